"""The training stages the engine (megaevo.training.trainer) runs, by the name the config's `stage` gives.

Each is a :class:`megaevo.training.stage.Stage` (the declared interface: data, a loss, and the
optional capabilities with their defaults): pre-training and continued pre-training are
:mod:`megaevo.stages.pretrain`; supervised fine-tuning (packed conversations with loss masks) is
:mod:`megaevo.stages.sft`; reinforcement learning with verifiable rewards (PPO, GRPO) is
:mod:`megaevo.stages.rl.stage`. Whoever launches a run passes :func:`build_stage` to the trainer.
"""
from __future__ import annotations

from typing import Callable

import torch

from megaevo.config import Config, ConfigError, Layout
from megaevo.parallel.state import ParallelState
from megaevo.stages.pretrain import pretrain_stage
from megaevo.stages.rl.stage import rl_stage
from megaevo.stages.sft import sft_stage
from megaevo.training.stage import Stage

STAGES: dict[str, Callable[[Config, Layout, ParallelState, torch.device], Stage]] = {
    "pretrain": pretrain_stage,
    "sft": sft_stage,
    "rl": rl_stage,
}


def build_stage(cfg: Config, layout: Layout, state: ParallelState, device: torch.device) -> Stage:
    """The stage the config describes (`stage`): pre-training / CPT, supervised fine-tuning or RL."""
    builder = STAGES.get(cfg.stage)
    if builder is None:
        raise ConfigError(f"stage={cfg.stage}: unknown stage: use stage=pretrain, stage=sft or stage=rl")
    return builder(cfg, layout, state, device)
