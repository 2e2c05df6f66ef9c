"""Parallelism: process groups, tensor-parallel layers and their communication."""
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                     allreduce_sequence_parallel_grads, gather_vocab_logits, mask_vocab_padding, normal_init,
                     padded_vocab_size, skip_init, tag_param, vocab_parallel_cross_entropy)
from .layout import Fragment, ParamLayout, ParamMeta, param_meta
from .mappings import (copy_to_tp, gather_from_sequence, gather_from_tp, reduce_from_tp,
                       reduce_scatter_to_sequence, scatter_to_sequence, scatter_to_tp)
from .state import ParallelState, init_parallel_state

__all__ = [
    "ColumnParallelLinear",
    "Fragment",
    "ParallelState",
    "ParamLayout",
    "ParamMeta",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "allreduce_sequence_parallel_grads",
    "copy_to_tp",
    "gather_from_sequence",
    "gather_from_tp",
    "gather_vocab_logits",
    "init_parallel_state",
    "mask_vocab_padding",
    "normal_init",
    "padded_vocab_size",
    "param_meta",
    "reduce_from_tp",
    "reduce_scatter_to_sequence",
    "scatter_to_sequence",
    "scatter_to_tp",
    "skip_init",
    "tag_param",
    "vocab_parallel_cross_entropy",
]
