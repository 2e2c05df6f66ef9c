"""A model's weights generation: how a cached copy of the weights (the inference-only packed weights of
:mod:`megaevo.model.decode`) knows that the weights changed.

The optimizer writes the flat parameter buffer that the parameters are views of, which autograd's
version counters do not see; so whatever writes the weights in place (the engine after every optimizer
update and every checkpoint load, the PPO critic, the RL reference) calls :func:`weights_changed`, and a
cache keys on :func:`weights_generation`.
"""
from __future__ import annotations

import torch

_GENERATION = "_weights_generation"


def weights_changed(*modules: torch.nn.Module) -> None:
    """Say that the weights of ``modules`` were written (an optimizer update, a checkpoint load): each
    module's weights generation goes up by one, so every packed or cached copy of its weights is
    rebuilt before it is used again."""
    for module in modules:
        module.__dict__[_GENERATION] = weights_generation(module) + 1


def weights_generation(module: torch.nn.Module) -> int:
    """How many times :func:`weights_changed` was called on ``module``."""
    return module.__dict__.get(_GENERATION, 0)
