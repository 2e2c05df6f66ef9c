"""Writing a megaevo checkpoint for a target TP x PP layout from logical tensors, one at a time.

Each target rank (tp t, pp p) gets one file, ``model_tp{t}_pp{p}.safetensors``, holding the
blocks of the logical tensors that rank owns (as the trainer would have saved them), so loading
at that layout reads no other rank's file. Which blocks a rank owns comes from the model itself:
the model chunks of every rank are built on the meta device (:func:`build_chunks`) and their
parameters' layouts list the fragments. Tensors replicated over TP are stored once (by TP rank 0), and the output
head tied to the input embedding on the last stage is stored with the embedding on the first.

:func:`write_checkpoint` is the one entry point; it takes :class:`TensorSource` objects, so an
importer (Hugging Face) and a resharder (checkpoint to checkpoint) differ only in where the
logical tensors come from. File names, the metadata record, the checksums (computed as the
bytes go out) and the atomic commit are the trainer's own (:mod:`megaevo.checkpoint`),
so both writers produce one format.

Tensors of a kind that holds no model tensor (PPO's critic, named ``critic.NAME``) are companions:
one named ``PREFIX.NAME`` after a model tensor of the same shape (the critic's embedding, layers and
final norm) is cut as that tensor is; any other (the critic's value head) is stored whole in the
first rank's file. Checkpoints load in any layout, so where a block lies only decides which ranks
read which file.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from megaevo.checkpoint.format import (CHECKSUM, FORMAT_VERSION, LATEST, CheckpointMeta, FileRecord, StoredFragment,
                                       TensorEntry, dtype_name, iteration_dir, model_file, temp_dir)
from megaevo.checkpoint.integrity import RunningChecksum
from megaevo.checkpoint.safetensors_io import StreamingWriter
from megaevo.checkpoint.save import commit_checkpoint
from megaevo.configio import errors_message
from megaevo.errors import ConvertError
from megaevo.model.args import ModelArgs, layout_errors, shape_errors
from megaevo.model.llama import build_chunks
from megaevo.parallel.state import ParallelState


@dataclass(frozen=True)
class TensorSource:
    """A logical tensor to write: ``load()`` returns it (whole, unpadded) when its turn comes."""

    kind: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Block:
    """One fragment of a logical tensor placed in a rank's file."""

    file: str
    index: int
    offset: tuple[int, ...]
    shape: tuple[int, ...]


def target_blocks(args: ModelArgs, tp: int = 1, pp: int = 1, pp_layers: list[int] | None = None,
                  virtual_pp: int = 1) -> tuple[dict[str, list[Block]], dict[str, tuple[int, ...]]]:
    """For every logical parameter, the blocks each target rank stores, and its logical shape.

    Pipeline rank ``p`` holds virtual stages ``p, p + pp, ...`` (``virtual_pp`` chunks), all in
    its one file per TP rank; ``pp_layers`` lists the layers of each virtual stage.
    """
    check_layout(args, tp, pp, pp_layers, virtual_pp)
    blocks: dict[str, list[Block]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    seen: set = set()
    for p in range(pp):
        for t in range(tp):
            state = ParallelState(tp_size=tp, tp_rank=t, pp_size=pp, pp_rank=p)
            count: dict[str, int] = {}
            for name, param, meta in (item for chunk in build_chunks(args, state, virtual_pp=virtual_pp,
                                                                     layers_per_stage=pp_layers, device="meta")
                                      for item in chunk.named_parameters_with_meta()):
                shapes[name] = tuple(meta.logical_shape)
                if meta.tp_replicated and t != 0:
                    continue
                for frag in meta.fragments(param.shape):
                    key = (name, tuple(frag.logical_offset), tuple(frag.shape))
                    if key in seen:
                        continue
                    seen.add(key)
                    i = count.get(name, 0)
                    count[name] = i + 1
                    blocks.setdefault(name, []).append(
                        Block(model_file(t, p), i, tuple(frag.logical_offset), tuple(frag.shape)))
    return blocks, shapes


def check_layout(args: ModelArgs, tp: int, pp: int, pp_layers: list[int] | None = None, virtual_pp: int = 1) -> None:
    """Refuse, saying which setting to change, a model shape that cannot run or a target layout it
    cannot take: the checks of :mod:`megaevo.model.args`, naming the converter's flags."""
    flags = {"tp": "--tp", "pp": "--pp", "virtual_pp": "--virtual-pp", "pp_layers": "--pp-layers"}
    errors = shape_errors(args) + layout_errors(args, tp, pp, virtual_pp, pp_layers, names=flags)
    if errors:
        raise ConvertError(errors_message(errors, "the model does not fit the target layout"))


def write_checkpoint(root: str | os.PathLike, sources: Iterable[TensorSource], args: ModelArgs, *,
                     tp: int = 1, pp: int = 1, pp_layers: list[int] | None = None, virtual_pp: int = 1,
                     iteration: int = 0, metadata: CheckpointMeta | dict | None = None,
                     files: dict[str, Path] | None = None, progress: bool = True, desc: str = "writing") -> Path:
    """Write ``root/iter_NNNNNNN`` (through a temporary directory) and point ``root/latest`` at it.

    ``sources`` must hold every parameter of the model for kind ``model`` (other kinds are optional
    but complete per kind); ``files`` are copied into the checkpoint under their given names.
    ``metadata`` is the checkpoint's record (its iteration then wins over ``iteration``), or a dict
    of :class:`CheckpointMeta` fields; its tensors and world size are filled in here.
    """
    root = Path(root)
    if not isinstance(metadata, CheckpointMeta):
        fields = {"format_version": FORMAT_VERSION, "iteration": iteration, **(metadata or {}), "tensors": {}}
        metadata = CheckpointMeta.from_json(fields, "checkpoint metadata to write")
    final = iteration_dir(root, metadata.iteration)
    if final.exists() or (root / LATEST).exists():
        raise ConvertError(f"{root} already holds a checkpoint; choose another output directory or remove it")
    sources = list(sources)
    blocks, shapes = target_blocks(args, tp, pp, pp_layers, virtual_pp)
    _check_sources(sources, shapes)
    blocks.update({s.name: _companion_blocks(s, blocks, shapes) for s in sources if s.name not in shapes})

    per_file: dict[str, list] = {model_file(t, p): [] for p in range(pp) for t in range(tp)}
    entries: dict[str, dict[str, TensorEntry]] = {}
    for src in sources:
        frags = []
        for b in blocks[src.name]:
            key = f"{src.kind}/{src.name}/{b.index}"
            per_file[b.file].append((key, src.dtype, b.shape))
            frags.append(StoredFragment(b.file, key, b.offset, b.shape))
        entries.setdefault(src.kind, {})[src.name] = TensorEntry(tuple(src.shape), dtype_name(src.dtype), frags)

    root.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(root, metadata.iteration)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    checksums = {name: RunningChecksum() for name in per_file}
    writers = {name: StreamingWriter(tmp / name, items, checksum=checksums[name]) for name, items in per_file.items()}
    try:
        with tqdm(total=sum(s.nbytes for s in sources), unit="B", unit_scale=True, desc=desc,
                  disable=not progress) as bar:
            for src in sources:
                full = src.load()
                if tuple(full.shape) != src.shape:
                    raise ConvertError(f"{src.name}: got shape {list(full.shape)}, expected {list(src.shape)}")
                full = full.to(src.dtype)
                for b in blocks[src.name]:
                    index = tuple(slice(o, o + s) for o, s in zip(b.offset, b.shape))
                    writers[b.file].write(f"{src.kind}/{src.name}/{b.index}", full[index])
                del full
                bar.update(src.nbytes)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    records = {name: FileRecord(w.size, CHECKSUM, checksums[name].hexdigest()) for name, w in writers.items()}
    for name, path in (files or {}).items():
        records[name] = _copy_file(path, tmp / name)
    return commit_checkpoint(root, tmp, dataclasses.replace(metadata, world_size=tp * pp, tensors=entries,
                                                            files=records))


def _copy_file(src: str | os.PathLike, dst: Path, chunk_bytes: int = 16 << 20) -> FileRecord:
    """Copy `src` to `dst`, checksumming the bytes as they are copied."""
    checksum, size = RunningChecksum(), 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(chunk_bytes):
            checksum.update(chunk)
            fout.write(chunk)
            size += len(chunk)
    return FileRecord(size, CHECKSUM, checksum.hexdigest())


def _companion_blocks(src: TensorSource, blocks: dict[str, list[Block]],
                      shapes: dict[str, tuple[int, ...]]) -> list[Block]:
    """Where a companion tensor (see the module's doc) goes: the blocks of the model tensor it is named
    after, or the whole tensor in the first rank's file."""
    _, _, name = src.name.partition(".")
    if name in shapes and shapes[name] == tuple(src.shape):
        return blocks[name]
    return [Block(model_file(0, 0), 0, (0,) * len(src.shape), tuple(src.shape))]


def _check_sources(sources: list[TensorSource], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every kind that holds model tensors (the weights, their optimizer state) holds all of them, in
    their shapes; a companion kind (no model tensor) is written as given."""
    by_kind: dict[str, dict[str, TensorSource]] = {}
    for s in sources:
        if s.name in by_kind.setdefault(s.kind, {}):
            raise ConvertError(f"{s.kind} tensor {s.name!r} given twice")
        by_kind[s.kind][s.name] = s
    if "model" not in by_kind:
        raise ConvertError("no model weights to write")
    for kind, named in by_kind.items():
        if kind != "model" and not set(named) & set(shapes):
            continue
        missing = sorted(set(shapes) - set(named))
        extra = sorted(set(named) - set(shapes))
        if missing or extra:
            raise ConvertError(f"the {kind} tensors do not match the model: "
                               + "; ".join(filter(None, [f"missing {missing}" if missing else "",
                                                         f"not in the model {extra}" if extra else ""])))
        for name, s in named.items():
            if tuple(s.shape) != shapes[name]:
                raise ConvertError(f"{kind} tensor {name!r} has shape {list(s.shape)}, the model needs "
                                   f"{list(shapes[name])}")
