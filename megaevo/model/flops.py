"""The arithmetic of a model's compute: training FLOPs per token, which MFU and the planner's step time use."""
from __future__ import annotations


def flops_per_token(shape, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters plus causal attention scores and values."""
    h, f, layers = shape.hidden_size, shape.ffn_hidden_size, shape.num_layers
    kv = shape.num_kv_heads * shape.head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * f
    matmul = layers * per_layer + h * shape.vocab_size
    attention = layers * 2 * seq_len * h  # QK^T and PV, halved by the causal mask, x2 for multiply-add
    return 6 * matmul + 3 * attention
