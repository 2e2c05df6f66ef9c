"""The root of a run's settings, :class:`Config` (one field per section, each section's class in the module
of the stage that owns it), and :class:`Layout`, the parallel layout a Config resolves to."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megaevo.config.rl import RLConfig
from megaevo.config.sections import (CheckpointConfig, DataConfig, KernelsConfig, OptimConfig, ParallelConfig,
                                     TrainConfig)
from megaevo.config.sft import SFTConfig
from megaevo.model.args import ModelArgs

ModelConfig = ModelArgs  # the `model` section: one class for the model's shape


@dataclass
class Config:
    stage: Literal["pretrain", "sft", "rl"] = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    out_dir: str = "runs/megaevo"

    @property
    def seq_len(self) -> int:
        """Training sample length: data.seq_len, else the model's max_seq_len."""
        return self.data.seq_len if self.data.seq_len is not None else self.model.max_seq_len


@dataclass(frozen=True)
class Layout:
    """How a world of processes splits into tensor, pipeline and data parallel groups."""

    world_size: int
    tp: int
    pp: int
    dp: int
    virtual_pp: int
    micro_batches_per_step: int  # global batch / (micro batch × dp): gradient-accumulation steps

