"""One place for collective names that differ between the torch versions megaevo supports.

torch 2.13 renames ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` (and their functional
variants) to ``all_gather_single`` / ``reduce_scatter_single`` and deprecates the old names;
torch 2.11 has only the old names. Everything in megaevo calls collectives through this module,
which binds whichever name exists, newest first, once at import.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def _first(module, *names):
    for name in names:
        fn = getattr(module, name, None)
        if fn is not None:
            return fn
    raise ImportError(f"none of {names} found in {module.__name__} (torch {torch.__version__})")


_all_gather_single = _first(dist, "all_gather_single", "all_gather_into_tensor")
_reduce_scatter_single = _first(dist, "reduce_scatter_single", "reduce_scatter_tensor")

#: Functional (traceable, out-of-place) collectives: ``fn(tensor, dim, group)`` etc.
functional_all_gather = _first(funcol, "all_gather_single", "all_gather_tensor")
functional_all_gather_autograd = _first(funcol, "all_gather_single_autograd", "all_gather_tensor_autograd")
functional_reduce_scatter = _first(funcol, "reduce_scatter_single", "reduce_scatter_tensor")
functional_reduce_scatter_autograd = _first(funcol, "reduce_scatter_single_autograd",
                                            "reduce_scatter_tensor_autograd")
functional_all_reduce = funcol.all_reduce


def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """Gather equal-sized ``input`` from every rank of ``group`` into ``output`` along dim 0."""
    return _all_gather_single(output, input, group=group, async_op=async_op)


def reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor, op=dist.ReduceOp.SUM, group=None,
                          async_op: bool = False):
    """Reduce ``input`` over ``group`` and keep this rank's dim-0 slice of the result in ``output``."""
    return _reduce_scatter_single(output, input, op=op, group=group, async_op=async_op)


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None, async_op: bool = False):
    """In-place all-reduce (the name is stable; here so callers need only one import)."""
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


__all__ = [
    "all_gather_into_tensor",
    "all_reduce",
    "functional_all_gather",
    "functional_all_gather_autograd",
    "functional_all_reduce",
    "functional_reduce_scatter",
    "functional_reduce_scatter_autograd",
    "reduce_scatter_tensor",
]
