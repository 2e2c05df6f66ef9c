"""Triton SwiGLU: one elementwise pass forward, one backward (recomputing the sigmoid)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import as_rows, check_device

BLOCK = 1024


@triton.jit
def _swiglu_fwd(gate_ptr, up_ptr, out_ptr, n_cols, gate_stride, up_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(grad_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_cols, gate_stride, up_stride,
                BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(grad_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dgate = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dgate_ptr + row * n_cols + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + row * n_cols + cols, (dy * silu).to(dup_ptr.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper around the two kernels; saves the inputs only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        check_device(gate, "swiglu")
        g2, u2 = as_rows(gate), as_rows(up)
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        rows, cols = g2.shape
        if out.numel():
            grid = (rows, triton.cdiv(cols, BLOCK))
            _swiglu_fwd[grid](g2, u2, out, cols, g2.stride(0), u2.stride(0), BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        g2, u2 = as_rows(gate), as_rows(up)
        grad = grad.contiguous()
        dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        dup = torch.empty_like(dgate)
        rows, cols = g2.shape
        if dgate.numel():
            grid = (rows, triton.cdiv(cols, BLOCK))
            _swiglu_bwd[grid](grad, g2, u2, dgate, dup, cols, g2.stride(0), u2.stride(0), BLOCK=BLOCK, num_warps=4)
        return dgate, dup
