"""What differs per stage, plugged into the one training engine (megaevo.training.trainer).

A stage is data and a loss:

* a :class:`BatchSource` yields each step's micro-batches for this data-parallel rank as named
  tensors — ``tokens`` and ``labels`` (batch, seq), and as the stage needs them ``loss_mask``
  (per-token weights), ``position_ids`` and ``doc_ids`` — and can save and restore its position;
* a :class:`LossFunction` runs the head of the last pipeline stage on a micro-batch and returns
  ``(loss_sum, count)``. It also says, from the micro-batch alone, what ``count`` will be, so the
  engine can sum the counts of the whole step over every micro-batch and data-parallel rank (one
  all-reduce, before any backward) and divide by that global count. Gradient accumulation and data
  parallelism then never change the loss, however unevenly the loss tokens fall.

Pre-training and continued pre-training are :mod:`megaevo.stages.pretrain`; supervised fine-tuning
(packed conversations with loss masks) is :mod:`megaevo.stages.sft`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

Batch = dict[str, torch.Tensor]
IGNORE_INDEX = -100


class BatchSource(Protocol):
    def next_step(self) -> list[Batch]:
        """This DP rank's micro-batches of the next step (already on the training device)."""

    def state_dict(self) -> dict:
        """The position of the source, JSON-serialisable (saved in checkpoints)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position given by :meth:`state_dict`."""


class LossFunction(Protocol):
    def count(self, batch: Batch) -> torch.Tensor:
        """What the loss of ``batch`` is summed over (e.g. its loss tokens), known before the forward."""

    def __call__(self, chunk: torch.nn.Module, x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the last model chunk on ``x`` and return ``(loss_sum, count)`` for ``batch``."""


@dataclass
class Stage:
    """A stage as the engine sees it.

    ``valid`` maps a validation set's name to a function giving this DP rank's micro-batches of one
    evaluation (the loss is reported as ``val/NAME``). ``tokens_per_sample`` is what throughput and
    the ``tokens`` counter count per sample of the global batch. ``iters``: the run's length when
    the stage counts it from its data (``train.epochs``); None leaves it to ``train.iters``.
    """

    name: str
    train: BatchSource
    loss: LossFunction
    tokens_per_sample: int
    valid: dict[str, Callable[[], list[Batch]]] = field(default_factory=dict)
    iters: int | None = None


class TokenLoss:
    """The mean next-token loss over the labels that count: ``labels != -100``, weighted by the
    batch's ``loss_mask`` when it has one (0/1 masks or per-token weights)."""

    def count(self, batch: Batch) -> torch.Tensor:
        keep = (batch["labels"] != IGNORE_INDEX).to(torch.float64)
        if "loss_mask" in batch:
            keep = keep * batch["loss_mask"].to(torch.float64)
        return keep.sum()

    def __call__(self, chunk, x, batch):
        per_token = chunk(x, batch["labels"], position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"))
        if "loss_mask" in batch:
            per_token = per_token * batch["loss_mask"].to(per_token.dtype)
        return per_token.float().sum(), self.count(batch)


class MicroBatchMeanLoss:
    """Each micro-batch's mean over its own loss tokens (as :class:`TokenLoss` weighs them), averaged
    over the step's micro-batches and DP ranks: the per-micro-batch mean many fine-tuning recipes use.

    A micro-batch counts 1 and returns its mean; one without loss tokens counts 0 and returns zero, so
    it neither adds to the average nor dilutes it (and never gives NaN)."""

    def __init__(self):
        self.tokens = TokenLoss()

    def count(self, batch: Batch) -> torch.Tensor:
        return (self.tokens.count(batch) > 0).to(torch.float64)

    def __call__(self, chunk, x, batch):
        loss_sum, tokens = self.tokens(chunk, x, batch)
        return loss_sum / tokens.clamp_min(1).to(loss_sum.dtype), (tokens > 0).to(torch.float64)
