"""Inference on the tensor-parallel model: :func:`load`, KV-cache generation, sampling."""
from .model import Model, load
from .sampling import Completion, SamplingParams, apply_repetition_penalty, filter_top_k_top_p, sample

__all__ = ["Completion", "Model", "SamplingParams", "apply_repetition_penalty", "filter_top_k_top_p", "load",
           "sample"]
