"""The arithmetic of PPO and GRPO: advantages, KL estimators, policy and value losses, loss aggregation.

Pure functions of tensors, with no model in them. Every per-token tensor is ``(batch, seq)`` over whole
sequences (prompt and response) and aligned to the same positions: position ``t`` holds the log-probability
of token ``t``, its value estimate, its reward. A ``mask`` (``response_mask``) marks the response tokens, the
only ones that count; it may be bool or 0/1 of any dtype. What a function given a mask returns per token is
0 outside it.

Statistics and losses leave a step as sums and counts (:class:`SumCount`, or the ``(weights, count)`` of
:func:`aggregation`) so that adding them over micro-batches and data-parallel ranks, as the engine does with
its ``(loss_sum, count)`` pairs, gives the exact mean of the whole step.

How the pieces compose (``mask`` the response mask, ``scores`` one reward per sequence):

* GRPO: ``advantages = grpo_advantages(scores, n)[:, None] * mask``;
* PPO: ``rewards = token_level_rewards(scores, mask) − β · kl_penalty(old_logp, ref_logp, "k1") * mask``,
  ``advantages, returns = gae(rewards, values, mask, γ, λ)``, then
  ``advantages = masked_whiten(advantages, mask, group=dp_group)``;
* the loss of a micro-batch, as the engine's ``(loss_sum, count)``: ``per_token, stats = policy_loss(...)``
  (plus ``β · kl_penalty(logp, ref_logp, "k3")`` for a KL loss term, times
  ``truncated_importance_weights(...)`` for rollouts from another engine), then
  ``aggregate(per_token, mask, mode, max_response_len)``; the loss's ``count(batch)`` is
  ``aggregation(mask, mode, max_response_len)[1]``.

Conventions chosen here:

* standard deviations are the unbiased ones (Bessel's correction, as ``torch.std``): GRPO's group std and
  the variance in :func:`masked_whiten` and :func:`explained_variance`;
* ``approx_kl`` in :func:`policy_loss` is ``½(logp − old_logp)²`` (the k2 estimator: never negative, so
  positive and negative log-ratios do not cancel in the mean);
* ``clipfrac`` counts the tokens whose clipped surrogate was the larger (so the one used), i.e. the tokens
  whose gradient the clip removed; ties (ratio inside the range) are not clipped;
* log-ratios are clamped to ±20 before ``exp`` in :func:`policy_loss` and the k3 estimator, so one extreme
  token gives a large finite number instead of ``inf``; k3 itself is clamped to at most 10 per token (as
  verl and NeMo-RL do), so a token the reference finds far less likely cannot outweigh the rest of the
  batch (such a token then adds no gradient to a KL loss term).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from megaevo.parallel import compat

LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0  # the most one token's k3 estimate counts
AGGREGATION_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


class SumCount(NamedTuple):
    """A mean kept as its numerator and denominator, so that it adds up exactly across micro-batches and
    ranks: ``SumCount(a1 + a2, n1 + n2)`` is the mean of both parts. Both are float64 scalars."""

    total: torch.Tensor
    count: torch.Tensor

    def mean(self) -> float:
        """total / count as a float (nan when count is 0)."""
        count = float(self.count)
        return float(self.total) / count if count else math.nan

    def __add__(self, other: "SumCount") -> "SumCount":  # type: ignore[override]
        return SumCount(self.total + other.total, self.count + other.count)


def _sum_count(values: torch.Tensor, mask: torch.Tensor) -> SumCount:
    m = mask.to(torch.float64)
    return SumCount((values.detach().to(torch.float64) * m).sum(), m.sum())


def _float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(like.dtype if like.is_floating_point() else torch.float32)


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values where mask, else exactly 0 (also where values is nan or inf)."""
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


# ---- advantages ------------------------------------------------------------------------------------------

def grpo_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantage of each sample: its reward minus its group's mean, divided by (group std + eps)
    when ``normalize_std`` (off is Dr. GRPO). ``rewards`` is (N,) with each prompt's ``group_size`` samples
    contiguous (N = prompts × group_size). The std is unbiased; a group whose rewards are all equal
    (also a group of one) gets exactly 0."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.detach().to(torch.float64).view(-1, group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    out = torch.where(constant, torch.zeros_like(centered), centered)
    return out.view(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


@torch.no_grad()
def gae(token_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens: ``(advantages, returns)``, (batch, seq).

    A right-to-left scan that skips the positions outside ``response_mask``, so the next step of a response
    token is the next response token of its row, wherever the responses start and end (left or right
    padding, or any other mask). After a row's last response token the value is 0 (the episode ends).
    ``δ_t = r_t + γ V_next − V_t``, ``A_t = δ_t + γλ A_next``, ``returns = A + V``; both 0 outside the mask.
    With γ = λ = 1, returns are the suffix sums of the rewards and advantages are returns − values."""
    if token_rewards.shape != values.shape or values.shape != response_mask.shape:
        raise ValueError(f"shapes differ: token_rewards {tuple(token_rewards.shape)}, values "
                         f"{tuple(values.shape)}, response_mask {tuple(response_mask.shape)}")
    dtype = torch.promote_types(torch.promote_types(token_rewards.dtype, values.dtype), torch.float32)
    r, v, m = token_rewards.to(dtype), values.to(dtype), response_mask.bool()
    next_value = torch.zeros(r.shape[0], dtype=dtype, device=r.device)
    next_adv = torch.zeros_like(next_value)
    advantages = torch.zeros_like(r)
    for t in reversed(torch.nonzero(m.any(dim=0)).squeeze(1).tolist()):  # the columns holding response tokens
        keep = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + gamma * lam * next_adv
        next_adv = torch.where(keep, adv, next_adv)
        next_value = torch.where(keep, v[:, t], next_value)
        advantages[:, t] = torch.where(keep, adv, torch.zeros_like(adv))
    returns = _masked(advantages + v, m)
    return advantages, returns


def _masked_moments(x: torch.Tensor, mask: torch.Tensor, group=None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, unbiased variance) of the masked elements of x over every rank of ``group`` (float64);
    the variance is 0 for fewer than two elements."""
    m = mask.to(torch.float64)
    xd = x.detach().to(torch.float64)
    first = torch.stack([(xd * m).sum(), m.sum()])
    if group is not None:
        compat.all_reduce(first, group=group)
    count = first[1]
    mean = first[0] / count.clamp(min=1.0)
    second = ((xd - mean) ** 2 * m).sum().reshape(1)
    if group is not None:
        compat.all_reduce(second, group=group)
    var = second[0] / (count - 1) if count > 1 else torch.zeros((), dtype=torch.float64, device=x.device)
    return count, mean, var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, group=None,
                  eps: float = 1e-8) -> torch.Tensor:
    """``(x − mean) / sqrt(var + eps)`` with the mean and (unbiased) variance of the masked elements of the
    whole global batch: with ``group`` (a torch.distributed process group, e.g. data parallel) the sums are
    all-reduced over it, so every rank whitens with the same statistics. Without ``shift_mean`` the mean is
    added back (only the scale changes). 0 outside the mask. Every rank of ``group`` must call it."""
    _, mean, var = _masked_moments(x, mask, group)
    xd = x.detach().to(torch.float64)
    out = (xd - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _masked(out, mask).to(x.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, group=None) -> float:
    """``1 − Var(returns − values) / Var(returns)`` over the masked tokens (of every rank of ``group`` when
    given): 1 for a perfect critic, 0 for one that predicts the mean, nan when the returns do not vary."""
    _, _, var_err = _masked_moments(returns.float() - values.float(), mask, group)
    _, _, var_ret = _masked_moments(returns, mask, group)
    if var_ret == 0:
        return math.nan
    return float(1.0 - var_err / var_ret)


def token_level_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(N, seq) rewards: each sequence's score on its last response token, 0 elsewhere. A row with no
    response tokens gets no reward at all (its score is dropped)."""
    if scores.dim() != 1 or scores.shape[0] != response_mask.shape[0]:
        raise ValueError(f"scores {tuple(scores.shape)} do not match response_mask {tuple(response_mask.shape)}")
    m = response_mask.bool()
    seq = m.shape[1]
    positions = torch.arange(seq, device=m.device).expand_as(m)
    last = torch.where(m, positions, torch.full_like(positions, -1)).amax(dim=1)  # -1: no response
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    out = torch.zeros(m.shape, dtype=dtype, device=m.device)
    has = last >= 0
    rows = torch.nonzero(has).squeeze(1)
    out[rows, last[has]] = scores.to(device=m.device, dtype=dtype)[has]
    return out


# ---- KL and importance weights ---------------------------------------------------------------------------

def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy ‖ reference) from tokens sampled from the policy (no mask applied:
    weigh it with the response mask). With ``d = logp − ref_logp``: ``k1 = d`` (unbiased, can be negative);
    ``k2 = ½ d²``; ``k3 = exp(−d) + d − 1`` (unbiased, never negative, low variance; ``d`` clamped to ±20
    and the estimate to at most :data:`K3_CLAMP`). All three are 0 where the policy equals the reference."""
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        neg = (-d).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # log(ref / policy)
        return (torch.expm1(neg) - neg).clamp(0.0, K3_CLAMP)
    raise ValueError(f"unknown KL estimator {estimator!r}: use one of {', '.join(KL_ESTIMATORS)}")


def token_mult_prob_error(rollout_logp: torch.Tensor, train_logp: torch.Tensor, mask: torch.Tensor) -> SumCount:
    """How far the rollout engine's token probabilities are from the trainer's: the mean over mask tokens
    of ``exp(|rollout_logp − train_logp|)`` (1 when they agree; a ratio of probabilities, ≥ 1)."""
    err = torch.exp((rollout_logp.detach().float() - train_logp.detach().float()).abs())
    return _sum_count(_masked(err, mask), mask)


def truncated_importance_weights(train_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """``min(exp(train_logp − rollout_logp), cap)``, detached: per-token weights that correct the policy
    loss for rollouts sampled by a different engine (multiply the per-token policy loss by them)."""
    if not cap > 0:
        raise ValueError(f"the importance weight cap must be positive, got {cap}")
    d = (train_logp.detach() - rollout_logp.detach()).float()
    return torch.exp(d.clamp(max=math.log(cap))).clamp(max=cap)


# ---- losses ----------------------------------------------------------------------------------------------

def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_low: float, clip_high: float, dual_clip: float | None = None
                ) -> tuple[torch.Tensor, dict[str, SumCount]]:
    """PPO's clipped surrogate per token: ``max(−A·r, −A·clip(r, 1 − clip_low, 1 + clip_high))`` with
    ``r = exp(logp − old_logp)``; with ``dual_clip = c > 1`` the loss of a negative-advantage token is also
    capped at ``−c·A``. Gradients flow through ``logp`` only. Returns the per-token loss (0 outside the
    mask) and stats as :class:`SumCount` over the mask tokens: ``clipfrac`` (tokens where the clip was
    active), ``dual_clipfrac`` (tokens where the dual-clip cap was active), ``approx_kl`` (½(logp − old)²)."""
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip ranges must not be negative, got clip_low={clip_low}, clip_high={clip_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be greater than 1, got {dual_clip}")
    adv = advantages.detach()
    log_ratio = (logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    dual_active = torch.zeros_like(clip_active)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual_active = (adv < 0) & (loss > cap)
        loss = torch.where(dual_active, cap.to(loss.dtype), loss)
    loss = _masked(loss, mask)
    stats = {
        "clipfrac": _sum_count(clip_active.float(), mask),
        "dual_clipfrac": _sum_count(dual_active.float(), mask),
        "approx_kl": _sum_count(_masked(0.5 * log_ratio.detach().float().square(), mask), mask),
    }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None) -> torch.Tensor:
    """The critic's per-token loss ``½ max((V − R)², (V_clipped − R)²)``, where ``V_clipped`` is ``values``
    kept within ``clip`` of ``old_values`` (no clipping when ``clip`` is None). 0 outside the mask."""
    returns = returns.detach()
    loss = (values - returns).square()
    if clip is not None:
        old = old_values.detach()
        v_clipped = old + (values - old).clamp(-clip, clip)
        loss = torch.maximum(loss, (v_clipped - returns).square())
    return _masked(0.5 * loss, mask)


# ---- aggregation -----------------------------------------------------------------------------------------

def aggregation(mask: torch.Tensor, mode: str = "token-mean",
                max_response_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights (batch, seq) and a count (a float64 scalar) for one micro-batch such that
    ``Σ (weights · per_token_loss) / Σ count``, both summed over every micro-batch and DP rank of a step
    (the engine's ``(loss_sum, count)``), is the step's loss under ``mode``. A sequence is a row with at
    least one mask token (rows without any, e.g. padding rows, neither weigh nor count). Modes:

    * ``token-mean``: the mean over every response token of the global batch;
    * ``seq-mean-token-sum``: the mean over sequences of each sequence's token sum;
    * ``seq-mean-token-mean``: the mean over sequences of each sequence's token mean;
    * ``seq-mean-token-sum-norm`` (Dr. GRPO): the sum over all tokens / (sequences × ``max_response_len``),
      a normaliser that does not depend on the response lengths (``max_response_len`` required).

    The count depends on the mask alone, so a loss's ``count(batch)`` can give it before the forward."""
    m = mask.to(torch.float32)
    tokens_per_seq = m.sum(dim=-1)
    sequences = (tokens_per_seq > 0).to(torch.float64).sum()
    if mode == "token-mean":
        return m, m.to(torch.float64).sum()
    if mode == "seq-mean-token-sum":
        return m, sequences
    if mode == "seq-mean-token-mean":
        return m / tokens_per_seq.clamp(min=1.0).unsqueeze(-1), sequences
    if mode == "seq-mean-token-sum-norm":
        if max_response_len is None or max_response_len < 1:
            raise ValueError(f"{mode} needs max_response_len (a positive constant), got {max_response_len}")
        return m, sequences * float(max_response_len)
    raise ValueError(f"unknown loss aggregation {mode!r}: use one of {', '.join(AGGREGATION_MODES)}")


def aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              max_response_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's ``(loss_sum, count)`` of one micro-batch for a per-token loss under ``mode`` (see
    :func:`aggregation`)."""
    weights, count = aggregation(mask, mode, max_response_len)
    return _masked(per_token_loss * weights.to(per_token_loss.dtype), mask).float().sum(), count
