"""PPO's critic: the actor's architecture with a scalar value head, trained beside the actor.

:class:`ValueModel` is the decoder without its output head (a :class:`~megaevo.model.llama.LlamaStage`
holding the embedding and every layer), the final norm, and ``value_head.weight`` (1, hidden), a fresh
head replicated over tensor parallelism. Its value at position ``t`` estimates the return after the
tokens up to ``t``: the state in which token ``t + 1`` is chosen, the alignment of the policy's
per-token log-probabilities (see :mod:`megaevo.stages.rl.rollout`). Under sequence parallelism the
values of each rank's sequence slice are gathered, so every rank sees the whole (batch, seq).

:func:`build_critic` makes it a :class:`~megaevo.training.unit.TrainUnit` like the actor's: fp32
gradient buffers reduced over data parallelism, its own distributed AdamW and learning rate
(``rl.critic``), a pipeline engine (PP = 1), and layout-free checkpoint tensors (kinds ``critic`` and
``critic_master`` / ``critic_exp_avg`` / ``critic_exp_avg_sq``, names prefixed ``critic.``), so a
checkpoint's ``model`` tensors stay the actor's alone.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaevo.common import stream_seed
from megaevo.config import Config, OptimConfig
from megaevo.model.llama import LlamaStage, RMSNorm
from megaevo.parallel.layers import tag_param
from megaevo.parallel.layout import ParamLayout, ParamMeta, param_meta
from megaevo.parallel.mappings import gather_from_sequence
from megaevo.parallel.state import ParallelState
from megaevo.checkpoint import (CRITIC_NAME_PREFIX, CRITIC_STATE_PREFIX, CRITIC_WEIGHTS_KIND, CheckpointError,
                                LoadedCheckpoint)
from megaevo.training.schedules import lr_at
from megaevo.training.unit import ModelChunks, TrainUnit

VALUE_HEAD = "value_head.weight"


class ValueModel(nn.Module):
    """The decoder body, its final norm and a scalar head: ``forward(tokens) -> values`` (batch, seq), fp32."""

    def __init__(self, args, state: ParallelState, seed: int, device=None, dtype=None):
        super().__init__()
        self.state = state
        self.body = LlamaStage(args, state, 0, args.num_layers, has_embedding=True, has_head=False, seed=seed,
                               device=device, dtype=dtype)
        sp = state.sequence_parallel_active
        self.norm = RMSNorm(args.hidden_size, args.norm_eps, sp, device, dtype)
        head = torch.empty(1, args.hidden_size, device=device, dtype=torch.float32)
        gen = torch.Generator(device=head.device)
        gen.manual_seed(stream_seed(seed, VALUE_HEAD))
        head.normal_(0.0, args.init_std, generator=gen)
        self.value_head = tag_param(nn.Parameter(head.to(dtype or torch.float32)), ParamLayout(), weight_decay=True,
                                    sequence_parallel=sp)

    def forward(self, x: torch.Tensor, labels=None, *, position_ids=None, doc_ids=None) -> torch.Tensor:
        h = self.norm(self.body(x, position_ids=position_ids, doc_ids=doc_ids))
        values = F.linear(h, self.value_head).squeeze(-1).float()
        if self.state.sequence_parallel_active:  # every TP rank computes the loss on the whole sequence
            values = gather_from_sequence(values, self.state.tp_group, dim=1, reduce_grad=False)
        return values

    def named_parameters_with_meta(self) -> list[tuple[str, nn.Parameter, ParamMeta]]:
        s = self.state
        return self.body.named_parameters_with_meta() + [
            (name, p, param_meta(name, p, s.tp_rank, s.tp_size))
            for name, p in (("norm.weight", self.norm.weight), (VALUE_HEAD, self.value_head))]


def critic_optim(cfg: Config) -> OptimConfig:
    """The critic's learning-rate schedule and AdamW settings: ``rl.critic`` over the actor's ``optim`` of a
    resolved config."""
    c, o = cfg.rl.critic, cfg.optim  # both warmups in iterations already (megaevo.config.resolve)
    return dataclasses.replace(o, lr=c.lr, min_lr=c.min_lr, warmup=o.warmup if c.warmup is None else c.warmup,
                               warmup_fraction=None,
                               weight_decay=o.weight_decay if c.weight_decay is None else c.weight_decay,
                               clip_grad=o.clip_grad if c.clip_grad is None else c.clip_grad)


def build_critic(cfg: Config, state: ParallelState, device: torch.device, dtype: torch.dtype) -> TrainUnit:
    """The value model of a run as a train unit (PP = 1) with the ``rl.critic`` optimizer settings."""
    model = ValueModel(cfg.model, state, cfg.train.seed, device, dtype)
    return TrainUnit(ModelChunks.of([model]), state, device, dtype, parallel=cfg.parallel, optim=critic_optim(cfg),
                     micro_shape=(cfg.train.micro_batch_size, cfg.seq_len, cfg.model.hidden_size),
                     weights_kind=CRITIC_WEIGHTS_KIND, state_prefix=CRITIC_STATE_PREFIX,
                     name_prefix=CRITIC_NAME_PREFIX)


def critic_lr(critic: TrainUnit, iteration: int, iters: int) -> float:
    return lr_at(iteration, critic.optim, iters)


@torch.no_grad()
def critic_values(critic: TrainUnit, tokens: torch.Tensor) -> torch.Tensor:
    critic.module.eval()
    return critic.module(tokens)


def load_critic_body(critic: TrainUnit, ck: LoadedCheckpoint) -> None:
    """Take the body and final norm from a policy checkpoint's ``model`` tensors (any layout); the value
    head keeps its fresh initialisation and the optimizer starts over."""
    critic.load_weights(ck, kind="model", prefix="", skip={VALUE_HEAD})
    critic.optimizer.reset_master()


def resume_critic(critic: TrainUnit, ck: LoadedCheckpoint, step: int) -> None:
    """Weights and optimizer state (at AdamW step ``step``) of the critic a PPO run saved in ``ck``."""
    if not ck.has(CRITIC_WEIGHTS_KIND):
        raise CheckpointError(f"{ck.path}: holds no critic ({CRITIC_WEIGHTS_KIND!r} tensors); it was not saved by a "
                              f"PPO run. Start PPO from it with checkpoint.finetune=true")
    critic.load(ck, with_optimizer=True, step=step)
