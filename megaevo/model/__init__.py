"""The Llama-family model, built as pipeline stages from tensor-parallel layers.

The package itself holds the shape (:class:`ModelArgs`, its checks and presets) and imports without torch;
the modules (``LlamaStage``, ``build_chunks``, ...) are in :mod:`megaevo.model.llama`, the FLOPs arithmetic
in :mod:`megaevo.model.flops`.
"""
from .args import RECOMPUTE_MODES, ModelArgs, layout_errors, model_preset, shape_errors
from .presets import PRESETS, preset_values

__all__ = [
    "PRESETS",
    "RECOMPUTE_MODES",
    "ModelArgs",
    "layout_errors",
    "model_preset",
    "preset_values",
    "shape_errors",
]
