"""Rewriting a checkpoint for another TP x PP layout, offline and tensor by tensor.

    reshard("runs/4b/checkpoints", "ckpt-tp2-pp4/", tp=2, pp=4)

A run already loads any checkpoint in any layout; what resharding adds is a checkpoint whose files
are cut for the target layout, so that each rank of the new run reads only its own file (and the
first stage's, for an output head tied to the embedding). Every logical tensor, weights and
optimizer state (fp32 master weights, both Adam moments), is copied exactly: same dtype, same
bits. Iteration, consumed samples, optimizer step and the run's config carry over, the config's
layout set to the target one. PPO's critic (kinds ``critic`` and ``critic_*`` optimizer state, see
:mod:`megaevo.checkpoint.format`) is carried like the model: its body cut as the model's layers are,
its value head stored once. The checkpoint's tokenizer (its own files, else the run's copy or its
recorded ``data.tokenizer``) is put into the new checkpoint, so that it is self-contained.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

from megaevo.checkpoint.format import (CRITIC_STATE_PREFIX, CRITIC_WEIGHTS_KIND, METADATA, STATE_KINDS,
                                       CheckpointMeta, SavedLayout)
from megaevo.checkpoint.load import LoadedCheckpoint
from megaevo.checkpoint.resolve import resolve_checkpoint
from megaevo.config import ConfigError, config_from_dict, config_to_dict
from megaevo.data.tokenizer_files import MAIN_FILES, find_tokenizer, not_found_message, tokenizer_candidates
from megaevo.log import get_logger

from .checkpoint_writer import ConvertError, TensorSource, check_layout, write_checkpoint

logger = get_logger(__name__)


def reshard(load: str | os.PathLike, save: str | os.PathLike, *, tp: int = 1, pp: int = 1, virtual_pp: int = 1,
            pp_layers: list[int] | None = None, optimizer: bool = True, progress: bool = True) -> Path:
    """Write checkpoint ``load`` (a checkpoint, a checkpoints folder or a run) under ``save`` for the
    target layout; ``optimizer=False`` keeps only the weights (the model's and a critic's). Returns the
    new checkpoint directory (``save/iter_NNNNNNN``, with ``save/latest`` pointing at it)."""
    path = resolve_checkpoint(load)
    ck = LoadedCheckpoint(path)
    record = ck.record
    raw = record.config
    if raw is None or "model" not in raw:
        raise ConvertError(f"{path / METADATA}: holds no run config, so the model's shape is unknown")
    try:
        cfg = config_from_dict(raw, source=str(path / METADATA))
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    args = cfg.model
    check_layout(args, tp, pp, pp_layers, virtual_pp)
    kinds = _kinds(record, optimizer, path)
    if "model" not in kinds:
        raise ConvertError(f"{path}: the checkpoint holds no model weights")
    sources = []
    for kind in kinds:
        for name, entry in record.tensors[kind].items():
            sources.append(TensorSource(kind, name, entry.shape, entry.torch_dtype,
                                        functools.partial(ck.tensor, kind, name)))
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.virtual_pp = tp, pp, virtual_pp
    cfg.parallel.pp_layers = list(pp_layers) if pp_layers else None
    source_layout = record.layout
    layout = dataclasses.replace(source_layout or SavedLayout(tp, pp), tp=tp, pp=pp, virtual_pp=virtual_pp, dp=None)
    meta = dataclasses.replace(record, layout=layout, config=config_to_dict(cfg), tensors={}, world_size=None,
                               resharded_from={"path": str(path.resolve()),
                                               "layout": dataclasses.asdict(source_layout) if source_layout else {}})
    side = (record.hf or {}).get("files", [])
    files = {name: path / name for name in side if isinstance(name, str) and "/" not in name and (path / name).is_file()}
    if not set(files) & set(MAIN_FILES):
        files.update(_tokenizer(path, record))
    return write_checkpoint(save, sources, args, tp=tp, pp=pp, pp_layers=pp_layers, virtual_pp=virtual_pp,
                            metadata=meta, files=files, progress=progress,
                            desc=f"reshard to tp{tp} pp{pp}" + (f" vpp{virtual_pp}" if virtual_pp > 1 else ""))


def _kinds(record: CheckpointMeta, optimizer: bool, path: Path) -> list[str]:
    """The tensor kinds to write: the weights (the model's, a critic's) and with ``optimizer`` their
    optimizer state. A kind this does not know is refused rather than left out."""
    weights = ("model", CRITIC_WEIGHTS_KIND)
    states = STATE_KINDS + tuple(CRITIC_STATE_PREFIX + k for k in STATE_KINDS)
    unknown = sorted(set(record.tensors) - set(weights) - set(states))
    if unknown:
        raise ConvertError(f"{path}: holds tensors of kind(s) {', '.join(unknown)}, which resharding does not know; "
                           f"not resharded rather than written without them")
    return [k for k in record.tensors if k in weights or (optimizer and k in states)]


def _tokenizer(path: Path, record: CheckpointMeta) -> dict[str, Path]:
    """The tokenizer files of the checkpoint at ``path`` (see megaevo.data.tokenizer_files), to copy
    into the new one; none, with a warning, when its config names a tokenizer that is nowhere."""
    recorded = ((record.config or {}).get("data") or {}).get("tokenizer")
    recorded = recorded if isinstance(recorded, str) else None
    candidates = tokenizer_candidates(path, recorded)
    found = find_tokenizer(candidates)
    if not found and recorded:
        logger.warning(f"{not_found_message(str(path), candidates)}: the resharded checkpoint carries none")
    return found
