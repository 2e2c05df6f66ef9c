"""Each data-parallel rank's micro-batches, as a function of consumed samples alone.

Global sample order is the dataset's order. Consecutive groups of micro_batch_size * dp_size
samples form one micro-batch per rank (rank r takes the r-th slice); a global batch is
global_batch_size / (micro_batch_size * dp_size) such groups. Starting at consumed = k yields
exactly the micro-batches that an uninterrupted run yields from sample k on, so resuming needs
nothing but the count of consumed samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from megaevo.data import DataError


@dataclass
class MicroBatchSampler:
    total_samples: int
    consumed_samples: int
    micro_batch_size: int
    dp_rank: int = 0
    dp_size: int = 1

    def __post_init__(self):
        if self.micro_batch_size < 1 or self.dp_size < 1:
            raise ValueError("micro_batch_size and dp_size must be positive")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {self.dp_rank} is outside [0, {self.dp_size})")
        if self.consumed_samples < 0:
            raise DataError(f"consumed_samples must be non-negative, got {self.consumed_samples}")
        if self.consumed_samples % self.stride:
            raise DataError(
                f"consumed_samples {self.consumed_samples} is not a multiple of micro_batch_size x dp_size "
                f"({self.stride}): it must fall on a micro-batch boundary"
            )

    @property
    def stride(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        return max(0, (self.total_samples - self.consumed_samples) // self.stride)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        for k in range(len(self)):
            first = start + k * self.stride
            yield list(range(first, first + self.micro_batch_size))


def collate(samples: Sequence[np.ndarray]) -> dict:
    """Stack samples of seq_len + 1 tokens into next-token `tokens` and `labels` (torch int64)."""
    import torch

    batch = torch.from_numpy(np.stack([np.asarray(s, dtype=np.int64) for s in samples]))
    return {"tokens": batch[:, :-1].contiguous(), "labels": batch[:, 1:].contiguous()}
