"""RMSNorm: ``x / sqrt(mean(x**2) + eps) * weight`` over the last dimension."""
from __future__ import annotations

import torch

from .dispatch import resolve, triton_module


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain-torch RMSNorm in float32, returned in ``x``'s dtype."""
    _check(x, weight)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: str | None = None) -> torch.Tensor:
    """RMSNorm of ``x`` (..., hidden) with ``weight`` (hidden,); the output has ``x``'s dtype.

    The Triton backward reduces the weight gradient inside the kernel family: each program keeps
    a float32 partial sum over its rows and a second small kernel adds the partials.
    """
    _check(x, weight)
    chosen = resolve("rms_norm", x.device, backend)
    if chosen == "triton":
        return triton_module("rmsnorm").RMSNormFunction.apply(x, weight, eps)
    if chosen == "apex":
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine

        return fused_rms_norm_affine(x, weight, weight.shape, eps)
    return rms_norm_reference(x, weight, eps)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or x.shape[-1:] != weight.shape:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be 1-D and match the last dim of x {tuple(x.shape)}")
