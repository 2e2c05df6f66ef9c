"""Triton RMSNorm.

Forward: each program normalises ``ROWS`` rows at once (several rows per program keep enough
bytes in flight when rows are short), storing each row's reciprocal RMS for the backward.
Backward: a fixed number of programs each walk a strided set of row groups, write the input
gradient and keep a float32 partial weight gradient in registers; a second kernel sums the
partials, a tile of partial rows at a time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import as_rows, check_device, num_sms


@triton.jit
def _rmsnorm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, x_stride, eps,
                 ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows[:, None] * n_cols + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _rmsnorm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, n_rows, n_cols, x_stride,
                 ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    n_groups = tl.cdiv(n_rows, ROWS)
    for i in range(0, tl.cdiv(n_groups - pid, n_programs)):
        rows = (pid + i * n_programs).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        wdy = w[None, :] * dy
        dx = (wdy - xhat * (tl.sum(xhat * wdy, axis=1) / n_cols)[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows[:, None] * n_cols + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(dw_part_ptr + pid * n_cols + cols, dw, mask=col_ok)


@triton.jit
def _sum_rows(part_ptr, out_ptr, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        acc += tl.load(part_ptr + rows[:, None] * n_cols + cols[None, :],
                       mask=(rows[:, None] < n_rows) & col_ok[None, :], other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=col_ok)


def launch_config(n_cols: int, sms: int) -> dict:
    """Rows per program and warps (the forward's and the backward's alike), and the backward's
    number of programs.

    A program covers about 8192 elements (at least one whole row), about 32 per thread (measured
    on an H100 with `benchmarks/rmsnorm_configs.py`).
    """
    block = triton.next_power_of_2(n_cols)
    rows = max(1, 8192 // block)
    warps = min(max(rows * block // 1024, 4), 16)
    return dict(block=block, rows=rows, warps=warps, programs=2 * sms)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper; saves the input, the weight and one float32 per row."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        check_device(x, "rms_norm")
        x2 = as_rows(x)
        rows, cols = x2.shape
        cfg = launch_config(cols, num_sms(x.device))
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        if rows:
            _rmsnorm_fwd[(triton.cdiv(rows, cfg["rows"]),)](
                x2, weight, y, rstd, rows, cols, x2.stride(0), eps, ROWS=cfg["rows"], BLOCK=cfg["block"],
                num_warps=cfg["warps"])
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x2 = as_rows(x)
        rows, cols = x2.shape
        cfg = launch_config(cols, num_sms(x.device))
        dy = dy.contiguous()
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        programs = max(1, min(triton.cdiv(rows, cfg["rows"]), cfg["programs"]))
        dw_part = torch.empty(programs, cols, dtype=torch.float32, device=x.device)
        dw = torch.empty_like(weight)
        if rows:
            _rmsnorm_bwd[(programs,)](dy, x2, weight, rstd, dx, dw_part, rows, cols, x2.stride(0),
                                      ROWS=cfg["rows"], BLOCK=cfg["block"], num_warps=cfg["warps"])
            _sum_rows[(triton.cdiv(cols, 64),)](dw_part, dw, programs, cols, BLOCK_R=32, BLOCK_C=64)
        else:
            dw.zero_()
        return dx, dw, None
