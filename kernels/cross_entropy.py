"""Cross-entropy per token, fused log-softmax + NLL, optionally over vocab-parallel logits.

With ``group`` (the tensor-parallel group), each rank holds a contiguous slice of the vocabulary:
rank ``r`` of the group has logits for ids ``[r * V_local, (r + 1) * V_local)``. Each rank computes
its local max, sum of exponentials and (if it owns the target) the target logit; one all-reduce
of the max and one of the sums give the full-vocabulary loss on every rank. The backward gives
each rank the gradient of its own slice: ``softmax - onehot``, scaled by the loss gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .dispatch import resolve, triton_module


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, group=None, *,
                  backend: str | None = None) -> torch.Tensor:
    """Per-token loss (float32, shape of ``target``); 0 where ``target == ignore_index``.

    A target outside the (full) vocabulary that is not ``ignore_index`` gives a NaN loss on every
    backend, never a finite wrong value; checking on the host would cost a device sync per step.

    ``logits`` is (..., V) or, with ``group``, (..., V / group size). The Triton path never builds
    a float32 copy of the logits: it reads them twice (forward, backward) and writes the gradient
    in the logits' dtype.
    """
    _check(logits, target)
    if resolve("cross_entropy", logits.device, backend) == "triton":
        return triton_module("cross_entropy").CrossEntropyFunction.apply(logits, target, ignore_index, group)
    return cross_entropy_reference(logits, target, ignore_index, group)


def cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                            group=None) -> torch.Tensor:
    """Plain-torch per-token cross-entropy in float32 (with ``group``: vocab-parallel)."""
    _check(logits, target)
    if group is None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        keep = target != ignore_index
        in_range = (target >= 0) & (target < logits.shape[-1])
        picked = logp.gather(-1, torch.where(keep & in_range, target, 0).unsqueeze(-1)).squeeze(-1)
        return mark_out_of_range(torch.where(keep, -picked, torch.zeros_like(picked)), target, ignore_index,
                                 logits.shape[-1])
    return _VocabParallelReference.apply(logits, target, ignore_index, group)


def mark_out_of_range(loss: torch.Tensor, target: torch.Tensor, ignore_index: int, vocab: int) -> torch.Tensor:
    """``loss`` with NaN where the target is neither ``ignore_index`` nor an id below ``vocab``."""
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    return torch.where(bad, float("nan"), loss)


def full_vocab(local_vocab: int, group) -> int:
    """The vocabulary size across ``group`` (each rank holds ``local_vocab`` ids)."""
    return local_vocab * (dist.get_world_size(group) if group is not None else 1)


def vocab_range(local_vocab: int, group) -> tuple[int, int]:
    """The [start, end) of the vocabulary ids held by this rank of ``group``."""
    if group is None:
        return 0, local_vocab
    start = dist.get_rank(group) * local_vocab
    return start, start + local_vocab


def combine_partials(local_max: torch.Tensor, local_sumexp: torch.Tensor, target_logit: torch.Tensor,
                     group) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary (log-sum-exp, target logit) from per-rank partials, all float32."""
    if group is None:
        return local_max + torch.log(local_sumexp), target_logit
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([local_sumexp * torch.exp(local_max - global_max), target_logit])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return global_max + torch.log(sums[0]), sums[1]


class _VocabParallelReference(torch.autograd.Function):
    """Vocab-parallel cross-entropy in plain torch (float32 softmax of the local slice)."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, group):
        x = logits.float()
        start, end = vocab_range(x.shape[-1], group)
        local_max = x.max(dim=-1).values
        sumexp = torch.exp(x - local_max.unsqueeze(-1)).sum(dim=-1)
        owned = (target >= start) & (target < end)
        local_t = torch.where(owned, target - start, 0)
        tgt = torch.where(owned, x.gather(-1, local_t.unsqueeze(-1)).squeeze(-1), 0.0)
        lse, tgt = combine_partials(local_max, sumexp, tgt, group)
        keep = target != ignore_index
        ctx.save_for_backward(torch.exp(x - lse.unsqueeze(-1)), local_t, owned & keep, keep)
        ctx.logits_dtype = logits.dtype
        loss = torch.where(keep, lse - tgt, 0.0)
        return mark_out_of_range(loss, target, ignore_index, full_vocab(x.shape[-1], group))

    @staticmethod
    def backward(ctx, grad):
        softmax, local_t, owned, keep = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, local_t.unsqueeze(-1), -owned.float().unsqueeze(-1))
        g = g * torch.where(keep, grad, 0.0).unsqueeze(-1)
        return g.to(ctx.logits_dtype), None, None, None


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"cross_entropy: target {tuple(target.shape)} must match logits {tuple(logits.shape)} "
                         "without the vocab dim")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cross_entropy: target must be int64 or int32, got {target.dtype}")
