"""Writing a checkpoint: each rank's part, the background writer, and the atomic commit.

A rank's part of a checkpoint is a :class:`SavePlan` (:func:`build_save_plan`): the blocks of each
parameter it holds and, with them, the same blocks of the optimizer's state. :class:`Checkpointer`
writes the parts (in the background with `async_save`, from host copies taken at once) together with
each rank's random states (:func:`rng_state`), every file's checksum computed as its bytes go out.

Writes go to a temporary directory; once every rank's files are complete, rank 0 writes
metadata.json, renames the directory into place and moves `latest` last
(:func:`commit_checkpoint`, shared with the offline converters), so an interrupted save leaves the
previous checkpoint intact. A rank that never finishes its part makes the save fail after
`timeout_s` instead of hanging.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megaevo.checkpoint.format import (CHECKSUM, FORMAT_VERSION, LATEST, METADATA, METADATA_CHECKSUM, STATE_KINDS,
                                       CheckpointError, CheckpointMeta, FileRecord, StoredFragment, TensorEntry,
                                       Validator, dtype_name, file_tag, iteration_dir, iteration_dirs, part_file,
                                       rng_file, tagged_model_file, temp_dir)
from megaevo.checkpoint.integrity import RunningChecksum, metadata_checksum, new_hash
from megaevo.checkpoint.resolve import find_checkpoint
from megaevo.checkpoint.safetensors_io import StreamingWriter
from megaevo.parallel.layout import ParamMeta
from megaevo.parallel.state import ParallelState

TIMEOUT_ENV = "MEGAEVO_CHECKPOINT_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      checksum: str | None = CHECKSUM) -> FileRecord:
    """Write `tensors` (in their order) as a safetensors file, each streamed into the file and into
    the checksum together; the file's record. The file is never read back."""
    running = RunningChecksum(checksum) if checksum else None
    with StreamingWriter(path, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], checksum=running) as w:
        for key, t in tensors.items():
            w.write(key, t)
    return FileRecord(w.size, checksum, running.hexdigest() if running else None)


# ------------------------------------------------------------------------------------------------ commit


def commit_checkpoint(root: str | os.PathLike, tmp: Path, meta: CheckpointMeta, keep_last: int | None = None) -> Path:
    """Make the complete temporary directory `tmp` checkpoint `meta.iteration` under `root`: write
    metadata.json and its checksum, rename `tmp` into place, move `latest` last, then keep only the
    newest `keep_last` checkpoints. An interruption before the rename leaves the previous checkpoint
    and `latest` as they were. Returns the checkpoint directory."""
    root = Path(root)
    raw = json.dumps(meta.to_json(), indent=1).encode()
    _atomic_write(tmp / METADATA, raw)
    _atomic_write(tmp / METADATA_CHECKSUM, metadata_checksum(raw))
    final = iteration_dir(root, meta.iteration)
    replaced = root / f".replaced_{final.name}"
    if final.exists():  # saved again (e.g. after a resume): move the old one aside, drop it once replaced
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(tmp, final)
    _atomic_write(root / LATEST, final.name + "\n")
    shutil.rmtree(replaced, ignore_errors=True)
    if keep_last:
        for old in iteration_dirs(root)[:-keep_last]:
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------ saving


@dataclass
class SavePlan:
    """What one rank contributes to a checkpoint (see :func:`build_save_plan`)."""

    iteration: int
    tensors: dict[str, dict[str, tuple[torch.Tensor, list]]]  # kind -> name -> (local tensor, layout Fragments)
    logical_shapes: dict[str, tuple[int, ...]]  # of this rank's tensors (pipeline stages hold different ones)
    rank: int
    world_size: int
    writer: bool  # DP rank 0 writes weights and optimizer state
    file_tag: str  # "tp{t}_pp{p}": the rank writes model_file(t, p)
    metadata: CheckpointMeta | dict = field(default_factory=dict)  # only used on rank 0; a dict: CheckpointMeta fields


def build_save_plan(meta: CheckpointMeta, params: dict[str, torch.Tensor], metas: dict[str, ParamMeta],
                    optimizer_state: dict[str, dict[str, torch.Tensor]] | None, state: ParallelState,
                    rank: int, world_size: int) -> SavePlan:
    """This rank's part of checkpoint `meta.iteration`: each parameter's blocks (a TP-replicated one
    only from TP rank 0) and, with `optimizer_state` ({name: {kind: local tensor}}, e.g.
    ``DistributedAdamW.local_state()``), the same blocks of every optimizer kind. Only DP rank 0 writes."""
    model = {}
    for name, p in params.items():
        m = metas[name]
        model[name] = (p.detach(), [] if (m.tp_replicated and state.tp_rank != 0) else m.fragments(p.shape))
    tensors = {"model": model}
    for kind in STATE_KINDS if optimizer_state is not None else ():
        tensors[kind] = {n: (optimizer_state[n][kind], model[n][1]) for n in params}
    return SavePlan(meta.iteration, tensors, {n: tuple(metas[n].logical_shape) for n in params}, rank, world_size,
                    writer=state.dp_rank == 0, file_tag=file_tag(state.tp_rank, state.pp_rank), metadata=meta)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random states as uint8 tensors (safetensors-friendly, nothing pickled)."""
    py = json.dumps(random.getstate()).encode()
    np_state = np.random.get_state()
    np_json = json.dumps([np_state[0], np_state[1].tolist(), *map(lambda x: float(x) if isinstance(x, float) else int(x),
                                                                     np_state[2:])]).encode()
    out = {"torch": torch.get_rng_state(), "python": torch.frombuffer(bytearray(py), dtype=torch.uint8),
           "numpy": torch.frombuffer(bytearray(np_json), dtype=torch.uint8)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise CheckpointError(f"{TIMEOUT_ENV}={raw!r}: give the checkpoint save timeout in seconds (> 0)")
    return value


class Checkpointer:
    """Saves and loads checkpoints under `root` for one rank of a run.

    Rank 0 waits at most `timeout_s` (default: $MEGAEVO_CHECKPOINT_TIMEOUT, else 600 s) for the other
    ranks' parts of a save; the barriers around a save are bounded by the process group's timeout.
    Each file's `checksum` (one of CHECKSUMS; None records sizes only) is computed while it is written."""

    def __init__(self, root: str | os.PathLike, rank: int = 0, world_size: int = 1, keep_last: int | None = None,
                 async_save: bool = False, timeout_s: float | None = None, checksum: str | None = CHECKSUM):
        self.root = Path(root)
        self.rank, self.world_size = rank, world_size
        self.keep_last = keep_last
        self.async_save = async_save
        if checksum is not None:
            new_hash(checksum)  # refuse an unknown name now, not in the middle of a save
        self.checksum = checksum
        self.timeout_s = float(timeout_s) if timeout_s is not None else _timeout_from_env()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- saving ------------------------------------------------------------------------------------
    def save(self, plan: SavePlan) -> None:
        """Write this rank's part; with async_save the copies are taken now and written in the background."""
        self.wait()
        tmp = temp_dir(self.root, plan.iteration)
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        # Host copies: taken now with async_save, so that training may change the tensors while the files
        # are written; a synchronous save of CPU tensors writes them as they are.
        host = {kind: {n: (t.detach().to("cpu", copy=self.async_save).contiguous(), frags)
                       for n, (t, frags) in d.items()}
                for kind, d in plan.tensors.items()}
        rng = {k: v.clone() for k, v in rng_state().items()}

        def write() -> None:
            try:
                self._write(tmp, plan, host, rng)
            except BaseException as e:  # noqa: BLE001 - reported by wait()
                self._error = e

        if self.async_save:
            self._thread = threading.Thread(target=write, name="megaevo-checkpoint", daemon=True)
            self._thread.start()
        else:
            write()
            self.wait()
            _barrier()

    def wait(self) -> None:
        """Block until a background save has finished; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write(self, tmp: Path, plan: SavePlan, host, rng) -> None:
        fragments, files = {}, {}
        if plan.writer:
            tensors, fname = {}, tagged_model_file(plan.file_tag)
            for kind, named in host.items():
                for name, (local, frags) in named.items():
                    for i, f in enumerate(frags):
                        key = f"{kind}/{name}/{i}"
                        tensors[key] = f.local_view(local).contiguous()
                        fragments.setdefault(kind, {}).setdefault(name, []).append(
                            StoredFragment(fname, key, tuple(f.logical_offset), tuple(f.shape)).to_json())
            files[fname] = write_safetensors(tmp / fname, tensors, self.checksum)
        files[rng_file(plan.rank)] = write_safetensors(tmp / rng_file(plan.rank), rng, self.checksum)
        part = {"rank": plan.rank, "fragments": fragments, "files": {n: r.to_json() for n, r in files.items()},
                "shapes": {n: list(plan.logical_shapes[n]) for d in host.values() for n in d},
                "dtypes": {kind: {n: dtype_name(t.dtype) for n, (t, _) in d.items()} for kind, d in host.items()}}
        _atomic_write(tmp / part_file(plan.rank), json.dumps(part))
        if self.rank == 0:
            self._commit(tmp, plan)

    def _wait_for_parts(self, tmp: Path, plan: SavePlan) -> list[Path]:
        """Rank 0: every rank's part file, or CheckpointError naming the ranks that did not deliver in time."""
        parts = [tmp / part_file(r) for r in range(plan.world_size)]
        missing = list(range(plan.world_size))
        deadline, pause = time.monotonic() + self.timeout_s, 0.005
        while True:
            missing = [r for r in missing if not parts[r].is_file()]
            if not missing:
                return parts
            if time.monotonic() >= deadline:
                shown = ", ".join(map(str, missing[:16])) + (f" and {len(missing) - 16} more"
                                                             if len(missing) > 16 else "")
                raise CheckpointError(
                    f"saving iteration {plan.iteration}: rank(s) {shown} did not finish their part within "
                    f"{self.timeout_s:g} s (no {part_file(missing[0])} in {tmp}); a peer process died or hangs. "
                    f"The previous checkpoint is intact; raise {TIMEOUT_ENV} if the file system is just slow")
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def _commit(self, tmp: Path, plan: SavePlan) -> None:
        """Rank 0: gather every rank's part into the metadata, then commit the directory."""
        tensors: dict[str, dict[str, TensorEntry]] = {}
        files: dict[str, FileRecord] = {}
        parts = self._wait_for_parts(tmp, plan)
        for p in parts:
            part = json.loads(p.read_text())
            files.update(Validator(str(p)).files(part["files"]))
            for kind, named in part["fragments"].items():
                for name, frags in named.items():
                    entry = tensors.setdefault(kind, {}).setdefault(
                        name, TensorEntry(tuple(part["shapes"][name]), part["dtypes"][kind][name]))
                    entry.fragments.extend(StoredFragment(f["file"], f["key"], tuple(f["offset"]), tuple(f["shape"]))
                                           for f in frags)
        for named in tensors.values():
            for entry in named.values():
                entry.fragments = _unique_fragments(entry.fragments)
        meta = plan.metadata
        if not isinstance(meta, CheckpointMeta):
            meta = CheckpointMeta.from_json({"format_version": FORMAT_VERSION, "iteration": plan.iteration, **meta,
                                             "tensors": {}}, "checkpoint metadata to save")
        meta = dataclasses.replace(meta, iteration=plan.iteration, world_size=plan.world_size, tensors=tensors,
                                   files=files)
        for p in parts:
            p.unlink()
        commit_checkpoint(self.root, tmp, meta, self.keep_last)

    # -- loading -----------------------------------------------------------------------------------
    def resolve(self, load: str | os.PathLike) -> Path | None:
        """`auto` -> this run's latest checkpoint (None if there is none); else the checkpoint `load`
        names (see :func:`~megaevo.checkpoint.resolve.find_checkpoint`), or `load` itself when it names
        none (loading it then says what is wrong with it)."""
        if str(load) == "auto":
            return find_checkpoint(self.root)
        return find_checkpoint(load) or Path(load)


def _unique_fragments(frags: list[StoredFragment]) -> list[StoredFragment]:
    """Fragments of replicated tensors may come from several ranks: keep one per logical block."""
    seen, out = set(), []
    for f in frags:
        if (f.offset, f.shape) not in seen:
            seen.add((f.offset, f.shape))
            out.append(f)
    return out


# ------------------------------------------------------------------------------------------------ helpers


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _barrier() -> None:
    """All ranks; bounded by the process group's own timeout (init_process_group's `timeout`)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
