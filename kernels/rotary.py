"""Rotary position embedding (RoPE) applied to q and k together.

Layout: q (batch, seq, heads, head_dim) and k (batch, seq, kv_heads, head_dim), the layout
:func:`megaevo.kernels.flash_attention` takes. Rotation pairs element ``i`` with ``i + head_dim/2``
(the "rotate half" convention of Hugging Face Llama checkpoints).
"""
from __future__ import annotations

import math

import torch

from .dispatch import resolve, triton_module


ROPE_SCALING_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rotary_tables(head_dim: int, max_positions: int, theta: float = 10000.0,
                  device: torch.device | str | None = None, scaling=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each float32 of shape (max_positions, head_dim // 2).

    ``scaling`` (a mapping, or its items) selects a frequency scaling; only Llama 3's is known:
    ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}``. Wavelengths longer than ``original / low_freq_factor``
    are stretched by ``factor``, those shorter than ``original / high_freq_factor`` are kept, and
    the band between is interpolated smoothly. ``None`` leaves the frequencies as they are.
    """
    if head_dim % 2:
        raise ValueError(f"rotary_tables: head_dim must be even, got {head_dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    if scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, dict(scaling))
    angles = torch.arange(max_positions, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    kind = scaling.get("rope_type")
    if kind != "llama3":
        raise ValueError(f"rotary_tables: unknown rope scaling type {kind!r}; only 'llama3' is supported")
    missing = [k for k in ROPE_SCALING_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"rotary_tables: llama3 rope scaling needs {', '.join(missing)}")
    factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    original = float(scaling["original_max_position_embeddings"])
    if not (factor > 0 and 0 < low < high and original > 0):
        raise ValueError(f"rotary_tables: llama3 rope scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor "
                         f"and original_max_position_embeddings > 0, got {scaling}")
    wavelen = 2 * math.pi / inv_freq
    # 0 for long wavelengths (fully scaled), 1 for short ones (kept), linear in 1 / wavelength between.
    keep = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    keep = torch.where(wavelen < original / high, 1.0, torch.where(wavelen > original / low, 0.0, keep))
    return (1 - keep) * inv_freq / factor + keep * inv_freq


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch RoPE in float32; returns new (q, k) in the inputs' dtypes."""
    _check(q, k, cos, sin, position_ids)
    if position_ids is None:
        c, s = cos[: q.shape[1]][None, :, None, :], sin[: q.shape[1]][None, :, None, :]
    else:
        c, s = cos[position_ids][:, :, None, :], sin[position_ids][:, :, None, :]
    c, s = c.float(), s.float()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 position_ids: torch.Tensor | None = None, *,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their positions in one pass; returns new (q, k).

    ``cos``/``sin`` come from :func:`rotary_tables`; ``position_ids`` (batch, seq) defaults to
    ``0 .. seq-1`` for every row. q and k may be strided views (e.g. of a fused QKV projection)
    as long as head_dim is contiguous.
    """
    _check(q, k, cos, sin, position_ids)
    if resolve("rotary", q.device, backend) == "triton":
        return triton_module("rotary").RotaryFunction.apply(q, k, cos, sin, position_ids)
    return apply_rotary_reference(q, k, cos, sin, position_ids)


def _check(q, k, cos, sin, position_ids) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rotary: q {tuple(q.shape)} and k {tuple(k.shape)} must be (batch, seq, heads, head_dim)")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"apply_rotary: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, seq or head_dim")
    half = q.shape[3] // 2
    if q.shape[3] % 2 or cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != half:
        raise ValueError(f"apply_rotary: cos/sin {tuple(cos.shape)} must be (positions, {half}) for head_dim {q.shape[3]}")
    if position_ids is None:
        if cos.shape[0] < q.shape[1]:
            raise ValueError(f"apply_rotary: tables cover {cos.shape[0]} positions, sequence has {q.shape[1]}")
    elif position_ids.shape != q.shape[:2]:
        raise ValueError(f"apply_rotary: position_ids {tuple(position_ids.shape)} must be (batch, seq) = {tuple(q.shape[:2])}")
