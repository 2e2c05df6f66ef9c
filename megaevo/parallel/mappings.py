"""Autograd functions that move activations in and out of tensor-parallel regions.

Each function is a pair (forward op, backward op) over the tensor-parallel group, after
Megatron-core's ``mappings.py``:

==========================  ============================  ============================
function                    forward                       backward
==========================  ============================  ============================
copy_to_tp                  identity                      all-reduce
reduce_from_tp              all-reduce                    identity
scatter_to_tp               keep own slice of last dim    all-gather last dim
gather_from_tp              all-gather last dim           keep own slice
scatter_to_sequence         keep own slice of seq dim     all-gather seq dim
gather_from_sequence        all-gather seq dim            reduce-scatter seq dim
reduce_scatter_to_sequence  reduce-scatter seq dim        all-gather seq dim
==========================  ============================  ============================

Activations are (batch, seq, hidden), so the sequence dim is 1. With ``group=None`` (one TP
rank) every function returns its input unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import compat

SEQ_DIM = 1


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = _size(group)
    if x.shape[dim] % size:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {size} tensor-parallel ranks")
    return x.chunk(size, dim=dim)[dist.get_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = _size(group)
    first = x.movedim(dim, 0).contiguous()
    out = torch.empty((size * first.shape[0],) + first.shape[1:], dtype=x.dtype, device=x.device)
    compat.all_gather_into_tensor(out, first, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = _size(group)
    if x.shape[dim] % size:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over {size} tensor-parallel ranks")
    first = x.movedim(dim, 0).contiguous()
    out = torch.empty((first.shape[0] // size,) + first.shape[1:], dtype=x.dtype, device=x.device)
    compat.reduce_scatter_tensor(out, first, group=group)
    return out.movedim(0, dim)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    compat.all_reduce(x, group=group)
    return x


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group), None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, reduce_grad):
        ctx.dim, ctx.group, ctx.reduce_grad = dim, group, reduce_grad
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return _reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return _split(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a TP region with a replicated input: identity forward, all-reduce the gradient."""
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a TP region by summing partial results: all-reduce forward, identity backward."""
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Keep this rank's slice of ``dim`` (default last); the gradient is all-gathered."""
    return x if _size(group) == 1 else _ScatterToTP.apply(x, dim % x.dim(), group)


def gather_from_tp(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """All-gather the slices of ``dim`` (default last); the gradient is split back."""
    return x if _size(group) == 1 else _GatherFromTP.apply(x, dim % x.dim(), group)


def scatter_to_sequence(x: torch.Tensor, group, dim: int = SEQ_DIM) -> torch.Tensor:
    """Keep this rank's slice of the sequence; the gradient is all-gathered."""
    return scatter_to_tp(x, group, dim)


def gather_from_sequence(x: torch.Tensor, group, dim: int = SEQ_DIM, reduce_grad: bool = True) -> torch.Tensor:
    """All-gather the sequence slices.

    The gradient is reduce-scattered (``reduce_grad``, for an input consumed by a TP region whose
    ranks each produce a partial gradient) or just split (when every rank's gradient is whole).
    """
    return x if _size(group) == 1 else _GatherFromSequence.apply(x, dim % x.dim(), group, reduce_grad)


def reduce_scatter_to_sequence(x: torch.Tensor, group, dim: int = SEQ_DIM) -> torch.Tensor:
    """Sum partial results and keep this rank's sequence slice; the gradient is all-gathered."""
    return x if _size(group) == 1 else _ReduceScatterToSequence.apply(x, dim % x.dim(), group)
