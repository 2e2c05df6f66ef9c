"""Triton RoPE: one program per token rotates all its q heads and k heads.

The backward is the same rotation by the negated angle, so one kernel serves both directions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_device


@triton.jit
def _rotate_heads(x_ptr, out_ptr, b, s, n_heads, stride_b, stride_s, stride_h, seq_len, c, sn,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (dims < HALF)
    src = x_ptr + b * stride_b + s * stride_s + heads * stride_h + dims
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + ((b * seq_len + s) * n_heads + heads) * (2 * HALF) + dims
    tl.store(dst, (x1 * c - x2 * sn).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * c + x1 * sn).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr, seq_len, n_q_heads, n_k_heads,
            sqb, sqs, sqh, skb, sks, skh,
            HALF: tl.constexpr, HAS_POS: tl.constexpr, INVERSE: tl.constexpr,
            BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    if HAS_POS:
        pos = tl.load(pos_ptr + token).to(tl.int64)
    else:
        pos = s
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    c = tl.load(cos_ptr + pos * HALF + dims, mask=dims < HALF, other=0.0)
    sn = tl.load(sin_ptr + pos * HALF + dims, mask=dims < HALF, other=0.0)
    if INVERSE:
        sn = -sn
    _rotate_heads(q_ptr, qo_ptr, b, s, n_q_heads, sqb, sqs, sqh, seq_len, c, sn, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr, ko_ptr, b, s, n_k_heads, skb, sks, skh, seq_len, c, sn, HALF, BLOCK_KH, BLOCK_HALF)


def _launch(q, k, cos, sin, pos, inverse):
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    batch, seq, hq, dim = q.shape
    hk = k.shape[2]
    q_out = torch.empty((batch, seq, hq, dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((batch, seq, hk, dim), dtype=k.dtype, device=k.device)
    if batch * seq == 0:
        return q_out, k_out
    half = dim // 2
    block = triton.next_power_of_2(max(hq, hk) * half)
    _rotary[(batch * seq,)](
        q, k, q_out, k_out, cos, sin, pos if pos is not None else q, seq, hq, hk,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        HALF=half, HAS_POS=pos is not None, INVERSE=inverse,
        BLOCK_QH=triton.next_power_of_2(hq), BLOCK_KH=triton.next_power_of_2(hk),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=min(max(block // 512, 1), 8),
    )
    return q_out, k_out


class RotaryFunction(torch.autograd.Function):
    """Autograd wrapper; saves nothing but the tables and positions."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids):
        check_device(q, "apply_rotary")
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        pos = position_ids.contiguous() if position_ids is not None else None
        ctx.save_for_backward(cos, sin, pos)
        return _launch(q, k, cos, sin, pos, inverse=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, pos = ctx.saved_tensors
        dq, dk = _launch(dq, dk, cos, sin, pos, inverse=True)
        return dq, dk, None, None, None
