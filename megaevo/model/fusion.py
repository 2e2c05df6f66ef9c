"""The fused projections of the decoder and the separate tensors they are made of (Hugging Face order).

``attention.qkv`` holds its logical rows grouped per KV group: for group g, its ``heads / kv_heads``
query heads, then key head g, then value head g (so a contiguous tensor-parallel slice is a set of
whole groups). ``mlp.gate_up`` is the gate rows, then the up rows.

How one megaevo tensor is made from its parts is named by a *join*: ``same`` (one tensor as it is),
``qkv`` (q, k, v fused per KV group) or ``gate_up`` (gate, then up). Import and export of Hugging Face
directories and ``megaevo.load`` all fuse and split through these functions.
"""
from __future__ import annotations

import torch

from .args import ModelArgs


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """The logical ``attention.qkv`` weight (or bias) from separate q, k, v in Hugging Face order."""
    q_per_kv = num_heads // num_kv_heads
    head_dim = q.shape[0] // num_heads
    rest = q.shape[1:]
    groups = torch.cat([q.reshape(num_kv_heads, q_per_kv, head_dim, *rest),
                        k.reshape(num_kv_heads, 1, head_dim, *rest),
                        v.reshape(num_kv_heads, 1, head_dim, *rest)], dim=1)
    return groups.reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`fuse_qkv`: separate q, k, v weights (or biases) in Hugging Face order."""
    q_per_kv = num_heads // num_kv_heads
    head_dim = qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    rest = qkv.shape[1:]
    groups = qkv.reshape(num_kv_heads, q_per_kv + 2, head_dim, *rest)
    q = groups[:, :q_per_kv].reshape(num_heads * head_dim, *rest)
    k = groups[:, q_per_kv].reshape(num_kv_heads * head_dim, *rest)
    v = groups[:, q_per_kv + 1].reshape(num_kv_heads * head_dim, *rest)
    return q, k, v


def join_parts(how: str, parts: list[torch.Tensor], args: ModelArgs) -> torch.Tensor:
    """The megaevo tensor made of ``parts`` (Hugging Face tensors) by the join ``how``."""
    if how == "qkv":
        return fuse_qkv(*parts, args.num_heads, args.num_kv_heads)
    if how == "gate_up":
        return torch.cat(parts, dim=0)
    return parts[0]


def split_parts(how: str, full: torch.Tensor, args: ModelArgs) -> list[torch.Tensor]:
    """The inverse of :func:`join_parts`: the parts of ``full``, each contiguous."""
    if how == "qkv":
        return [t.contiguous() for t in split_qkv(full, args.num_heads, args.num_kv_heads)]
    if how == "gate_up":
        return [t.contiguous() for t in full.split(full.shape[0] // 2, dim=0)]
    return [full]


def part_shapes(how: str, shape: tuple[int, ...], args: ModelArgs) -> list[tuple[int, ...]]:
    """The shapes of the parts that the join ``how`` makes a tensor of ``shape`` from."""
    rest = tuple(shape[1:])
    if how == "qkv":
        hd = args.head_dim
        return [(args.num_heads * hd, *rest), (args.num_kv_heads * hd, *rest), (args.num_kv_heads * hd, *rest)]
    if how == "gate_up":
        return [(shape[0] // 2, *rest)] * 2
    return [tuple(shape)]
