"""Model shape settings and the EvoLM presets.

:class:`ModelArgs` holds only what the model needs; the trainer's ``ModelConfig`` maps onto it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

RECOMPUTE_MODES = ("none", "full", "selective")


@dataclass(frozen=True)
class ModelArgs:
    """Shape and numerics of a Llama-family decoder.

    ``vocab_size`` is the tokenizer's; the embedding and output rows are padded to a multiple of
    ``vocab_pad_multiple`` x TP (see :meth:`padded_vocab_size`). ``recompute`` is ``none``,
    ``full`` (each decoder layer) or ``selective`` (only the attention core). ``rope_scaling``
    is a rotary frequency scaling (see :func:`megaevo.kernels.rotary_tables`), given as a mapping
    and kept as a sorted tuple of its items so that the arguments stay hashable.
    """

    vocab_size: int = 32000
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    ffn_hidden_size: int = 352
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    vocab_pad_multiple: int = 128
    init_std: float = 0.02
    recompute: str = "none"
    rope_scaling: tuple[tuple[str, object], ...] | None = None

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def padded_vocab_size(self, tp_size: int = 1) -> int:
        step = self.vocab_pad_multiple * tp_size
        return -(-self.vocab_size // step) * step

    def replace(self, **changes) -> "ModelArgs":
        return replace(self, **changes)

    @classmethod
    def from_config(cls, config) -> "ModelArgs":
        """The fields of ``config`` (e.g. the trainer's ``ModelConfig``) that have the same names as ours."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)})

    def validate(self, tp_size: int = 1) -> "ModelArgs":
        """Raise ValueError, naming the field to change, if this shape cannot run at ``tp_size``."""
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
                     "max_seq_len", "vocab_pad_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads "
                             f"({self.num_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head dim hidden_size / num_heads = {self.head_dim} must be even for rotary embeddings")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"model.recompute must be one of {RECOMPUTE_MODES}, got {self.recompute!r}")
        for name in ("num_heads", "num_kv_heads", "ffn_hidden_size"):
            value = getattr(self, name)
            if value % tp_size:
                fits = [t for t in range(1, min(value, 64) + 1) if value % t == 0]
                unit = {"num_heads": "attention heads", "num_kv_heads": "KV groups"}.get(name, "FFN columns")
                raise ValueError(f"model.{name} ({value}) is not divisible by parallel.tp ({tp_size}): each "
                                 f"tensor-parallel rank must hold whole {unit}; set parallel.tp to one of {fits} "
                                 f"or change model.{name}")
        return self


def model_preset(name: str, **overrides) -> ModelArgs:
    """A preset of megaevo.config.PRESETS by name (``tiny``, ``evolm-1b``, ...) with fields overridden."""
    from megaevo.config import preset_values

    values = {k: v for k, v in preset_values(name).items() if k in _FIELDS}
    return ModelArgs(**{**values, **overrides})


_FIELDS = {f.name for f in fields(ModelArgs)}
