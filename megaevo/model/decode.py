"""Inference-only weights for the one-token decode steps of generation on a whole single-rank model (TP = 1).

A decode step is the chunk's own cached forward (``chunk(tokens, position_ids=..., kv_cache=...,
linears=...)``, one new position per row) with its projections replaced by :class:`DecodeLinears`:
copies of the same weights that run as :class:`DecodeLinear`. On the CPU in float32 (where a decode
step is a handful of skinny (rows x hidden) GEMMs over every weight, bound by how fast the weights
stream from memory) those use MKL's packed GEMM: each weight is re-laid out once for the batch size,
which runs the skinny GEMMs markedly faster than the plain ``F.linear``. The packed copies are
inference-only and extra memory (about twice the weights); the model's parameters, its checkpoints and
its training numerics are untouched. Packed weights are built for one batch size; a batch of another
size runs the plain GEMM. The head computes the real vocabulary only (no padded ids).

The :class:`DecodeLinears` of a chunk are cached on it (see :func:`decode_linears`) and rebuilt when
another batch size is asked for or the weights changed. The chunk's *weights generation* says the
latter: whatever writes the weights in place without autograd's version counters seeing it (the
optimizer updates the flat parameter buffer the parameters are views of) calls
:func:`megaevo.model.weights.weights_changed`, as the training engine does after every optimizer update
and every checkpoint load, and the cache is keyed on that generation (and, as a second guard, on each
parameter's storage and version counter).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .llama import LlamaStage
from .weights import weights_generation

MIN_PACK_STEPS = 16  # packing costs a few decode steps; not worth it for shorter generations
_CACHE_SIZE = 2  # packed weight sets kept per chunk (by batch size)
_CACHE = "_decode_steps"  # the chunk's cache: {"key": weights key, "steps": {rows (0: unpacked): DecodeLinears}}


def mkl_packed_gemm_available() -> bool:
    return (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
            and hasattr(torch.ops.mkl, "_mkl_linear"))


class DecodeLinear:
    """``x @ weight.T (+ bias)`` over the last dim of ``x``, then ``+ out_bias`` (the bias of a
    row-parallel layer, added after the product as that layer adds it). With ``pack_rows`` the weight
    is also held in MKL's packed layout for that many rows, used when the input has exactly that many."""

    __slots__ = ("weight", "bias", "out_bias", "packed", "rows")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack_rows: int = 0, *,
                 out_bias: torch.Tensor | None = None):
        self.weight, self.bias, self.out_bias, self.rows = weight, bias, out_bias, pack_rows
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, pack_rows) if pack_rows else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.numel() == self.rows * x.shape[-1]:
            y = torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows)
        else:
            y = F.linear(x, self.weight, self.bias)
        return y if self.out_bias is None else y + self.out_bias


class LayerLinears:
    """One decoder layer's projections as :class:`DecodeLinear`: ``qkv``, ``dense``, ``gate_up``, ``down``."""

    __slots__ = ("qkv", "dense", "gate_up", "down")

    def __init__(self, layer, pack_rows: int = 0):
        attn, mlp = layer.attention, layer.mlp
        self.qkv = DecodeLinear(attn.qkv.weight, attn.qkv.bias, pack_rows)
        self.dense = DecodeLinear(attn.dense.weight, None, pack_rows, out_bias=attn.dense.bias)
        self.gate_up = DecodeLinear(mlp.gate_up.weight, mlp.gate_up.bias, pack_rows)
        self.down = DecodeLinear(mlp.down.weight, None, pack_rows, out_bias=mlp.down.bias)


class DecodeLinears:
    """The projections of a whole single-rank ``LlamaStage`` for its decode steps: ``layers`` (one
    :class:`LayerLinears` each) and ``head`` (the output head over the real vocabulary).

    ``pack_rows`` > 0 packs every weight for that batch size (CPU, float32, MKL only)."""

    def __init__(self, chunk: LlamaStage, pack_rows: int = 0):
        self.pack_rows = pack_rows
        self.layers = [LayerLinears(layer, pack_rows) for layer in chunk.layers]
        head = chunk.head_weight()
        self.head = DecodeLinear(head[:chunk.args.vocab_size], None, pack_rows)  # padded ids never computed

    @staticmethod
    def supports(chunk: LlamaStage) -> bool:
        """Whether ``chunk`` is a whole model on one rank (embedding, every layer, head; TP = 1)."""
        return chunk.state.tp_size == 1 and chunk.is_whole_model


def _weights_key(chunk: LlamaStage) -> tuple:
    return weights_generation(chunk), tuple((p.data_ptr(), p._version) for p in chunk.parameters())


def _packing_fits(chunk: LlamaStage) -> bool:
    """Packed copies take about twice the weights' memory: only when that much is free."""
    size = sum(p.numel() * p.element_size() for p in chunk.parameters())
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return 3 * size < free


def decode_linears(chunk: LlamaStage, rows: int, steps: int) -> DecodeLinears | None:
    """The :class:`DecodeLinears` for ``rows`` rows and about ``steps`` decode steps, cached on
    ``chunk`` until its weights change (:func:`megaevo.model.weights.weights_changed`); None when the
    chunk is not a whole single-rank model (its own projections are used). Weights are packed on the
    CPU in float32 when MKL is there, the generation is long enough to repay packing (or a packed set
    for ``rows`` is cached) and the memory allows."""
    if not DecodeLinears.supports(chunk):
        return None
    weight = chunk.embedding.weight
    key = _weights_key(chunk)
    cache = chunk.__dict__.get(_CACHE)
    if cache is None or cache["key"] != key:
        cache = {"key": key, "steps": {}}
        chunk.__dict__[_CACHE] = cache
    packable = weight.device.type == "cpu" and weight.dtype == torch.float32 and mkl_packed_gemm_available()
    if packable and rows in cache["steps"]:
        return cache["steps"][rows]
    if packable and steps >= MIN_PACK_STEPS and _packing_fits(chunk):
        while len(cache["steps"]) >= _CACHE_SIZE:
            cache["steps"].pop(next(iter(cache["steps"])))
        cache["steps"][rows] = DecodeLinears(chunk, pack_rows=rows)
        return cache["steps"][rows]
    if 0 not in cache["steps"]:
        cache["steps"][0] = DecodeLinears(chunk)
    return cache["steps"][0]


def packed_batch_sizes(chunk: LlamaStage) -> list[int]:
    """The batch sizes that packed decode weights of ``chunk`` are cached for (none before a decode)."""
    return [rows for rows in chunk.__dict__.get(_CACHE, {}).get("steps", {}) if rows > 0]


def forget_decode_linears(chunk: LlamaStage) -> None:
    """Drop the decode weights cached on ``chunk`` (the next generation prepares them again)."""
    chunk.__dict__.pop(_CACHE, None)
