"""Pre-training and continued pre-training: GPT samples from a blend, the mean next-token loss.

Samples come from :func:`megaevo.data.blended.build_datasets` (a blend of corpora, e.g. 95% domain
data and 5% replay); the position in them is the count of consumed samples, so a resumed run (also
on another layout with the same global batch) reads exactly what an uninterrupted run reads.
Validation reports a loss per corpus.
"""
from __future__ import annotations

import torch

from megaevo.config import Config, ConfigError, Layout
from megaevo.data.blended import build_datasets
from megaevo.data.sampler import MicroBatchSampler, collate
from megaevo.parallel.state import ParallelState
from megaevo.stages import Batch, Stage, TokenLoss


class GPTBatches:
    """This DP rank's micro-batches of GPT samples, positioned by the count of consumed samples."""

    def __init__(self, dataset, *, micro_batch_size: int, micro_batches: int, state: ParallelState,
                 device: torch.device, vocab_size: int, consumed_samples: int = 0):
        self.dataset, self.micro_batch_size, self.micro_batches = dataset, micro_batch_size, micro_batches
        self.state, self.device, self.vocab_size = state, device, vocab_size
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
            batch = collate([self.dataset[i] for i in indices])
            top = int(batch["tokens"].max())
            if top >= self.vocab_size:
                raise ConfigError(f"the data holds token id {top} but model.vocab_size is {self.vocab_size}: "
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


def pretrain_stage(cfg: Config, layout: Layout, state: ParallelState, device: torch.device) -> Stage:
    """The pre-training (or CPT) stage of ``cfg``: its training blend and per-corpus validation sets."""
    t = cfg.train
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give the training data, e.g. data.train=[1.0, path/to/prefix]")
    splits = build_datasets(cfg.data.train, cfg.seq_len, t.seed, t.iters * t.global_batch_size,
                            t.eval_iters * t.global_batch_size, None, cfg.data.split, cfg.data.valid or None,
                            cfg.data.cache_dir)
    common = dict(micro_batch_size=t.micro_batch_size, micro_batches=layout.micro_batches_per_step, state=state,
                  device=device, vocab_size=cfg.model.vocab_size)
    valid = {}
    for name, ds in splits.valid.items():
        steps = min(t.eval_iters, len(ds) // t.global_batch_size)
        if steps:
            source = GPTBatches(ds, **common)
            valid[name] = lambda source=source, steps=steps: source.batches(0, steps * source.micro_batches)
    return Stage("pretrain", GPTBatches(splits.train, **common), TokenLoss(), tokens_per_sample=cfg.seq_len,
                 valid=valid)
