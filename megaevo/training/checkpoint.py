"""Layout-free checkpoints: safetensors fragments placed in logical tensors by JSON metadata.

    out_dir/checkpoints/iter_0000100/
        metadata.json                 a CheckpointMeta: iteration, consumed samples, layout, config,
                                      for every logical tensor its shape, dtype and fragments, and
                                      for every file its size and checksum
        metadata.json.sha256          the checksum of metadata.json (``sha256sum -c`` reads it)
        model_tp0_pp0.safetensors     fragments written by the rank at (tp 0, pp 0) of DP rank 0
        rng_rank0.safetensors         each rank's random states
    out_dir/checkpoints/latest        the name of the newest complete checkpoint

Each logical tensor is stored as the blocks that the saving ranks held: a fragment names its file,
its key in that file and its offset in the logical (unsharded, unpadded) tensor. Loading
assembles the blocks a rank needs, whatever TP/PP/DP layout saved them. Kinds of tensors:
`model` (weights in training dtype) and the optimizer's `master`, `exp_avg`, `exp_avg_sq` (fp32).

This module is the format's one home: the metadata record (:class:`CheckpointMeta`), the file
names (:func:`iteration_dir`, :func:`model_file`, :func:`rng_file`, :func:`temp_dir`,
:data:`LATEST`), the atomic commit (:func:`commit_checkpoint`, shared by the trainer's
:class:`Checkpointer` and the offline converters), and a rank's view of a checkpoint
(:func:`build_save_plan`, :func:`read_local`, :func:`read_local_state`).

Writes go to a temporary directory; once every rank's files are complete, rank 0 writes
metadata.json, renames the directory into place and moves `latest` last, so an interrupted save
leaves the previous checkpoint intact. A rank that never finishes its part makes the save fail
after `timeout_s` instead of hanging. Nothing is unpickled on load, and file names from metadata
must be plain names inside the checkpoint directory.

Integrity: each file's checksum (:data:`CHECKSUM`, named in the record so that it can change) is
computed while the file is written, from the bytes as they go out, and recorded in metadata.json
(:class:`FileRecord`); metadata.json's own sha256 sits beside it. :class:`LoadedCheckpoint` checks
metadata.json when it opens a checkpoint and each file's size and checksum the first time it opens
that file, and refuses unreadable fragments and non-finite values (NaN/Inf) in what it reads, each
with one line naming the file and the tensor. :func:`verify_checkpoint` reads and checks a whole
checkpoint; :func:`last_verified_checkpoint` finds the newest one that passes, and
:func:`with_intact_alternative` names it in the error of a damaged checkpoint that a run tried to
load. Checkpoints written before checksums were recorded load unverified.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from megaevo.errors import UserError
from megaevo.log import get_logger
from megaevo.parallel.layout import ParamMeta
from megaevo.parallel.state import ParallelState
from megaevo.training.optimizer import STATE_KINDS

log = get_logger(__name__)

FORMAT_VERSION = 1
KINDS = ("model", *STATE_KINDS)
LATEST = "latest"
METADATA = "metadata.json"
METADATA_CHECKSUM = METADATA + ".sha256"
TIMEOUT_ENV = "MEGAEVO_CHECKPOINT_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, malformed, or does not fit the model."""


# ------------------------------------------------------------------------------------------------ names


def iteration_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / iteration_name(iteration)


def temp_dir(root: str | os.PathLike, iteration: int) -> Path:
    """Where the checkpoint of `iteration` is written before it is renamed into place."""
    return Path(root) / f".tmp_{iteration_name(iteration)}"


def model_file(tp_rank: int, pp_rank: int) -> str:
    """The file of the weights and optimizer state written by the rank at (tp_rank, pp_rank) of DP rank 0."""
    return _model_file(f"tp{tp_rank}_pp{pp_rank}")


def _model_file(tag: str) -> str:
    return f"model_{tag}.safetensors"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint directory `root/latest` names, or None without a `latest` pointer."""
    latest = Path(root) / LATEST
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    if not _ITER_DIR.match(name):
        raise CheckpointError(f"{latest}: expected a checkpoint name like iter_0000100, found {name!r}")
    return Path(root) / name


def _part_file(rank: int) -> str:
    """A rank's report of what it wrote, gathered by rank 0 into metadata.json."""
    return f"part_rank{rank}.json"


# ------------------------------------------------------------------------------------------------ checksums


class _Crc32:
    """zlib's CRC-32 behind hashlib's ``update``/``hexdigest``."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


CHECKSUMS = {"crc32": _Crc32, "sha256": hashlib.sha256}  # what a FileRecord may name
# What new checkpoints record: the fastest here (benchmarks/checkpoint_save.py: crc32 adds a quarter to
# a save of evolm-1b on two cores, sha256 half). It catches damage, not tampering.
CHECKSUM = "crc32"


def _new_hash(algorithm: str):
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
        self._hash = _new_hash(algorithm)
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
    h = _new_hash(algorithm)
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


@dataclass(frozen=True)
class FileRecord:
    """A file of a checkpoint as it was written: its size and, unless None, its checksum.
    In metadata.json: ``{"bytes": 2215688, "crc32": "5e0c92a1"}`` (the key names the algorithm)."""

    size: int
    algorithm: str | None = None
    digest: str | None = None

    def to_json(self) -> dict:
        return {"bytes": self.size, **({self.algorithm: self.digest} if self.algorithm else {})}

    def check(self, path: Path) -> None:
        """CheckpointError naming `path` if it is missing, has another size or fails its checksum."""
        if not path.is_file():
            raise CheckpointError(f"{path}: file missing ({METADATA} lists it)")
        size = path.stat().st_size
        if size != self.size:
            how = "truncated" if size < self.size else "longer than written"
            raise CheckpointError(f"{path}: {how}: {size:,} bytes, {METADATA} records {self.size:,}")
        if self.algorithm is not None:
            actual = file_checksum(path, self.algorithm)
            if actual != self.digest:
                raise CheckpointError(f"{path}: checksum mismatch ({self.algorithm} {actual}, {METADATA} records "
                                      f"{self.digest}): the file is damaged")


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      checksum: str | None = CHECKSUM) -> FileRecord:
    """Write `tensors` (in their order) as a safetensors file, each streamed into the file and into
    the checksum together; the file's record. The file is never read back."""
    from megaevo.convert.safetensors_io import StreamingWriter  # not at the top: megaevo.convert imports this module

    running = RunningChecksum(checksum) if checksum else None
    with StreamingWriter(path, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], checksum=running) as w:
        for key, t in tensors.items():
            w.write(key, t)
    return FileRecord(w.size, checksum, running.hexdigest() if running else None)


def _metadata_checksum(raw: bytes) -> str:
    """The text of metadata.json.sha256 for metadata.json holding `raw` (the format of ``sha256sum``)."""
    return f"{hashlib.sha256(raw).hexdigest()}  {METADATA}\n"


# ------------------------------------------------------------------------------------------------ metadata


def dtype_name(dtype: torch.dtype) -> str:
    """The name a TensorEntry records: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class StoredFragment:
    """A block of a logical tensor: tensor `key` of `file`, at `offset` in the logical tensor."""

    file: str
    key: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"file": self.file, "key": self.key, "offset": list(self.offset), "shape": list(self.shape)}


@dataclass
class TensorEntry:
    """One logical tensor of one kind: its unsharded shape, dtype name (``float32``) and fragments."""

    shape: tuple[int, ...]
    dtype: str
    fragments: list[StoredFragment] = field(default_factory=list)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "fragments": [f.to_json() for f in self.fragments]}


@dataclass
class SavedLayout:
    """The parallel layout a checkpoint was saved with (informative: any layout loads any checkpoint)."""

    tp: int
    pp: int
    dp: int | None = None  # None: not from a run (e.g. resharded offline)
    virtual_pp: int = 1
    distributed_optimizer: bool = False
    dtype: str | None = None  # training dtype, e.g. "torch.bfloat16"


@dataclass
class CheckpointMeta:
    """What metadata.json holds. `tensors` and `world_size` are filled in by the writer at commit;
    `extra` holds stage-specific state (e.g. an SFT epoch) as plain JSON."""

    iteration: int
    tensors: dict[str, dict[str, TensorEntry]] = field(default_factory=dict)  # kind -> name -> entry
    world_size: int | None = None
    consumed_samples: int = 0
    tokens: int = 0
    optimizer_step: int | None = None  # None: same as iteration
    skipped_steps: int = 0
    scheduler: dict = field(default_factory=dict)
    layout: SavedLayout | None = None
    config: dict | None = None  # the run's config as a plain dict (config_to_dict)
    hf: dict | None = None  # set by Hugging Face import: architecture, model_type, source, files, config
    resharded_from: dict | None = None  # {"path": ..., "layout": {...}} when written by reshard
    extra: dict = field(default_factory=dict)
    files: dict[str, FileRecord] = field(default_factory=dict)  # file name -> size and checksum, filled at commit
    format_version: int = FORMAT_VERSION
    unknown: dict = field(default_factory=dict, repr=False)  # keys of newer writers, kept as they are

    def saved_with(self, world_size: int, tp: int, pp: int, virtual_pp: int = 1) -> bool:
        """Whether the saving run had this layout (then each rank's RNG state applies as saved)."""
        layout = self.layout
        return (layout is not None and self.world_size == world_size
                and (layout.tp, layout.pp, layout.virtual_pp) == (tp, pp, virtual_pp))

    def to_json(self) -> dict:
        """The metadata.json object; optional fields that are None are left out."""
        out: dict[str, Any] = {"format_version": self.format_version, "iteration": self.iteration}
        for f in dataclasses.fields(self):
            if f.name in ("format_version", "iteration", "tensors", "files", "unknown"):
                continue
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = dataclasses.asdict(value) if isinstance(value, SavedLayout) else value
        out.update(self.unknown)
        out["tensors"] = {kind: {name: e.to_json() for name, e in named.items()}
                          for kind, named in self.tensors.items()}
        if self.files:
            out["files"] = {name: r.to_json() for name, r in sorted(self.files.items())}
        return out

    @classmethod
    def from_json(cls, data: Any, path: str | os.PathLike) -> "CheckpointMeta":
        """The record from a metadata.json object; CheckpointError naming `path` and the field if malformed."""
        v = _Validator(str(path))
        data = v.obj(data, "metadata")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{path}: unsupported format_version {version!r} (this megaevo reads "
                                  f"{FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)} - {"unknown"}
        layout = data.get("layout")
        if layout is not None:
            layout = v.obj(layout, "layout")
            layout = SavedLayout(tp=v.int(layout.get("tp"), "layout.tp", 1), pp=v.int(layout.get("pp"), "layout.pp", 1),
                                 dp=v.opt_int(layout.get("dp"), "layout.dp", 1),
                                 virtual_pp=v.int(layout.get("virtual_pp", 1), "layout.virtual_pp", 1),
                                 distributed_optimizer=v.bool(layout.get("distributed_optimizer", False),
                                                              "layout.distributed_optimizer"),
                                 dtype=v.opt_str(layout.get("dtype"), "layout.dtype"))
        return cls(
            iteration=v.int(data.get("iteration"), "iteration"),
            tensors=v.tensors(data.get("tensors")),
            world_size=v.opt_int(data.get("world_size"), "world_size", 1),
            consumed_samples=v.int(data.get("consumed_samples", 0), "consumed_samples"),
            tokens=v.int(data.get("tokens", 0), "tokens"),
            optimizer_step=v.opt_int(data.get("optimizer_step"), "optimizer_step"),
            skipped_steps=v.int(data.get("skipped_steps", 0), "skipped_steps"),
            scheduler=v.obj(data.get("scheduler", {}), "scheduler"),
            layout=layout,
            config=v.opt_obj(data.get("config"), "config"),
            hf=v.opt_obj(data.get("hf"), "hf"),
            resharded_from=v.opt_obj(data.get("resharded_from"), "resharded_from"),
            extra=v.obj(data.get("extra", {}), "extra"),
            files=v.files(data.get("files", {})),
            unknown={k: val for k, val in data.items() if k not in known},
        )


class _Validator:
    """Type checks of metadata fields; each failure names the file and the field."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, name: str, expected: str, value: Any) -> None:
        raise CheckpointError(f"{self.source}: metadata field {name} must be {expected}, found {value!r}")

    def int(self, value: Any, name: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(name, f"an integer >= {minimum}", value)
        return value

    def opt_int(self, value: Any, name: str, minimum: int = 0) -> int | None:
        return None if value is None else self.int(value, name, minimum)

    def bool(self, value: Any, name: str) -> bool:
        if not isinstance(value, bool):
            self.fail(name, "true or false", value)
        return value

    def opt_str(self, value: Any, name: str) -> str | None:
        if value is not None and not isinstance(value, str):
            self.fail(name, "a string", value)
        return value

    def obj(self, value: Any, name: str) -> dict:
        if not isinstance(value, dict):
            self.fail(name, "a JSON object", value)
        return value

    def opt_obj(self, value: Any, name: str) -> dict | None:
        return None if value is None else self.obj(value, name)

    def shape(self, value: Any, name: str, ndim: int | None = None) -> tuple[int, ...]:
        if not isinstance(value, list) or (ndim is not None and len(value) != ndim) or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in value):
            self.fail(name, "a list of " + (f"{ndim} " if ndim is not None else "") + "integers >= 0", value)
        return tuple(value)

    def tensors(self, value: Any) -> dict[str, dict[str, TensorEntry]]:
        out: dict[str, dict[str, TensorEntry]] = {}
        for kind, named in self.obj(value, "tensors").items():
            out[kind] = {}
            for name, entry in self.obj(named, f"tensors.{kind}").items():
                where = f"tensors.{kind}[{name!r}]"
                entry = self.obj(entry, where)
                shape = self.shape(entry.get("shape"), f"{where}.shape")
                dtype = entry.get("dtype")
                if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
                    self.fail(f"{where}.dtype", "a torch dtype name such as 'float32'", dtype)
                frags = entry.get("fragments")
                if not isinstance(frags, list):
                    self.fail(f"{where}.fragments", "a list", frags)
                out[kind][name] = TensorEntry(shape, dtype, [self.fragment(f, f"{where}.fragments[{i}]", shape)
                                                             for i, f in enumerate(frags)])
        return out

    def files(self, value: Any) -> dict[str, FileRecord]:
        out = {}
        for name, record in self.obj(value, "files").items():
            where = f"files[{name!r}]"
            self.plain_name(name, where)
            record = self.obj(record, where)
            size = self.int(record.get("bytes"), f"{where}.bytes")
            sums = [(k, d) for k, d in record.items() if k != "bytes"]
            if len(sums) > 1 or any(not isinstance(d, str) for _, d in sums):
                self.fail(where, 'an object {"bytes": N, "<checksum>": "<hex digest>"}', record)
            if sums and sums[0][0] not in CHECKSUMS:
                self.fail(where, f"a checksum this megaevo knows ({', '.join(CHECKSUMS)})", sums[0][0])
            out[name] = FileRecord(size, *(sums[0] if sums else (None, None)))
        return out

    def plain_name(self, file: Any, where: str) -> None:
        if not isinstance(file, str) or not _PLAIN_NAME.match(file) or file in (".", ".."):
            raise CheckpointError(f"{self.source}: metadata field {where} names a file outside the "
                                  f"checkpoint: {file!r}")

    def fragment(self, value: Any, where: str, full: tuple[int, ...]) -> StoredFragment:
        value = self.obj(value, where)
        file, key = value.get("file"), value.get("key")
        self.plain_name(file, f"{where}.file")
        if not isinstance(key, str):
            self.fail(f"{where}.key", "a string", key)
        offset = self.shape(value.get("offset"), f"{where}.offset", len(full))
        shape = self.shape(value.get("shape"), f"{where}.shape", len(full))
        if any(o + s > d for o, s, d in zip(offset, shape, full)):
            raise CheckpointError(f"{self.source}: metadata field {where}: block {list(offset)}+{list(shape)} lies "
                                  f"outside the tensor's shape {list(full)}")
        return StoredFragment(file, key, offset, shape)


# ------------------------------------------------------------------------------------------------ commit


def commit_checkpoint(root: str | os.PathLike, tmp: Path, meta: CheckpointMeta, keep_last: int | None = None) -> Path:
    """Make the complete temporary directory `tmp` checkpoint `meta.iteration` under `root`: write
    metadata.json and its checksum, rename `tmp` into place, move `latest` last, then keep only the
    newest `keep_last` checkpoints. An interruption before the rename leaves the previous checkpoint
    and `latest` as they were. Returns the checkpoint directory."""
    root = Path(root)
    raw = json.dumps(meta.to_json(), indent=1).encode()
    _atomic_write(tmp / METADATA, raw)
    _atomic_write(tmp / METADATA_CHECKSUM, _metadata_checksum(raw))
    final = iteration_dir(root, meta.iteration)
    replaced = root / f".replaced_{final.name}"
    if final.exists():  # saved again (e.g. after a resume): move the old one aside, drop it once replaced
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(tmp, final)
    _atomic_write(root / LATEST, final.name + "\n")
    shutil.rmtree(replaced, ignore_errors=True)
    if keep_last:
        done = sorted((p for p in root.iterdir() if _ITER_DIR.match(p.name)), key=lambda p: int(p.name[5:]))
        for old in done[:-keep_last]:
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
                    writer=state.dp_rank == 0, file_tag=f"tp{state.tp_rank}_pp{state.pp_rank}", metadata=meta)


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


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    py = json.loads(bytes(states["python"].tolist()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))
    npj = json.loads(bytes(states["numpy"].tolist()).decode())
    np.random.set_state((npj[0], np.array(npj[1], dtype=np.uint32), *npj[2:]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


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
            _new_hash(checksum)  # refuse an unknown name now, not in the middle of a save
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
            tensors, fname = {}, _model_file(plan.file_tag)
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
        _atomic_write(tmp / _part_file(plan.rank), json.dumps(part))
        if self.rank == 0:
            self._commit(tmp, plan)

    def _wait_for_parts(self, tmp: Path, plan: SavePlan) -> list[Path]:
        """Rank 0: every rank's part file, or CheckpointError naming the ranks that did not deliver in time."""
        parts = [tmp / _part_file(r) for r in range(plan.world_size)]
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
                    f"{self.timeout_s:g} s (no {_part_file(missing[0])} in {tmp}); a peer process died or hangs. "
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
            files.update(_Validator(str(p)).files(part["files"]))
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
        """`auto` -> this run's latest checkpoint (None if there is none); else the given checkpoint, the
        latest of a checkpoints directory, or the latest of a run directory's checkpoints."""
        if str(load) == "auto":
            return latest_checkpoint(self.root)
        path = Path(load)
        if not (path / METADATA).is_file():
            for root in (path, path / "checkpoints"):
                if (root / LATEST).is_file():
                    return latest_checkpoint(root)
        return path


def _unique_fragments(frags: list[StoredFragment]) -> list[StoredFragment]:
    """Fragments of replicated tensors may come from several ranks: keep one per logical block."""
    seen, out = set(), []
    for f in frags:
        if (f.offset, f.shape) not in seen:
            seen.add((f.offset, f.shape))
            out.append(f)
    return out


# ------------------------------------------------------------------------------------------------ loading


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
            self._check_metadata(raw)
        try:
            self.meta = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{meta_path}: unreadable metadata ({e})") from None
        self.record = CheckpointMeta.from_json(self.meta, meta_path)
        if verify and not self.record.files:
            log.debug(f"{self.path}: no checksums recorded (written before megaevo recorded them); its files "
                      f"are read unverified")

    def _check_metadata(self, raw: bytes) -> None:
        side = self.path / METADATA_CHECKSUM
        if not side.is_file():
            return
        recorded = (side.read_text(errors="replace").split() or [""])[0]
        actual = hashlib.sha256(raw).hexdigest()
        if actual != recorded:
            raise CheckpointError(f"{self.path / METADATA}: checksum mismatch (sha256 {actual}, {METADATA_CHECKSUM} "
                                  f"records {recorded or 'nothing'}): the file is damaged (if it was edited on "
                                  f"purpose, delete {METADATA_CHECKSUM})")

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
            record.check(path)
            self._verified.add(name)
        return record

    def check_sizes(self) -> None:
        """Every file metadata.json lists is there at the size it records (no checksums read: cheap
        enough for any checkpoint); CheckpointError naming the first that is not."""
        for name, record in sorted(self.record.files.items()):
            path = self._path(name)
            if not path.is_file() or path.stat().st_size != record.size:
                FileRecord(record.size).check(path)

    @property
    def iteration(self) -> int:
        return self.record.iteration

    def has(self, kind: str) -> bool:
        return kind in self.record.tensors

    def names(self, kind: str = "model") -> list[str]:
        return list(self.record.tensors.get(kind, {}))

    def _path(self, name: str) -> Path:
        if not _PLAIN_NAME.match(name) or name in (".", ".."):
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
            raise CheckpointError(f"{path}: unreadable safetensors file ({_one_line(e)})") from None

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
                raise CheckpointError(f"{where} is unreadable ({_one_line(e)})") from None
            if self.verify:
                _check_finite(block, where)
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
            raise CheckpointError(f"{self.path / name}: unreadable ({_one_line(e)})") from None


def _check_finite(block: torch.Tensor, where: str) -> None:
    """CheckpointError at `where` if floating-point `block` holds NaN or Inf. A NaN or Inf makes the
    sum non-finite; the sum (a fast reduction) is finite for finite values unless it overflows, and
    only then is every value looked at."""
    if not block.is_floating_point() or bool(torch.isfinite(block.sum())):
        return
    bad = int((~torch.isfinite(block)).sum())
    if bad:
        raise CheckpointError(f"{where} holds {bad:,} non-finite value(s) (NaN/Inf) of {block.numel():,}: it was "
                              f"saved from a diverged run or damaged; load an earlier checkpoint")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


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


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from itself, a checkpoints directory (its latest) or a run directory."""
    p = Path(path)
    if (p / METADATA).is_file():
        return p
    for root in (p, p / "checkpoints"):
        if (root / LATEST).is_file():
            resolved = latest_checkpoint(root)
            if resolved is not None and (resolved / METADATA).is_file():
                return resolved
            raise CheckpointError(f"{root / LATEST} points at {resolved}, which is not a complete checkpoint")
    raise CheckpointError(f"{p}: not a megaevo checkpoint (no {METADATA}, no `{LATEST}` pointer)")


def summarize_checkpoint(path: str | os.PathLike) -> dict:
    """What `megaevo inspect` prints for a checkpoint directory, a run's checkpoints/ folder or a run.
    Checks metadata.json against its checksum and every recorded file's presence and size (not its
    contents: that is :func:`verify_checkpoint`)."""
    path = resolve_checkpoint(path)
    record = LoadedCheckpoint(path).record
    for name, file in sorted(record.files.items()):
        FileRecord(file.size).check(path / name)
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
    from tqdm import tqdm

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
    for name in sorted(n for n in names if re.fullmatch(r"rng_rank\d+\.safetensors", n)):
        ck.rng(int(name[len("rng_rank"):-len(".safetensors")]))
    return {"path": str(path), "iteration": record.iteration, "checksum": _checksum_of(record),
            "files": {name: sizes[name] for name in sorted(names)}, "bytes": sum(sizes.values()), "tensors": count,
            "seconds": round(time.perf_counter() - start, 3)}


def _complete_checkpoints(root: Path) -> list[Path]:
    """The checkpoints (``iter_*`` with metadata.json) under the checkpoints folder `root`, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _ITER_DIR.match(p.name) and (p / METADATA).is_file()),
                  key=lambda p: int(p.name[5:]), reverse=True)


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
    if not _ITER_DIR.match(path.name) or not path.parent.is_dir():
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


# ------------------------------------------------------------------------------------------------ helpers


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _barrier() -> None:
    """All ranks; bounded by the process group's own timeout (init_process_group's `timeout`)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
