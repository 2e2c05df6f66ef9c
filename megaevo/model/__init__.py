"""The Llama-family model, built as pipeline stages from tensor-parallel layers.

The shape (:class:`ModelArgs`, its checks and presets) imports without torch; the modules
(``LlamaStage``, ``build_chunks``, ...) load with their first use.
"""
from .args import RECOMPUTE_MODES, ModelArgs, layout_errors, model_preset, shape_errors
from .presets import PRESETS, preset_values

_LLAMA = ("MLP", "Attention", "DecoderLayer", "LlamaStage", "RMSNorm", "build_chunks", "build_stage", "fuse_qkv",
          "split_qkv", "stage_layer_range")

__all__ = [
    "MLP",
    "PRESETS",
    "RECOMPUTE_MODES",
    "Attention",
    "DecoderLayer",
    "LlamaStage",
    "ModelArgs",
    "RMSNorm",
    "build_chunks",
    "build_stage",
    "fuse_qkv",
    "layout_errors",
    "model_preset",
    "preset_values",
    "shape_errors",
    "split_qkv",
    "stage_layer_range",
]


def __getattr__(name: str):
    if name in _LLAMA:
        from . import llama

        return getattr(llama, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
