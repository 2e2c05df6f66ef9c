"""Hugging Face model directories <-> megaevo checkpoints, streamed tensor by tensor.

Import (:func:`import_hf`) reads ``config.json`` and the safetensors shards (with or without
``model.safetensors.index.json``), fuses q/k/v into megaevo's grouped ``attention.qkv`` and
gate/up into ``mlp.gate_up``, and writes a checkpoint at iteration 0 without optimizer state for
any TP x PP layout. Export (:func:`export_hf`) does the reverse into sharded safetensors with an
index and a ``config.json`` that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.
Tokenizer files travel with the weights both ways. Only one logical tensor (and its parts) is in
memory at a time.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from megaevo.checkpoint.format import LATEST, CheckpointMeta, SavedLayout, iteration_dir
from megaevo.checkpoint.load import LoadedCheckpoint
from megaevo.checkpoint.resolve import resolve_checkpoint
from megaevo.checkpoint.safetensors_io import DTYPES, StreamingWriter, TensorInfo, parse_size, read_header
from megaevo.common import torch_dtype
from megaevo.config import (CheckpointConfig, Config, ConfigError, DataConfig, ParallelConfig,
                            config_from_dict, config_to_dict, save_config, validate)
from megaevo.data.tokenizer_files import TOKENIZER_FILES, find_tokenizer, not_found_message, tokenizer_candidates
from megaevo.log import get_logger
from megaevo.model.args import ModelArgs
from megaevo.model.fusion import join_parts, part_shapes, split_parts

from .checkpoint_writer import ConvertError, TensorSource, check_layout, target_blocks, write_checkpoint
from .hf_config import ARCHITECTURES, HFModelSpec, hf_config_from_model, spec_from_hf_config
from .hf_tokenizer import generation_config, special_token_ids, write_spm_tokenizer_files

# Files besides the weights that describe how to use the model; copied both ways when present.
SIDE_FILES = TOKENIZER_FILES + ("generation_config.json",)
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # buffers recomputed from the config
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
logger = get_logger(__name__)


# ------------------------------------------------------------------------------------------------ naming


def tensor_links(args: ModelArgs) -> list[tuple[str, tuple[str, ...], str]]:
    """``(megaevo name, Hugging Face names, how)`` for every weight, in model order.

    ``how`` is ``same`` (one tensor), ``qkv`` (q, k, v fused per KV group) or ``gate_up``
    (gate rows, then up rows): the join of :mod:`megaevo.model.fusion`.
    """
    links = [("embedding.weight", ("model.embed_tokens.weight",), "same")]
    for i in range(args.num_layers):
        hf, me = f"model.layers.{i}.", f"layers.{i}."
        links.append((me + "attention_norm.weight", (hf + "input_layernorm.weight",), "same"))
        links.append((me + "attention.qkv.weight", tuple(f"{hf}self_attn.{p}_proj.weight" for p in "qkv"), "qkv"))
        if args.qkv_bias:
            links.append((me + "attention.qkv.bias", tuple(f"{hf}self_attn.{p}_proj.bias" for p in "qkv"), "qkv"))
        links.append((me + "attention.dense.weight", (hf + "self_attn.o_proj.weight",), "same"))
        links.append((me + "mlp_norm.weight", (hf + "post_attention_layernorm.weight",), "same"))
        links.append((me + "mlp.gate_up.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), "gate_up"))
        links.append((me + "mlp.down.weight", (hf + "mlp.down_proj.weight",), "same"))
    links.append(("norm.weight", ("model.norm.weight",), "same"))
    if not args.tie_embeddings:
        links.append(("output.weight", ("lm_head.weight",), "same"))
    return links


# ------------------------------------------------------------------------------------------------ reading HF


def is_hf_dir(path: str | os.PathLike) -> bool:
    """A directory with a ``config.json`` and safetensors weights (and no megaevo metadata)."""
    p = Path(path)
    return (p.is_dir() and (p / "config.json").is_file() and not (p / "metadata.json").is_file()
            and ((p / "model.safetensors.index.json").is_file() or any(p.glob("*.safetensors"))))


def read_hf_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise ConvertError(f"{src}: no config.json: not a Hugging Face model directory")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: unreadable JSON ({e})") from None


def hf_tensors(src: Path) -> dict[str, TensorInfo]:
    """Every tensor of an HF directory by name (from the safetensors headers; nothing is loaded)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ConvertError(f"{index}: unreadable index ({e!r})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
        if not (src / "model.safetensors").is_file():
            found = sorted(p.name for p in src.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
            raise ConvertError(f"{src}: no model.safetensors and no model.safetensors.index.json"
                               + (f" (found {', '.join(found[:5])}; only safetensors weights are read, pickled "
                                  f".bin/.pt files never)" if found else ""))
        weight_map = None
    out: dict[str, TensorInfo] = {}
    for name in files:
        if not isinstance(name, str) or not _PLAIN_NAME.match(name) or name in (".", ".."):
            raise ConvertError(f"{index}: names a file outside the model directory: {name!r}")
        path = src / name
        if not path.is_file():
            raise ConvertError(f"{path}: shard listed in {index.name} is missing")
        header, _ = read_header(path)
        for key, info in header.items():
            if key in out:
                raise ConvertError(f"{src}: tensor {key!r} is in both {out[key].file.name} and {name}")
            out[key] = info
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in out or out[key].file.name != name:
                raise ConvertError(f"{index}: tensor {key!r} is not in {name}")
    return out


class _Reader:
    """Loads tensors from the shards of an HF directory.

    Each read opens its shard anew: a shard kept open stays memory-mapped, and the pages read
    through the map would count as resident memory until the end of the conversion.
    """

    def __init__(self, tensors: dict[str, TensorInfo]):
        self.tensors = tensors

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.tensors[key].file), framework="pt") as f:
            return f.get_tensor(key)


def _check_hf_weights(src: Path, tensors: dict[str, TensorInfo], args: ModelArgs) -> None:
    shapes = dict(target_blocks(args)[1])
    expected = {}
    for name, hf_names, how in tensor_links(args):
        expected.update(zip(hf_names, part_shapes(how, shapes[name], args)))
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ConvertError(f"{src}: tensor(s) missing for the model config.json describes: {', '.join(missing[:6])}"
                           + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
    for key, shape in expected.items():
        if tensors[key].shape != shape:
            raise ConvertError(f"{tensors[key].file}: tensor {key!r} has shape {list(tensors[key].shape)}, "
                               f"config.json implies {list(shape)}")
        if tensors[key].dtype not in DTYPES or not DTYPES[tensors[key].dtype].is_floating_point:
            raise ConvertError(f"{tensors[key].file}: tensor {key!r} has dtype {tensors[key].dtype}, "
                               f"expected floating-point weights")
    ignorable = {"lm_head.weight"} if args.tie_embeddings else set()
    unknown = [k for k in tensors if k not in expected and k not in ignorable and not _IGNORED.search(k)]
    if unknown:
        raise ConvertError(f"{src}: tensor(s) megaevo's model has no place for: {', '.join(sorted(unknown)[:6])}"
                           + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else "")
                           + "; the model is not converted rather than converted without them")


def _check_tokenizer_fits(src: Path, vocab_size: int) -> None:
    path = src / "tokenizer.json"
    if not path.is_file():
        return
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return
    try:
        n = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # noqa: BLE001 - a tokenizer file the library cannot read
        raise ConvertError(f"{path}: unreadable tokenizer ({e})") from None
    if n > vocab_size:
        raise ConvertError(f"{path}: the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}: "
                           f"ids {vocab_size}..{n - 1} would have no embedding row")


# ------------------------------------------------------------------------------------------------ import


def import_hf(src: str | os.PathLike, out: str | os.PathLike, *, tp: int = 1, pp: int = 1,
              pp_layers: list[int] | None = None, virtual_pp: int = 1, dtype: str | None = None,
              progress: bool = True) -> Path:
    """Convert the Hugging Face model in ``src`` into a megaevo checkpoint under ``out``.

    ``out`` becomes a checkpoints directory (``out/iter_0000000`` and ``out/latest``) that
    ``checkpoint.load=out`` starts from (iteration 0, no optimizer state), plus ``out/config.yaml``,
    a training config with the converted model settings. ``dtype`` (``bf16``, ``fp32``, ``fp16``)
    casts the weights; by default they keep the dtype they have. Returns the checkpoint directory.
    """
    src, out = Path(src), Path(out)
    if (out / LATEST).exists() or any(out.glob("iter_*")):
        raise ConvertError(f"{out} already holds a checkpoint; choose another --save directory or remove it")
    raw = read_hf_config(src)
    spec = spec_from_hf_config(raw, str(src / "config.json"))
    cfg = Config(model=ModelArgs(**spec.model),
                 parallel=ParallelConfig(tp=tp, pp=pp, virtual_pp=virtual_pp, pp_layers=pp_layers))
    args = cfg.model
    check_layout(args, tp, pp, pp_layers, virtual_pp)
    try:
        validate(cfg, world_size=tp * pp)
    except ConfigError as e:
        raise ConvertError(f"{src / 'config.json'}: {e}") from None
    tensors = hf_tensors(src)
    _check_hf_weights(src, tensors, args)
    _check_tokenizer_fits(src, args.vocab_size)
    cast = _dtype(dtype) if dtype else None

    reader = _Reader(tensors)
    shapes = target_blocks(args)[1]
    sources = []
    for name, hf_names, how in tensor_links(args):
        kinds = [DTYPES[tensors[k].dtype] for k in hf_names]
        target = cast or kinds[0]
        if cast is None and any(k != kinds[0] for k in kinds):
            target = torch.float32
        load = (lambda hf_names=hf_names, how=how, target=target:
                join_parts(how, [reader.get(k).to(target) for k in hf_names], args))
        sources.append(TensorSource("model", name, shapes[name], target, load))

    side = {name: src / name for name in SIDE_FILES if (src / name).is_file()}
    ckpt_dir = iteration_dir(out, 0)
    tok = next((n for n in ("tokenizer.json", "tokenizer.model") if n in side), None)
    cfg.data = DataConfig(tokenizer=str((ckpt_dir / tok).resolve()) if tok else None)
    # finetune: the run starts from the imported weights, and a restart resumes its own checkpoints.
    cfg.checkpoint = CheckpointConfig(load=str(out.resolve()), finetune=True)
    model_dtype = {s.dtype for s in sources}
    metadata = CheckpointMeta(
        iteration=0, optimizer_step=0,
        layout=SavedLayout(tp=tp, pp=pp, virtual_pp=virtual_pp, dp=1, distributed_optimizer=False,
                           dtype=str(model_dtype.pop()) if len(model_dtype) == 1 else "mixed"),
        config=config_to_dict(cfg),
        hf={"architecture": spec.architecture, "model_type": spec.model_type, "source": str(src.resolve()),
            "files": sorted(side), "config": raw})
    path = write_checkpoint(out, sources, args, tp=tp, pp=pp, pp_layers=pp_layers, virtual_pp=virtual_pp,
                            metadata=metadata, files=side,
                            progress=progress, desc=f"import {src.name}")
    save_config(cfg, out / "config.yaml")
    return path


# ------------------------------------------------------------------------------------------------ export


def export_hf(load: str | os.PathLike, out: str | os.PathLike, *, architecture: str | None = None,
              dtype: str | None = None, max_shard_size: str | int = "2GB", tokenizer: str | os.PathLike | None = None,
              progress: bool = True) -> dict:
    """Write the megaevo checkpoint ``load`` as a Hugging Face model directory ``out``.

    The architecture is the imported one when the checkpoint came from Hugging Face, else
    ``Qwen2ForCausalLM`` for a model with q/k/v biases and ``LlamaForCausalLM`` otherwise.
    Tokenizer files come from ``tokenizer`` (a file or directory), else those the checkpoint
    carries, else the run's copy or its ``data.tokenizer``
    (:func:`megaevo.data.tokenizer_files.tokenizer_candidates`); without any, a warning says where
    they were looked for. A bare SentencePiece model also
    gets ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``; the
    tokenizer's bos/eos/pad ids go into ``config.json`` and a ``generation_config.json`` (unless
    the checkpoint carries one), so that ``generate()`` stops at eos. Returns a summary.
    """
    path = resolve_checkpoint(load)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out} exists and is not an empty directory; choose another --to-hf directory")
    record = LoadedCheckpoint(path).record
    if not record.config:
        raise ConvertError(f"{path}/metadata.json: no model config recorded, cannot describe the model")
    try:
        cfg = config_from_dict(record.config, source=f"{path}/metadata.json")
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    args = cfg.model
    hf_meta = record.hf or {}
    arch = architecture or hf_meta.get("architecture") or ("Qwen2ForCausalLM" if args.qkv_bias else "LlamaForCausalLM")
    if arch not in ARCHITECTURES:
        raise ConvertError(f"cannot export as {arch!r} (supported: {', '.join(ARCHITECTURES)})")
    shapes = target_blocks(args)[1]
    entries = record.tensors.get("model", {})
    missing, extra = sorted(set(shapes) - set(entries)), sorted(set(entries) - set(shapes))
    if missing or extra:
        raise ConvertError(f"{path}: the checkpoint's model tensors do not match its config: "
                           + "; ".join(filter(None, [f"missing {missing[:6]}" if missing else "",
                                                     f"unexpected {extra[:6]}" if extra else ""])))
    cast = _dtype(dtype) if dtype else None

    # Plan every HF tensor (name, dtype, shape) and the shard it goes to, before reading any data.
    limit = parse_size(max_shard_size)
    plan, shards, size = [], [[]], 0
    for name, hf_names, how in tensor_links(args):
        stored = entries[name]
        if stored.shape != tuple(shapes[name]) and not _padded_vocab(name, stored.shape, shapes[name]):
            raise ConvertError(f"{path}: tensor {name!r} has shape {list(stored.shape)}, the config implies "
                               f"{list(shapes[name])}")
        target = cast or _dtype(stored.dtype)
        parts = list(zip(hf_names, part_shapes(how, shapes[name], args)))
        for key, shape in parts:
            nbytes = _numel(shape) * _itemsize(target)
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append((key, target, shape))
            size += nbytes
        plan.append((name, how, target, [k for k, _ in parts]))
    n = len(shards)
    file_of = {key: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, shard in enumerate(shards) for key, _, _ in shard}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    writers = {}
    try:
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            writers[fname] = StreamingWriter(tmp / fname, shard, metadata={"format": "pt"})
        total = sum(_numel(shape) * _itemsize(t) for shard in shards for _, t, shape in shard)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"export {out.name}", disable=not progress) as bar:
            for name, how, target, keys in plan:
                # A fresh reader per tensor unmaps the files read so far (see _Reader).
                full = LoadedCheckpoint(path).tensor("model", name)
                if full.shape[0] != shapes[name][0]:
                    full = full[: shapes[name][0]]
                for key, part in zip(keys, split_parts(how, full.to(target), args)):
                    writers[file_of[key]].write(key, part)
                    bar.update(part.numel() * part.element_size())
                del full
        for w in writers.values():
            w.close()
        copied = _copy_tokenizer(tmp, path, hf_meta, cfg, tokenizer)
        written = _complete_tokenizer(tmp, copied, args.max_seq_len)
        token_ids = special_token_ids(tmp) if copied else {}
        config = hf_config_from_model(args, arch, _single_dtype([t for _, _, t, _ in plan]), hf_meta.get("config"),
                                      token_ids=token_ids)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = None if "generation_config.json" in copied else generation_config(config)
        if generation:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
            written.append("generation_config.json")
        index = {"metadata": {"total_size": total, "total_parameters": sum(_numel(shapes[nm]) for nm in shapes)},
                 "weight_map": dict(sorted(file_of.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return {"path": str(out), "checkpoint": str(path), "architecture": arch, "shards": n, "bytes": total,
            "parameters": index["metadata"]["total_parameters"], "files_copied": copied, "files_written": written}


def _padded_vocab(name: str, stored, logical) -> bool:
    return (name in ("embedding.weight", "output.weight") and len(stored) == 2 and stored[1] == logical[1]
            and stored[0] > logical[0])


def _copy_tokenizer(dst: Path, ckpt: Path, hf_meta: dict, cfg: Config, explicit) -> list[str]:
    """Copy tokenizer files into ``dst`` from the first source that has them; their names."""
    def from_path(p: Path) -> dict[str, Path]:
        if p.is_dir():
            return {n: p / n for n in SIDE_FILES if (p / n).is_file()}
        if p.is_file():
            if p.name in SIDE_FILES:
                return {p.name: p}
            if p.suffix in (".json", ".model"):
                return {"tokenizer" + p.suffix: p}
        raise ConvertError(f"--tokenizer {p}: not a tokenizer file (tokenizer.json, *.model) or a directory "
                           f"holding tokenizer files")

    if explicit is not None:
        found = from_path(Path(explicit))
        if not found:
            raise ConvertError(f"--tokenizer {explicit}: no tokenizer files found there")
    else:
        found = {n: ckpt / n for n in hf_meta.get("files", []) if _PLAIN_NAME.match(n) and n in SIDE_FILES
                 and (ckpt / n).is_file()}
        if not found:
            candidates = tokenizer_candidates(ckpt, cfg.data.tokenizer)
            found = find_tokenizer(candidates)
            if not found:
                logger.warning(f"{not_found_message(str(ckpt), candidates)}: the exported model has no tokenizer; "
                               f"give one with --tokenizer PATH")
    for name, p in found.items():
        shutil.copyfile(p, dst / name)
    return sorted(found)


def _complete_tokenizer(dst: Path, copied: list[str], max_seq_len: int) -> list[str]:
    """Write the Hugging Face files for a bare SentencePiece ``tokenizer.model`` in ``dst``; their names.

    tokenizer.json, tokenizer_config.json and special_tokens_map.json let transformers load the
    tokenizer without sentencepiece or protobuf (see :mod:`megaevo.convert.hf_tokenizer`). A
    tokenizer that came with its own tokenizer.json or tokenizer_config.json is left as it is.
    """
    if "tokenizer.model" not in copied or {"tokenizer.json", "tokenizer_config.json"} & set(copied):
        return []
    return write_spm_tokenizer_files(dst, dst / "tokenizer.model", max_seq_len)


# ------------------------------------------------------------------------------------------------ inspect


def summarize_hf(path: str | os.PathLike) -> dict:
    """What `megaevo inspect` prints for a Hugging Face model directory."""
    src = Path(path)
    raw = read_hf_config(src)
    tensors = hf_tensors(src)
    dtypes: dict[str, int] = {}
    for t in tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.numel
    try:
        spec: HFModelSpec | None = spec_from_hf_config(raw, str(src / "config.json"))
        problem = None
    except ConvertError as e:
        spec, problem = None, str(e)
    shape_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings")
    return {
        "path": str(src),
        "format": "huggingface",
        "architecture": (raw.get("architectures") or [None])[0],
        "model_type": raw.get("model_type"),
        "dtype": raw.get("dtype") or raw.get("torch_dtype"),
        "config": {k: raw.get(k) for k in shape_keys if k in raw},
        "parameters": int(sum(t.numel for k, t in tensors.items() if not _IGNORED.search(k))),
        "dtypes": dtypes,
        "files": len({t.file for t in tensors.values()}),
        "tokenizer_files": [n for n in TOKENIZER_FILES if (src / n).is_file()],
        "convertible": problem is None,
        "megaevo_model": spec.model if spec else None,
        "problem": problem,
        "tensors": {k: {"shape": list(t.shape), "dtype": t.dtype, "file": t.file.name} for k, t in sorted(tensors.items())},
    }


# ------------------------------------------------------------------------------------------------ helpers


def _dtype(name: str) -> torch.dtype:
    try:
        return torch_dtype(name)
    except ValueError as e:
        raise ConvertError(str(e)) from None


def _single_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for d in dtypes:
        counts[d] = counts.get(d, 0) + 1
    return max(counts, key=counts.get)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
