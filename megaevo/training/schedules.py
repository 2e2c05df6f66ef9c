"""Learning-rate schedules by iteration, as pure functions of the step.

`lr_at(step, optim, total_iters)` is the learning rate of the update made at iteration `step`,
counted as Megatron-LM counts it: `step` is the number of updates already made, so the first
update uses step 0 and the last of a run of `total_iters` uses step total_iters - 1. Warmup rises
linearly from 0 at step 0 to `optim.lr` at step `optim.warmup` (the first update of a run with
warmup is therefore made at learning rate 0, as in Megatron-LM). Decays reach `min_lr` at step
`total_iters` and stay there. Nothing is stateful: a run resumed at step k gets lr_at(k).

A warmup longer than the run (a shortened run) is allowed, as in Megatron-LM: the rate keeps rising
until the run ends, never reaching `lr`, and the phases after the warmup never start. A phase that
would begin at or after `total_iters` (a wsd decay or an inf-cos anneal squeezed out by the warmup)
does not begin.

Schedules (`optim.schedule`):
  constant  warmup, then lr.
  cosine    warmup, then cosine from lr to min_lr at `decay_iters` (default: total_iters).
  linear    warmup, then a straight line from lr to min_lr at `decay_iters`.
  wsd       warmup, stable at lr, then decay to min_lr over the final `decay_fraction` of the
            run, shaped by `decay_style` (linear, cosine, sqrt = 1 - sqrt, exp = geometric).
  inf-cos   the infinite schedule of Ibrahim et al. (2024): warmup, cosine cool-down from lr to
            `constant_lr` over `cooldown_iters`, constant, then an anneal to min_lr over the final
            `anneal_iters` (default: `anneal_fraction` of the run), shaped by `anneal_style`
            (default exp: constant_lr · (min_lr / constant_lr) ** progress).
"""
from __future__ import annotations

import math

from megaevo.config import OptimConfig

SCHEDULES = ("constant", "cosine", "linear", "wsd", "inf-cos")
DECAY_STYLES = ("linear", "cosine", "sqrt", "exp")


def check_schedule(optim: OptimConfig) -> None:
    """Raise ValueError when `optim` names an unknown schedule or decay shape, or lacks a setting."""
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: unknown learning-rate schedule {optim.schedule!r}; "
                         f"expected one of {', '.join(SCHEDULES)}")
    for name in ("decay_style", "anneal_style"):
        if getattr(optim, name) not in DECAY_STYLES:
            raise ValueError(f"optim.{name}: unknown decay shape {getattr(optim, name)!r}; "
                             f"expected one of {', '.join(DECAY_STYLES)}")
    if optim.schedule == "inf-cos" and optim.constant_lr is None:
        raise ValueError("optim.schedule=inf-cos needs optim.constant_lr")


def decay(progress: float, start: float, end: float, style: str) -> float:
    """A value going from `start` (progress 0) to `end` (progress 1) with the given shape."""
    p = min(max(progress, 0.0), 1.0)
    if p >= 1.0:
        return end
    if style == "linear":
        return end + (start - end) * (1.0 - p)
    if style == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    if style == "sqrt":
        return end + (start - end) * (1.0 - math.sqrt(p))
    if style == "exp":
        if start <= 0 or end <= 0:
            raise ValueError(f"an exponential decay needs positive learning rates, got {start} -> {end}")
        return start * (end / start) ** p
    raise ValueError(f"unknown decay shape {style!r}; expected one of {', '.join(DECAY_STYLES)}")


def lr_at(step: int, optim: OptimConfig, total_iters: int) -> float:
    """The learning rate of the update made after `step` updates (see the module docstring)."""
    check_schedule(optim)
    lr, min_lr, warmup = optim.lr, optim.min_lr, max(optim.warmup, 0)
    step = max(step, 0)
    if step < warmup:
        return lr * step / warmup
    if optim.schedule == "constant":
        return lr
    if optim.schedule in ("cosine", "linear"):
        end = optim.decay_iters if optim.decay_iters is not None else total_iters
        if step >= end:  # also every step after a warmup that outlasts the decay
            return min_lr
        return decay((step - warmup) / (end - warmup), lr, min_lr, optim.schedule)  # warmup <= step < end
    if optim.schedule == "wsd":
        length = round(optim.decay_fraction * total_iters)
        start = max(warmup, total_iters - length)
        if length <= 0 or step <= start or start >= total_iters:  # no decay, not yet, or squeezed out
            return lr
        return decay((step - start) / (total_iters - start), lr, min_lr, optim.decay_style)
    return _inf_cos(step, optim, total_iters)


def _inf_cos(step: int, optim: OptimConfig, total_iters: int) -> float:
    constant = optim.constant_lr
    warmup, cooldown = max(optim.warmup, 0), max(optim.cooldown_iters, 0)
    cooled = warmup + cooldown
    length = optim.anneal_iters if optim.anneal_iters is not None else round(optim.anneal_fraction * total_iters)
    anneal_start = max(cooled, total_iters - length)
    if length > 0 and step >= anneal_start and anneal_start < total_iters:
        return decay((step - anneal_start) / (total_iters - anneal_start), constant, optim.min_lr, optim.anneal_style)
    if step < cooled:  # so cooldown > 0, as step >= warmup here
        return decay((step - warmup) / cooldown, optim.lr, constant, "cosine")
    return constant
