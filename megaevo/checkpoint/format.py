"""The checkpoint format's names and its metadata record.

    out_dir/checkpoints/iter_0000100/
        metadata.json                 a CheckpointMeta: iteration, consumed samples, layout, config,
                                      for every logical tensor its shape, dtype and fragments, and
                                      for every file its size and checksum
        metadata.json.sha256          the checksum of metadata.json (``sha256sum -c`` reads it)
        model_tp0_pp0.safetensors     fragments written by the rank at (tp 0, pp 0) of DP rank 0
        rng_rank0.safetensors         each rank's random states
    out_dir/checkpoints/latest        the name of the newest complete checkpoint

This module is where every name of the format is spelled: the directory of an iteration
(:func:`iteration_name`, the one place ``iter_0000012`` is formatted), the files in it, the tensor
kinds (``model``, the optimizer's :data:`STATE_KINDS` and PPO's critic), the checksum algorithms a
record may name, and the record itself (:class:`CheckpointMeta`, :class:`SavedLayout`,
:class:`FileRecord`), validated field by field when read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megaevo.errors import UserError

FORMAT_VERSION = 1
LATEST = "latest"
METADATA = "metadata.json"
METADATA_CHECKSUM = METADATA + ".sha256"

# Tensor kinds: the weights in training dtype, the optimizer's fp32 state of each parameter.
STATE_KINDS = ("master", "exp_avg", "exp_avg_sq")
KINDS = ("model", *STATE_KINDS)
# PPO's critic is stored beside the actor: its weights as kind "critic", its optimizer state as
# "critic_master", ..., each tensor named "critic.NAME", so that the "model" tensors stay the actor's.
CRITIC_WEIGHTS_KIND = "critic"
CRITIC_STATE_PREFIX = "critic_"
CRITIC_NAME_PREFIX = "critic."

_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_RNG_FILE = re.compile(r"^rng_rank(\d+)\.safetensors$")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, malformed, or does not fit the model."""


# ------------------------------------------------------------------------------------------------ names


def iteration_name(iteration: int) -> str:
    """The directory name of the checkpoint of `iteration`: 12 -> "iter_0000012"."""
    return f"iter_{iteration:07d}"


def iteration_of(name: str) -> int | None:
    """The iteration of a checkpoint directory named `name` ("iter_0000012" -> 12); None for another name."""
    m = _ITER_DIR.match(name)
    return int(m.group(1)) if m else None


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / iteration_name(iteration)


def iteration_dirs(root: str | os.PathLike) -> list[Path]:
    """The ``iter_*`` directories under the checkpoints folder `root`, oldest first (none if no folder)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if iteration_of(p.name) is not None), key=lambda p: iteration_of(p.name))


def temp_dir(root: str | os.PathLike, iteration: int) -> Path:
    """Where the checkpoint of `iteration` is written before it is renamed into place."""
    return Path(root) / f".tmp_{iteration_name(iteration)}"


def file_tag(tp_rank: int, pp_rank: int) -> str:
    """What tells the model files of the ranks at (tp_rank, pp_rank) apart: "tp0_pp1"."""
    return f"tp{tp_rank}_pp{pp_rank}"


def model_file(tp_rank: int, pp_rank: int) -> str:
    """The file of the weights and optimizer state written by the rank at (tp_rank, pp_rank) of DP rank 0."""
    return tagged_model_file(file_tag(tp_rank, pp_rank))


def tagged_model_file(tag: str) -> str:
    """The model file of :func:`file_tag` `tag`."""
    return f"model_{tag}.safetensors"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


def rng_rank_of(name: str) -> int | None:
    """The rank whose random states file `name` holds ("rng_rank3.safetensors" -> 3); None for another file."""
    m = _RNG_FILE.match(name)
    return int(m.group(1)) if m else None


def part_file(rank: int) -> str:
    """A rank's report of what it wrote, gathered by rank 0 into metadata.json."""
    return f"part_rank{rank}.json"


def is_plain_name(name: Any) -> bool:
    """Whether `name` may name a file of a checkpoint: a plain name inside its directory."""
    return isinstance(name, str) and bool(_PLAIN_NAME.match(name)) and name not in (".", "..")


def dtype_name(dtype: torch.dtype) -> str:
    """The name a TensorEntry records: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


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


# ------------------------------------------------------------------------------------------------ metadata


@dataclass(frozen=True)
class FileRecord:
    """A file of a checkpoint as it was written: its size and, unless None, its checksum.
    In metadata.json: ``{"bytes": 2215688, "crc32": "5e0c92a1"}`` (the key names the algorithm).
    :func:`megaevo.checkpoint.integrity.check_file` checks a file against it."""

    size: int
    algorithm: str | None = None
    digest: str | None = None

    def to_json(self) -> dict:
        return {"bytes": self.size, **({self.algorithm: self.digest} if self.algorithm else {})}


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
        v = Validator(str(path))
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


class Validator:
    """Type checks of metadata fields (of metadata.json, or of a rank's part of a save); each failure
    names the file and the field."""

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
        if not is_plain_name(file):
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
