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

from ..dispatch import autotune_enabled
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
def _load_rows(base, idx, ok, stride, HEAD_DIM: tl.constexpr):
    """Rows ``idx`` (zeros where not ``ok``) of a (seq, head_dim) slice with row stride ``stride``."""
    dims = tl.arange(0, HEAD_DIM)
    return tl.load(base + idx[:, None] * stride + dims[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _store_rows(base, idx, ok, stride, value, HEAD_DIM: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    tl.store(base + idx[:, None] * stride + dims[None, :], value.to(base.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _query_block(n_heads, group, seq_q, BLOCK_M: tl.constexpr):
    """This program's query rows (the longest causal rows first), batch, head and kv head."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    h = bh % n_heads
    rows = start_m + tl.arange(0, BLOCK_M)
    return start_m, bh, (bh // n_heads).to(tl.int64), h, h // group, rows, rows < seq_q


@triton.jit
def _key_range(DOC, b, rows, row_ok, start_m, seq_q, seq_k, shift,
               CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key blocks a query block visits: [lo, mid) need no mask, [mid, hi) do (with document ids,
    all of them). Also the document ids' base and the query rows' ids (stand-ins without them)."""
    lo = seq_k * 0
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M + shift)
    doc_base = DOC
    doc_q = rows
    if HAS_DOC:
        doc_base = DOC + b * seq_k
        doc_q = tl.load(DOC + b * seq_q + rows, mask=row_ok, other=0)
        lo, hi = _doc_block_range(doc_base, doc_q, row_ok, lo, hi, seq_k, BLOCK_N)
        mid = lo
    elif CAUSAL:
        mid = tl.minimum(start_m + shift + 1, seq_k) // BLOCK_N * BLOCK_N
    else:
        mid = seq_k // BLOCK_N * BLOCK_N
    return lo, mid, hi, doc_base, doc_q


@triton.jit
def _kv_block(k_base, v_base, cols, seq_k, stride_ks, stride_vs, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The K and V rows ``cols`` of one kv head (zeros past ``seq_k`` when ``MASKED``)."""
    dims = tl.arange(0, HEAD_DIM)
    k_ptrs = k_base + cols[:, None] * stride_ks + dims[None, :]
    v_ptrs = v_base + cols[:, None] * stride_vs + dims[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=cols[:, None] < seq_k, other=0.0)
        v = tl.load(v_ptrs, mask=cols[:, None] < seq_k, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k, v


@triton.jit
def _keep(rows, cols, seq_k, shift, doc_base, doc_q, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask: query ``rows`` may see key ``cols``."""
    keep = cols[None, :] < seq_k
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + shift)
    if HAS_DOC:
        doc_k = tl.load(doc_base + cols, mask=cols < seq_k, other=0)
        keep = keep & (doc_q[:, None] == doc_k[None, :])
    return keep


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, doc_base, doc_q, rows, lo, hi, seq_k, shift,
                stride_ks, stride_vs, qk_scale,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k, v = _kv_block(k_base, v_base, cols, seq_k, stride_ks, stride_vs, MASKED, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if MASKED:
            s = tl.where(_keep(rows, cols, seq_k, shift, doc_base, doc_q, CAUSAL, HAS_DOC), s, -float("inf"))
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
    start_m, bh, b, h, kvh, rows, row_ok = _query_block(n_heads, group, seq_q, BLOCK_M)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qs, HEAD_DIM)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    shift = seq_k - seq_q
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, mid, hi, doc_base, doc_q = _key_range(DOC, b, rows, row_ok, start_m, seq_q, seq_k, shift,
                                              CAUSAL, HAS_DOC, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, doc_base, doc_q, rows, lo, mid, seq_k, shift,
                                stride_ks, stride_vs, qk_scale, False, CAUSAL, False, HEAD_DIM, BLOCK_N, PREC)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, doc_base, doc_q, rows, mid, hi, seq_k, shift,
                                stride_ks, stride_vs, qk_scale, True, CAUSAL, HAS_DOC, HEAD_DIM, BLOCK_N, PREC)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    _store_rows(O + b * stride_ob + h * stride_oh, rows, row_ok, stride_os, acc / l_safe[:, None], HEAD_DIM)
    tl.store(LSE + bh.to(tl.int64) * seq_q + rows, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
                    n_heads, seq_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    row_ok = rows < seq_q
    o = _load_rows(O + b * stride_ob + h * stride_oh, rows, row_ok, stride_os, HEAD_DIM)
    do = _load_rows(DO + b * stride_db + h * stride_dh, rows, row_ok, stride_ds, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * seq_q + rows, delta, mask=row_ok)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, doc_base, doc_k, cols, lo, hi, seq_q,
                 shift, stride_qs, stride_dos, qk_scale,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < seq_q
        q = _load_rows(q_base, rows, row_ok, stride_qs, HEAD_DIM)
        do = _load_rows(do_base, rows, row_ok, stride_dos, HEAD_DIM)
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
    col_ok = cols < seq_k
    k = _load_rows(K + b * stride_kb + kvh * stride_kh, cols, col_ok, stride_ks, HEAD_DIM)
    v = _load_rows(V + b * stride_vb + kvh * stride_vh, cols, col_ok, stride_vs, HEAD_DIM)
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
    _store_rows(DK + b * stride_dkb + out_h * stride_dkh, cols, col_ok, stride_dks, dk * sm_scale, HEAD_DIM)
    _store_rows(DV + b * stride_dvb + out_h * stride_dvh, cols, col_ok, stride_dvs, dv, HEAD_DIM)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_base, v_base, doc_base, doc_q, rows, lo, hi, seq_k, shift,
               stride_ks, stride_vs, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k, v = _kv_block(k_base, v_base, cols, seq_k, stride_ks, stride_vs, MASKED, HEAD_DIM)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_keep(rows, cols, seq_k, shift, doc_base, doc_q, CAUSAL, HAS_DOC), p, 0.0)
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
    start_m, bh, b, h, kvh, rows, row_ok = _query_block(n_heads, group, seq_q, BLOCK_M)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qs, HEAD_DIM)
    do = _load_rows(DO + b * stride_db + h * stride_dh, rows, row_ok, stride_ds, HEAD_DIM)
    lse = tl.load(LSE + bh.to(tl.int64) * seq_q + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * seq_q + rows, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    shift = seq_k - seq_q
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, mid, hi, doc_base, doc_q = _key_range(DOC, b, rows, row_ok, start_m, seq_q, seq_k, shift,
                                              CAUSAL, HAS_DOC, BLOCK_M, BLOCK_N)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, doc_base, doc_q, rows, lo, mid, seq_k, shift,
                    stride_ks, stride_vs, qk_scale, False, CAUSAL, False, HEAD_DIM, BLOCK_N, PREC)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, doc_base, doc_q, rows, mid, hi, seq_k, shift,
                    stride_ks, stride_vs, qk_scale, True, CAUSAL, HAS_DOC, HEAD_DIM, BLOCK_N, PREC)
    _store_rows(DQ + b * stride_dqb + h * stride_dqh, rows, row_ok, stride_dqs, dq * sm_scale, HEAD_DIM)


# Launch configurations, as (BLOCK_M, BLOCK_N, num_warps, num_stages), per kernel and head-dim
# class (64: head dims up to 64, 128: up to 128, 256: up to 256). A GPU times every tile of its
# list once per (sequence-length bucket, head dim, masks, dtype) and keeps the fastest; with
# autotuning off the first tile of the list runs. The lists for 64 and 128 hold the fastest tiles
# of a grid timed on an H100 with Triton 3.6 (`benchmarks/attention_tiles.py`: causal, bf16,
# 32/4 heads, 2048 and 4096 tokens); the first is the one fastest at both lengths, or within
# timing noise of it. Four warps beat eight for the dK/dV kernel there, spills in Triton's
# resource report (`benchmarks/kernel_resources.py`) notwithstanding. The lists for 256 hold
# tiles that fit and spill little under Triton 3.6 and 3.9.
TILES: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    "fwd": {
        64: [(64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
        128: [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3)],
        256: [(32, 32, 4, 2), (64, 16, 4, 2)],
    },
    "dkdv": {
        64: [(128, 64, 4, 2), (64, 64, 4, 2), (32, 128, 4, 3), (32, 64, 4, 3)],
        128: [(32, 64, 4, 3), (64, 128, 8, 3), (64, 64, 4, 2), (32, 128, 8, 3)],
        256: [(32, 32, 8, 2), (16, 32, 4, 2)],
    },
    "dq": {
        64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (128, 32, 8, 3)],
        128: [(128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 4, 3)],
        256: [(32, 32, 4, 2), (32, 16, 4, 2)],
    },
}
# The interpreter runs small fixed blocks (unequal, to exercise the block arithmetic).
CPU_TILES = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
_KEY = ["seq_bucket", "HEAD_DIM", "CAUSAL", "HAS_DOC"]
_KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}


def head_dim_class(head_dim: int) -> int:
    """The tile list a (padded) head dim uses: 64, 128 or 256."""
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def candidate_tiles(kernel: str, head_dim: int) -> list[tuple[int, int, int, int]]:
    """The tiles autotuning may pick for ``kernel`` ('fwd', 'dkdv', 'dq') at ``head_dim``."""
    return list(TILES[kernel][head_dim_class(head_dim)])


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        allowed = set(candidate_tiles(kernel, head_dim))
        return [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
    return prune


def _autotuned(kernel: str):
    tiles = sorted({t for per_dim in TILES[kernel].values() for t in per_dim})
    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s) for m, n, w, s in tiles]
    return triton.autotune(configs, key=_KEY, prune_configs_by={"early_config_prune": _prune(kernel)})(
        _KERNELS[kernel])


_AUTOTUNED = {} if INTERPRETED else {name: _autotuned(name) for name in _KERNELS}


def _launch(kernel: str, grid, args, meta, tile=None) -> None:
    """Run one kernel: with ``tile`` if given; else the interpreter's tile, the autotuner, or the
    fixed (first) tile of the list when autotuning is off."""
    if tile is None and not INTERPRETED and autotune_enabled():
        _AUTOTUNED[kernel][grid](*args, **meta)
        return
    if tile is None:
        tile = CPU_TILES[kernel] if INTERPRETED else candidate_tiles(kernel, meta["HEAD_DIM"])[0]
    block_m, block_n, warps, stages = tile
    blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n)
    _KERNELS[kernel][grid(blocks)](*args, **meta, **blocks, num_warps=warps, num_stages=stages)


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


def attention_forward(q, k, v, causal, softmax_scale, doc_ids, tile=None):
    """Output and base-2 log-sum-exp (batch, heads, seq_q) of the Triton forward (``tile``:
    force one (BLOCK_M, BLOCK_N, warps, stages), else see :func:`_launch`)."""
    batch, seq_q, n_heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    out = torch.empty((batch, seq_q, n_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, seq_q), dtype=torch.float32, device=q.device)
    meta = dict(HEAD_DIM=head_dim, CAUSAL=causal, HAS_DOC=doc_ids is not None, PREC=_precision(q.dtype))

    def grid(m):
        return (triton.cdiv(seq_q, m["BLOCK_M"]), batch * n_heads)

    _launch("fwd", grid, (q, k, v, out, lse, doc_ids if doc_ids is not None else lse, softmax_scale * LOG2E,
                          *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                          n_heads, n_heads // kv_heads, seq_q, seq_k, _seq_bucket(seq_k)), meta, tile)
    return out, lse


def attention_backward(do, q, k, v, out, lse, causal, softmax_scale, doc_ids, tiles=(None, None)):
    """dq, dk, dv of the Triton backward (``tiles``: force the dK/dV and the dQ kernel's tiles)."""
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

    def dkdv_grid(m):
        return (triton.cdiv(seq_k, m["BLOCK_N"]), batch * kv_heads * n_split)

    _launch("dkdv", dkdv_grid, (q, k, v, do, lse, delta, doc, dk, dv, softmax_scale * LOG2E, softmax_scale,
                                *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
                                n_heads, group, per_program, seq_q, seq_k, bucket), meta, tiles[0])
    if n_split > 1:
        dk = dk.view(batch, seq_k, kv_heads, n_split, head_dim).sum(3).to(k.dtype)
        dv = dv.view(batch, seq_k, kv_heads, n_split, head_dim).sum(3).to(v.dtype)

    dq = torch.empty_like(q)

    def dq_grid(m):
        return (triton.cdiv(seq_q, m["BLOCK_M"]), batch * n_heads)

    _launch("dq", dq_grid, (q, k, v, do, lse, delta, doc, dq, softmax_scale * LOG2E, softmax_scale,
                            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
                            n_heads, group, seq_q, seq_k, bucket), meta, tiles[1])
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
