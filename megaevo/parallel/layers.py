"""Tensor-parallel layers: column/row-parallel linears, vocab-parallel embedding and loss.

Shapes follow the model: activations are (batch, seq, hidden); under sequence parallelism the
activations outside TP regions are (batch, seq / tp, hidden). Every parameter is tagged with

* ``tp_layout`` (:class:`~megaevo.parallel.layout.ParamLayout`): its place in the logical tensor;
* ``weight_decay`` (bool): False for norms and biases;
* ``sequence_parallel`` (bool): a replicated parameter that sees only this rank's sequence slice,
  so its gradient is partial and must be all-reduced over TP (:func:`allreduce_sequence_parallel_grads`).

Weights are initialised on the full logical tensor and then sliced, so the same RNG state gives
the same logical weights at every TP size.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaevo.common import IGNORE_INDEX, padded_vocab_size
from megaevo.kernels import cross_entropy

from . import compat
from .layout import ParamLayout
from .mappings import (copy_to_tp, gather_from_sequence, gather_from_tp, reduce_from_tp,
                       reduce_scatter_to_sequence, scatter_to_tp)
from .state import ParallelState

InitMethod = Callable[[torch.Tensor], None]


def normal_init(std: float = 0.02) -> InitMethod:
    """Fill a tensor in place from N(0, std) with the global RNG."""
    return lambda t: nn.init.normal_(t, mean=0.0, std=std)


def skip_init(t: torch.Tensor) -> None:
    """An init method that leaves the weight uninitialised (the owner initialises it later)."""


def tag_param(param: nn.Parameter, layout: ParamLayout, weight_decay: bool = True,
              sequence_parallel: bool = False) -> nn.Parameter:
    """Attach the per-parameter metadata described in the module docstring; returns ``param``."""
    param.tp_layout = layout
    param.weight_decay = weight_decay
    param.sequence_parallel = sequence_parallel
    return param


def _local_param(layout: ParamLayout, logical_shape, state: ParallelState, init_method: InitMethod | None,
                 device, dtype) -> nn.Parameter:
    """A parameter holding this rank's slice of a logical tensor initialised by ``init_method``."""
    if init_method is skip_init:
        shape = list(logical_shape)
        if layout.partition_dim is not None:
            shape[layout.partition_dim] = (layout.padded_size or shape[layout.partition_dim]) // state.tp_size
        return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
    full = torch.empty(logical_shape, device=device, dtype=torch.float32)
    (init_method or normal_init())(full)
    return nn.Parameter(layout.shard(full, state.tp_rank, state.tp_size).to(dtype))


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel ({d}); choose a parallel.tp "
                         f"that divides it")
    return n // d


class ColumnParallelLinear(nn.Module):
    """``y = x W^T (+ b)`` with W split along its output dim: each rank computes a slice of y.

    * ``chunks``: logical sizes of fused outputs (e.g. ``(ffn, ffn)`` for gate and up); each is
      split separately, so the local output holds this rank's slice of every chunk in order.
    * ``padded_out_features``: pad the output dim (vocab) to this size; padding rows are zero.
    * ``gather_output``: all-gather the output so every rank holds all of y (unchunked, unpadded only).
    * sequence parallel: the input is the rank's sequence slice and is all-gathered first.
    * ``skip_weight``: hold no weight; ``forward`` must be given one (tied output embedding).
    """

    def __init__(self, in_features: int, out_features: int, state: ParallelState, *, bias: bool = False,
                 gather_output: bool = False, chunks: tuple[int, ...] | None = None,
                 padded_out_features: int | None = None, sequence_parallel: bool | None = None,
                 skip_weight: bool = False, init_method: InitMethod | None = None, device=None, dtype=None):
        super().__init__()
        self.state = state
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = state.sequence_parallel_active if sequence_parallel is None else sequence_parallel
        self.gather_output = gather_output
        if gather_output and (chunks or padded_out_features):
            raise ValueError("ColumnParallelLinear: gather_output needs an unchunked, unpadded output")
        if chunks is not None:
            if sum(chunks) != out_features:
                raise ValueError(f"ColumnParallelLinear: chunks {chunks} must sum to out_features {out_features}")
            for c in chunks:
                _divide(c, state.tp_size, "a fused output chunk")
            layout = ParamLayout(0, tuple(chunks))
        elif padded_out_features is not None and padded_out_features != out_features:
            _divide(padded_out_features, state.tp_size, "padded output size")
            layout = ParamLayout(0, logical_size=out_features, padded_size=padded_out_features)
        else:
            _divide(out_features, state.tp_size, "output features")
            layout = ParamLayout(0)
        self.padded_out_features = padded_out_features or out_features
        self.local_out = self.padded_out_features // state.tp_size
        if skip_weight:
            self.weight = None
        else:
            self.weight = tag_param(_local_param(layout, (out_features, in_features), state, init_method,
                                                 device, dtype), layout)
        self.bias = None
        if bias:
            b = _local_param(layout, (out_features,), state, nn.init.zeros_, device, dtype)
            self.bias = tag_param(b, layout, weight_decay=False)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        if weight is None:
            raise ValueError("ColumnParallelLinear(skip_weight=True) needs a weight passed to forward")
        group = self.state.tp_group
        x = gather_from_sequence(x, group) if self.sequence_parallel else copy_to_tp(x, group)
        y = F.linear(x, weight, self.bias)
        return gather_from_tp(y, group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``y = x W^T (+ b)`` with W split along its input dim: each rank adds a partial product.

    The input is split along its last dim (``input_is_parallel``, e.g. the output of a
    column-parallel layer; else it is scattered first). Partial outputs are all-reduced, or
    reduce-scattered along the sequence under sequence parallelism. The bias is replicated and
    added after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, state: ParallelState, *, bias: bool = False,
                 input_is_parallel: bool = True, sequence_parallel: bool | None = None,
                 init_method: InitMethod | None = None, device=None, dtype=None):
        super().__init__()
        self.state = state
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = state.sequence_parallel_active if sequence_parallel is None else sequence_parallel
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence parallelism needs input_is_parallel=True")
        self.input_is_parallel = input_is_parallel
        _divide(in_features, state.tp_size, "input features")
        layout = ParamLayout(1)
        self.weight = tag_param(_local_param(layout, (out_features, in_features), state, init_method, device, dtype),
                                layout)
        self.bias = None
        if bias:
            b = _local_param(ParamLayout(), (out_features,), state, nn.init.zeros_, device, dtype)
            self.bias = tag_param(b, ParamLayout(), weight_decay=False, sequence_parallel=self.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.state.tp_group
        if not self.input_is_parallel:
            x = scatter_to_tp(x, group)
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sequence(y, group) if self.sequence_parallel else reduce_from_tp(y, group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding with rows split over TP ranks; ids outside this rank's rows contribute zeros.

    The vocabulary is padded to ``padded_num_embeddings`` (default: a multiple of 128 x TP); the
    padding rows are zero and no valid id reaches them. The output is all-reduced, or
    reduce-scattered along the sequence under sequence parallelism.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, state: ParallelState, *,
                 padded_num_embeddings: int | None = None, sequence_parallel: bool | None = None,
                 init_method: InitMethod | None = None, device=None, dtype=None):
        super().__init__()
        self.state = state
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padded_num_embeddings = padded_num_embeddings or padded_vocab_size(num_embeddings, state.tp_size)
        if self.padded_num_embeddings < num_embeddings:
            raise ValueError(f"padded vocab size {self.padded_num_embeddings} is smaller than the vocab {num_embeddings}")
        self.sequence_parallel = state.sequence_parallel_active if sequence_parallel is None else sequence_parallel
        local = _divide(self.padded_num_embeddings, state.tp_size, "padded vocab size")
        self.vocab_start, self.vocab_end = state.tp_rank * local, (state.tp_rank + 1) * local
        layout = (ParamLayout(0) if self.padded_num_embeddings == num_embeddings else
                  ParamLayout(0, logical_size=num_embeddings, padded_size=self.padded_num_embeddings))
        self.weight = tag_param(_local_param(layout, (num_embeddings, embedding_dim), state, init_method, device, dtype),
                                layout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        group = self.state.tp_group
        if self.state.tp_size == 1:
            out = F.embedding(ids, self.weight)
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local_ids = torch.where(outside, 0, ids - self.vocab_start)
            out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_to_sequence(out, group) if self.sequence_parallel else reduce_from_tp(out, group)


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int, state: ParallelState) -> torch.Tensor:
    """Set the logits of padded vocab ids (>= ``vocab_size``) on this rank to the dtype's minimum, in place.

    ``logits`` is this rank's vocab slice (..., V_padded / tp). A finite minimum (not -inf) keeps
    a rank whose whole slice is padding free of NaN; the padded ids still get exactly zero
    probability and zero gradient.
    """
    if logits.is_leaf and logits.requires_grad:
        logits = logits.clone()
    local = logits.shape[-1]
    first_pad = vocab_size - state.tp_rank * local
    if first_pad < local:
        logits[..., max(first_pad, 0):].fill_(torch.finfo(logits.dtype).min)
    return logits


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, state: ParallelState,
                                 vocab_size: int | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token cross-entropy (float32, ``target``'s shape) from vocab-parallel logits.

    Each rank holds logits for a contiguous slice of the (padded) vocabulary; only per-token
    max, sum of exponentials and the target logit cross the TP group, never the vocab dim.
    With ``vocab_size``, padded ids are masked out first. Positions with ``ignore_index`` give 0.
    """
    if vocab_size is not None:
        logits = mask_vocab_padding(logits, vocab_size, state)
    return cross_entropy(logits, target, ignore_index=ignore_index, group=state.tp_group)


def vocab_parallel_log_probs(logits: torch.Tensor, target: torch.Tensor, state: ParallelState,
                             vocab_size: int | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token log-probability of ``target`` (float32; 0 where ``target == ignore_index``) from
    vocab-parallel logits, differentiable, without gathering the vocabulary."""
    return -vocab_parallel_cross_entropy(logits, target, state, vocab_size, ignore_index)


class _VocabParallelEntropy(torch.autograd.Function):
    """Entropy of softmax(logits) over a vocabulary split across ``group``: per-token max, sum of
    exponentials and sum of ``exp * logit`` cross the group, never the vocab dim.

    With p = softmax(l) and H = -sum p log p, dH/dl_j = -p_j (log p_j + H): local to each rank once
    the global H and normaliser are known, so backward needs no communication.
    """

    @staticmethod
    def forward(ctx, logits, group):
        x = logits.float()
        top = x.max(dim=-1).values
        if group is not None:
            compat.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=group)
        shifted = x - top.unsqueeze(-1)
        exp = shifted.exp()
        sums = torch.stack([exp.sum(dim=-1), torch.where(exp > 0, exp * shifted, 0.0).sum(dim=-1)])
        if group is not None:
            compat.all_reduce(sums, group=group)
        z, weighted = sums[0], sums[1]
        log_z = z.log()
        entropy = log_z - weighted / z
        ctx.save_for_backward(shifted, log_z, entropy)
        ctx.dtype = logits.dtype
        return entropy

    @staticmethod
    def backward(ctx, grad):
        shifted, log_z, entropy = ctx.saved_tensors
        log_p = shifted - log_z.unsqueeze(-1)
        p = log_p.exp()
        grad_logits = torch.where(p > 0, -p * (log_p + entropy.unsqueeze(-1)), 0.0) * grad.unsqueeze(-1)
        return grad_logits.to(ctx.dtype), None


def vocab_parallel_entropy(logits: torch.Tensor, state: ParallelState, vocab_size: int | None = None) -> torch.Tensor:
    """Per-token entropy (float32, ``logits.shape[:-1]``) of the distribution given by vocab-parallel
    logits, differentiable; with ``vocab_size``, padded ids are masked out first."""
    if vocab_size is not None:
        logits = mask_vocab_padding(logits, vocab_size, state)
    return _VocabParallelEntropy.apply(logits, state.tp_group)


def gather_vocab_logits(logits: torch.Tensor, state: ParallelState, vocab_size: int | None = None) -> torch.Tensor:
    """All-gather vocab-parallel logits to (..., vocab) and drop the padded ids (for eval/generation)."""
    full = gather_from_tp(logits, state.tp_group)
    return full if vocab_size is None else full[..., :vocab_size]


def allreduce_sequence_parallel_grads(params: Iterable[nn.Parameter], state: ParallelState,
                                      grad_attr: str = "grad") -> None:
    """Sum over TP the gradients of parameters tagged ``sequence_parallel`` (call after backward).

    Under sequence parallelism a replicated parameter such as a norm weight sees only this rank's
    sequence slice, so each rank holds a partial gradient. ``grad_attr`` names where the gradient
    lives (``"grad"``, or e.g. ``"main_grad"`` for a data-parallel buffer). One flat all-reduce.
    """
    if state.tp_group is None:
        return
    grads = [getattr(p, grad_attr) for p in params
             if getattr(p, "sequence_parallel", False) and getattr(p, grad_attr, None) is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    compat.all_reduce(flat, group=state.tp_group)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)
