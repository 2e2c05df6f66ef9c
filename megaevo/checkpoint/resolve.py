"""Finding a checkpoint, and looking at one whole: what `megaevo inspect` shows and checks.

One rule says which checkpoint directory a path names (:func:`find_checkpoint`): the directory
itself when it holds metadata.json, else the one the `latest` pointer of the path names, else the
one the `latest` pointer of the path's ``checkpoints`` folder (a run directory) names. The trainer's
``checkpoint.load`` (:meth:`Checkpointer.resolve <megaevo.checkpoint.save.Checkpointer.resolve>`),
:func:`resolve_checkpoint` (inspection, verification, conversion, inference) and the search for an
intact checkpoint all go through it.

:func:`verify_checkpoint` reads and checks a whole checkpoint; :func:`last_verified_checkpoint` finds
the newest one that passes, and :func:`with_intact_alternative` names it in the error of a damaged
checkpoint that a run tried to load. Checkpoints written before checksums were recorded load unverified.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

from tqdm import tqdm

from megaevo.checkpoint.format import (LATEST, METADATA, STATE_KINDS, CheckpointError, CheckpointMeta, FileRecord,
                                       iteration_dirs, iteration_of, rng_rank_of)
from megaevo.checkpoint.integrity import check_file
from megaevo.checkpoint.load import LoadedCheckpoint
from megaevo.log import get_logger

log = get_logger(__name__)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint directory `root/latest` names, or None without a `latest` pointer."""
    latest = Path(root) / LATEST
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    if iteration_of(name) is None:
        raise CheckpointError(f"{latest}: expected a checkpoint name like iter_0000100, found {name!r}")
    return Path(root) / name


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint directory `path` names: `path` itself if it holds metadata.json, else the one
    named by the `latest` pointer of `path` (a checkpoints folder) or of ``path/checkpoints`` (a run
    directory), complete or not; None if it names none."""
    p = Path(path)
    if (p / METADATA).is_file():
        return p
    for root in (p, p / "checkpoints"):
        named = latest_checkpoint(root)
        if named is not None:
            return named
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The complete checkpoint directory `path` names (see :func:`find_checkpoint`): a checkpoint, a
    checkpoints folder (its latest) or a run directory. CheckpointError if there is none."""
    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{Path(path)}: not a megaevo checkpoint (no {METADATA}, no `{LATEST}` pointer)")
    if not (found / METADATA).is_file():
        raise CheckpointError(f"{found.parent / LATEST} points at {found}, which is not a complete checkpoint")
    return found


def summarize_checkpoint(path: str | os.PathLike) -> dict:
    """What `megaevo inspect` prints for a checkpoint directory, a run's checkpoints/ folder or a run.
    Checks metadata.json against its checksum and every recorded file's presence and size (not its
    contents: that is :func:`verify_checkpoint`)."""
    path = resolve_checkpoint(path)
    record = LoadedCheckpoint(path).record
    for name, file in sorted(record.files.items()):
        check_file(path / name, FileRecord(file.size))
    tensors = {name: {"shape": list(e.shape), "dtype": e.dtype, "fragments": len(e.fragments)}
               for name, e in sorted(record.tensors.get("model", {}).items())}
    return {
        "path": str(path),
        "iteration": record.iteration,
        "consumed_samples": record.consumed_samples,
        "tokens": record.tokens,
        "layout": dataclasses.asdict(record.layout) if record.layout else None,
        "optimizer_state": [k for k in STATE_KINDS if k in record.tensors],
        "parameters": int(sum(math.prod(t["shape"]) for t in tensors.values())),
        "files": {name: f.size for name, f in sorted(record.files.items())},
        "checksum": _checksum_of(record),
        "tensors": tensors,
    }


def _checksum_of(record: CheckpointMeta) -> str | None:
    """The checksum algorithm(s) the record's files carry, e.g. "sha256"; None if none."""
    return ", ".join(sorted({f.algorithm for f in record.files.values() if f.algorithm})) or None


def verify_checkpoint(path: str | os.PathLike, *, progress: bool = False) -> dict:
    """Read and check the whole checkpoint `path` (a checkpoint, a checkpoints folder or a run):
    metadata.json against its checksum, every file against its recorded size and checksum, every
    fragment readable and in place (each tensor covered exactly once), every tensor finite, every
    rank's random states readable. Raises CheckpointError naming the first problem (file, and tensor
    where there is one); returns what was checked. A checkpoint written before checksums were
    recorded is checked for all but the checksums (``"checksum": None``)."""
    start = time.perf_counter()
    path = resolve_checkpoint(path)
    ck = LoadedCheckpoint(path)
    record = ck.record
    names = set(record.files) | {f.file for named in record.tensors.values() for e in named.values()
                                 for f in e.fragments}
    names |= {p.name for p in path.glob("rng_rank*.safetensors")}
    sizes = {name: (path / name).stat().st_size if (path / name).is_file() else 0 for name in names}
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc=f"verifying {path.name}",
              disable=not progress) as bar:
        for name in sorted(names):
            ck.verify_file(name)
            bar.update(sizes[name])
    count = 0
    for kind, named in record.tensors.items():
        for name in named:
            ck.tensor(kind, name)
            count += 1
    for rank in sorted(r for r in map(rng_rank_of, names) if r is not None):
        ck.rng(rank)
    return {"path": str(path), "iteration": record.iteration, "checksum": _checksum_of(record),
            "files": {name: sizes[name] for name in sorted(names)}, "bytes": sum(sizes.values()), "tensors": count,
            "seconds": round(time.perf_counter() - start, 3)}


def _complete_checkpoints(root: Path) -> list[Path]:
    """The checkpoints (``iter_*`` with metadata.json) under the checkpoints folder `root`, newest first."""
    return [p for p in reversed(iteration_dirs(root)) if (p / METADATA).is_file()]


def _first_verified(paths: list[Path]) -> tuple[Path | None, list[tuple[Path, CheckpointError]]]:
    """The first of `paths` that passes :func:`verify_checkpoint` (None if none does), and the problems
    of those before it."""
    failed = []
    for path in paths:
        try:
            verify_checkpoint(path)
            return path, failed
        except CheckpointError as e:
            failed.append((path, e))
    return None, failed


def last_verified_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (``iter_*`` with metadata.json) under the checkpoints folder
    `root` that passes :func:`verify_checkpoint`, or None. Each newer one that fails is logged as a
    warning with its problem. Reads whole checkpoints: meant for after a failure, not every step."""
    good, failed = _first_verified(_complete_checkpoints(Path(root)))
    for path, e in failed:
        log.warning(f"checkpoint {path.name} does not verify: {e}")
    return good


def with_intact_alternative(error: CheckpointError, path: str | os.PathLike,
                            how: str = "resume with") -> CheckpointError:
    """`error`, raised loading checkpoint `path`, with the checkpoint to use instead: when `path` is an
    ``iter_*`` checkpoint that is damaged or incomplete (it fails :func:`verify_checkpoint`), the
    newest other one in its folder that verifies is named, as ``checkpoint.load=...``. `error` is
    returned as it is for an intact checkpoint (e.g. one that does not fit the model) or a path that
    is not in a checkpoints folder. Reads whole checkpoints: meant for after a failure."""
    path = Path(path)
    if iteration_of(path.name) is None or not path.parent.is_dir():
        return error
    try:
        verify_checkpoint(path)
        return error  # intact: the problem is elsewhere (the model, the layout)
    except CheckpointError:
        pass
    good, failed = _first_verified([p for p in _complete_checkpoints(path.parent) if p.name != path.name])
    others = ", ".join(p.name for p, _ in failed)
    if good is not None:
        also = f" ({others} {'does' if len(failed) == 1 else 'do'} not verify either)" if failed else ""
        hint = f"the newest intact checkpoint is {good}{also}: {how} checkpoint.load={good}"
    elif failed:
        hint = f"no other checkpoint in {path.parent} verifies ({others})"
    else:
        hint = f"there is no other checkpoint in {path.parent}"
    return CheckpointError(f"{error}; {hint}")
