"""A cache of index arrays as .npy files, keyed by a hash of everything the arrays depend on.

In a multi-process run one process builds and the others wait, then every process memory-maps the
files. With torch.distributed initialised, global rank 0 builds and a barrier holds the rest;
independent processes (no process group) serialise on a file lock in the cache directory.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

FORMAT_VERSION = 1


def cache_key(description: dict) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, **description}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def dataset_fingerprint(idx_path: str | os.PathLike) -> dict:
    """What identifies an indexed dataset's content without reading it all."""
    p = Path(idx_path).resolve()
    st = p.stat()
    return {"path": str(p), "idx_bytes": st.st_size, "idx_mtime_ns": st.st_mtime_ns}


def _dist():
    """torch.distributed when a process group is up (never imports torch itself)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def cached_arrays(
    cache_dir: str | os.PathLike,
    kind: str,
    description: dict,
    names: list[str],
    build: Callable[[], dict[str, np.ndarray]],
    log: Callable[[str], None] | None = None,
) -> dict[str, np.ndarray]:
    """Load arrays `names` for `description` from the cache, building (and saving) them first if absent."""
    cache_dir = Path(cache_dir)
    key = cache_key({"kind": kind, **description})
    files = {n: cache_dir / f"{key}-{kind}-{n}.npy" for n in names}
    marker = cache_dir / f"{key}-{kind}-description.json"

    def build_if_missing() -> None:
        if marker.is_file():
            return
        cache_dir.mkdir(parents=True, exist_ok=True)
        with open(cache_dir / f".{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if marker.is_file():  # another process built it while we waited
                return
            if log:
                log(f"building {kind} indices in {cache_dir} ({key})")
            arrays = build()
            for n in names:
                tmp = files[n].with_name(files[n].name + f".tmp-{os.getpid()}.npy")
                np.save(tmp, arrays[n], allow_pickle=False)
                os.replace(tmp, files[n])
            tmp = marker.with_name(marker.name + f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"kind": kind, **description}, indent=2, sort_keys=True))
            os.replace(tmp, marker)  # the marker goes last: its presence means every array is complete

    dist = _dist()
    if dist is None:
        build_if_missing()
    else:
        if dist.get_rank() == 0:
            build_if_missing()
        dist.barrier()
        if not marker.is_file():
            raise RuntimeError(
                f"{marker}: rank {dist.get_rank()} cannot see the indices rank 0 built; the data cache "
                f"directory must be on a filesystem that every rank shares (set the cache directory)"
            )
    return {n: np.load(files[n], mmap_mode="r", allow_pickle=False) for n in names}
