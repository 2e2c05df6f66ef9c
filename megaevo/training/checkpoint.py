"""Layout-free checkpoints: safetensors fragments placed in logical tensors by JSON metadata.

    out_dir/checkpoints/iter_0000100/
        metadata.json                 a CheckpointMeta: iteration, consumed samples, layout, config,
                                      and for every logical tensor its shape, dtype and fragments
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
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from megaevo.errors import UserError
from megaevo.parallel.layout import ParamMeta
from megaevo.parallel.state import ParallelState
from megaevo.training.optimizer import STATE_KINDS

FORMAT_VERSION = 1
KINDS = ("model", *STATE_KINDS)
LATEST = "latest"
METADATA = "metadata.json"
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
            if f.name in ("format_version", "iteration", "tensors", "unknown"):
                continue
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = dataclasses.asdict(value) if isinstance(value, SavedLayout) else value
        out.update(self.unknown)
        out["tensors"] = {kind: {name: e.to_json() for name, e in named.items()}
                          for kind, named in self.tensors.items()}
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

    def fragment(self, value: Any, where: str, full: tuple[int, ...]) -> StoredFragment:
        value = self.obj(value, where)
        file, key = value.get("file"), value.get("key")
        if not isinstance(file, str) or not _PLAIN_NAME.match(file) or file in (".", ".."):
            raise CheckpointError(f"{self.source}: metadata field {where}.file names a file outside the "
                                  f"checkpoint: {file!r}")
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
    metadata.json, rename `tmp` into place, move `latest` last, then keep only the newest
    `keep_last` checkpoints. An interruption before the rename leaves the previous checkpoint and
    `latest` as they were. Returns the checkpoint directory."""
    root = Path(root)
    _atomic_write(tmp / METADATA, json.dumps(meta.to_json(), indent=1))
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
    ranks' parts of a save; the barriers around a save are bounded by the process group's timeout."""

    def __init__(self, root: str | os.PathLike, rank: int = 0, world_size: int = 1, keep_last: int | None = None,
                 async_save: bool = False, timeout_s: float | None = None):
        self.root = Path(root)
        self.rank, self.world_size = rank, world_size
        self.keep_last = keep_last
        self.async_save = async_save
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
        # Copy to host memory now, so training may change the tensors while the files are written.
        host = {kind: {n: (t.detach().to("cpu", copy=True).contiguous(), frags) for n, (t, frags) in d.items()}
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
        fragments = {}
        if plan.writer:
            tensors, fname = {}, _model_file(plan.file_tag)
            for kind, named in host.items():
                for name, (local, frags) in named.items():
                    for i, f in enumerate(frags):
                        key = f"{kind}/{name}/{i}"
                        tensors[key] = f.local_view(local).contiguous()
                        fragments.setdefault(kind, {}).setdefault(name, []).append(
                            StoredFragment(fname, key, tuple(f.logical_offset), tuple(f.shape)).to_json())
            save_file(tensors, str(tmp / fname))
        save_file(rng, str(tmp / rng_file(plan.rank)))
        part = {"rank": plan.rank, "fragments": fragments,
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
        parts = self._wait_for_parts(tmp, plan)
        for p in parts:
            part = json.loads(p.read_text())
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
        meta = dataclasses.replace(meta, iteration=plan.iteration, world_size=plan.world_size, tensors=tensors)
        for p in parts:
            p.unlink()
        commit_checkpoint(self.root, tmp, meta, self.keep_last)

    # -- loading -----------------------------------------------------------------------------------
    def resolve(self, load: str | os.PathLike) -> Path | None:
        """`auto` -> this run's latest checkpoint (None if there is none); else the given directory."""
        if str(load) == "auto":
            return latest_checkpoint(self.root)
        path = Path(load)
        if (path / LATEST).is_file() and not (path / METADATA).is_file():
            return latest_checkpoint(path)
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

    `record` is the validated :class:`CheckpointMeta`; `meta` the raw metadata.json object."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / METADATA
        if not meta_path.is_file():
            raise CheckpointError(f"{self.path}: not a megaevo checkpoint (no {METADATA})")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{meta_path}: unreadable metadata ({e})") from None
        self.record = CheckpointMeta.from_json(self.meta, meta_path)

    @property
    def iteration(self) -> int:
        return self.record.iteration

    def has(self, kind: str) -> bool:
        return kind in self.record.tensors

    def names(self, kind: str = "model") -> list[str]:
        return list(self.record.tensors.get(kind, {}))

    def _file(self, name: str):
        """A fresh read handle on file `name` of the checkpoint. Handles are not kept: each maps its
        file, and pages read through a kept one would stay in this process's memory until the end."""
        if not _PLAIN_NAME.match(name) or name in (".", ".."):
            raise CheckpointError(f"{self.path}: metadata names a file outside the checkpoint: {name!r}")
        path = self.path / name
        if not path.is_file():
            raise CheckpointError(f"{path}: fragment file missing")
        return safe_open(str(path), framework="pt")

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
            if frag.key not in f.keys():
                raise CheckpointError(f"{self.path / frag.file}: fragment {frag.key!r} of {name!r} is missing")
            stored = f.get_slice(frag.key)
            if tuple(stored.get_shape()) != fs:
                raise CheckpointError(f"{self.path}: fragment {frag.key!r} of {name!r} does not match its metadata")
            block = stored[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, fo))]
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
        return {k: f.get_tensor(k) for k in f.keys()}


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
    """What `megaevo inspect` prints for a checkpoint directory, a run's checkpoints/ folder or a run."""
    path = resolve_checkpoint(path)
    record = LoadedCheckpoint(path).record
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
        "tensors": tensors,
    }


# ------------------------------------------------------------------------------------------------ helpers


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _barrier() -> None:
    """All ranks; bounded by the process group's own timeout (init_process_group's `timeout`)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
