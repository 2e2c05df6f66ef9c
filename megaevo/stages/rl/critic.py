"""PPO's critic: the actor's architecture with a scalar value head, trained beside the actor.

:class:`ValueModel` is the decoder without its output head (a :class:`~megaevo.model.llama.LlamaStage`
holding the embedding and every layer), the final norm, and ``value_head.weight`` (1, hidden), a fresh
head replicated over tensor parallelism. Its value at position ``t`` estimates the return after the
tokens up to ``t``: the state in which token ``t + 1`` is chosen, the alignment of the policy's
per-token log-probabilities (see :mod:`megaevo.stages.rl.rollout`). Under sequence parallelism the
values of each rank's sequence slice are gathered, so every rank sees the whole (batch, seq).

:class:`Critic` gives it what the engine gives the actor: fp32 gradient buffers reduced over data
parallelism, its own distributed AdamW and learning rate (``rl.critic``), a pipeline engine to run it
through :meth:`megaevo.training.trainer.Trainer.forward_backward`, and layout-free checkpoint tensors
(kinds ``critic`` and ``critic_master`` / ``critic_exp_avg`` / ``critic_exp_avg_sq``, names prefixed
``critic.``), so a checkpoint's ``model`` tensors stay the actor's alone.
"""
from __future__ import annotations

import dataclasses
import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaevo.config import Config, OptimConfig
from megaevo.model.llama import LlamaStage, RMSNorm
from megaevo.model.weights import weights_changed
from megaevo.parallel.data_parallel import GradBuffers
from megaevo.parallel.layers import allreduce_sequence_parallel_grads, tag_param
from megaevo.parallel.layout import ParamLayout, ParamMeta, param_meta
from megaevo.parallel.mappings import gather_from_sequence
from megaevo.parallel.pipeline import PipelineEngine
from megaevo.parallel.state import ParallelState
from megaevo.training.checkpoint import CheckpointError, LoadedCheckpoint, read_local
from megaevo.training.optimizer import STATE_KINDS, DistributedAdamW, StepResult
from megaevo.training.schedules import lr_at

VALUE_HEAD = "value_head.weight"
PREFIX = "critic."
WEIGHTS_KIND = "critic"
STATE_KIND_PREFIX = "critic_"


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
        gen.manual_seed((seed * 1_000_003 + zlib.crc32(VALUE_HEAD.encode())) % 2**63)
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
    """The critic's learning-rate schedule and AdamW settings: ``rl.critic`` over the actor's ``optim``."""
    c, o = cfg.rl.critic, cfg.optim
    warmup = o.warmup if o.warmup_fraction is None else int(round(o.warmup_fraction * cfg.train.iters))
    if c.warmup is not None:
        warmup = c.warmup
    if c.warmup_fraction is not None:
        warmup = int(round(c.warmup_fraction * cfg.train.iters))
    return dataclasses.replace(o, lr=c.lr, min_lr=c.min_lr, warmup=warmup, warmup_fraction=None,
                               weight_decay=o.weight_decay if c.weight_decay is None else c.weight_decay,
                               clip_grad=o.clip_grad if c.clip_grad is None else c.clip_grad)


class Critic:
    """The value model of a run with its gradient buffers, optimizer and pipeline (PP = 1)."""

    def __init__(self, cfg: Config, state: ParallelState, device: torch.device, dtype: torch.dtype):
        self.cfg, self.state, self.device = cfg, state, device
        self.model = ValueModel(cfg.model, state, cfg.train.seed, device, dtype)
        named = self.model.named_parameters_with_meta()
        self.params = {n: p for n, p, _ in named}
        self.metas = {n: m for n, _, m in named}
        p = cfg.parallel
        self.optim = critic_optim(cfg)
        self.buffers = GradBuffers(self.params, state, dtype, bucket_size=int(p.bucket_size_mb * 2**20 / 4),
                                   distributed=p.distributed_optimizer, overlap=p.overlap_grad_reduce)
        o = self.optim
        self.optimizer = DistributedAdamW(self.buffers, self.metas, state, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                          weight_decay=o.weight_decay, clip_grad=o.clip_grad)
        self.pipeline = PipelineEngine([self.model], state, (cfg.train.micro_batch_size, cfg.seq_len,
                                                             cfg.model.hidden_size), dtype, device)

    def lr(self, iteration: int) -> float:
        return lr_at(iteration, self.optim, self.cfg.train.iters)

    @torch.no_grad()
    def values(self, tokens: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model(tokens)

    def update(self, trainer, batches: list[dict], loss, lr: float) -> tuple[float, StepResult | None]:
        """One optimizer update on ``batches`` through the engine's forward/backward (global normalisation)."""
        self.buffers.zero_grad()
        self.model.train()
        value = trainer.forward_backward(batches, loss, pipeline=self.pipeline, buffers=self.buffers)
        self.buffers.finish_grad_sync()
        allreduce_sequence_parallel_grads(self.params.values(), self.state, grad_attr="main_grad")
        result = self.optimizer.step(lr) if math.isfinite(value) else None
        weights_changed(self.model)  # as the engine does for the actor
        return value, result

    # -- checkpoints -------------------------------------------------------------------------------
    @torch.no_grad()
    def load_body(self, ck: LoadedCheckpoint) -> None:
        """Take the body and final norm from a policy checkpoint's ``model`` tensors (any layout); the value
        head keeps its fresh initialisation and the optimizer starts over."""
        for name, p in self.params.items():
            if name != VALUE_HEAD:
                p.copy_(read_local(ck, "model", name, self.metas[name], p.shape).to(p.dtype))
        self.optimizer.reset_master()

    @torch.no_grad()
    def load(self, ck: LoadedCheckpoint, with_optimizer: bool, step: int) -> None:
        """Weights (and with ``with_optimizer`` the optimizer state, at AdamW step ``step``) saved by
        :meth:`checkpoint_tensors`."""
        if not ck.has(WEIGHTS_KIND):
            raise CheckpointError(f"{ck.path}: holds no critic ({WEIGHTS_KIND!r} tensors); it was not saved by a "
                                  f"PPO run. Start PPO from it with checkpoint.finetune=true")
        for name, p in self.params.items():
            p.copy_(read_local(ck, WEIGHTS_KIND, PREFIX + name, self.metas[name], p.shape).to(p.dtype))
        if not with_optimizer:
            self.optimizer.reset_master()
            return
        state = {name: {k: read_local(ck, STATE_KIND_PREFIX + k, PREFIX + name, self.metas[name], p.shape)
                        for k in STATE_KINDS} for name, p in self.params.items()}
        self.optimizer.load_local_state(state, step)

    def checkpoint_tensors(self) -> dict[str, dict[str, tuple]]:
        """``{kind: {name: (local tensor, fragments, logical shape)}}`` for the trainer's save (collective
        over DP with the distributed optimizer)."""
        optimizer_state = self.optimizer.local_state()
        out: dict[str, dict[str, tuple]] = {WEIGHTS_KIND: {}, **{STATE_KIND_PREFIX + k: {} for k in STATE_KINDS}}
        for name, p in self.params.items():
            m = self.metas[name]
            frags = [] if (m.tp_replicated and self.state.tp_rank != 0) else m.fragments(p.shape)
            out[WEIGHTS_KIND][PREFIX + name] = (p.detach(), frags, m.logical_shape)
            for k in STATE_KINDS:
                out[STATE_KIND_PREFIX + k][PREFIX + name] = (optimizer_state[name][k], frags, m.logical_shape)
        return out
