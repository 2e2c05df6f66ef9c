"""The model's shape, and the checks of a shape and of a parallel layout for it.

:class:`ModelArgs` is the one definition of a model's shape: the `model` section of a run's
config (``megaevo.config.ModelConfig`` is the same class), what :class:`LlamaStage` is built
from, and what the converters read and write. :func:`shape_errors` and :func:`layout_errors`
are the one set of checks, used by config validation, the model builder and the converters;
each returns one message per problem, naming the settings to change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Mapping, Optional, get_args

from megaevo.common import padded_vocab_size
from megaevo.configio import ConfigError, errors_message

from .presets import preset_values

Recompute = Literal["none", "full", "selective"]
RECOMPUTE_MODES: tuple[str, ...] = get_args(Recompute)
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# How layout_errors names the parallel settings by default: by their config keys.
LAYOUT_KEYS = {"tp": "parallel.tp", "pp": "parallel.pp", "virtual_pp": "parallel.virtual_pp",
               "pp_layers": "parallel.pp_layers"}
_SIZES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_heads", "num_kv_heads", "vocab_size", "max_seq_len",
          "vocab_pad_multiple")


@dataclass(frozen=True)
class ModelArgs:
    """A Llama-family decoder: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

    The defaults are the ``tiny`` preset. In a config, ``preset:`` fills the fields of a named
    shape (see :mod:`megaevo.model.presets`) and fields given beside it win; in Python use
    ``ModelArgs.from_preset(name, **overrides)``. ``vocab_size`` is the tokenizer's; the
    embedding and output rows are padded to a multiple of ``vocab_pad_multiple`` × TP (see
    :meth:`padded_vocab_size`). ``recompute`` is ``none``, ``full`` (each decoder layer) or
    ``selective`` (only the attention core). ``rope_scaling`` is null or Llama 3's frequency
    scaling (see :func:`megaevo.kernels.rotary_tables`): ``{rope_type: llama3, factor: 8.0,
    low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192}``.

    Instances are immutable and hashable (``rope_scaling`` hashes by its sorted items); change
    one with :meth:`replace`. Nothing is checked on construction but the preset's name:
    :meth:`validate` (or :func:`shape_errors` / :func:`layout_errors`) says what is wrong.
    """

    preset: Optional[str] = field(default=None, metadata={"fills": preset_values})
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
    vocab_pad_multiple: int = 128
    init_std: float = 0.02
    recompute: Recompute = "none"
    rope_scaling: Optional[dict[str, Any]] = None

    def __post_init__(self):
        if self.preset is not None:
            preset_values(self.preset)
        scaling = self.rope_scaling
        if isinstance(scaling, Mapping) or (isinstance(scaling, (list, tuple))  # also its items, as pairs
                                            and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in scaling)):
            object.__setattr__(self, "rope_scaling", dict(scaling))  # a copy: the caller's dict stays theirs

    def __hash__(self) -> int:
        return hash(tuple(_hashable(getattr(self, f.name)) for f in fields(self)))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelArgs":
        """Preset ``name`` (``tiny``, ``evolm-1b``, ...) with ``overrides`` on top."""
        return cls(**{"preset": name, **preset_values(name), **overrides})

    @classmethod
    def from_config(cls, config) -> "ModelArgs":
        """``config`` itself if it is a ModelArgs, else the fields of an object with the same names."""
        if isinstance(config, cls):
            return config
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)})

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        """The vocabulary rounded up to a multiple of ``vocab_pad_multiple`` × tp, as Megatron-LM pads it."""
        return padded_vocab_size(self.vocab_size, tp, self.vocab_pad_multiple)

    def replace(self, **changes) -> "ModelArgs":
        return replace(self, **changes)

    def validate(self, tp: int = 1, pp: int = 1, virtual_pp: int = 1,
                 pp_layers: list[int] | None = None) -> "ModelArgs":
        """This shape, or ConfigError (a ValueError) listing what keeps it from running in the layout."""
        errors = shape_errors(self) + layout_errors(self, tp, pp, virtual_pp, pp_layers)
        if errors:
            raise ConfigError(errors_message(errors, "the model cannot run in this layout"))
        return self


def model_preset(name: str, **overrides) -> ModelArgs:
    """``ModelArgs.from_preset``: a preset by name with fields overridden."""
    return ModelArgs.from_preset(name, **overrides)


def _hashable(value):
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


# ---------------------------------------------------------------- checks


def divisors(n: int) -> str:
    """The divisors of ``n`` as text (the first 12)."""
    ds = [d for d in range(1, n + 1) if n % d == 0] if n > 0 else []
    return ", ".join(map(str, ds[:12])) + (", ..." if len(ds) > 12 else "")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def shape_errors(shape) -> list[str]:
    """What makes ``shape`` (a ModelArgs) unusable in any layout, one message per problem."""
    errors = [f"model.{name}={getattr(shape, name)!r} must be a positive integer"
              for name in _SIZES if not _positive_int(getattr(shape, name))]
    if errors:
        return errors
    heads, kv, hidden = shape.num_heads, shape.num_kv_heads, shape.hidden_size
    if heads % kv:
        errors.append(f"model.num_heads={heads} is not divisible by model.num_kv_heads={kv}: "
                      f"set model.num_kv_heads to one of {divisors(heads)}")
    if hidden % heads:
        errors.append(f"model.hidden_size={hidden} is not divisible by model.num_heads={heads}")
    elif shape.head_dim % 2:
        errors.append(f"model.hidden_size / model.num_heads = {shape.head_dim} must be even for rotary embeddings")
    for name in ("rope_theta", "norm_eps", "init_std"):
        if not _positive_number(getattr(shape, name)):
            errors.append(f"model.{name}={getattr(shape, name)!r} must be a positive number")
    if shape.recompute not in RECOMPUTE_MODES:
        errors.append(f"model.recompute={shape.recompute!r} must be one of {', '.join(map(repr, RECOMPUTE_MODES))}")
    if shape.rope_scaling is not None:
        errors += _rope_scaling_errors(shape.rope_scaling)
    return errors


def _rope_scaling_errors(scaling) -> list[str]:
    if not isinstance(scaling, Mapping):
        return [f"model.rope_scaling={scaling!r} must be a mapping (or null)"]
    kind = scaling.get("rope_type")
    if kind != "llama3":
        return [f"model.rope_scaling.rope_type={kind!r} is not supported: the only rotary scaling is 'llama3' "
                f"(or set model.rope_scaling=null)"]
    errors = []
    unknown = sorted(set(scaling) - {"rope_type", *LLAMA3_SCALING_KEYS})
    if unknown:
        errors.append(f"model.rope_scaling: unknown key(s) {', '.join(unknown)} for rope_type llama3 "
                      f"(known: {', '.join(LLAMA3_SCALING_KEYS)})")
    missing = [k for k in LLAMA3_SCALING_KEYS if k not in scaling]
    if missing:
        errors.append(f"model.rope_scaling: rope_type llama3 needs {', '.join(missing)}")
    bad = [k for k in LLAMA3_SCALING_KEYS if k in scaling and not _positive_number(scaling[k])]
    if bad:
        errors.append(f"model.rope_scaling: {', '.join(bad)} must be positive numbers")
    elif not missing and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        errors.append(f"model.rope_scaling: high_freq_factor={scaling['high_freq_factor']} must be larger than "
                      f"low_freq_factor={scaling['low_freq_factor']}")
    return errors


def _namer(names: Mapping[str, str] | None):
    """The label of each parallel setting, and `show(setting, value)`: `parallel.tp=4`, or `--tp 4`
    for a command-line flag."""
    label = {**LAYOUT_KEYS, **(names or {})}

    def show(setting: str, value) -> str:
        return f"{label[setting]} {value}" if label[setting].startswith("-") else f"{label[setting]}={value}"

    return label, show


def layout_errors(shape, tp: int, pp: int, virtual_pp: int = 1, pp_layers: list[int] | None = None, *,
                  names: Mapping[str, str] | None = None) -> list[str]:
    """What keeps ``shape`` from being split over ``tp`` tensor-parallel ranks and ``pp`` × ``virtual_pp``
    pipeline stages (``pp_layers``: the layers of each stage), one message per problem.

    The parallel settings are named by their config keys (``parallel.tp``, ...); ``names`` renames
    them, e.g. ``{"tp": "--tp"}`` for a command-line flag. Problems of the shape alone are
    :func:`shape_errors`' and not repeated here.
    """
    label, show = _namer(names)
    if not all(_positive_int(x) for x in (tp, pp, virtual_pp)):
        return [f"{label['tp']}, {label['pp']} and {label['virtual_pp']} must be positive integers "
                f"(got {tp!r}, {pp!r}, {virtual_pp!r})"]
    errors = []
    split = (("num_heads", "attention heads"), ("num_kv_heads", "KV heads"), ("ffn_hidden_size", "FFN columns"))
    if all(_positive_int(getattr(shape, name)) for name, _ in split):
        fits = divisors(math.gcd(*(getattr(shape, name) for name, _ in split)))
        for name, unit in split:
            value = getattr(shape, name)
            if value % tp:
                errors.append(f"{show('tp', tp)} does not divide the model's {value} {unit} (model.{name}={value}): "
                              f"each tensor-parallel rank holds whole {unit}; set {label['tp']} to one of {fits}")
    if _positive_int(shape.num_layers):
        errors += pipeline_errors(shape.num_layers, pp, virtual_pp, pp_layers, names=names)
    return errors


def pipeline_errors(num_layers: int, pp: int, virtual_pp: int = 1, pp_layers: list[int] | None = None, *,
                    names: Mapping[str, str] | None = None) -> list[str]:
    """What keeps ``num_layers`` layers from being split over ``pp`` × ``virtual_pp`` pipeline stages:
    evenly, or ``pp_layers`` layers each (see :func:`layout_errors`)."""
    label, show = _namer(names)
    if not (_positive_int(pp) and _positive_int(virtual_pp)):
        return [f"{label['pp']} and {label['virtual_pp']} must be positive integers (got {pp!r}, {virtual_pp!r})"]
    errors = []
    if virtual_pp > 1 and pp < 2:
        errors.append(f"{show('virtual_pp', virtual_pp)} needs {label['pp']} of at least 2")
    stages = pp * virtual_pp
    count = show("pp", pp) if virtual_pp == 1 else \
        f"{label['pp']} × {label['virtual_pp']} = {pp} × {virtual_pp} = {stages}"
    if pp_layers is not None:
        if (not isinstance(pp_layers, (list, tuple)) or len(pp_layers) != stages
                or not all(_positive_int(n) for n in pp_layers) or sum(pp_layers) != num_layers):
            errors.append(f"{show('pp_layers', pp_layers)} must list {stages} positive layer counts "
                          f"(one per pipeline stage, {count}) summing to model.num_layers={num_layers}")
    elif num_layers % stages:
        errors.append(f"{count} does not divide the model's {num_layers} layers (model.num_layers={num_layers}): "
                      f"choose a number of pipeline stages among {divisors(num_layers)} or list the layers "
                      f"per stage in {label['pp_layers']}")
    return errors

