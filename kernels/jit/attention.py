"""Triton flash attention: online-softmax forward, deterministic two-kernel backward.

Forward: one program per (query block, batch x head) walks the key blocks it may see, keeping a
running max and sum in base 2 and storing the log-sum-exp per row for the backward.
Backward: ``delta = rowsum(dO * O)``; one kernel per key block accumulates dK and dV over the
query heads of its kv head (so GQA never repeats K/V, and no atomics are needed); another per
query block accumulates dQ. Blocks a causal mask hides entirely are skipped; masks are applied
only on blocks that need them. With ``doc_ids`` each program first scans the document ids to
narrow its loop to blocks that share a document with it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import INTERPRETED, check_device, num_sms

LOG2E = 1.4426950408889634
INT_MAX = tl.constexpr(2147483647)


@triton.jit
def _doc_block_range(doc_ptr, doc_own, own_valid, lo, hi, n, BLOCK: tl.constexpr):
    """[first, last) of the BLOCK-sized blocks of ``doc_ptr[lo:hi]`` sharing a document id with
    ``doc_own``; a block qualifies when the id ranges overlap (exact masking happens later)."""
    own_min = tl.min(tl.where(own_valid, doc_own, INT_MAX), axis=0)
    own_max = tl.max(tl.where(own_valid, doc_own, -INT_MAX), axis=0)
    first = hi
    last = lo
    for start in range(lo, hi, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        valid = idx < n
        d = tl.load(doc_ptr + idx, mask=valid, other=0)
        d_min = tl.min(tl.where(valid, d, INT_MAX), axis=0)
        d_max = tl.max(tl.where(valid, d, -INT_MAX), axis=0)
        hit = (d_min <= own_max) & (d_max >= own_min)
        first = tl.minimum(first, tl.where(hit, start, hi))
        last = tl.where(hit, start + BLOCK, last)
    return first, tl.minimum(last, hi)


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, doc_base, doc_q, rows, lo, hi, seq_k, shift,
                stride_ks, stride_vs, qk_scale,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + cols[:, None] * stride_ks + dims[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vs + dims[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=cols[:, None] < seq_k, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < seq_k, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if MASKED:
            keep = cols[None, :] < seq_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None] + shift)
            if HAS_DOC:
                doc_k = tl.load(doc_base + cols, mask=cols < seq_k, other=0)
                keep = keep & (doc_q[:, None] == doc_k[None, :])
            s = tl.where(keep, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, DOC, qk_scale,
              stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
              stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
              n_heads, group, seq_q, seq_k, seq_bucket,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest causal rows first
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    kvh = h // group
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_q
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    shift = seq_k - seq_q
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo = seq_k * 0
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M + shift)
    if HAS_DOC:
        doc_base = DOC + b * seq_k
        doc_q = tl.load(DOC + b * seq_q + rows, mask=row_ok, other=0)
        lo, hi = _doc_block_range(doc_base, doc_q, row_ok, lo, hi, seq_k, BLOCK_N)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, doc_base, doc_q, rows, lo, hi, seq_k,
                                    shift, stride_ks, stride_vs, qk_scale,
                                    True, CAUSAL, True, HEAD_DIM, BLOCK_N, PREC)
    else:
        if CAUSAL:
            mid = tl.minimum(start_m + shift + 1, seq_k) // BLOCK_N * BLOCK_N
        else:
            mid = seq_k // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, DOC, rows, rows, lo, mid, seq_k,
                                    shift, stride_ks, stride_vs, qk_scale,
                                    False, CAUSAL, False, HEAD_DIM, BLOCK_N, PREC)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, DOC, rows, rows, mid, hi, seq_k,
                                    shift, stride_ks, stride_vs, qk_scale,
                                    True, CAUSAL, False, HEAD_DIM, BLOCK_N, PREC)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + dims[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * seq_q + rows, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
                    n_heads, seq_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows[:, None] < seq_q
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + dims[None, :], mask=row_ok, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + rows[:, None] * stride_ds + dims[None, :], mask=row_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * seq_q + rows, delta, mask=rows < seq_q)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, doc_base, doc_k, cols, lo, hi, seq_q,
                 shift, stride_qs, stride_dos, qk_scale,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < seq_q
        q = tl.load(q_base + rows[:, None] * stride_qs + dims[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dos + dims[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :])
        if MASKED:
            if CAUSAL:
                keep = cols[:, None] <= rows[None, :] + shift
            else:
                keep = cols[:, None] >= 0
            if HAS_DOC:
                doc_q = tl.load(doc_base + rows, mask=row_ok, other=0)
                keep = keep & (doc_k[:, None] == doc_q[None, :])
            p_t = tl.where(keep, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DOC, DK, DV, qk_scale, sm_scale,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                   stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                   n_heads, group, heads_per_program, seq_q, seq_k, seq_bucket,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    n_split = group // heads_per_program
    n_kv = n_heads // group
    pid = tl.program_id(1)
    b = (pid // (n_kv * n_split)).to(tl.int64)
    kvh = (pid // n_split) % n_kv
    split = pid % n_split
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    col_ok = cols < seq_k
    k = tl.load(K + b * stride_kb + kvh * stride_kh + cols[:, None] * stride_ks + dims[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + kvh * stride_vh + cols[:, None] * stride_vs + dims[None, :],
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    shift = seq_k - seq_q
    lo = seq_q * 0
    hi = seq_q
    if CAUSAL:
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
    doc_base = DOC + b * seq_q
    doc_k = cols
    if HAS_DOC:
        doc_k = tl.load(DOC + b * seq_k + cols, mask=col_ok, other=0)
        lo, hi = _doc_block_range(doc_base, doc_k, col_ok, lo, hi, seq_q, BLOCK_M)
        mid = hi
    elif CAUSAL:
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.maximum(mid, lo), hi)
    else:
        mid = lo
    for i in range(0, heads_per_program):
        h = kvh * group + split * heads_per_program + i
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_db + h * stride_dh
        lse_base = LSE + (b * n_heads + h) * seq_q
        delta_base = DELTA + (b * n_heads + h) * seq_q
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, doc_base, doc_k, cols,
                              lo, mid, seq_q, shift, stride_qs, stride_ds, qk_scale,
                              True, CAUSAL, HAS_DOC, HEAD_DIM, BLOCK_M, PREC)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, doc_base, doc_k, cols,
                              mid, hi, seq_q, shift, stride_qs, stride_ds, qk_scale,
                              False, CAUSAL, False, HEAD_DIM, BLOCK_M, PREC)
    out_h = kvh * n_split + split
    tl.store(DK + b * stride_dkb + out_h * stride_dkh + cols[:, None] * stride_dks + dims[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + b * stride_dvb + out_h * stride_dvh + cols[:, None] * stride_dvs + dims[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_base, v_base, doc_base, doc_q, rows, lo, hi, seq_k, shift,
               stride_ks, stride_vs, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + cols[:, None] * stride_ks + dims[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vs + dims[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=cols[:, None] < seq_k, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < seq_k, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse[:, None])
        if MASKED:
            keep = cols[None, :] < seq_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None] + shift)
            if HAS_DOC:
                doc_k = tl.load(doc_base + cols, mask=cols < seq_k, other=0)
                keep = keep & (doc_q[:, None] == doc_k[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DOC, DQ, qk_scale, sm_scale,
                 stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                 stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                 stride_dqb, stride_dqs, stride_dqh,
                 n_heads, group, seq_q, seq_k, seq_bucket,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest causal rows first
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    kvh = h // group
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_q
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + rows[:, None] * stride_ds + dims[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * seq_q + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * seq_q + rows, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    shift = seq_k - seq_q
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo = seq_k * 0
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M + shift)
    if HAS_DOC:
        doc_base = DOC + b * seq_k
        doc_q = tl.load(DOC + b * seq_q + rows, mask=row_ok, other=0)
        lo, hi = _doc_block_range(doc_base, doc_q, row_ok, lo, hi, seq_k, BLOCK_N)
        dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, doc_base, doc_q, rows, lo, hi, seq_k, shift,
                        stride_ks, stride_vs, qk_scale, True, CAUSAL, True, HEAD_DIM, BLOCK_N, PREC)
    else:
        if CAUSAL:
            mid = tl.minimum(start_m + shift + 1, seq_k) // BLOCK_N * BLOCK_N
        else:
            mid = seq_k // BLOCK_N * BLOCK_N
        dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, DOC, rows, rows, lo, mid, seq_k, shift,
                        stride_ks, stride_vs, qk_scale, False, CAUSAL, False, HEAD_DIM, BLOCK_N, PREC)
        dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, DOC, rows, rows, mid, hi, seq_k, shift,
                        stride_ks, stride_vs, qk_scale, True, CAUSAL, False, HEAD_DIM, BLOCK_N, PREC)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqs + dims[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# Launch configurations. The interpreter gets small fixed blocks (unequal, to exercise the
# block arithmetic); a GPU autotunes over a few tiles (BLOCK_M, BLOCK_N, warps, stages), once per
# (sequence-length bucket, head dim, masks, dtype).
_KEY = ["seq_bucket", "HEAD_DIM", "CAUSAL", "HAS_DOC"]
_CPU_FWD = dict(BLOCK_M=32, BLOCK_N=16)
_CPU_DKDV = dict(BLOCK_M=16, BLOCK_N=32)
_CPU_DQ = dict(BLOCK_M=32, BLOCK_N=16)
_FWD_TILES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3), (64, 32, 4, 2),
              (32, 32, 4, 2)]
_DKDV_TILES = [(32, 128, 8, 3), (32, 64, 8, 3), (64, 64, 8, 3), (16, 64, 4, 3), (64, 128, 8, 3), (32, 128, 4, 3),
               (64, 64, 4, 3), (32, 32, 4, 2)]
_DQ_TILES = [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (32, 32, 4, 2)]


def _prune(configs, named_args, **kwargs):
    """Small tiles only for head_dim 256 (registers), and no tiny tiles below it."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    area = [c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in configs]
    if head_dim >= 256:
        return [c for c, a in zip(configs, area) if a <= 2048]
    return [c for c, a in zip(configs, area) if a > 1024]


def _autotuned(kernel, tiles):
    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s) for m, n, w, s in tiles]
    return triton.autotune(configs, key=_KEY, prune_configs_by={"early_config_prune": _prune})(kernel)


if INTERPRETED:
    _fwd_kernel, _dkdv_kernel, _dq_kernel = _attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq
else:
    _fwd_kernel = _autotuned(_attn_fwd, _FWD_TILES)
    _dkdv_kernel = _autotuned(_attn_bwd_dkdv, _DKDV_TILES)
    _dq_kernel = _autotuned(_attn_bwd_dq, _DQ_TILES)


def _seq_bucket(seq_k: int) -> int:
    """Autotuning key for the length: powers of two from 1024 to 16384."""
    return max(1024, min(triton.next_power_of_2(seq_k), 16384))


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _heads_per_program(batch: int, kv_heads: int, group: int, seq_k: int, device: torch.device) -> int:
    """Query heads one dK/dV program covers: all of its group unless that leaves the GPU idle."""
    programs = batch * kv_heads * triton.cdiv(seq_k, 128)
    target = 2 * num_sms(device)
    for split in range(1, group + 1):
        if group % split == 0 and (programs * split >= target or split == group):
            return group // split
    return group


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_forward(q, k, v, causal, softmax_scale, doc_ids):
    """Output and base-2 log-sum-exp (batch, heads, seq_q) of the Triton forward."""
    batch, seq_q, n_heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    out = torch.empty((batch, seq_q, n_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, seq_q), dtype=torch.float32, device=q.device)
    meta = dict(HEAD_DIM=head_dim, CAUSAL=causal, HAS_DOC=doc_ids is not None, PREC=_precision(q.dtype))
    if INTERPRETED:
        meta.update(_CPU_FWD)

    def grid(m):
        return (triton.cdiv(seq_q, m["BLOCK_M"]), batch * n_heads)

    _fwd_kernel[grid](q, k, v, out, lse, doc_ids if doc_ids is not None else lse, softmax_scale * LOG2E,
                      *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                      n_heads, n_heads // kv_heads, seq_q, seq_k, _seq_bucket(seq_k), **meta)
    return out, lse


def attention_backward(do, q, k, v, out, lse, causal, softmax_scale, doc_ids):
    """dq, dk, dv of the Triton backward."""
    batch, seq_q, n_heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    group = n_heads // kv_heads
    doc = doc_ids if doc_ids is not None else lse
    meta = dict(HEAD_DIM=head_dim, CAUSAL=causal, HAS_DOC=doc_ids is not None, PREC=_precision(q.dtype))
    bucket = _seq_bucket(seq_k)

    delta = torch.empty_like(lse)
    rows = max(16, 8192 // head_dim)
    _attn_bwd_delta[(triton.cdiv(seq_q, rows), batch * n_heads)](
        out, do, delta, *_strides(out), *_strides(do), n_heads, seq_q, HEAD_DIM=head_dim, BLOCK_M=rows)

    per_program = _heads_per_program(batch, kv_heads, group, seq_k, q.device)
    n_split = group // per_program
    if n_split == 1:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
    else:
        dk = torch.empty((batch, seq_k, kv_heads * n_split, head_dim), dtype=torch.float32, device=q.device)
        dv = torch.empty_like(dk)
    dkdv_meta = dict(meta, **_CPU_DKDV) if INTERPRETED else meta

    def dkdv_grid(m):
        return (triton.cdiv(seq_k, m["BLOCK_N"]), batch * kv_heads * n_split)

    _dkdv_kernel[dkdv_grid](q, k, v, do, lse, delta, doc, dk, dv, softmax_scale * LOG2E, softmax_scale,
                            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
                            n_heads, group, per_program, seq_q, seq_k, bucket, **dkdv_meta)
    if n_split > 1:
        dk = dk.view(batch, seq_k, kv_heads, n_split, head_dim).sum(3).to(k.dtype)
        dv = dv.view(batch, seq_k, kv_heads, n_split, head_dim).sum(3).to(v.dtype)

    dq = torch.empty_like(q)
    dq_meta = dict(meta, **_CPU_DQ) if INTERPRETED else meta

    def dq_grid(m):
        return (triton.cdiv(seq_q, m["BLOCK_M"]), batch * n_heads)

    _dq_kernel[dq_grid](q, k, v, do, lse, delta, doc, dq, softmax_scale * LOG2E, softmax_scale,
                        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
                        n_heads, group, seq_q, seq_k, bucket, **dq_meta)
    return dq, dk, dv


def _padded_head_dim(dim: int) -> int:
    """The head dim the kernels run at: a power of two of at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(dim))


def _pad(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero-pad the head dim (zeros change neither q.k nor the kept output columns)."""
    return t if t.shape[-1] == dim else F.pad(t, (0, dim - t.shape[-1]))


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper; saves q, k, v, the output and one float32 per query row and head.

    Head dims that are not a power of two (or below 16) run zero-padded.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, doc_ids):
        check_device(q, "flash_attention")
        dim = q.shape[-1]
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dim)
        padded = _padded_head_dim(dim)
        q, k, v = (_unit_last(_pad(t, padded)) for t in (q, k, v))
        doc = doc_ids.to(torch.int32).contiguous() if doc_ids is not None else None
        if q.numel() == 0 or k.shape[1] == 0:
            out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
            lse = torch.full(q.shape[:1] + (q.shape[2], q.shape[1]), float("inf"), device=q.device)
        else:
            out, lse = attention_forward(q, k, v, causal, scale, doc)
        ctx.save_for_backward(q, k, v, out, lse, doc)
        ctx.causal, ctx.scale, ctx.dim = causal, scale, dim
        return out if padded == dim else out[..., :dim].contiguous()

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, doc = ctx.saved_tensors
        if q.numel() == 0 or k.shape[1] == 0:
            grads = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
        else:
            do = _unit_last(_pad(do, q.shape[-1]))
            grads = attention_backward(do, q, k, v, out, lse, ctx.causal, ctx.scale, doc)
        if q.shape[-1] != ctx.dim:
            grads = tuple(g[..., : ctx.dim].contiguous() for g in grads)
        return (*grads, None, None, None)
