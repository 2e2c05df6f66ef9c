"""GPT pre-training samples over an indexed dataset, with Megatron-LM's sample order.

Sample i holds `seq_len + 1` tokens cut across document boundaries (inputs are the first seq_len,
labels the last seq_len). Documents of a split are a contiguous range of the dataset's sequences
(Megatron-LM's "documents" for GPT data are the sequences of the .idx). The order comes from the
document, sample and shuffle indices of megaevo.data.indices, cached on disk.
"""
from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

from megaevo.data import DataError
from megaevo.data.cache import cached_arrays, dataset_fingerprint
from megaevo.data.indexed import IndexedDataset
from megaevo.data.indices import TooFewTokensError, build_gpt_indices, plan_epochs

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str | Sequence[float]) -> list[float]:
    """'98,1,1' (or '98/1/1', or a list) -> three weights summing to 1; missing parts are 0."""
    weights = [float(w) for w in _split_parts(split)]
    if not 1 <= len(weights) <= 3:
        raise DataError(f"split {split!r}: expected one to three parts (train, valid, test)")
    weights += [0.0] * (3 - len(weights))
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise DataError(f"split {split!r}: parts must be non-negative and not all zero")
    total = sum(weights)
    return [w / total for w in weights]


def _split_parts(split: str | Sequence[float]) -> list[str]:
    """The parts of a split as written ('98', '0.01'), checked to be numbers."""
    try:
        parts = split.replace("/", ",").split(",") if isinstance(split, str) else [str(w) for w in split]
        parts = [p.strip() for p in parts if p.strip()]
        [float(p) for p in parts]
    except (TypeError, ValueError):
        raise DataError(f"split {split!r}: expected numbers like '98,1,1'") from None
    return parts


def split_share(split: str | Sequence[float], which: str) -> str:
    """The share of split part `which` (train, valid or test) as written: '1/1000' for the test
    part of '998,1,1'; 'all' or 'none' for a part that takes everything or nothing."""
    parse_split(split)  # the errors of a malformed split
    parts = [Fraction(p) for p in _split_parts(split)]
    parts += [Fraction(0)] * (3 - len(parts))
    share = parts[SPLIT_NAMES.index(which)] / sum(parts)
    if share in (0, 1):
        return "all" if share else "none"
    if share.denominator > 100_000:
        return f"{float(share):.4%}"
    return f"{share.numerator}/{share.denominator}"


def format_split(split: str | Sequence[float]) -> str:
    """A split as one would write it in a config: '998,1,1'."""
    return ",".join(p.removesuffix(".0") for p in _split_parts(split))


SPLIT_ROUNDINGS = ("megatron", "megatron-legacy")


def split_ranges(
    num_documents: int, split: str | Sequence[float], rounding: str = "megatron"
) -> dict[str, tuple[int, int]]:
    """Document ranges [begin, end) of train, valid and test.

    "megatron" (the default) is Megatron-LM core's rule: the weights are normalised to sum to 1,
    summed cumulatively (0, w0, w0 + w1, ...) and each bound is rounded on its own,
    `int(round(cumulative * num_documents))` with Python's round (ties to even). Adjacent splits
    share a bound, so the ranges are contiguous; a part of weight 0 is an empty range.
    "megatron-legacy" is the older rule (Megatron-LM's `get_train_valid_test_split_`): each part's
    size is rounded, the sizes are summed, and the excess over num_documents is taken off every
    bound after the first.
    """
    weights = parse_split(split)
    n = float(num_documents)
    if rounding == "megatron":
        cumulative = [0.0]
        for w in weights:
            cumulative.append(cumulative[-1] + w)
        bounds = [0] + [int(round(c * n)) for c in cumulative[1:]]
        bounds[-1] = min(bounds[-1], num_documents)  # never past the end, whatever the float error
    elif rounding == "megatron-legacy":
        bounds = [0]
        for w in weights:
            bounds.append(bounds[-1] + int(round(w * n)))
        excess = bounds[-1] - num_documents
        bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    else:
        raise DataError(f"split rounding {rounding!r}: expected one of {', '.join(SPLIT_ROUNDINGS)}")
    return {name: (bounds[i], bounds[i + 1]) for i, name in enumerate(SPLIT_NAMES)}


class GPTDataset:
    """`num_samples` samples (one epoch's worth when None) from documents [begin, end) of `indexed`.

    Item i is an int64 array of seq_len + 1 tokens. The indices cover every whole sample of the
    epochs needed (a few more than asked for); the dataset shows the first num_samples of them.
    """

    def __init__(
        self,
        indexed: IndexedDataset | str | os.PathLike,
        seq_len: int,
        num_samples: int | None,
        seed: int,
        document_range: tuple[int, int] | None = None,
        split: str = "train",
        cache_dir: str | os.PathLike | None = None,
        impl: str = "cpp",
        name: str | None = None,
    ):
        self.indexed = indexed if isinstance(indexed, IndexedDataset) else IndexedDataset(indexed)
        n = len(self.indexed)
        begin, end = document_range if document_range is not None else (0, n)
        if not 0 <= begin < end <= n:
            raise DataError(f"{self.indexed.prefix}: document range [{begin}, {end}) is empty or outside [0, {n})")
        if num_samples is not None and num_samples < 1:
            raise DataError(f"{self.indexed.prefix}: num_samples must be positive, got {num_samples}")
        self.name = name or Path(self.indexed.prefix).name
        self.seq_len, self.seed, self.split = int(seq_len), int(seed), split
        self.document_range = (begin, end)
        # Checked here, on every rank, before one rank builds the indices while the others wait.
        self.tokens = int(self.indexed.sequence_lengths[begin:end].sum(dtype=np.int64))
        try:
            plan_epochs(self.tokens, self.seq_len, num_samples)
        except TooFewTokensError as e:
            docs = f"{end - begin:,} document{'s' if end - begin != 1 else ''}"
            raise TooFewTokensError(f"{self.name} ({self.indexed.prefix}), {split} split of {docs} "
                                    f"[{begin}, {end}): {e}", e.tokens, e.sample_tokens) from None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path(self.indexed.prefix).parent / "cache"
        self.description = {
            "dataset": dataset_fingerprint(self.indexed.idx_path),
            "split": split,
            "document_range": [begin, end],
            "seq_len": self.seq_len,
            "num_samples": num_samples,
            "seed": self.seed,
            "add_extra_token": 1,
        }

        def build() -> dict[str, np.ndarray]:
            idx = build_gpt_indices(
                self.indexed.sequence_lengths, np.arange(begin, end, dtype=np.int32), self.seq_len, num_samples,
                self.seed, impl=impl,
            )
            return {"document_index": idx.document_index, "sample_index": idx.sample_index,
                    "shuffle_index": idx.shuffle_index}

        arrays = cached_arrays(self.cache_dir, "GPTDataset", self.description,
                               ["document_index", "sample_index", "shuffle_index"], build)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        self.num_samples = len(self.shuffle_index) if num_samples is None else num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"{self.name}: sample {i} out of range ({len(self)} samples)")
        return self.tokens_at(int(self.shuffle_index[i]))

    def tokens_at(self, j: int) -> np.ndarray:
        """Sample j in unshuffled order: the tokens between sample_index rows j and j + 1."""
        (d0, off0), (d1, off1) = self.sample_index[j], self.sample_index[j + 1]
        d0, off0, d1, off1 = int(d0), int(off0), int(d1), int(off1)
        get, docs = self.indexed.get, self.document_index
        if d0 == d1:
            parts = [get(int(docs[d0]), off0, off1 - off0 + 1)]
        else:
            parts = [get(int(docs[d0]), off0)]
            parts += [get(int(docs[d]), 0) for d in range(d0 + 1, d1)]
            parts.append(get(int(docs[d1]), 0, off1 + 1))
        out = np.concatenate(parts).astype(np.int64, copy=False)
        if len(out) != self.seq_len + 1:
            raise RuntimeError(f"{self.name}: sample {j} has {len(out)} tokens, expected {self.seq_len + 1}")
        return out
