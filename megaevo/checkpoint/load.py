"""Reading a checkpoint: a rank's view of it, whatever layout saved it.

Each logical tensor is stored as the blocks that the saving ranks held: a fragment names its file,
its key in that file and its offset in the logical (unsharded, unpadded) tensor.
:class:`LoadedCheckpoint` assembles the blocks a rank needs (:func:`read_local`,
:func:`load_local_weights`, :func:`read_local_state`). Nothing is unpickled, and file names from
metadata must be plain names inside the checkpoint directory. :func:`set_rng_state` restores the
random states a rank saved.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from megaevo.checkpoint.format import (METADATA, STATE_KINDS, CheckpointError, CheckpointMeta, FileRecord,
                                       TensorEntry, is_plain_name, rng_file)
from megaevo.checkpoint.integrity import check_file, check_finite, check_metadata, one_line
from megaevo.log import get_logger
from megaevo.parallel.layout import ParamMeta

log = get_logger(__name__)


class LoadedCheckpoint:
    """Read access to a checkpoint directory; every tensor is assembled from its fragments on demand.

    `record` is the validated :class:`CheckpointMeta`; `meta` the raw metadata.json object.
    With `verify` (the default), metadata.json is checked against metadata.json.sha256 here, and each
    file against its size and checksum the first time it is opened (reading it once, which also
    brings it into the page cache for the reads that follow); every block read must be finite."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        self.path = Path(path)
        self.verify = verify
        self._verified: set[str] = set()
        meta_path = self.path / METADATA
        if not meta_path.is_file():
            raise CheckpointError(f"{self.path}: not a megaevo checkpoint (no {METADATA})")
        raw = meta_path.read_bytes()
        if verify:
            check_metadata(self.path, raw)
        try:
            self.meta = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{meta_path}: unreadable metadata ({e})") from None
        self.record = CheckpointMeta.from_json(self.meta, meta_path)
        if verify and not self.record.files:
            log.debug(f"{self.path}: no checksums recorded (written before megaevo recorded them); its files "
                      f"are read unverified")

    def verify_file(self, name: str) -> FileRecord | None:
        """Check file `name` against the size and checksum that metadata.json records for it, once per
        file; None for a checkpoint that records none. CheckpointError naming the file on a mismatch."""
        path = self._path(name)
        record = self.record.files.get(name)
        if record is None:
            if self.record.files:
                raise CheckpointError(f"{path}: not listed in {self.path / METADATA} (no size or checksum to check)")
            if not path.is_file():
                raise CheckpointError(f"{path}: fragment file missing")
            return None
        if name not in self._verified:
            check_file(path, record)
            self._verified.add(name)
        return record

    def check_sizes(self) -> None:
        """Every file metadata.json lists is there at the size it records (no checksums read: cheap
        enough for any checkpoint); CheckpointError naming the first that is not."""
        for name, record in sorted(self.record.files.items()):
            path = self._path(name)
            if not path.is_file() or path.stat().st_size != record.size:
                check_file(path, FileRecord(record.size))

    @property
    def iteration(self) -> int:
        return self.record.iteration

    def has(self, kind: str) -> bool:
        return kind in self.record.tensors

    def names(self, kind: str = "model") -> list[str]:
        return list(self.record.tensors.get(kind, {}))

    def _path(self, name: str) -> Path:
        if not is_plain_name(name):
            raise CheckpointError(f"{self.path}: metadata names a file outside the checkpoint: {name!r}")
        return self.path / name

    def _file(self, name: str):
        """A fresh read handle on file `name` of the checkpoint, verified on its first opening. Handles
        are not kept: each maps its file, and pages read through a kept one would stay in this
        process's memory until the end."""
        path = self._path(name)
        if self.verify:
            self.verify_file(name)
        elif not path.is_file():
            raise CheckpointError(f"{path}: fragment file missing")
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({one_line(e)})") from None

    def entry(self, kind: str, name: str) -> TensorEntry:
        entry = self.record.tensors.get(kind, {}).get(name)
        if entry is None:
            raise CheckpointError(f"{self.path}: no {kind} tensor {name!r} in the checkpoint")
        return entry

    def tensor(self, kind: str, name: str, expected_shape=None) -> torch.Tensor:
        """The whole logical tensor `name` of `kind`, checked for complete, non-overlapping coverage."""
        shape = self.shape(kind, name, expected_shape)
        return self.region(kind, name, (0,) * len(shape), shape)

    def shape(self, kind: str, name: str, expected_shape=None) -> tuple[int, ...]:
        """The logical shape of `name`; CheckpointError if it is absent or differs from `expected_shape`."""
        shape = self.entry(kind, name).shape
        if expected_shape is not None and tuple(expected_shape) != shape:
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {list(shape)} in the checkpoint but the "
                                  f"model needs {list(expected_shape)}")
        return shape

    def region(self, kind: str, name: str, offset, shape) -> torch.Tensor:
        """The block ``[offset, offset + shape)`` of logical tensor `name`, read only from the fragments
        that overlap it (a rank loading a checkpoint saved for its own layout opens only its own file).
        The block must be covered exactly once."""
        entry = self.entry(kind, name)
        full = entry.shape
        offset, shape = tuple(offset), tuple(shape)
        if len(offset) != len(full) or len(shape) != len(full) or any(
                o < 0 or o + s > d for o, s, d in zip(offset, shape, full)):
            raise CheckpointError(f"{self.path}: block {list(offset)}+{list(shape)} lies outside {name!r} {list(full)}")
        out = None
        covered = torch.zeros(shape, dtype=torch.int8)
        for frag in entry.fragments:
            fo, fs = frag.offset, frag.shape
            lo = [max(a, b) for a, b in zip(fo, offset)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(fo, fs, offset, shape)]
            if any(l >= h for l, h in zip(lo, hi)):
                continue
            f = self._file(frag.file)
            where = f"{self.path / frag.file}: {kind} tensor {name!r} (fragment {frag.key!r})"
            try:
                if frag.key not in f.keys():
                    raise CheckpointError(f"{where} is missing")
                stored = f.get_slice(frag.key)
                if tuple(stored.get_shape()) != fs:
                    raise CheckpointError(f"{where} has shape {list(stored.get_shape())}, its metadata says {list(fs)}")
                block = stored[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, fo))]
            except SafetensorError as e:
                raise CheckpointError(f"{where} is unreadable ({one_line(e)})") from None
            if self.verify:
                check_finite(block, where)
            if out is None:
                out = torch.empty(shape, dtype=block.dtype)
            index = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offset))
            out[index] = block
            covered[index] += 1
        if out is None or bool((covered != 1).any()):
            problem = "missing" if out is None or bool((covered == 0).any()) else "duplicated"
            raise CheckpointError(f"{self.path}: tensor {name!r} ({kind}) has {problem} fragments")
        return out

    def rng(self, rank: int) -> dict[str, torch.Tensor] | None:
        name = rng_file(rank)
        if not (self.path / name).is_file():
            return None
        f = self._file(name)
        try:
            return {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise CheckpointError(f"{self.path / name}: unreadable ({one_line(e)})") from None


def read_local(ck: LoadedCheckpoint, kind: str, name: str, meta: ParamMeta, local_shape) -> torch.Tensor:
    """The local (TP-sharded, padded) tensor of parameter `name` described by `meta`, assembled from
    the checkpoint's blocks that overlap it, whatever layout saved them; padding rows are zero.
    Returned on the CPU in the stored dtype."""
    ck.shape(kind, name, meta.logical_shape)
    local = torch.zeros(tuple(local_shape), dtype=ck.entry(kind, name).torch_dtype)
    for frag in meta.fragments(local_shape):
        block = ck.region(kind, name, frag.logical_offset, frag.shape)
        frag.local_view(local).copy_(block)
    return local


@torch.no_grad()
def load_local_weights(ck: LoadedCheckpoint, params: dict[str, torch.Tensor],
                       metas: dict[str, ParamMeta]) -> None:
    """Copy each parameter's local shard of the checkpoint's weights into it (cast to its dtype)."""
    for name, p in params.items():
        p.copy_(read_local(ck, "model", name, metas[name], p.shape).to(p.dtype))


def read_local_state(ck: LoadedCheckpoint, params: dict[str, torch.Tensor], metas: dict[str, ParamMeta],
                     kinds=STATE_KINDS) -> dict[str, dict[str, torch.Tensor]]:
    """{name: {kind: local tensor}} for every kind of STATE_KINDS (the form of
    ``DistributedAdamW.load_local_state``): read for the kinds in `kinds`, zero (fp32) for the others.
    CheckpointError if the checkpoint lacks one of `kinds`."""
    absent = [k for k in kinds if not ck.has(k)]
    if absent:
        raise CheckpointError(f"{ck.path}: optimizer state is incomplete (no {', '.join(absent)}; has "
                              f"{', '.join(sorted(ck.record.tensors))})")
    return {name: {k: (read_local(ck, k, name, metas[name], p.shape) if k in kinds
                       else torch.zeros(p.shape, dtype=torch.float32)) for k in STATE_KINDS}
            for name, p in params.items()}


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    """Restore this process's random states from what :func:`megaevo.checkpoint.save.rng_state` captured."""
    torch.set_rng_state(states["torch"])
    py = json.loads(bytes(states["python"].tolist()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))
    npj = json.loads(bytes(states["numpy"].tolist()).decode())
    np.random.set_state((npj[0], np.array(npj[1], dtype=np.uint32), *npj[2:]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
