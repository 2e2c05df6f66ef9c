"""Small rules every layer shares, in one place: the label that no loss counts, the names of the compute
dtypes, how a seed and a name make the seed of one tensor's random stream, how the vocabulary is padded
for tensor parallelism, and how many micro-batch activations the pipeline schedule keeps alive.

Nothing here imports torch at module level, so the configuration and command-line layers stay light.
"""
from __future__ import annotations

import zlib

IGNORE_INDEX = -100
"""A label no loss counts (prompt tokens, padding, the last token of a document)."""

DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16"}
"""Every spelling of a dtype megaevo accepts (configs, `--dtype`, `megaevo.load`), by torch's name."""


def resolve_dtype(dtype: str, device_type: str) -> str:
    """The compute dtype a run uses: "auto" is bf16 on CUDA and fp32 elsewhere; others as given."""
    if dtype == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return dtype


def torch_dtype(name, *, what: str = "dtype"):
    """The torch dtype named ``name`` (a torch.dtype, or any spelling of :data:`DTYPE_NAMES`, with or
    without ``torch.``); ValueError naming ``what`` and the choices for another."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ValueError(f"{what}: unknown dtype {name!r} (use one of {', '.join(DTYPE_NAMES)})")
    return getattr(torch, DTYPE_NAMES[key])


def stream_seed(seed: int, name: str) -> int:
    """The seed of the random stream that initialises tensor ``name`` in a run seeded ``seed``: the same on
    every layout, so a weight's initial value never depends on how the model is split."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 128) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple * tp_size`` (the embedding and output layer's
    rows, as Megatron-LM pads them)."""
    step = multiple * tp_size
    return -(-vocab_size // step) * step


def activation_bound(num_micro: int, pp: int, rank: int, virtual_pp: int = 1) -> int:
    """The most micro-batch activations (per model chunk) pipeline rank ``rank`` holds at once under the
    engine's schedule (megaevo.parallel.pipeline: 1F1B, or interleaved with ``virtual_pp`` chunks); the
    layout planner counts activation memory with it."""
    if virtual_pp == 1:
        return min(pp - rank, num_micro)
    total = num_micro * virtual_pp
    if num_micro == pp:
        return total
    return min((pp - rank - 1) * 2 + (virtual_pp - 1) * pp + 1, total)
