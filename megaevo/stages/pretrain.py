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
from megaevo.data.sampler import collate
from megaevo.parallel.state import ParallelState
from megaevo.training.stage import SampleBatches, Stage, TokenLoss


class GPTBatches(SampleBatches):
    """This DP rank's micro-batches of GPT samples, positioned by the count of consumed samples."""

    def __init__(self, dataset, **kwargs):
        super().__init__(dataset, collate=collate, **kwargs)
        self.dataset = dataset


def pretrain_stage(cfg: Config, layout: Layout, state: ParallelState, device: torch.device) -> Stage:
    """The pre-training (or CPT) stage of ``cfg``: its training blend and per-corpus validation sets."""
    t = cfg.train
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give the training data, e.g. data.train=[1.0, path/to/prefix]")
    samples = t.iters * t.global_batch_size
    if cfg.data.train_samples is not None:
        if cfg.data.train_samples < samples:
            raise ConfigError(f"data.train_samples={cfg.data.train_samples} is below the run's {samples} samples "
                              f"(train.iters={t.iters} x train.global_batch_size={t.global_batch_size})")
        samples = cfg.data.train_samples
    splits = build_datasets(cfg.data.train, cfg.seq_len, t.seed, samples,
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
