"""Rewriting a checkpoint for another TP x PP layout, offline and tensor by tensor.

    reshard("runs/4b/checkpoints", "ckpt-tp2-pp4/", tp=2, pp=4)

A run already loads any checkpoint in any layout; what resharding adds is a checkpoint whose files
are cut for the target layout, so that each rank of the new run reads only its own file (and the
first stage's, for an output head tied to the embedding). Every logical tensor, weights and
optimizer state (fp32 master weights, both Adam moments), is copied exactly: same dtype, same
bits. Iteration, consumed samples, optimizer step and the run's config carry over, the config's
layout set to the target one.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from megaevo.config import ConfigError, config_from_dict, config_to_dict
from megaevo.model.args import ModelArgs
from megaevo.training.checkpoint import KINDS, LoadedCheckpoint, resolve_checkpoint

from .checkpoint_writer import ConvertError, TensorSource, check_layout, write_checkpoint


def reshard(load: str | os.PathLike, save: str | os.PathLike, *, tp: int = 1, pp: int = 1, virtual_pp: int = 1,
            pp_layers: list[int] | None = None, optimizer: bool = True, progress: bool = True) -> Path:
    """Write checkpoint ``load`` (a checkpoint, a checkpoints folder or a run) under ``save`` for the
    target layout; ``optimizer=False`` keeps only the weights. Returns the new checkpoint directory
    (``save/iter_NNNNNNN``, with ``save/latest`` pointing at it)."""
    path = resolve_checkpoint(load)
    ck = LoadedCheckpoint(path)
    raw = ck.meta.get("config")
    if not isinstance(raw, dict) or "model" not in raw:
        raise ConvertError(f"{path / 'metadata.json'}: holds no run config, so the model's shape is unknown")
    try:
        cfg = config_from_dict(raw, source=str(path / "metadata.json"))
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    args = ModelArgs.from_config(cfg.model)
    check_layout(args, tp, pp, pp_layers, virtual_pp)
    kinds = [k for k in KINDS if ck.has(k) and (optimizer or k == "model")]
    if "model" not in kinds:
        raise ConvertError(f"{path}: the checkpoint holds no model weights")
    sources = []
    for kind in kinds:
        for name, entry in ck.meta["tensors"][kind].items():
            dtype = getattr(torch, str(entry.get("dtype")), None)
            if not isinstance(dtype, torch.dtype):
                raise ConvertError(f"{path}: {kind} tensor {name!r} has an unknown dtype {entry.get('dtype')!r}")
            sources.append(TensorSource(kind, name, ck.shape(kind, name), dtype,
                                        functools.partial(ck.tensor, kind, name)))
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.virtual_pp = tp, pp, virtual_pp
    cfg.parallel.pp_layers = list(pp_layers) if pp_layers else None
    source_layout = ck.meta.get("layout") or {}
    metadata = {k: v for k, v in ck.meta.items() if k not in ("format_version", "iteration", "world_size", "tensors")}
    metadata["layout"] = {**source_layout, "tp": tp, "pp": pp, "virtual_pp": virtual_pp, "dp": None}
    metadata["config"] = config_to_dict(cfg)
    metadata["resharded_from"] = {"path": str(path.resolve()), "layout": source_layout}
    side = (ck.meta.get("hf") or {}).get("files", [])
    files = {name: path / name for name in side if isinstance(name, str) and "/" not in name and (path / name).is_file()}
    return write_checkpoint(save, sources, args, tp=tp, pp=pp, pp_layers=pp_layers, virtual_pp=virtual_pp,
                            iteration=ck.iteration, metadata=metadata, files=files, progress=progress,
                            desc=f"reshard to tp{tp} pp{pp}" + (f" vpp{virtual_pp}" if virtual_pp > 1 else ""))
