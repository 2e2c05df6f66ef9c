"""Every setting of a run: dataclasses, a YAML file, dotted overrides, and validation.

    cfg = load_config("run.yaml", ["parallel.tp=2", "optim.lr=3e-4"])
    layout = validate(cfg, world_size=8)      # Layout(tp=2, pp=1, dp=4, ...)

A YAML file holds the sections `model`, `parallel`, `data`, `train`, `optim`, `checkpoint`,
`kernels` and the top-level `out_dir`. Overrides `key.sub=value` apply after the file, in order;
their values are read as YAML (`parallel.tp=2`, `optim.betas=[0.9,0.95]`, `checkpoint.load=null`).
`model.preset: evolm-1b` fills the model's architecture fields, and fields given beside it (or by
a later override) win. Unknown keys and wrongly typed values raise ConfigError naming the dotted
key; a layout the world size cannot run raises ConfigError from validate() saying what to change.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A setting that is unknown, of the wrong type, or impossible together with the others."""


# Architecture fields of the EvoLM release (Llama family, GQA) and a tiny model for CPU runs.
_EVOLM = dict(num_heads=32, num_kv_heads=4, vocab_size=32000, max_seq_len=2048,
              rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False)
PRESETS: dict[str, dict[str, Any]] = {
    "evolm-0.5b": dict(_EVOLM, num_layers=20, hidden_size=1536, ffn_hidden_size=3216),
    "evolm-1b": dict(_EVOLM, num_layers=22, hidden_size=2048, ffn_hidden_size=4896),
    "evolm-2b": dict(_EVOLM, num_layers=26, hidden_size=2816, ffn_hidden_size=6180),
    "evolm-4b": dict(_EVOLM, num_layers=28, hidden_size=4096, ffn_hidden_size=7792),
    "tiny": dict(num_layers=4, hidden_size=128, ffn_hidden_size=352, num_heads=4, num_kv_heads=2,
                 vocab_size=4096, max_seq_len=256, rope_theta=10000.0, norm_eps=1e-5,
                 tie_embeddings=False),
}


def preset_values(name: str, key: str = "model.preset") -> dict:
    """The architecture fields of a model preset (a copy)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"{key}: unknown model preset {name!r}{_did_you_mean(name, PRESETS)}; "
                          f"known: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


@dataclass
class ModelConfig:
    """A Llama-family transformer: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

    The defaults are the `tiny` preset. From a YAML file, `preset:` fills the architecture fields
    and explicit fields override it; in Python use `ModelConfig.from_preset(name, **overrides)`.
    `rope_scaling` is null or Llama 3's frequency scaling: `{rope_type: llama3, factor: 8.0,
    low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192}`.
    """

    preset: Optional[str] = None
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 352
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 4096
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    init_std: float = 0.02
    recompute: Literal["none", "full", "selective"] = "none"
    rope_scaling: Optional[dict[str, Any]] = None

    def __post_init__(self):
        if self.preset is not None:
            preset_values(self.preset)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """The preset's architecture with `overrides` on top."""
        return cls(preset=name, **{**preset_values(name), **overrides})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        """The vocabulary rounded up to a multiple of 128 × tp, as Megatron-LM pads it."""
        multiple = 128 * tp
        return math.ceil(self.vocab_size / multiple) * multiple


@dataclass
class ParallelConfig:
    """Tensor (tp), pipeline (pp, virtual_pp stages per rank) and data parallelism.

    The data-parallel size is what the world size leaves: world_size / (tp * pp).
    `pp_layers` gives an uneven split: layers per (virtual) stage, pp * virtual_pp entries.
    Sequence parallelism with tp=1 is allowed and does nothing.
    """

    tp: int = 1
    pp: int = 1
    virtual_pp: int = 1
    pp_layers: Optional[list[int]] = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    bucket_size_mb: float = 25.0
    overlap_grad_reduce: bool = True


@dataclass
class DataConfig:
    """Training blend, extra validation sets, and sample length.

    `train` takes any blend `megaevo.data.blended.parse_blend` reads: `[0.95, data/math, 0.05,
    data/web]`, a list of prefixes, or `{name: {prefix: ..., weight: ...}}`. `valid` names further
    whole datasets to report a validation loss on: `{name: prefix}`. `seq_len` None means the
    model's max_seq_len.
    """

    train: Union[list, dict] = field(default_factory=list)
    valid: dict[str, str] = field(default_factory=dict)
    seq_len: Optional[int] = None
    split: str = "969,30,1"
    cache_dir: Optional[str] = None
    tokenizer: Optional[str] = None


@dataclass
class TrainConfig:
    """Batch sizes (in samples), length of the run (in iterations), seeds and intervals.

    dtype "auto" means bf16 on CUDA and fp32 on the CPU (see resolve_dtype). An interval of 0
    turns that action off.
    """

    micro_batch_size: int = 1
    global_batch_size: int = 8
    iters: int = 1000
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 10
    dtype: Literal["auto", "bf16", "fp32"] = "auto"


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (see megaevo.training.schedules).

    `warmup` and every `*_iters` count iterations. cosine / linear decay to `min_lr` at
    `decay_iters` (None: the end of training). wsd holds `lr` and decays over the final
    `decay_fraction` of training with shape `decay_style`. inf-cos cools down from `lr` to
    `constant_lr` over `cooldown_iters` (cosine), holds it, and anneals to `min_lr` over the
    final `anneal_iters` (None: `anneal_fraction` of training) with shape `anneal_style`.
    """

    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 100
    schedule: Literal["cosine", "linear", "wsd", "inf-cos", "constant"] = "cosine"
    decay_iters: Optional[int] = None
    decay_fraction: float = 0.2
    decay_style: Literal["linear", "cosine", "sqrt", "exp"] = "linear"
    cooldown_iters: int = 0
    constant_lr: Optional[float] = None
    anneal_iters: Optional[int] = None
    anneal_fraction: float = 0.1
    anneal_style: Literal["linear", "cosine", "sqrt", "exp"] = "exp"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class CheckpointConfig:
    """Saving every `interval` iterations (0: only at the end), keeping the last `keep_last`
    (None: all). `load` is None (start fresh), "auto" (the latest checkpoint under out_dir, if
    any) or a path. `finetune`: take only the model weights from `load` and start at iteration 0
    with a fresh optimizer and data position (continued pre-training, SFT); once the run has saved
    checkpoints of its own, a restart resumes those instead. `async_save` is the YAML key `async`."""

    interval: int = 1000
    keep_last: Optional[int] = None
    load: Optional[str] = None
    finetune: bool = False
    async_save: bool = field(default=False, metadata={"yaml": "async"})
    save: bool = True


@dataclass
class KernelsConfig:
    """Which implementation runs the fused ops: auto (Triton on CUDA, torch on the CPU).

    ``autotune``: time a few tiles per shape and keep the fastest (kernels with tile choices, on a
    GPU). Off, every launch uses a fixed tile per head dim, so reruns and resumes sum in the same
    order on the same hardware; the environment variable MEGAEVO_KERNEL_AUTOTUNE=0/1 wins.
    """

    backend: Literal["auto", "triton", "torch", "apex"] = "auto"
    autotune: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    out_dir: str = "runs/megaevo"

    @property
    def seq_len(self) -> int:
        """Training sample length: data.seq_len, else the model's max_seq_len."""
        return self.data.seq_len if self.data.seq_len is not None else self.model.max_seq_len


@dataclass(frozen=True)
class Layout:
    """How a world of processes splits into tensor, pipeline and data parallel groups."""

    world_size: int
    tp: int
    pp: int
    dp: int
    virtual_pp: int
    micro_batches_per_step: int  # global batch / (micro batch × dp): gradient-accumulation steps


def resolve_dtype(dtype: str, device_type: str) -> str:
    """The compute dtype a run uses: "auto" is bf16 on CUDA and fp32 elsewhere."""
    if dtype == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return dtype


# ---------------------------------------------------------------- schema: names and types


def _fields(cls) -> dict[str, dataclasses.Field]:
    """A dataclass's fields by their YAML name (`async` for CheckpointConfig.async_save)."""
    return {f.metadata.get("yaml", f.name): f for f in dataclasses.fields(cls)}


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_type(cls, f: dataclasses.Field):
    tp = _hints(cls)[f.name]
    return tp if dataclasses.is_dataclass(tp) else None


def _known_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for name, f in _fields(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        sub = _section_type(cls, f)
        if sub is not None:
            keys += _known_keys(sub, key + ".")
    return keys


def _did_you_mean(word: str, options) -> str:
    match = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _nearest_key(key: str) -> str | None:
    """The known dotted key nearest to an unknown one: a sibling with the same words in another
    order (`lr_min` -> `min_lr`), a similar sibling, the same name in another section
    (`train.lr` -> `optim.lr`), or a similar name anywhere."""
    known = _known_keys()
    section, _, leaf = key.rpartition(".")
    prefix = section + "." if section else ""
    siblings = [k[len(prefix):] for k in known if k.startswith(prefix) and "." not in k[len(prefix):]]
    words = sorted(leaf.lower().split("_"))
    for sibling in siblings:
        if sorted(sibling.split("_")) == words:
            return prefix + sibling
    match = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if match:
        return prefix + match[0]
    elsewhere = {k.rpartition(".")[2]: k for k in known if "." in k}
    match = difflib.get_close_matches(leaf, list(elsewhere), n=1, cutoff=0.8)
    return elsewhere[match[0]] if match else None


def _unknown_key(key: str) -> ConfigError:
    near = _nearest_key(key)
    return ConfigError(f"unknown key {key!r}" + (f" (did you mean {near!r}?)" if near else ""))


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} numbers" if Ellipsis not in args else "a list"
    if origin is list or tp is list:
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value, tp, key: str):
    """`value` as type `tp`, or ConfigError naming `key` and the expected type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail(extra: str = ""):
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}{extra}")

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: keep X's error about an item (`key[1]: ...`)
            try:
                return _coerce(value, options[0], key)
            except ConfigError as e:
                if str(e).startswith(f"{key}: "):
                    raise fail() from None
                raise
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise fail()
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise fail(_did_you_mean(value, args) if isinstance(value, str) else "")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise fail()
        try:  # YAML reads 3e-4 (no dot) as a string
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise fail() from None
        if tp is float:
            return float(number)
        if isinstance(number, float) and not number.is_integer():
            raise fail()
        return int(number)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        if origin is tuple and args and Ellipsis not in args:
            if len(value) != len(args):
                raise fail(f" ({len(value)} items)")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail()
        ktype, vtype = args if args else (Any, Any)
        return {_coerce(k, ktype, key): _coerce(v, vtype, f"{key}.{k}") for k, v in value.items()}
    raise fail()


# ---------------------------------------------------------------- building a Config


def _merge_section(base: dict, layer, cls, prefix: str) -> dict:
    """`base` (a raw section) updated by `layer`: sub-sections merge, fields are replaced, unknown
    keys raise. A model `preset` fills its fields before the layer's explicit ones."""
    if not isinstance(layer, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of settings, got {layer!r}")
    out = dict(base)
    fields = _fields(cls)
    if cls is ModelConfig and layer.get("preset") is not None:
        out.update(preset_values(layer["preset"], f"{prefix}.preset"))
    for name, value in layer.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown_key(key)
        sub = _section_type(cls, fields[name])
        if sub is not None and isinstance(value, dict):
            out[name] = _merge_section(out.get(name) or {}, value, sub, key)
        else:
            out[name] = copy.deepcopy(value)
    return out


def _apply_override(tree: dict, text: str) -> dict:
    """`tree` with one `a.b.c=value` override applied (value read as YAML)."""
    dotted, sep, raw = text.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted:
        raise ConfigError("expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot read the value as YAML ({e})") from None
    parts = dotted.split(".")
    # Nest the value under its path; below a field (e.g. data.valid.web) it sets one entry.
    cls, depth = Config, 0
    while depth < len(parts) - 1 and cls is not None:
        f = _fields(cls).get(parts[depth])
        if f is None:
            raise _unknown_key(".".join(parts[: depth + 1]))
        cls = _section_type(cls, f)
        depth += 1
    if cls is None:  # inside a free-form field: set the entry in a copy of its current value
        field_key = parts[:depth]
        current = _get(tree, field_key)
        current = copy.deepcopy(current) if isinstance(current, dict) else {}
        node = current
        for p in parts[depth:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {p!r} is not a mapping")
        node[parts[-1]] = value
        parts, value = field_key, current
    for p in reversed(parts):
        value = {p: value}
    return _merge_section(tree, value, Config, "")


def _get(tree: dict, parts: list[str]):
    for p in parts:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(p)
    return tree


def _build(cls, raw: dict, prefix: str):
    hints = _hints(cls)
    kwargs = {}
    for name, f in _fields(cls).items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        sub = _section_type(cls, f)
        if sub is not None:
            if not isinstance(raw[name], dict):
                raise ConfigError(f"{key}: expected a mapping of settings, got {raw[name]!r}")
            kwargs[f.name] = _build(sub, raw[name], key)
        else:
            kwargs[f.name] = _coerce(raw[name], hints[f.name], key)
    return cls(**kwargs)


def config_from_dict(raw: dict | None, overrides: list[str] | tuple[str, ...] = (), source: str = "") -> Config:
    """A Config from a raw mapping (as read from YAML, `source` naming it in errors) and dotted
    overrides applied in order."""
    try:
        tree = _merge_section({}, raw or {}, Config, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    for text in overrides:
        try:
            tree = _apply_override(tree, text)
        except ConfigError as e:
            raise ConfigError(f"override {text!r}: {e}") from None
    return _build(Config, tree, "")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The Config of a YAML file (None: all defaults) with dotted overrides applied in order."""
    if path is None:
        return config_from_dict({}, overrides)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(raw).__name__}")
    return config_from_dict(raw, overrides, source=str(path))


def config_to_dict(cfg) -> dict:
    """Plain YAML-ready data: YAML key names, tuples as lists."""
    if dataclasses.is_dataclass(cfg):
        return {name: config_to_dict(getattr(cfg, f.name)) for name, f in _fields(type(cfg)).items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write `cfg` as YAML that load_config reads back to an equal Config (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a config is meant to be read and shared
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- validation


def _divisors(n: int) -> str:
    ds = [d for d in range(1, n + 1) if n % d == 0] if n > 0 else []
    return ", ".join(map(str, ds[:12])) + (", ..." if len(ds) > 12 else "")


def validate(cfg: Config, world_size: int) -> Layout:
    """Check that `cfg` can run on `world_size` processes; return the layout.

    Raises ConfigError listing every problem found, each saying which setting to change.
    """
    errors = _model_errors(cfg) + _optim_errors(cfg) + _other_errors(cfg)
    layout_errors, layout = _layout_errors(cfg, world_size)
    errors += layout_errors
    if errors:
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {e}" for e in errors))
    return layout


def _model_errors(cfg: Config) -> list[str]:
    m, errors = cfg.model, []
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_heads", "num_kv_heads", "vocab_size", "max_seq_len"):
        if getattr(m, name) < 1:
            errors.append(f"model.{name}={getattr(m, name)} must be at least 1")
    if errors:
        return errors
    if m.num_heads % m.num_kv_heads:
        errors.append(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}: "
                      f"set num_kv_heads to one of {_divisors(m.num_heads)}")
    if m.hidden_size % m.num_heads:
        errors.append(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    elif m.head_dim % 2:
        errors.append(f"model.hidden_size / model.num_heads = {m.head_dim} must be even for rotary embeddings")
    if cfg.seq_len > m.max_seq_len or cfg.seq_len < 1:
        errors.append(f"data.seq_len={cfg.seq_len} must be between 1 and model.max_seq_len={m.max_seq_len}: "
                      f"lower data.seq_len or raise model.max_seq_len")
    if m.rope_theta <= 0 or m.norm_eps <= 0 or m.init_std <= 0:
        errors.append("model.rope_theta, model.norm_eps and model.init_std must be positive")
    if m.rope_scaling is not None:
        errors += _rope_scaling_errors(m.rope_scaling)
    return errors


_LLAMA3_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_scaling_errors(scaling: dict) -> list[str]:
    kind = scaling.get("rope_type")
    if kind != "llama3":
        return [f"model.rope_scaling.rope_type={kind!r} is not supported: the only rotary scaling is 'llama3' "
                f"(or set model.rope_scaling=null)"]
    errors = []
    unknown = sorted(set(scaling) - {"rope_type", *_LLAMA3_SCALING})
    if unknown:
        errors.append(f"model.rope_scaling: unknown key(s) {', '.join(unknown)} for rope_type llama3 "
                      f"(known: {', '.join(_LLAMA3_SCALING)})")
    missing = [k for k in _LLAMA3_SCALING if k not in scaling]
    if missing:
        errors.append(f"model.rope_scaling: rope_type llama3 needs {', '.join(missing)}")
    bad = [k for k in _LLAMA3_SCALING if k in scaling
           and (isinstance(scaling[k], bool) or not isinstance(scaling[k], (int, float)) or scaling[k] <= 0)]
    if bad:
        errors.append(f"model.rope_scaling: {', '.join(bad)} must be positive numbers")
    elif not missing and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        errors.append(f"model.rope_scaling: high_freq_factor={scaling['high_freq_factor']} must be larger than "
                      f"low_freq_factor={scaling['low_freq_factor']}")
    return errors


def _optim_errors(cfg: Config) -> list[str]:
    o, iters, errors = cfg.optim, cfg.train.iters, []
    if o.lr < 0 or o.min_lr < 0:
        errors.append(f"optim.lr={o.lr} and optim.min_lr={o.min_lr} must not be negative")
    if o.lr < o.min_lr:
        errors.append(f"optim.lr={o.lr} is below optim.min_lr={o.min_lr}: lower min_lr or raise lr")
    if o.warmup < 0 or o.warmup > iters:
        errors.append(f"optim.warmup={o.warmup} must be between 0 and train.iters={iters}")
    if o.decay_iters is not None and o.decay_iters < o.warmup:
        errors.append(f"optim.decay_iters={o.decay_iters} is shorter than optim.warmup={o.warmup}")
    if not 0 <= o.decay_fraction <= 1 or not 0 <= o.anneal_fraction <= 1:
        errors.append("optim.decay_fraction and optim.anneal_fraction must be between 0 and 1")
    if o.schedule == "wsd" and o.decay_style == "exp" and o.min_lr <= 0:
        errors.append("optim.decay_style=exp needs optim.min_lr > 0 (or choose linear, cosine or sqrt)")
    if o.schedule == "inf-cos":
        if o.constant_lr is None:
            errors.append("optim.schedule=inf-cos needs optim.constant_lr (the learning rate after cool-down)")
        elif not o.min_lr <= o.constant_lr <= o.lr:
            errors.append(f"optim.constant_lr={o.constant_lr} must lie between optim.min_lr={o.min_lr} "
                          f"and optim.lr={o.lr}")
        if o.anneal_style == "exp" and o.min_lr <= 0:
            errors.append("optim.anneal_style=exp needs optim.min_lr > 0 (or choose linear, cosine or sqrt)")
        anneal = o.anneal_iters if o.anneal_iters is not None else round(o.anneal_fraction * iters)
        if o.cooldown_iters < 0 or anneal < 0 or o.warmup + o.cooldown_iters + anneal > iters:
            errors.append(f"optim.warmup + optim.cooldown_iters + anneal iterations = "
                          f"{o.warmup} + {o.cooldown_iters} + {anneal} exceed train.iters={iters}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        errors.append(f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    if o.eps <= 0 or o.weight_decay < 0 or o.clip_grad < 0:
        errors.append("optim.eps must be positive; optim.weight_decay and optim.clip_grad must not be negative")
    return errors


def _other_errors(cfg: Config) -> list[str]:
    t, c, errors = cfg.train, cfg.checkpoint, []
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        errors.append("train.micro_batch_size and train.global_batch_size must be at least 1")
    for name in ("iters", "log_interval", "eval_interval", "eval_iters"):
        if getattr(t, name) < 0:
            errors.append(f"train.{name} must not be negative")
    if c.interval < 0 or (c.keep_last is not None and c.keep_last < 1):
        errors.append("checkpoint.interval must not be negative and checkpoint.keep_last must be at least 1 (or null)")
    if cfg.data.train:
        from megaevo.data.blended import parse_blend

        try:
            parse_blend(cfg.data.train)
        except ValueError as e:
            errors.append(f"data.train: {e}")
    return errors


def _layout_errors(cfg: Config, world_size: int) -> tuple[list[str], Layout | None]:
    p, m, t, errors = cfg.parallel, cfg.model, cfg.train, []
    if p.tp < 1 or p.pp < 1 or p.virtual_pp < 1:
        return [f"parallel.tp, parallel.pp and parallel.virtual_pp must be at least 1 "
                f"(got {p.tp}, {p.pp}, {p.virtual_pp})"], None
    if world_size < 1 or world_size % (p.tp * p.pp):
        errors.append(f"world size {world_size} is not a multiple of TP × PP = {p.tp} × {p.pp} = {p.tp * p.pp}: "
                      f"launch a multiple of {p.tp * p.pp} processes or change parallel.tp / parallel.pp")
    if m.num_heads % p.tp:
        errors.append(f"model.num_heads={m.num_heads} is not divisible by parallel.tp={p.tp}: "
                      f"set parallel.tp to one of {_divisors(math.gcd(m.num_heads, m.num_kv_heads))}")
    if m.num_kv_heads % p.tp:
        errors.append(f"model.num_kv_heads={m.num_kv_heads} is not divisible by parallel.tp={p.tp}: "
                      f"set parallel.tp to one of {_divisors(math.gcd(m.num_heads, m.num_kv_heads))}")
    if m.ffn_hidden_size % p.tp:
        errors.append(f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tp={p.tp}: "
                      f"set parallel.tp to one of {_divisors(m.ffn_hidden_size)}")
    if p.sequence_parallel and cfg.seq_len % p.tp:
        errors.append(f"data.seq_len={cfg.seq_len} is not divisible by parallel.tp={p.tp}, "
                      f"which sequence_parallel needs: change data.seq_len or turn parallel.sequence_parallel off")
    stages = p.pp * p.virtual_pp
    if p.virtual_pp > 1 and p.pp < 2:
        errors.append(f"parallel.virtual_pp={p.virtual_pp} needs parallel.pp of at least 2")
    if p.pp_layers is not None:
        if len(p.pp_layers) != stages or sum(p.pp_layers) != m.num_layers or min(p.pp_layers, default=0) < 1:
            errors.append(f"parallel.pp_layers={p.pp_layers} must list {stages} positive layer counts "
                          f"(parallel.pp × parallel.virtual_pp) summing to model.num_layers={m.num_layers}")
    elif m.num_layers % stages:
        what = "parallel.pp" if p.virtual_pp == 1 else "parallel.pp × parallel.virtual_pp"
        errors.append(f"model.num_layers={m.num_layers} is not divisible by {what}={stages}: "
                      f"choose a pipeline size among {_divisors(m.num_layers)} or list the layers per stage "
                      f"in parallel.pp_layers")
    if world_size < 1 or world_size % (p.tp * p.pp) or t.micro_batch_size < 1 or t.global_batch_size < 1:
        return errors, None
    dp = world_size // (p.tp * p.pp)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        lower = max(per_step, t.global_batch_size // per_step * per_step)
        errors.append(f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size × DP "
                      f"= {t.micro_batch_size} × {dp} = {per_step}: use a multiple of {per_step} "
                      f"(e.g. {lower} or {lower + per_step}) or change train.micro_batch_size")
        return errors, None
    micro_batches = t.global_batch_size // per_step
    if p.virtual_pp > 1 and micro_batches % p.pp:
        errors.append(f"the interleaved pipeline (parallel.virtual_pp={p.virtual_pp}) needs the micro-batches per step "
                      f"({micro_batches}) to be a multiple of parallel.pp={p.pp}: change train.global_batch_size")
    return errors, Layout(world_size, p.tp, p.pp, dp, p.virtual_pp, micro_batches)
