"""AdamW over flat float32 buffers, and the global sum of squares for gradient clipping.

``adamw_step`` updates master weights and both moments in place, optionally scaling the
gradients first (the clipping coefficient) and writing a low-precision copy of the updated
weights, all in one pass over memory. The math is torch.optim.AdamW's (decoupled weight decay,
bias correction).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .dispatch import resolve, triton_module


def adamw_step_reference(params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                         *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                         grad_scale: float = 1.0, out: torch.Tensor | None = None) -> None:
    """In-place AdamW step in plain torch, the same operations as torch.optim.AdamW (single tensor)."""
    _check(params, grads, exp_avg, exp_avg_sq, out, step)
    grad = grads.float() if grad_scale == 1.0 else grads.float() * grad_scale
    params.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    params.addcdiv_(exp_avg, denom, value=-step_size)
    if out is not None:
        out.copy_(params)


def adamw_step(params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
               grad_scale: float = 1.0, out: torch.Tensor | None = None, backend: str | None = None) -> None:
    """One AdamW step over flat buffers, in place.

    ``params``, ``exp_avg``, ``exp_avg_sq``: contiguous float32 of one shape; ``grads``: same shape,
    float32 or a 16-bit type. ``step`` counts from 1. ``grad_scale`` multiplies the gradients
    (e.g. the clipping coefficient). ``out`` (optional, same shape, e.g. bfloat16) receives the
    updated weights rounded to its dtype.
    """
    _check(params, grads, exp_avg, exp_avg_sq, out, step)
    chosen = resolve("adamw", params.device, backend)
    kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                  grad_scale=grad_scale, out=out)
    if chosen == "triton":
        triton_module("adamw").adamw_step(params, grads, exp_avg, exp_avg_sq, **kwargs)
    elif chosen == "apex":
        _adamw_apex(params, grads, exp_avg, exp_avg_sq, **kwargs)
    else:
        adamw_step_reference(params, grads, exp_avg, exp_avg_sq, **kwargs)


def sum_of_squares_reference(tensors: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of all elements, float32 0-dim tensor, in plain torch."""
    tensors = _as_list(tensors)
    total = torch.zeros((), dtype=torch.float32, device=tensors[0].device if tensors else None)
    for t in tensors:
        total = total + t.float().pow(2).sum()
    return total


def sum_of_squares(tensors: torch.Tensor | Sequence[torch.Tensor], *, backend: str | None = None) -> torch.Tensor:
    """Sum of squares of every element of one tensor or a list (float32, 0-dim): ``norm ** 2``.

    The Triton path writes per-block float32 partials, then sums them in a second launch, so
    the result is deterministic for a given device.
    """
    tensors = _as_list(tensors)
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    if resolve("sum_of_squares", tensors[0].device, backend) == "triton":
        return triton_module("adamw").sum_of_squares(tensors)
    return sum_of_squares_reference(tensors)


def _as_list(tensors) -> list[torch.Tensor]:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def _adamw_apex(params, grads, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step, grad_scale, out):
    import amp_C
    from apex.multi_tensor_apply import multi_tensor_applier

    grad = grads.float() if grad_scale == 1.0 else grads.float() * grad_scale
    noop = torch.zeros(1, dtype=torch.int, device=params.device)
    adamw_mode, bias_correction = 1, 1
    multi_tensor_applier(amp_C.multi_tensor_adam, noop, [[grad], [params], [exp_avg], [exp_avg_sq]],
                         lr, beta1, beta2, eps, step, adamw_mode, bias_correction, weight_decay)
    if out is not None:
        out.copy_(params)


def _check(params, grads, exp_avg, exp_avg_sq, out, step) -> None:
    for name, t in (("params", params), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"adamw_step: {name} must be a contiguous float32 tensor, got {t.dtype}")
    for name, t in (("grads", grads), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("out", out)):
        if t is not None and t.shape != params.shape:
            raise ValueError(f"adamw_step: {name} {tuple(t.shape)} must have the shape of params {tuple(params.shape)}")
    if out is not None and not out.is_contiguous():
        raise ValueError("adamw_step: out must be contiguous")
    if step < 1:
        raise ValueError(f"adamw_step: step counts from 1, got {step}")
