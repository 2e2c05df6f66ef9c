"""Layout-free checkpoints: safetensors fragments placed in logical tensors by JSON metadata.

    out_dir/checkpoints/iter_0000100/
        metadata.json                 iteration, consumed samples, layout, config, and for every
                                      logical tensor its shape, dtype and fragments
        model_tp0_pp0.safetensors     fragments written by the rank at (tp 0, pp 0) of DP rank 0
        rng_rank0.safetensors         each rank's random states
    out_dir/checkpoints/latest        the name of the newest complete checkpoint

Each logical tensor is stored as the blocks that the saving ranks held: a fragment names its file,
its key in that file and its offset in the logical (unsharded, unpadded) tensor. Loading
assembles the blocks a rank needs, whatever TP/PP/DP layout saved them. Kinds of tensors:
`model` (weights in training dtype) and the optimizer's `master`, `exp_avg`, `exp_avg_sq` (fp32).

Writes go to a temporary directory; rank 0 renames it into place once every rank's files are
complete, then moves `latest`, so an interrupted save leaves the previous checkpoint intact.
Nothing is unpickled on load, and file names from metadata must be plain names inside the
checkpoint directory.
"""
from __future__ import annotations

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

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
KINDS = ("model", "master", "exp_avg", "exp_avg_sq")
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not fit the model."""


@dataclass
class SavePlan:
    """What one rank contributes to a checkpoint."""

    iteration: int
    tensors: dict[str, dict[str, tuple[torch.Tensor, list]]]  # kind -> name -> (local tensor, fragments)
    logical_shapes: dict[str, tuple[int, ...]]  # of this rank's tensors (pipeline stages hold different ones)
    rank: int
    world_size: int
    writer: bool  # DP rank 0 writes weights and optimizer state
    file_tag: str  # e.g. "tp0_pp0"
    metadata: dict = field(default_factory=dict)  # only used on rank 0


def iteration_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


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


class Checkpointer:
    """Saves and loads checkpoints under `root` for one rank of a run."""

    def __init__(self, root: str | os.PathLike, rank: int = 0, world_size: int = 1, keep_last: int | None = None,
                 async_save: bool = False):
        self.root = Path(root)
        self.rank, self.world_size = rank, world_size
        self.keep_last = keep_last
        self.async_save = async_save
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- saving ------------------------------------------------------------------------------------
    def save(self, plan: SavePlan) -> None:
        """Write this rank's part; with async_save the copies are taken now and written in the background."""
        self.wait()
        tmp = self.root / f".tmp_iter_{plan.iteration:07d}"
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
            tensors, fname = {}, f"model_{plan.file_tag}.safetensors"
            for kind, named in host.items():
                for name, (local, frags) in named.items():
                    for i, f in enumerate(frags):
                        key = f"{kind}/{name}/{i}"
                        tensors[key] = f.local_view(local).contiguous()
                        fragments.setdefault(kind, {}).setdefault(name, []).append(
                            {"file": fname, "key": key, "offset": list(f.logical_offset), "shape": list(f.shape)})
            save_file(tensors, str(tmp / fname))
        save_file(rng, str(tmp / f"rng_rank{plan.rank}.safetensors"))
        part = {"rank": plan.rank, "fragments": fragments,
                "shapes": {n: list(plan.logical_shapes[n]) for d in host.values() for n in d},
                "dtypes": {kind: {n: str(t.dtype).removeprefix("torch.") for n, (t, _) in d.items()}
                           for kind, d in host.items()}}
        _atomic_write(tmp / f"part_rank{plan.rank}.json", json.dumps(part))
        if self.rank == 0:
            self._commit(tmp, plan)

    def _commit(self, tmp: Path, plan: SavePlan) -> None:
        """Rank 0: wait for every rank's part, write metadata.json, rename into place, move `latest`."""
        parts = [tmp / f"part_rank{r}.json" for r in range(plan.world_size)]
        while not all(p.is_file() for p in parts):
            time.sleep(0.01)
        tensors: dict = {}
        for p in parts:
            part = json.loads(p.read_text())
            for kind, named in part["fragments"].items():
                for name, frags in named.items():
                    entry = tensors.setdefault(kind, {}).setdefault(
                        name, {"shape": part["shapes"][name], "dtype": part["dtypes"][kind][name],
                               "fragments": []})
                    entry["fragments"].extend(frags)
        for kind in tensors:
            for name, entry in tensors[kind].items():
                entry["fragments"] = _unique_fragments(entry["fragments"])
        meta = {"format_version": FORMAT_VERSION, "iteration": plan.iteration, **plan.metadata,
                "world_size": plan.world_size, "tensors": tensors}
        _atomic_write(tmp / "metadata.json", json.dumps(meta, indent=1))
        for p in parts:
            p.unlink()
        final = iteration_dir(self.root, plan.iteration)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write(self.root / "latest", final.name + "\n")
        self._prune(final.name)

    def _prune(self, newest: str) -> None:
        if not self.keep_last:
            return
        done = sorted(p for p in self.root.iterdir() if _ITER_DIR.match(p.name))
        for old in done[: -self.keep_last]:
            if old.name != newest:
                shutil.rmtree(old, ignore_errors=True)

    # -- loading -----------------------------------------------------------------------------------
    def resolve(self, load: str | os.PathLike) -> Path | None:
        """`auto` -> this run's latest checkpoint (None if there is none); else the given directory."""
        if str(load) == "auto":
            latest = self.root / "latest"
            if not latest.is_file():
                return None
            name = latest.read_text().strip()
            if not _ITER_DIR.match(name):
                raise CheckpointError(f"{latest}: expected a checkpoint name like iter_0000100, found {name!r}")
            return self.root / name
        path = Path(load)
        if (path / "latest").is_file() and not (path / "metadata.json").is_file():
            return Checkpointer(path).resolve("auto")
        return path


class LoadedCheckpoint:
    """Read access to a checkpoint directory; every tensor is assembled from its fragments on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / "metadata.json"
        if not meta_path.is_file():
            raise CheckpointError(f"{self.path}: not a megaevo checkpoint (no metadata.json)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{meta_path}: unreadable metadata ({e})") from None
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{meta_path}: unsupported format_version {self.meta.get('format_version')!r}")

    @property
    def iteration(self) -> int:
        return int(self.meta["iteration"])

    def has(self, kind: str) -> bool:
        return kind in self.meta["tensors"]

    def names(self, kind: str = "model") -> list[str]:
        return list(self.meta["tensors"].get(kind, {}))

    def _file(self, name: str):
        """A fresh read handle on file `name` of the checkpoint. Handles are not kept: each maps its
        file, and pages read through a kept one would stay in this process's memory until the end."""
        if not _PLAIN_NAME.match(name) or name in (".", ".."):
            raise CheckpointError(f"{self.path}: metadata names a file outside the checkpoint: {name!r}")
        path = self.path / name
        if not path.is_file():
            raise CheckpointError(f"{path}: fragment file missing")
        return safe_open(str(path), framework="pt")

    def tensor(self, kind: str, name: str, expected_shape=None) -> torch.Tensor:
        """The whole logical tensor `name` of `kind`, checked for complete, non-overlapping coverage."""
        shape = self.shape(kind, name, expected_shape)
        return self.region(kind, name, (0,) * len(shape), shape)

    def shape(self, kind: str, name: str, expected_shape=None) -> tuple[int, ...]:
        """The logical shape of `name`; CheckpointError if it is absent or differs from `expected_shape`."""
        entry = self.meta["tensors"].get(kind, {}).get(name)
        if entry is None:
            raise CheckpointError(f"{self.path}: no {kind} tensor {name!r} in the checkpoint")
        shape = tuple(entry["shape"])
        if expected_shape is not None and tuple(expected_shape) != shape:
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {list(shape)} in the checkpoint but the "
                                  f"model needs {list(expected_shape)}")
        return shape

    def region(self, kind: str, name: str, offset, shape) -> torch.Tensor:
        """The block ``[offset, offset + shape)`` of logical tensor `name`, read only from the fragments
        that overlap it (a rank loading a checkpoint saved for its own layout opens only its own file).
        The block must be covered exactly once."""
        full = self.shape(kind, name)
        entry = self.meta["tensors"][kind][name]
        offset, shape = tuple(offset), tuple(shape)
        if len(offset) != len(full) or len(shape) != len(full) or any(
                o < 0 or o + s > d for o, s, d in zip(offset, shape, full)):
            raise CheckpointError(f"{self.path}: block {list(offset)}+{list(shape)} lies outside {name!r} {list(full)}")
        out = None
        covered = torch.zeros(shape, dtype=torch.int8)
        for frag in entry["fragments"]:
            fo, fs = frag.get("offset"), frag.get("shape")
            if not isinstance(fo, list) or not isinstance(fs, list) or len(fo) != len(full) or len(fs) != len(full):
                raise CheckpointError(f"{self.path}: fragment {frag.get('key')!r} of {name!r} does not match its "
                                      f"metadata")
            if any(o < 0 or o + s > d for o, s, d in zip(fo, fs, full)):
                raise CheckpointError(f"{self.path}: fragment {frag['key']!r} lies outside {name!r} {list(full)}")
            lo = [max(a, b) for a, b in zip(fo, offset)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(fo, fs, offset, shape)]
            if any(l >= h for l, h in zip(lo, hi)):
                continue
            f = self._file(frag["file"])
            if frag["key"] not in f.keys():
                raise CheckpointError(f"{self.path / frag['file']}: fragment {frag['key']!r} of {name!r} is missing")
            stored = f.get_slice(frag["key"])
            if list(stored.get_shape()) != fs:
                raise CheckpointError(f"{self.path}: fragment {frag['key']!r} of {name!r} does not match its metadata")
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
        name = f"rng_rank{rank}.safetensors"
        if not (self.path / name).is_file():
            return None
        f = self._file(name)
        return {k: f.get_tensor(k) for k in f.keys()}


def _unique_fragments(frags: list[dict]) -> list[dict]:
    """Fragments of replicated tensors are written by every TP rank: keep one per logical block."""
    seen, out = set(), []
    for f in frags:
        key = (tuple(f["offset"]), tuple(f["shape"]))
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from itself, a checkpoints directory (its latest) or a run directory."""
    p = Path(path)
    if (p / "metadata.json").is_file():
        return p
    for root in (p, p / "checkpoints"):
        if (root / "latest").is_file():
            resolved = Checkpointer(root).resolve("auto")
            if resolved is not None and (resolved / "metadata.json").is_file():
                return resolved
            raise CheckpointError(f"{root / 'latest'} points at {resolved}, which is not a complete checkpoint")
    raise CheckpointError(f"{p}: not a megaevo checkpoint (no metadata.json, no `latest` pointer)")


def summarize_checkpoint(path: str | os.PathLike) -> dict:
    """What `megaevo inspect` prints for a checkpoint directory, a run's checkpoints/ folder or a run."""
    path = resolve_checkpoint(path)
    ck = LoadedCheckpoint(path)
    model = ck.meta["tensors"].get("model", {})
    tensors = {name: {"shape": e["shape"], "dtype": e["dtype"], "fragments": len(e["fragments"])}
               for name, e in sorted(model.items())}
    return {
        "path": str(path),
        "iteration": ck.iteration,
        "consumed_samples": ck.meta.get("consumed_samples"),
        "tokens": ck.meta.get("tokens"),
        "layout": ck.meta.get("layout"),
        "optimizer_state": [k for k in KINDS[1:] if ck.has(k)],
        "parameters": int(sum(math.prod(t["shape"]) for t in tensors.values())),
        "tensors": tensors,
    }
