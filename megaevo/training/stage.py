"""What differs per training stage, as the one engine (megaevo.training.trainer) sees it.

A stage is data and a loss:

* a :class:`BatchSource` yields each step's micro-batches for this data-parallel rank as named
  tensors — ``tokens`` and ``labels`` (batch, seq), and as the stage needs them ``loss_mask``
  (per-token weights), ``position_ids`` and ``doc_ids`` — and can save and restore its position;
* a :class:`LossFunction` runs the head of the last pipeline stage on a micro-batch and returns
  ``(loss_sum, count)``. It also says, from the micro-batch alone, what ``count`` will be, so the
  engine can sum the counts of the whole step over every micro-batch and data-parallel rank (one
  all-reduce, before any backward) and divide by that global count. Gradient accumulation and data
  parallelism then never change the loss, however unevenly the loss tokens fall.

Beside them a :class:`Stage` declares everything else it may do, each with a default the engine
calls unconditionally: :meth:`Stage.start` (once a run's starting weights are in place),
:meth:`Stage.run_iteration` (one iteration; by default one update of the actor on the next step's
batches), :meth:`Stage.units` (further train units, e.g. PPO's critic), :meth:`Stage.checkpoint_tensors`
and :meth:`Stage.load_checkpoint` (their state in checkpoints). The engine hands a stage what it
may use through a :class:`StageContext`.

The stages themselves (pre-training, SFT, RL) are registered in :mod:`megaevo.stages`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from megaevo.common import IGNORE_INDEX
from megaevo.config import ConfigError
from megaevo.data.sampler import MicroBatchSampler
from megaevo.parallel.state import ParallelState
from megaevo.checkpoint import LoadedCheckpoint
from megaevo.training.unit import TrainUnit

Batch = dict[str, torch.Tensor]


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
class StageContext:
    """What the engine gives a stage: the actor's train unit (the model being trained), the parallel
    state, the device, and ``iteration``, the count of iterations done (the one about to run is
    ``iteration + 1``)."""

    actor: TrainUnit
    state: ParallelState
    device: torch.device
    iteration: int = 0


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

    def units(self) -> list[TrainUnit]:
        """Train units the stage trains beside the actor (they share the engine's stop request)."""
        return []

    def start(self, ctx: StageContext, loaded: bool) -> None:
        """Called once before a run's first iteration, when its starting weights are in place; ``loaded``:
        whether they came from a checkpoint (:meth:`load_checkpoint` was called)."""

    def run_iteration(self, ctx: StageContext, lr: float) -> dict:
        """Run one iteration at learning rate ``lr``: ``{"loss", "grad_norm", "skipped"}`` and optionally
        ``"metrics"``, a dict merged into the logged record (it may replace ``tokens`` and ``tokens_per_s``).
        By default one update of the actor on the next step's batches."""
        loss, result = ctx.actor.update(self.train.next_step(), self.loss, lr)
        return {"loss": loss, "grad_norm": result.grad_norm if result else float("nan"),
                "skipped": result is None or result.skipped}

    def checkpoint_tensors(self) -> dict[str, dict[str, tuple]]:
        """Further tensors saved with each checkpoint, ``{kind: {name: (local tensor, fragments, logical
        shape)}}``, under kinds of their own (never ``model``, so exports see only the model); collective
        over the job like the optimizer's state. By default those of :meth:`units`."""
        out: dict[str, dict[str, tuple]] = {}
        for unit in self.units():
            out.update(unit.checkpoint_tensors())
        return out

    def load_checkpoint(self, ck: LoadedCheckpoint, resume: bool) -> None:
        """Called once a checkpoint's weights are loaded into the actor; ``resume`` false when only the
        weights are taken (``checkpoint.finetune``)."""


class SampleBatches:
    """This DP rank's micro-batches of an indexable stream of samples (numpy rows of named arrays),
    positioned by the count of consumed samples: global sample ``k`` of the run is ``samples[k]``, and
    a resumed run (also on another layout with the same global batch) reads what an uninterrupted one
    reads. ``collate`` stacks a micro-batch's rows into tensors; ``what`` names the data in errors."""

    def __init__(self, samples, *, micro_batch_size: int, micro_batches: int, state, device: torch.device,
                 vocab_size: int, collate: Callable[[list], Batch], what: str = "data", consumed_samples: int = 0):
        self.samples, self.micro_batch_size, self.micro_batches = samples, micro_batch_size, micro_batches
        self.state, self.device, self.vocab_size = state, device, vocab_size
        self.collate, self.what = collate, what
        self.consumed_samples = consumed_samples

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch_size * self.state.dp_size * self.micro_batches

    def batches(self, consumed: int, count: int) -> list[Batch]:
        """``count`` micro-batches of this DP rank starting at global sample ``consumed``."""
        stride = self.micro_batch_size * self.state.dp_size
        sampler = MicroBatchSampler(consumed + count * stride, consumed, self.micro_batch_size,
                                    self.state.dp_rank, self.state.dp_size)
        out = []
        for indices in sampler:
            batch = self.collate([self.samples[i] for i in indices])
            top = int(batch["tokens"].max())
            if top >= self.vocab_size:
                raise ConfigError(f"the {self.what} holds token id {top} but model.vocab_size is {self.vocab_size}: "
                                  f"use the tokenizer the model was sized for, or raise model.vocab_size")
            out.append({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        return out

    def next_step(self) -> list[Batch]:
        out = self.batches(self.consumed_samples, self.micro_batches)
        self.consumed_samples += self.samples_per_step
        return out

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])


class TokenLoss:
    """The mean next-token loss over the labels that count: ``labels != IGNORE_INDEX``, weighted by the
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
