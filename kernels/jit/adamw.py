"""Triton AdamW step and sum of squares over flat buffers.

The step reads weight, gradient and both moments and writes weight, both moments and
(optionally) a 16-bit weight copy: 28 bytes per parameter with float32 gradients, plus 2 for
the copy. Scalars that change every step (lr, bias corrections) are kernel arguments, not
compile-time constants, so nothing recompiles.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import check_device, num_sms

BLOCK = 2048
SUMSQ_BLOCK = 4096


@triton.jit
def _adamw(p_ptr, g_ptr, m_ptr, v_ptr, out_ptr, n, decay, beta1, beta2, step_size, bc2_sqrt, eps, grad_scale,
           HAS_OUT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * grad_scale
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    p = p * decay
    m = m + (g - m) * (1.0 - beta1)
    v = v * beta2 + (1.0 - beta2) * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if HAS_OUT:
        tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sumsq_partials(x_ptr, part_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, tl.cdiv(tl.cdiv(n, BLOCK) - pid, n_programs)):
        offs = (pid + i * n_programs).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


def adamw_step(params, grads, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step,
               grad_scale=1.0, out=None):
    """In-place fused AdamW step; see :func:`megaevo.kernels.adamw_step`."""
    check_device(params, "adamw_step")
    n = params.numel()
    if n == 0:
        return
    grads = grads.contiguous()
    _adamw[(triton.cdiv(n, BLOCK),)](
        params, grads, exp_avg, exp_avg_sq, out if out is not None else params, n,
        1.0 - lr * weight_decay, beta1, beta2, lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step), eps,
        grad_scale, HAS_OUT=out is not None, BLOCK=BLOCK, num_warps=8)


@triton.jit
def _sum(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares over a list of tensors: per-block partials, then one program adds them."""
    check_device(tensors[0], "sum_of_squares")
    device = tensors[0].device
    flat = [t.contiguous().view(-1) for t in tensors if t.numel()]
    programs = [max(1, min(4 * num_sms(device), triton.cdiv(t.numel(), SUMSQ_BLOCK))) for t in flat]
    partials = torch.empty(sum(programs), dtype=torch.float32, device=device)
    start = 0
    for t, count in zip(flat, programs):
        _sumsq_partials[(count,)](t, partials[start:], t.numel(), BLOCK=SUMSQ_BLOCK, num_warps=8)
        start += count
    total = torch.zeros(1, dtype=torch.float32, device=device)
    if start:
        _sum[(1,)](partials, total, start, BLOCK=1024)
    return total[0]
