"""SwiGLU: ``silu(gate) * up``, the Llama MLP's gating, fused into one pass each way."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import resolve, triton_module


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-torch SwiGLU, computed in float32 and returned in ``gate``'s dtype."""
    _check(gate, up)
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``silu(gate) * up`` for two tensors of the same shape (views of one fused tensor are fine)."""
    _check(gate, up)
    if resolve("swiglu", gate.device, backend) == "triton":
        return triton_module("swiglu").SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate ({gate.dtype}) and up ({up.dtype}) must have the same dtype")
