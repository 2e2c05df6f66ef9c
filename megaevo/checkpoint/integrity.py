"""Integrity of checkpoints: checksums as files are written, and the checks of what is read.

Each file's checksum (:data:`~megaevo.checkpoint.format.CHECKSUM`, named in the record so that it can
change) is computed while the file is written, from the bytes as they go out
(:class:`RunningChecksum`), and recorded in metadata.json (a ``FileRecord``); metadata.json's own
sha256 sits beside it (:func:`metadata_checksum`). A reader checks metadata.json against it
(:func:`check_metadata`), each file against its size and checksum (:func:`check_file`), and refuses
non-finite values in what it reads (:func:`check_finite`), each with one line naming the file and
the tensor.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from megaevo.checkpoint.format import CHECKSUM, CHECKSUMS, METADATA, METADATA_CHECKSUM, CheckpointError, FileRecord


def new_hash(algorithm: str):
    """A fresh hash object of checksum `algorithm` (one of CHECKSUMS); CheckpointError for another name."""
    if algorithm not in CHECKSUMS:
        raise CheckpointError(f"unknown checksum {algorithm!r} (this megaevo knows {', '.join(CHECKSUMS)})")
    return CHECKSUMS[algorithm]()


class RunningChecksum:
    """The checksum `algorithm` of the bytes given to :meth:`update`, in order.

    Each update runs on a helper thread (hashlib and zlib release the GIL), so hashing a block
    overlaps the caller's writing of the same block. One update is in flight at a time: a block
    must stay unchanged until the next update or :meth:`hexdigest`."""

    def __init__(self, algorithm: str = CHECKSUM):
        self.algorithm = algorithm
        self._hash = new_hash(algorithm)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="megaevo-checksum")
        self._pending: Future | None = None

    def update(self, data) -> None:
        self._wait()
        self._pending = self._pool.submit(self._hash.update, data)

    def hexdigest(self) -> str:
        self._wait()
        self._pool.shutdown()
        return self._hash.hexdigest()

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


def file_checksum(path: str | os.PathLike, algorithm: str = CHECKSUM, chunk_bytes: int = 16 << 20) -> str:
    """The checksum of the file at `path`, read once, in chunks."""
    h = new_hash(algorithm)
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def check_file(path: Path, record: FileRecord) -> None:
    """CheckpointError naming `path` if it is missing, has another size than `record` or fails its
    checksum (if the record has one)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file missing ({METADATA} lists it)")
    size = path.stat().st_size
    if size != record.size:
        how = "truncated" if size < record.size else "longer than written"
        raise CheckpointError(f"{path}: {how}: {size:,} bytes, {METADATA} records {record.size:,}")
    if record.algorithm is not None:
        actual = file_checksum(path, record.algorithm)
        if actual != record.digest:
            raise CheckpointError(f"{path}: checksum mismatch ({record.algorithm} {actual}, {METADATA} records "
                                  f"{record.digest}): the file is damaged")


def metadata_checksum(raw: bytes) -> str:
    """The text of metadata.json.sha256 for metadata.json holding `raw` (the format of ``sha256sum``)."""
    return f"{hashlib.sha256(raw).hexdigest()}  {METADATA}\n"


def check_metadata(directory: Path, raw: bytes) -> None:
    """CheckpointError if `raw`, the bytes of `directory`'s metadata.json, do not match the checksum
    beside it (none there: nothing to check)."""
    side = directory / METADATA_CHECKSUM
    if not side.is_file():
        return
    recorded = (side.read_text(errors="replace").split() or [""])[0]
    actual = hashlib.sha256(raw).hexdigest()
    if actual != recorded:
        raise CheckpointError(f"{directory / METADATA}: checksum mismatch (sha256 {actual}, {METADATA_CHECKSUM} "
                              f"records {recorded or 'nothing'}): the file is damaged (if it was edited on "
                              f"purpose, delete {METADATA_CHECKSUM})")


def check_finite(block: torch.Tensor, where: str) -> None:
    """CheckpointError at `where` if floating-point `block` holds NaN or Inf. A NaN or Inf makes the
    sum non-finite; the sum (a fast reduction) is finite for finite values unless it overflows, and
    only then is every value looked at."""
    if not block.is_floating_point() or bool(torch.isfinite(block.sum())):
        return
    bad = int((~torch.isfinite(block)).sum())
    if bad:
        raise CheckpointError(f"{where} holds {bad:,} non-finite value(s) (NaN/Inf) of {block.numel():,}: it was "
                              f"saved from a diverged run or damaged; load an earlier checkpoint")


def one_line(e: BaseException) -> str:
    """An error's message on one line (safetensors' own messages span several)."""
    return " ".join(str(e).split())
