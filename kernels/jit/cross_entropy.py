"""Triton cross-entropy: per-row partials forward, softmax-minus-onehot backward.

Forward reads each row of logits once in vocab chunks with an online max / sum-exp, and picks
the target logit when this rank owns it; the (small) per-row partials are combined across the
vocab-parallel group in torch. Backward recomputes the softmax from the saved log-sum-exp.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..cross_entropy import combine_partials, full_vocab, mark_out_of_range, vocab_range
from . import as_rows, check_device

BLOCK_V = 4096


@triton.jit
def _ce_fwd(logits_ptr, target_ptr, max_ptr, sumexp_ptr, tgt_ptr, n_vocab, stride, vocab_start,
            BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    cols = tl.arange(0, BLOCK)
    x = tl.load(base + cols, mask=cols < n_vocab, other=-float("inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    s = tl.sum(tl.exp(x - m), axis=0)
    for start in range(BLOCK, n_vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_vocab, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    local = tl.load(target_ptr + row).to(tl.int64) - vocab_start
    owned = (local >= 0) & (local < n_vocab)
    tgt = tl.load(base + tl.where(owned, local, 0), mask=owned, other=0.0).to(tl.float32)
    tl.store(max_ptr + row, m)
    tl.store(sumexp_ptr + row, s)
    tl.store(tgt_ptr + row, tl.where(owned, tgt, 0.0))


@triton.jit
def _ce_bwd(logits_ptr, grad_logits_ptr, target_ptr, lse_ptr, grad_ptr, n_vocab, stride, vocab_start,
            ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_vocab
    target = tl.load(target_ptr + row).to(tl.int64)
    g = tl.load(grad_ptr + row).to(tl.float32)
    g = tl.where(target == ignore_index, 0.0, g)
    lse = tl.load(lse_ptr + row)
    x = tl.load(logits_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    p = tl.exp(x - lse)
    p = tl.where(cols == target - vocab_start, p - 1.0, p)
    tl.store(grad_logits_ptr + row * n_vocab + cols, (p * g).to(grad_logits_ptr.dtype.element_ty), mask=mask)


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper; saves the logits (no copy), targets and one float32 per row."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, group):
        check_device(logits, "cross_entropy")
        x = as_rows(logits)
        rows, vocab = x.shape
        t = target.reshape(-1).contiguous()
        start, _ = vocab_range(vocab, group)
        stats = torch.empty(3, rows, dtype=torch.float32, device=logits.device)
        if rows:
            _ce_fwd[(rows,)](x, t, stats[0], stats[1], stats[2], vocab, x.stride(0), start,
                             BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)), num_warps=8)
        lse, tgt = combine_partials(stats[0], stats[1], stats[2], group)
        loss = mark_out_of_range(torch.where(t == ignore_index, 0.0, lse - tgt), t, ignore_index,
                                 full_vocab(vocab, group))
        ctx.save_for_backward(logits, t, lse)
        ctx.ignore_index, ctx.vocab_start = ignore_index, start
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad):
        logits, t, lse = ctx.saved_tensors
        x = as_rows(logits)
        rows, vocab = x.shape
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        block = min(BLOCK_V, triton.next_power_of_2(vocab))
        if rows:
            _ce_bwd[(rows, triton.cdiv(vocab, block))](
                x, grad_logits, t, lse, grad.reshape(-1).contiguous(), vocab, x.stride(0), ctx.vocab_start,
                ctx.ignore_index, BLOCK=block, num_warps=8)
        return grad_logits, None, None, None
