"""Hugging Face ``config.json`` <-> megaevo's model shape (:class:`megaevo.model.args.ModelArgs`).

Supported: ``LlamaForCausalLM`` (also Llama 3 rope scaling and tied embeddings),
``MistralForCausalLM`` and ``Qwen2ForCausalLM`` (q/k/v biases). Both the older layout of the
file (``rope_theta`` + ``rope_scaling``) and the newer one (``rope_parameters``) are read.
Anything the megaevo model cannot reproduce is refused by the name of its field, never dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megaevo.model.args import LLAMA3_SCALING_KEYS as _LLAMA3_KEYS

from .checkpoint_writer import ConvertError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_MOE_FIELDS = ("num_local_experts", "num_experts", "num_experts_per_tok", "n_routed_experts", "n_shared_experts",
               "moe_intermediate_size", "shared_expert_intermediate_size", "moe_layer_freq", "first_k_dense_replace")
_DEFAULTS = {  # what transformers assumes when config.json leaves a field out
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    "mistral": {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
}


@dataclass(frozen=True)
class HFModelSpec:
    """What a Hugging Face config says, in megaevo terms."""

    architecture: str
    model_type: str
    model: dict  # ModelArgs fields
    dtype: str | None  # the checkpoint's declared dtype ("bfloat16", ...), if any


def spec_from_hf_config(raw: dict, where: str = "config.json") -> HFModelSpec:
    """Map a Hugging Face model config onto ModelArgs fields, refusing what does not fit."""
    if not isinstance(raw, dict):
        raise ConvertError(f"{where}: expected a JSON object")

    def refuse(why: str) -> ConvertError:
        return ConvertError(f"{where}: {why}; megaevo's model cannot represent it, so the model is not converted")

    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if len(archs) > 1:
        raise refuse(f"architectures lists several models {archs}")
    if archs:
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise refuse(f"architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    else:
        by_type = {v: k for k, v in ARCHITECTURES.items()}
        if model_type not in by_type:
            raise refuse(f"no `architectures` and model_type {model_type!r} is not one of {', '.join(by_type)}")
        arch = by_type[model_type]
    kind = ARCHITECTURES[arch]
    if model_type is not None and model_type != kind:
        raise refuse(f"model_type {model_type!r} does not match architecture {arch!r} (expected {kind!r})")
    defaults = _DEFAULTS[kind]

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(raw.get(name), int) or raw[name] < 1:
            raise ConvertError(f"{where}: field {name} must be a positive integer, got {raw.get(name)!r}")
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads") or heads
    for name in _MOE_FIELDS:
        if raw.get(name) not in (None, 0):
            raise refuse(f"mixture-of-experts field {name}={raw[name]!r}")
    if raw.get("quantization_config"):
        raise refuse("quantization_config is set (quantized weights)")
    act = raw.get("hidden_act", raw.get("hidden_activation", "silu"))
    if act != "silu":
        raise refuse(f"hidden_act={act!r} (only silu, i.e. SwiGLU, is supported)")
    if raw.get("mlp_bias"):
        raise refuse("mlp_bias=true (biases on the MLP projections)")
    if kind in ("llama", "mistral") and raw.get("attention_bias"):
        raise refuse("attention_bias=true (this gives o_proj a bias too; only q/k/v biases are supported, "
                     "as in Qwen2ForCausalLM)")
    if hidden % heads:
        raise refuse(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise refuse(f"head_dim={head_dim} differs from hidden_size / num_attention_heads = {hidden // heads}")
    if heads % kv_heads:
        raise refuse(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if raw.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise refuse(f"partial_rotary_factor={raw['partial_rotary_factor']!r} (rotary embeddings on part of a head)")
    max_pos = raw.get("max_position_embeddings") or defaults["max_position_embeddings"]
    _check_attention_window(raw, kind, max_pos, refuse)
    theta, scaling = _rope(raw, defaults["rope_theta"], max_pos, refuse)
    model = dict(num_layers=raw["num_hidden_layers"], hidden_size=hidden, ffn_hidden_size=raw["intermediate_size"],
                 num_heads=heads, num_kv_heads=kv_heads, vocab_size=raw["vocab_size"], max_seq_len=int(max_pos),
                 rope_theta=float(theta), norm_eps=float(raw.get("rms_norm_eps") or defaults["rms_norm_eps"]),
                 tie_embeddings=bool(raw.get("tie_word_embeddings", False)), qkv_bias=kind == "qwen2",
                 rope_scaling=scaling)
    if isinstance(raw.get("initializer_range"), (int, float)) and raw["initializer_range"] > 0:
        model["init_std"] = float(raw["initializer_range"])
    dtype = raw.get("dtype") or raw.get("torch_dtype")
    return HFModelSpec(arch, kind, model, dtype if isinstance(dtype, str) else None)


def _check_attention_window(raw: dict, kind: str, max_pos: int, refuse) -> None:
    layer_types = raw.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise refuse(f"layer_types has layers other than full_attention ({sorted(set(layer_types))})")
    window = raw.get("sliding_window")
    if kind == "qwen2":
        if raw.get("use_sliding_window"):
            raise refuse(f"use_sliding_window=true (sliding_window={window})")
        return
    if window is not None and window < max_pos:
        raise refuse(f"sliding_window={window} is enabled (shorter than max_position_embeddings={max_pos}); "
                     f"megaevo attends over the whole causal context")


def _rope(raw: dict, default_theta: float, max_pos: int, refuse) -> tuple[float, dict | None]:
    """rope_theta and the megaevo rope_scaling from either layout of the config."""
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise refuse(f"rope_scaling/rope_parameters is not an object: {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise refuse("rope_parameters differ per layer type")
    theta = raw.get("rope_theta") or params.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta")
    theta = theta or default_theta
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
        if extra:
            raise refuse(f"default rope type with scaling fields {extra}")
        return theta, None
    if rope_type != "llama3":
        raise refuse(f"rope type {rope_type!r} (rope_scaling.rope_type; supported: default, llama3)")
    extra = sorted(set(params) - {"rope_type", "type", "rope_theta", *_LLAMA3_KEYS})
    if extra:
        raise refuse(f"llama3 rope scaling with unknown fields {extra}")
    scaling = {"rope_type": "llama3"}
    for key in _LLAMA3_KEYS:
        value = params.get(key)
        if value is None and key == "original_max_position_embeddings":
            value = max_pos
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise refuse(f"llama3 rope scaling needs a positive {key}, got {value!r}")
        scaling[key] = float(value) if key != "original_max_position_embeddings" else int(value)
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise refuse("llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return theta, scaling


def hf_config_from_model(model, architecture: str, dtype: torch.dtype, extra: dict | None = None,
                         token_ids: dict | None = None) -> dict:
    """A ``config.json`` for ``model`` (a ModelArgs) as ``architecture``.

    Written with both ``rope_theta``/``rope_scaling`` and ``rope_parameters`` so that older and
    newer transformers read the same rotary settings. ``extra`` (e.g. token ids of the imported
    model) fills fields megaevo does not own; ``token_ids`` (``bos_token_id``, ``eos_token_id``,
    ``pad_token_id`` of the exported tokenizer) fills those ``extra`` leaves unset.
    """
    if architecture not in ARCHITECTURES:
        raise ConvertError(f"cannot export as {architecture!r} (supported: {', '.join(ARCHITECTURES)})")
    kind = ARCHITECTURES[architecture]
    if model.qkv_bias and kind != "qwen2":
        raise ConvertError(f"the model has q/k/v biases, which {architecture} cannot hold; export as Qwen2ForCausalLM")
    scaling = dict(model.rope_scaling) if model.rope_scaling else None
    dtype_name = str(dtype).removeprefix("torch.")
    id_keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    out = {k: v for k, v in (token_ids or {}).items() if k in id_keys and v is not None}
    out.update({k: v for k, v in (extra or {}).items() if k in id_keys and v is not None})
    out.update({
        "architectures": [architecture],
        "model_type": kind,
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads,
        "head_dim": model.hidden_size // model.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta, **(scaling or {})},
        "tie_word_embeddings": model.tie_embeddings,
        "initializer_range": model.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    })
    if kind == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if kind == "mistral":
        out["sliding_window"] = None
    if kind == "qwen2":
        out.update(attention_bias=True, use_sliding_window=False, sliding_window=None,
                   max_window_layers=model.num_layers)
    return out
