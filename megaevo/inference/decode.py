"""The one-token decode step of generation on a single-rank model (TP = 1), with inference-only weights.

:class:`DecodeStep` computes what ``stage(tokens, position_ids=..., kv_cache=...)`` computes for one
new position per row (the same norms, SwiGLU, rotary and cache attention), but walks the decoder
with 2-D activations and no per-module dispatch, and runs its matmuls through :class:`DecodeLinear`.
On the CPU in float32 (where a decode step is a handful of skinny (rows x hidden) GEMMs over
every weight, bound by how fast the weights stream from memory) those use MKL's packed GEMM: each
weight is re-laid out once for the batch size, which runs the skinny GEMMs markedly faster than
the plain ``F.linear``. The packed copies are inference-only and extra memory (about twice the
weights); the model's parameters, its checkpoints and its training numerics are untouched.
Packed weights are built for one batch size; a batch of another size runs the plain GEMM.

A :class:`DecodeStep` is cached on the stage (see :func:`decode_step`) and rebuilt when another
batch size is asked for or the weights changed. The stage's *weights generation* says the latter:
whatever writes the weights in place without autograd's version counters seeing it (the optimizer
updates the flat parameter buffer the parameters are views of) calls
:func:`megaevo.model.weights.weights_changed`, as the
training engine does after every optimizer update and every checkpoint load, and the cache is keyed
on that generation (and, as a second guard, on each parameter's storage and version counter).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from megaevo import kernels
from megaevo.model.weights import weights_generation

MIN_PACK_STEPS = 16  # packing costs a few decode steps; not worth it for shorter generations
_CACHE_SIZE = 2  # packed weight sets kept per stage (by batch size)


def mkl_packed_gemm_available() -> bool:
    return (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
            and hasattr(torch.ops.mkl, "_mkl_linear"))


class DecodeLinear:
    """``x @ weight.T (+ bias)`` for (rows, in) inputs; with ``pack_rows`` the weight is also held
    in MKL's packed layout for that many rows, used when the input has exactly that many."""

    __slots__ = ("weight", "bias", "packed", "rows")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack_rows: int = 0):
        self.weight, self.bias, self.rows = weight, bias, pack_rows
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, pack_rows) if pack_rows else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] == self.rows:
            return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows)
        return F.linear(x, self.weight, self.bias)


class _Layer:
    __slots__ = ("attn_norm", "attn_eps", "qkv", "dense", "dense_bias", "mlp_norm", "mlp_eps", "gate_up", "down",
                 "down_bias", "kv", "g", "d")


class DecodeStep:
    """One decode forward (one new token per row) of a whole single-rank ``LlamaStage``.

    ``pack_rows`` > 0 packs every weight for that batch size (CPU, float32, MKL only)."""

    def __init__(self, stage, pack_rows: int = 0):
        args = stage.args
        self.args, self.pack_rows = args, pack_rows
        self.embedding = stage.embedding.weight
        self.layers = []
        for block in stage.layers:
            attn, mlp = block.attention, block.mlp
            layer = _Layer()
            layer.attn_norm, layer.attn_eps = block.attention_norm.weight, block.attention_norm.eps
            layer.mlp_norm, layer.mlp_eps = block.mlp_norm.weight, block.mlp_norm.eps
            layer.qkv = DecodeLinear(attn.qkv.weight, attn.qkv.bias, pack_rows)
            layer.dense, layer.dense_bias = DecodeLinear(attn.dense.weight, None, pack_rows), attn.dense.bias
            layer.gate_up = DecodeLinear(mlp.gate_up.weight, mlp.gate_up.bias, pack_rows)
            layer.down, layer.down_bias = DecodeLinear(mlp.down.weight, None, pack_rows), mlp.down.bias
            layer.kv, layer.g, layer.d = attn.local_kv_heads, attn.q_per_kv, attn.head_dim
            self.layers.append(layer)
        self.norm, self.norm_eps = stage.norm.weight, stage.norm.eps
        head = stage.embedding.weight if stage.tied_here else stage.output.weight
        self.head = DecodeLinear(head[:args.vocab_size], None, pack_rows)  # padded ids never computed
        self.rope = stage.rope_tables

    @staticmethod
    def supports(stage) -> bool:
        """Whether ``stage`` is a whole model on one rank (embedding, every layer, head; TP = 1)."""
        return (stage.state.tp_size == 1 and stage.has_embedding and stage.has_head
                and stage.first_layer == 0 and stage.end_layer == stage.args.num_layers)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """``tokens`` (b,) after the cache's filled length, at ``positions`` (b, 1); returns the
        logits (b, vocab_size) and advances the cache by one."""
        b = tokens.shape[0]
        h = F.embedding(tokens, self.embedding)  # (b, hidden)
        cos, sin = self.rope(h.device)
        cache.begin(cos, sin, positions, 1)
        for i, layer in enumerate(self.layers):
            lc = cache.layer(i)
            kv, g, d = layer.kv, layer.g, layer.d
            qkv = layer.qkv(kernels.rms_norm(h, layer.attn_norm, layer.attn_eps)).view(b, 1, kv, g + 2, d)
            qk = lc.rotate(qkv[:, :, :, : g + 1])
            out = lc.attend(qk[:, :, :, :g].reshape(b, 1, kv * g, d), qk[:, :, :, g], qkv[:, :, :, g + 1])
            a = layer.dense(out.view(b, kv * g * d))
            h = h + (a if layer.dense_bias is None else a + layer.dense_bias)
            gate, up = layer.gate_up(kernels.rms_norm(h, layer.mlp_norm, layer.mlp_eps)).chunk(2, dim=-1)
            m = layer.down(kernels.swiglu(gate, up))
            h = h + (m if layer.down_bias is None else m + layer.down_bias)
        cache.advance(1)
        return self.head(kernels.rms_norm(h, self.norm, self.norm_eps))


def _weights_key(stage) -> tuple:
    return weights_generation(stage), tuple((p.data_ptr(), p._version) for p in stage.parameters())


def _packing_fits(stage) -> bool:
    """Packed copies take about twice the weights' memory: only when that much is free."""
    size = sum(p.numel() * p.element_size() for p in stage.parameters())
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return 3 * size < free


def decode_step(stage, rows: int, steps: int) -> DecodeStep | None:
    """The :class:`DecodeStep` for ``rows`` rows and about ``steps`` decode steps, cached on
    ``stage`` until its weights change (:func:`megaevo.model.weights.weights_changed`); None when the stage is not a
    whole single-rank model (the stage's own forward is used). Weights are packed on the CPU in
    float32 when MKL is there, the generation is long enough to repay packing (or a packed set for
    ``rows`` is cached) and the memory allows."""
    if not DecodeStep.supports(stage):
        return None
    weight = stage.embedding.weight
    key = _weights_key(stage)
    cache = stage.__dict__.get("_decode_steps")
    if cache is None or cache["key"] != key:
        cache = {"key": key, "steps": {}}
        stage.__dict__["_decode_steps"] = cache
    packable = weight.device.type == "cpu" and weight.dtype == torch.float32 and mkl_packed_gemm_available()
    if packable and rows in cache["steps"]:
        return cache["steps"][rows]
    if packable and steps >= MIN_PACK_STEPS and _packing_fits(stage):
        while len(cache["steps"]) >= _CACHE_SIZE:
            cache["steps"].pop(next(iter(cache["steps"])))
        cache["steps"][rows] = DecodeStep(stage, pack_rows=rows)
        return cache["steps"][rows]
    if 0 not in cache["steps"]:
        cache["steps"][0] = DecodeStep(stage)
    return cache["steps"][0]
