"""The Llama-family decoder, built as one pipeline stage from tensor-parallel layers.

A :class:`LlamaStage` holds a contiguous range of decoder layers, plus the token embedding on
the first stage and the final norm and output head on the last. With one stage and TP = 1 it is
the whole model in one process.

Tensor-parallel layout (each rank holds whole KV groups):

* ``attention.qkv`` (column-parallel) has the logical rows grouped per KV group:
  for group g, its ``heads / kv_heads`` query heads, then key head g, then value head g.
  A contiguous TP slice is therefore a set of whole groups (:func:`~megaevo.model.fusion.fuse_qkv` /
  :func:`~megaevo.model.fusion.split_qkv` convert from / to separate q, k, v weights in Hugging Face order).
* ``mlp.gate_up`` (column-parallel) is gate and up stacked, declared as two chunks.
* ``attention.dense`` and ``mlp.down`` are row-parallel; the embedding and the output head are
  vocab-parallel, padded to a multiple of 128 x TP; padded ids get exactly zero probability.

Under sequence parallelism the residual stream between TP regions is split along the sequence
(batch, seq / tp, hidden) and the norms run on that slice.

Generation runs the same modules with a KV cache (``kv_cache``); its decode steps may also replace the
projections by inference-only copies of their weights (``linears``, see :mod:`megaevo.model.decode`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from megaevo import kernels
from megaevo.common import IGNORE_INDEX, stream_seed
from megaevo.configio import ConfigError, errors_message
from megaevo.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                     mask_vocab_padding, skip_init, tag_param, vocab_parallel_cross_entropy,
                                     vocab_parallel_entropy)
from megaevo.parallel.layout import ParamLayout, ParamMeta, param_meta
from megaevo.parallel.state import ParallelState

from .args import ModelArgs, pipeline_errors

OUTPUT_PROJECTIONS = ("attention.dense.weight", "mlp.down.weight")


class RMSNorm(nn.Module):
    """RMSNorm with a weight replicated over TP (its gradient is partial under sequence parallelism)."""

    def __init__(self, dim: int, eps: float, sequence_parallel: bool, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = tag_param(nn.Parameter(torch.ones(dim, device=device, dtype=dtype)), ParamLayout(),
                                weight_decay=False, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings over this rank's KV groups."""

    def __init__(self, args: ModelArgs, state: ParallelState, device=None, dtype=None):
        super().__init__()
        self.head_dim = args.head_dim
        self.q_per_kv = args.num_heads // args.num_kv_heads
        self.local_kv_heads = args.num_kv_heads // state.tp_size
        self.selective_recompute = args.recompute == "selective"
        qkv_size = (args.num_heads + 2 * args.num_kv_heads) * args.head_dim
        self.qkv = ColumnParallelLinear(args.hidden_size, qkv_size, state, bias=args.qkv_bias,
                                        init_method=skip_init, device=device, dtype=dtype)
        self.dense = RowParallelLinear(args.num_heads * args.head_dim, args.hidden_size, state,
                                       init_method=skip_init, device=device, dtype=dtype)

    def forward(self, x, cos, sin, position_ids=None, doc_ids=None):
        qkv = self.qkv(x)
        b, s = qkv.shape[:2]
        qkv = qkv.view(b, s, self.local_kv_heads, self.q_per_kv + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_kv].reshape(b, s, self.local_kv_heads * self.q_per_kv, self.head_dim)
        k, v = qkv[:, :, :, self.q_per_kv], qkv[:, :, :, self.q_per_kv + 1]
        q, k = kernels.apply_rotary(q, k, cos, sin, position_ids)
        if self.selective_recompute and torch.is_grad_enabled():
            out = checkpoint(_attention_core, q, k, v, doc_ids, use_reentrant=False)
        else:
            out = _attention_core(q, k, v, doc_ids)
        return self.dense(out.reshape(b, s, -1))

    def attend_cached(self, qkv, kv_cache, doc_ids=None):
        """Generation: the attention of ``qkv`` (batch, seq, this rank's fused q/k/v projection) of the
        next ``seq`` positions through this layer's ``kv_cache``. The query and key heads are rotated in
        one pass (the cache holds this forward's rotary factors), the keys and values appended to the
        cache, and every cached position up to each query attended; (batch, seq, local heads x head_dim)."""
        b, s, g = qkv.shape[0], qkv.shape[1], self.q_per_kv
        qkv = qkv.view(b, s, self.local_kv_heads, g + 2, self.head_dim)
        qk = kv_cache.rotate(qkv[:, :, :, : g + 1])
        q = qk[:, :, :, :g].reshape(b, s, self.local_kv_heads * g, self.head_dim)
        return kv_cache.attend(q, qk[:, :, :, g], qkv[:, :, :, g + 1], doc_ids).reshape(b, s, -1)


def _attention_core(q, k, v, doc_ids):
    return kernels.flash_attention(q, k, v, causal=True, doc_ids=doc_ids)


def gated(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU of a fused gate/up projection (the gate, then the up half along the last dim)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return kernels.swiglu(gate, up)


class MLP(nn.Module):
    """SwiGLU feed-forward: fused gate/up (column-parallel, two chunks), down (row-parallel)."""

    def __init__(self, args: ModelArgs, state: ParallelState, device=None, dtype=None):
        super().__init__()
        ffn = args.ffn_hidden_size
        self.gate_up = ColumnParallelLinear(args.hidden_size, 2 * ffn, state, chunks=(ffn, ffn),
                                            init_method=skip_init, device=device, dtype=dtype)
        self.down = RowParallelLinear(ffn, args.hidden_size, state, init_method=skip_init, device=device, dtype=dtype)

    def forward(self, x):
        return self.down(gated(self.gate_up(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, args: ModelArgs, state: ParallelState, device=None, dtype=None):
        super().__init__()
        sp = state.sequence_parallel_active
        self.attention_norm = RMSNorm(args.hidden_size, args.norm_eps, sp, device, dtype)
        self.attention = Attention(args, state, device, dtype)
        self.mlp_norm = RMSNorm(args.hidden_size, args.norm_eps, sp, device, dtype)
        self.mlp = MLP(args, state, device, dtype)

    def forward(self, x, cos, sin, position_ids=None, doc_ids=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, position_ids, doc_ids)
        return x + self.mlp(self.mlp_norm(x))

    def cached_forward(self, x, kv_cache, doc_ids=None, linears=None):
        """The block in generation: ``x`` (batch, seq, hidden) are the next ``seq`` positions after those
        this layer's ``kv_cache`` holds (their keys and values are appended; the rotary factors are the
        cache's). ``linears`` (a :class:`megaevo.model.decode.LayerLinears`) replaces the projections by
        inference-only copies of their weights. The norms' forward is called directly: at one token per
        row, module dispatch is a noticeable part of a small model's decode step."""
        attn, mlp = self.attention, self.mlp
        qkv, dense, gate_up, down = ((attn.qkv, attn.dense, mlp.gate_up, mlp.down) if linears is None
                                     else (linears.qkv, linears.dense, linears.gate_up, linears.down))
        x = x + dense(attn.attend_cached(qkv(self.attention_norm.forward(x)), kv_cache, doc_ids))
        return x + down(gated(gate_up(self.mlp_norm.forward(x))))


class LlamaStage(nn.Module):
    """Decoder layers ``[first_layer, end_layer)`` with the embedding and/or the head.

    ``forward(x, labels=None, position_ids=None, doc_ids=None)``: ``x`` is token ids (batch, seq)
    on a stage with the embedding, else hidden states from the previous stage. Returns, on a stage
    with the head, the per-token loss (float32, (batch, seq); 0 where ``labels == ignore_index``) when
    ``labels`` is given, else this rank's vocab slice of the logits (padded ids at the dtype's
    minimum); with ``with_entropy`` also the per-token entropy of the predicted distribution, as
    ``(loss, entropy)`` (the log-probability of each label is ``-loss``); on other stages the hidden states ((batch, seq / tp, hidden) under sequence
    parallelism). ``position_ids`` and ``doc_ids`` are (batch, seq) over the whole sequence.

    With ``kv_cache`` (a :class:`megaevo.inference.kv_cache.KVCache`, for generation) ``x`` is the
    next ``seq`` tokens after the cache's filled length: each layer appends its keys and values to
    the cache and attends over everything cached so far, and the cache then advances by ``seq``;
    ``last_only`` then gives the logits of the last position only, (batch, 1, vocab). A decode step
    may also pass ``linears`` (:class:`megaevo.model.decode.DecodeLinears` of this stage): the same
    forward on inference-only (e.g. packed) copies of the projections, its head over the real
    vocabulary only, (batch, seq, vocab_size).

    Parameters are initialised by :meth:`reset_parameters` from ``seed`` and their logical names,
    so every layout (TP size, pipeline split) starts from the same logical weights.
    """

    def __init__(self, args: ModelArgs, state: ParallelState | None = None, first_layer: int = 0,
                 end_layer: int | None = None, has_embedding: bool = True, has_head: bool = True, *,
                 seed: int = 0, device=None, dtype=None):
        super().__init__()
        state = state or ParallelState.single()
        args.validate(state.tp_size)
        end_layer = args.num_layers if end_layer is None else end_layer
        if not 0 <= first_layer <= end_layer <= args.num_layers:
            raise ValueError(f"LlamaStage: layer range [{first_layer}, {end_layer}) is outside "
                             f"[0, {args.num_layers}) (model.num_layers)")
        self.args, self.state = args, state
        self.first_layer, self.end_layer = first_layer, end_layer
        self.vocab_padded = args.padded_vocab_size(state.tp_size)
        self.tied_here = args.tie_embeddings and has_embedding and has_head
        self.embedding = self.norm = self.output = None
        if has_embedding:
            self.embedding = VocabParallelEmbedding(args.vocab_size, args.hidden_size, state,
                                                    padded_num_embeddings=self.vocab_padded, init_method=skip_init,
                                                    device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(args, state, device, dtype) for _ in range(first_layer, end_layer))
        if has_head:
            self.norm = RMSNorm(args.hidden_size, args.norm_eps, state.sequence_parallel_active, device, dtype)
            self.output = ColumnParallelLinear(args.hidden_size, args.vocab_size, state,
                                               padded_out_features=self.vocab_padded, skip_weight=self.tied_here,
                                               init_method=skip_init, device=device, dtype=dtype)
            if args.tie_embeddings and not has_embedding:
                self.output.weight.pipeline_tied = True
        self._rope_cache: dict = {}
        self.reset_parameters(seed)

    @property
    def has_embedding(self) -> bool:
        return self.embedding is not None

    @property
    def has_head(self) -> bool:
        return self.output is not None

    @property
    def is_whole_model(self) -> bool:
        """Whether this stage holds the embedding, every decoder layer and the head."""
        return self.has_embedding and self.has_head and self.first_layer == 0 and self.end_layer == self.args.num_layers

    def head_weight(self) -> torch.Tensor:
        """This rank's weight of the output head (the embedding's when they are tied on this stage)."""
        return self.embedding.weight if self.tied_here else self.output.weight

    def logical_name(self, local_name: str) -> str:
        """The layer-global name of a parameter (``layers.0...`` here may be ``layers.7...`` logically)."""
        if local_name.startswith("layers."):
            _, index, rest = local_name.split(".", 2)
            return f"layers.{self.first_layer + int(index)}.{rest}"
        if local_name == "output.weight" and self.args.tie_embeddings:
            return "embedding.weight"
        return local_name

    def named_parameters_with_meta(self) -> list[tuple[str, nn.Parameter, ParamMeta]]:
        """``(logical_name, param, meta)`` for every parameter of this stage, each listed once."""
        return [(self.logical_name(n), p, param_meta(self.logical_name(n), p, self.state.tp_rank, self.state.tp_size))
                for n, p in self.named_parameters()]

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Initialise every parameter from its full logical tensor, seeded by ``seed`` and its logical name.

        Norm weights are 1, biases 0, the output projections of each block N(0, std / sqrt(2 L)),
        everything else N(0, std). On the meta device (shapes and layouts only) there is nothing to do.
        """
        if any(p.is_meta for p in self.parameters()):
            return
        std = self.args.init_std
        for name, param, meta in self.named_parameters_with_meta():
            full = torch.empty(meta.logical_shape, device=param.device, dtype=torch.float32)
            if name.endswith("norm.weight"):
                full.fill_(1.0)
            elif name.endswith(".bias"):
                full.zero_()
            else:
                gen = torch.Generator(device=param.device)
                gen.manual_seed(stream_seed(seed, name))
                scale = std / math.sqrt(2 * self.args.num_layers) if name.endswith(OUTPUT_PROJECTIONS) else std
                full.normal_(0.0, scale, generator=gen)
            param.copy_(meta.layout.shard(full, meta.tp_rank, meta.tp_size))

    def rope_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin tables for ``max_seq_len`` positions, cached per device (never cast with the model)."""
        key = str(device)
        if key not in self._rope_cache:
            self._rope_cache[key] = kernels.rotary_tables(self.args.head_dim, self.args.max_seq_len,
                                                          self.args.rope_theta, device=device,
                                                          scaling=self.args.rope_scaling)
        return self._rope_cache[key]

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, *, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX, with_entropy: bool = False,
                kv_cache=None, last_only: bool = False, linears=None):
        h = self.embedding(x) if self.has_embedding else x
        cos, sin = self.rope_tables(h.device)
        if kv_cache is not None:
            kv_cache.begin(cos, sin, position_ids, x.shape[1])
        full_recompute = self.args.recompute == "full" and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if kv_cache is not None:
                h = layer.cached_forward(h, kv_cache.layer(i), doc_ids, None if linears is None else linears.layers[i])
            elif full_recompute:
                h = checkpoint(layer, h, cos, sin, position_ids, doc_ids, use_reentrant=False)
            else:
                h = layer(h, cos, sin, position_ids, doc_ids)
        if kv_cache is not None:
            kv_cache.advance(x.shape[1])
        if not self.has_head:
            return h
        if kv_cache is not None and last_only:
            h = h[:, -1:]
        h = self.norm(h)
        if linears is not None:
            logits = linears.head(h)
        else:
            logits = self.output(h, self.embedding.weight if self.tied_here else None)
        logits = mask_vocab_padding(logits, self.args.vocab_size, self.state)
        if labels is None:
            return logits
        loss = vocab_parallel_cross_entropy(logits, labels, self.state, ignore_index=ignore_index)
        if with_entropy:
            return loss, vocab_parallel_entropy(logits, self.state)
        return loss


def stage_layer_range(num_layers: int, num_stages: int, stage: int,
                      layers_per_stage: list[int] | None = None) -> tuple[int, int]:
    """``[first, end)`` of the decoder layers on pipeline stage ``stage`` of ``num_stages``.

    An even split, or ``layers_per_stage`` (one count per stage, summing to ``num_layers``).
    """
    errors = pipeline_errors(num_layers, num_stages, 1, layers_per_stage)
    if errors:
        raise ConfigError(errors_message(errors))
    if layers_per_stage is None:
        layers_per_stage = [num_layers // num_stages] * num_stages
    first = sum(layers_per_stage[:stage])
    return first, first + layers_per_stage[stage]


def build_chunks(args: ModelArgs, state: ParallelState | None = None, *, virtual_pp: int = 1,
                 layers_per_stage: list[int] | None = None, seed: int = 0, device=None,
                 dtype=None) -> list[LlamaStage]:
    """This process's model chunks: chunk ``c`` is virtual pipeline stage ``c * pp + pp_rank`` of
    ``pp * virtual_pp``, with its share of the layers (an even split, or ``layers_per_stage``, one
    entry per virtual stage), the embedding on virtual stage 0 and the head on the last."""
    state = state or ParallelState.single()
    args.validate(state.tp_size, state.pp_size, virtual_pp, layers_per_stage)
    stages = state.pp_size * virtual_pp
    chunks = []
    for c in range(virtual_pp):
        stage = c * state.pp_size + state.pp_rank
        first, end = stage_layer_range(args.num_layers, stages, stage, layers_per_stage)
        chunks.append(LlamaStage(args, state, first, end, has_embedding=stage == 0, has_head=stage == stages - 1,
                                 seed=seed, device=device, dtype=dtype))
    return chunks


def build_stage(args: ModelArgs, state: ParallelState | None = None, *, seed: int = 0, device=None,
                dtype=None) -> LlamaStage:
    """This process's pipeline stage (one chunk): its share of the layers, the embedding first, the head last."""
    return build_chunks(args, state, seed=seed, device=device, dtype=dtype)[0]

