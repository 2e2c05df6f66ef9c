"""Validation and the one resolve step.

:func:`resolve` computes every value a run derives from its config and its world size, once: absolute
paths, the rollout batch of `stage: rl` as the global batch, the run's length (`iters`, when a stage
counted `train.epochs`), `optim.warmup` from `optim.warmup_fraction` and the critic's from its own, and the
parallel layout. A resolved config resolves to itself. Each section's checks live beside it (sections, sft,
rl); this module runs them in one order and lists every problem in one ConfigError. Nothing here reads the
environment: what is worth a warning is logged where `rank` is 0.
"""
from __future__ import annotations

import dataclasses

from megaevo.config.io import absolute_paths
from megaevo.config.rl import resolve_critic_warmup, rl_errors, rollout_batch_errors, with_rl_batch
from megaevo.config.root import Config, Layout
from megaevo.config.sections import (model_errors, optim_errors, optim_warnings, resolve_warmup,
                                     train_errors)
from megaevo.config.sft import epochs_errors, sft_errors
from megaevo.configio import ConfigError, errors_message
from megaevo.log import get_logger

log = get_logger("megaevo.config")


@dataclasses.dataclass(frozen=True)
class Checked:
    """What checking a config gives: the config with its derived values, its layout (None when the
    layout checks failed), and the messages: problems (errors) and what is allowed but worth saying."""

    cfg: Config
    layout: Layout | None
    errors: list[str]
    warnings: list[str]


def resolve(cfg: Config, world_size: int, *, iters: int | None = None, rank: int = 0) -> tuple[Config, Layout]:
    """`cfg` with every derived value computed, and its layout on `world_size` processes.

    `iters`: the run's length in iterations when a stage counted it from `train.epochs` (it becomes
    `train.iters`); otherwise the length is `train.iters` unless `train.epochs` is set, and the checks
    and values that need the length wait for it. Raises ConfigError listing every problem; warnings
    (such as a warmup longer than the run) are logged when `rank` is 0.
    """
    checked = _raised(check(absolute_paths(cfg), world_size, iters=iters), rank)
    return checked.cfg, checked.layout


def check(cfg: Config, world_size: int, *, iters: int | None = None) -> Checked:
    """The checks and derived values of :func:`resolve` but the paths, raising and logging nothing: `cfg`
    as given with its rollout batch, length and warmups resolved, and every message about it."""
    cfg = with_rl_batch(cfg)
    if iters is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, iters=int(iters)))
    length = _length(cfg, iters)
    if length is not None:
        cfg = _with_warmups(cfg, length)
    errors = model_errors(cfg) + optim_errors(cfg.optim, length) + train_errors(cfg)
    errors += (rl_errors(cfg) if cfg.stage == "rl" else []) + epochs_errors(cfg) + sft_errors(cfg)
    world_errors, layout = _world_errors(cfg, world_size)
    return Checked(cfg, layout, errors + world_errors, optim_warnings(cfg.optim, length))


def validate(cfg: Config, world_size: int, *, rank: int = 0) -> Layout:
    """Check that `cfg` can run on `world_size` processes; return the layout (see :func:`resolve`).

    Raises ConfigError listing every problem found, each saying which setting to change. The
    model's shape and its split over TP and PP are checked by megaevo.model.args (shape_errors,
    layout_errors), as the model builder and the converters check them.
    """
    return _raised(check(cfg, world_size), rank).layout


def with_iters(cfg: Config, iters: int, *, rank: int = 0) -> Config:
    """A copy of `cfg` running `iters` iterations (the count `train.epochs` comes to), with
    `optim.warmup` resolved from `optim.warmup_fraction` when that is set, its learning-rate schedule
    checked against that length."""
    out = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, iters=int(iters)))
    out = _with_warmups(out, out.train.iters)
    _raised(Checked(out, None, optim_errors(out.optim, out.train.iters),
                    optim_warnings(out.optim, out.train.iters)), rank)
    return out


def _length(cfg: Config, iters: int | None) -> int | None:
    """The run's length in iterations: `iters` when given, else `train.iters` unless `train.epochs` is set
    (then it is known once the stage has read its data)."""
    if iters is not None:
        return int(iters)
    return cfg.train.iters if cfg.train.epochs is None else None


def _with_warmups(cfg: Config, iters: int) -> Config:
    """`cfg` with the warmups given as fractions of a run of `iters` iterations counted in iterations."""
    cfg = dataclasses.replace(cfg, optim=resolve_warmup(cfg.optim, iters))
    if cfg.stage == "rl" and cfg.rl.algorithm == "ppo":  # the runs that train a critic
        cfg = dataclasses.replace(cfg, rl=resolve_critic_warmup(cfg.rl, iters))
    return cfg


def _raised(checked: Checked, rank: int) -> Checked:
    """`checked`, its warnings logged when `rank` is 0 (said once per run); ConfigError listing its errors."""
    if rank == 0:
        for text in checked.warnings:
            log.warning(text)
    if checked.errors:
        raise ConfigError(errors_message(checked.errors))
    return checked


def _world_errors(cfg: Config, world_size: int) -> tuple[list[str], Layout | None]:
    """The checks of the layout that are not about the model's shape: world size, batch sizes."""
    p, t, errors = cfg.parallel, cfg.train, []
    if not all(isinstance(x, int) and x >= 1 for x in (p.tp, p.pp, p.virtual_pp)):
        return errors, None  # layout_errors says so
    if world_size < 1 or world_size % (p.tp * p.pp):
        errors.append(f"world size {world_size} is not a multiple of TP × PP = {p.tp} × {p.pp} = {p.tp * p.pp}: "
                      f"launch a multiple of {p.tp * p.pp} processes or change parallel.tp / parallel.pp")
    if p.sequence_parallel and cfg.seq_len % p.tp:
        errors.append(f"data.seq_len={cfg.seq_len} is not divisible by parallel.tp={p.tp}, "
                      f"which sequence_parallel needs: change data.seq_len or turn parallel.sequence_parallel off")
    if world_size < 1 or world_size % (p.tp * p.pp) or t.micro_batch_size < 1 or t.global_batch_size < 1:
        return errors, None
    dp = world_size // (p.tp * p.pp)
    if cfg.stage == "rl" and cfg.rl.mini_batches >= 1 and cfg.rl.n >= 1:  # the rollout batch is derived
        errors += rollout_batch_errors(cfg, dp)
        if errors:
            return errors, None
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        lower = max(per_step, t.global_batch_size // per_step * per_step)
        errors.append(f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size × DP "
                      f"= {t.micro_batch_size} × {dp} = {per_step}: use a multiple of {per_step} "
                      f"(e.g. {lower} or {lower + per_step}) or change train.micro_batch_size")
        return errors, None
    micro_batches = t.global_batch_size // per_step
    if p.virtual_pp > 1 and micro_batches % p.pp:
        errors.append(f"the interleaved pipeline (parallel.virtual_pp={p.virtual_pp}) needs the micro-batches per step "
                      f"({micro_batches}) to be a multiple of parallel.pp={p.pp}: change train.global_batch_size")
    return errors, Layout(world_size, p.tp, p.pp, dp, p.virtual_pp, micro_batches)
