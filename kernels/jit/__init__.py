"""Triton implementations of the fused ops, one module per op.

Importing this package imports Triton; :mod:`megaevo.kernels` does so only when a Triton kernel
is first needed (see :func:`megaevo.kernels.dispatch.triton_module`). Whether the kernels run
compiled on a GPU or in Triton's CPU interpreter is fixed when they are defined, so
``INTERPRETED`` records it.
"""
from __future__ import annotations

import torch
import triton  # noqa: F401  (fails here, not later, when triton is missing)

from ..dispatch import interpreting

INTERPRETED: bool = interpreting()


def check_device(t: torch.Tensor, op: str) -> None:
    """Refuse tensors the loaded kernels cannot run on, with a clear message."""
    if t.is_cuda or INTERPRETED:
        return
    raise RuntimeError(
        f"{op}: the Triton kernels were loaded without TRITON_INTERPRET=1, so they cannot run on "
        f"{t.device.type} tensors; set TRITON_INTERPRET=1 before the first Triton kernel is used"
    )


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D (rows, last dim) view with unit column stride, copying only when needed."""
    n = t.shape[-1]
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, n)
    except RuntimeError:
        return t.contiguous().view(-1, n)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device; a small number for the CPU interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2
