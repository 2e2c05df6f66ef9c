"""The memory check before a run allocates: the planner's estimate of its layout against the device."""
from __future__ import annotations

import os

import torch

from megaevo import kernels
from megaevo.config import Config, Layout
from megaevo.errors import UserError
from megaevo.plan import check_fits, of_config


def device_memory(device: torch.device) -> float | None:
    """Bytes of memory per device the run may use: MEGAEVO_DEVICE_MEMORY_GB when set (also on the CPU,
    where it is how a test fakes a small device), else the GPU's total, else None (no check)."""
    fake = os.environ.get("MEGAEVO_DEVICE_MEMORY_GB")
    if fake:
        return float(fake) * 2**30
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return None


def check_memory(cfg: Config, layout: Layout, device: torch.device, dtype: torch.dtype,
                 memory: float | None = None) -> None:
    """Stop before allocating when the planner's estimate of this layout (megaevo.plan) exceeds the
    device's memory (``memory`` bytes; default :func:`device_memory`): UserError naming the biggest term
    and the best layout of this world size that fits."""
    memory = device_memory(device) if memory is None else memory
    if memory is None:
        return
    backend = kernels.resolve("rms_norm", device, None)
    w, c = of_config(cfg, layout.dp, dtype_bytes=torch.finfo(dtype).bits // 8,
                     kernels="triton" if backend == "triton" else "torch")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or min(layout.world_size, 8)
    fit = check_fits(w, c, memory, per_node)
    if not fit.estimate.fits:
        raise UserError(f"{fit.message()} (train.memory_check=false runs it anyway)")
