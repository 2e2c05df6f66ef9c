"""Attention: causal / document-masked grouped-query attention without materialising repeated K/V.

Layout: q (batch, seq_q, heads, head_dim); k and v (batch, seq_k, kv_heads, head_dim), heads a
multiple of kv_heads; query head ``h`` reads kv head ``h // (heads // kv_heads)``. With
``causal``, query ``i`` sees key ``j`` only if ``j <= i + seq_k - seq_q`` (aligned at the end, so
seq_q < seq_k is decoding with a cache). ``doc_ids`` (batch, seq), for seq_q == seq_k, further
keeps a query to keys of its own document: ``doc_ids[i] == doc_ids[j]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import get_backend, resolve, triton_module

TRITON_MAX_HEAD_DIM = 256


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None, doc_ids: torch.Tensor | None = None, *,
                    backend: str | None = None) -> torch.Tensor:
    """Softmax attention; returns (batch, seq_q, heads, head_dim) in q's dtype.

    Backends: Triton (online-softmax forward, deterministic backward), or torch's
    scaled_dot_product_attention. ``auto`` falls back to torch for head dims above 256.
    """
    _check(q, k, v, causal, doc_ids)
    chosen = resolve("flash_attention", q.device, backend)
    if chosen == "triton" and q.shape[-1] > TRITON_MAX_HEAD_DIM:
        if (backend if backend is not None else get_backend()).strip().lower() == "triton":
            raise ValueError(f"flash_attention: the Triton kernel takes head_dim up to {TRITON_MAX_HEAD_DIM}, "
                             f"got {q.shape[-1]}")
        chosen = "torch"
    if chosen == "triton":
        return triton_module("attention").FlashAttentionFunction.apply(q, k, v, causal, softmax_scale, doc_ids)
    return attention_sdpa(q, k, v, causal, softmax_scale, doc_ids)


def flash_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                              softmax_scale: float | None = None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The explicit math in float32: repeat K/V per group, mask, softmax, weighted sum."""
    _check(q, k, v, causal, doc_ids)
    group = q.shape[2] // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qf = q.float().transpose(1, 2)
    kf = k.float().repeat_interleave(group, dim=2).transpose(1, 2)
    vf = v.float().repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    mask = attention_mask(q.shape[1], k.shape[1], causal, doc_ids, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf
    return out.transpose(1, 2).to(q.dtype)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                   softmax_scale: float | None = None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The same function through torch's scaled_dot_product_attention (the ``torch`` backend)."""
    _check(q, k, v, causal, doc_ids)
    plain_causal = causal and doc_ids is None and q.shape[1] == k.shape[1]
    mask = None if plain_causal else attention_mask(q.shape[1], k.shape[1], causal, doc_ids, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=plain_causal,
        scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def attention_mask(seq_q: int, seq_k: int, causal: bool, doc_ids: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor | None:
    """Boolean mask (batch or 1, 1, seq_q, seq_k), True where a query may see a key; None if all may."""
    mask = None
    if causal:
        i = torch.arange(seq_q, device=device)[:, None]
        j = torch.arange(seq_k, device=device)[None, :]
        mask = (j <= i + (seq_k - seq_q))[None, None]
    if doc_ids is not None:
        same = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    return mask


def _check(q, k, v, causal, doc_ids) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flash_attention: q, k, v must be (batch, seq, heads, head_dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"flash_attention: heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if causal and q.shape[1] > k.shape[1]:
        raise ValueError(f"flash_attention: causal attention needs seq_q ({q.shape[1]}) <= seq_k ({k.shape[1]})")
    if doc_ids is not None:
        if q.shape[1] != k.shape[1]:
            raise ValueError("flash_attention: doc_ids needs seq_q == seq_k")
        if doc_ids.shape != q.shape[:2]:
            raise ValueError(f"flash_attention: doc_ids {tuple(doc_ids.shape)} must be (batch, seq) = {tuple(q.shape[:2])}")
        if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
            raise ValueError(f"flash_attention: doc_ids must be an integer tensor, got {doc_ids.dtype}")
