"""The Llama-family model, built as pipeline stages from tensor-parallel layers."""
from .args import RECOMPUTE_MODES, ModelArgs, model_preset
from .llama import (MLP, Attention, DecoderLayer, LlamaStage, RMSNorm, build_chunks, build_stage, fuse_qkv, split_qkv,
                    stage_layer_range)

__all__ = [
    "MLP",
    "RECOMPUTE_MODES",
    "Attention",
    "DecoderLayer",
    "LlamaStage",
    "ModelArgs",
    "RMSNorm",
    "build_chunks",
    "build_stage",
    "fuse_qkv",
    "model_preset",
    "split_qkv",
    "stage_layer_range",
]
