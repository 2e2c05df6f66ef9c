"""Triton RMSNorm.

Forward: one program per row, storing the row's reciprocal RMS for the backward.
Backward: a fixed number of programs each walk a strided set of rows, write the input gradient
and keep a float32 partial weight gradient in registers; a second kernel sums the partials.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import as_rows, check_device, num_sms


@triton.jit
def _rmsnorm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, x_stride, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(y_ptr + row * n_cols + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rmsnorm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, n_rows, n_cols, x_stride,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, tl.cdiv(n_rows - pid, n_programs)):
        row64 = (pid + i * n_programs).to(tl.int64)
        x = tl.load(x_ptr + row64 * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row64 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row64)
        xhat = x * rstd
        wdy = w * dy
        dx = (wdy - xhat * (tl.sum(xhat * wdy, axis=0) / n_cols)) * rstd
        tl.store(dx_ptr + row64 * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(dw_part_ptr + pid * n_cols + cols, dw, mask=mask)


@triton.jit
def _sum_rows(part_ptr, out_ptr, n_rows, n_cols, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(0, n_rows):
        acc += tl.load(part_ptr + row * n_cols + cols, mask=mask, other=0.0)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper; saves the input, the weight and one float32 per row."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        check_device(x, "rms_norm")
        x2 = as_rows(x)
        rows, cols = x2.shape
        block = triton.next_power_of_2(cols)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        if rows:
            _rmsnorm_fwd[(rows,)](x2, weight, y, rstd, cols, x2.stride(0), eps, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x2 = as_rows(x)
        rows, cols = x2.shape
        block = triton.next_power_of_2(cols)
        dy = dy.contiguous()
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        programs = max(1, min(rows, 4 * num_sms(x.device)))
        dw_part = torch.empty(programs, cols, dtype=torch.float32, device=x.device)
        dw = torch.empty_like(weight)
        if rows:
            _rmsnorm_bwd[(programs,)](dy, x2, weight, rstd, dx, dw_part, rows, cols, x2.stride(0),
                                      BLOCK=block, num_warps=_warps(block))
            _sum_rows[(triton.cdiv(cols, 256),)](dw_part, dw, programs, cols, BLOCK=256)
        else:
            dw.zero_()
        return dx, dw, None
