"""A train unit: one model as the engine trains it.

:class:`TrainUnit` owns one model's chunks on this rank (:class:`ModelChunks`), their fp32 gradient
buffers (each chunk's buckets reduce during its last backward; tied embedding copies wait for the sum
across the first and last pipeline stage), its distributed AdamW, its pipeline engine, and its
checkpoint tensors. The actor of every stage is one; PPO's critic is another (its own optimizer
settings, kinds and name prefix); a frozen reference policy is one without an optimizer.

The global normalisation lives here: before any backward, a step's loss count is summed over every
micro-batch and DP rank (one all-reduce, which also carries the run's stop request, see
:class:`megaevo.training.signals.StopRequest`), and each micro-batch's loss sum is divided by that
global count, so accumulation and data parallelism never change the loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megaevo.config import Config, Layout, OptimConfig, ParallelConfig
from megaevo.model.llama import LlamaStage, build_chunks
from megaevo.model.weights import weights_changed
from megaevo.parallel import compat
from megaevo.parallel.data_parallel import GradBuffers
from megaevo.parallel.layers import allreduce_sequence_parallel_grads
from megaevo.parallel.layout import ParamMeta
from megaevo.parallel.pipeline import LossFn, PipelineEngine, StepStats
from megaevo.parallel.state import ParallelState
from megaevo.checkpoint import STATE_KINDS, CheckpointError, LoadedCheckpoint, read_local
from megaevo.training.optimizer import DistributedAdamW, StepResult
from megaevo.training.signals import StopRequest

MicroBatch = dict[str, torch.Tensor]


@dataclass
class ModelChunks:
    """This rank's model chunks and their parameters by logical name."""

    chunks: list[torch.nn.Module]
    params: dict[str, torch.nn.Parameter]
    metas: dict[str, ParamMeta]
    chunk_of: dict[str, int]  # logical name -> index of the chunk holding it
    tied: list[torch.nn.Parameter]  # embedding copies on the first and last stage, whose gradients sum

    @classmethod
    def of(cls, chunks: list[torch.nn.Module], tie_embeddings: bool = False, pp_size: int = 1) -> "ModelChunks":
        """The parameters of ``chunks`` (modules with ``named_parameters_with_meta``)."""
        named = [(c, item) for c, chunk in enumerate(chunks) for item in chunk.named_parameters_with_meta()]
        params = {n: p for _, (n, p, _) in named}
        tied = [params["embedding.weight"]] if tie_embeddings and pp_size > 1 and "embedding.weight" in params \
            else []
        return cls(chunks, params, {n: m for _, (n, _, m) in named}, {n: c for c, (n, _, _) in named}, tied)

    @property
    def module(self) -> torch.nn.Module:
        return self.chunks[0] if len(self.chunks) == 1 else torch.nn.ModuleList(self.chunks)


def build_model(cfg: Config, layout: Layout, state: ParallelState, device: torch.device,
                dtype: torch.dtype) -> ModelChunks:
    """This rank's pipeline chunks of ``cfg.model`` on tensor-parallel layers."""
    chunks: list[LlamaStage] = build_chunks(cfg.model, state, virtual_pp=layout.virtual_pp,
                                            layers_per_stage=cfg.parallel.pp_layers, seed=cfg.train.seed,
                                            device=device, dtype=dtype)
    return ModelChunks.of(chunks, cfg.model.tie_embeddings, state.pp_size)


class TrainUnit:
    """One model's chunks, gradient buffers, optimizer (``optim``; None: a frozen model) and pipeline
    (``micro_shape``: (micro-batch, seq, hidden) of the activations between stages). In checkpoints its
    weights are kind ``weights_kind`` and its optimizer state kinds ``state_prefix + kind``, every name
    prefixed ``name_prefix``."""

    def __init__(self, model: ModelChunks, state: ParallelState, device: torch.device, dtype: torch.dtype, *,
                 parallel: ParallelConfig, optim: OptimConfig | None, micro_shape: tuple[int, int, int],
                 weights_kind: str = "model", state_prefix: str = "", name_prefix: str = ""):
        self.model, self.state, self.device, self.dtype = model, state, device, dtype
        self.optim = optim
        self.weights_kind, self.state_prefix, self.name_prefix = weights_kind, state_prefix, name_prefix
        self.buffers: GradBuffers | None = None
        self.optimizer: DistributedAdamW | None = None
        if optim is not None:
            self.buffers = GradBuffers(model.params, state, dtype, bucket_size=int(parallel.bucket_size_mb * 2**20 / 4),
                                       distributed=parallel.distributed_optimizer, overlap=parallel.overlap_grad_reduce,
                                       groups=model.chunk_of, deferred={"embedding.weight"} if model.tied else set())
            self.optimizer = DistributedAdamW(self.buffers, model.metas, state, lr=optim.lr, betas=tuple(optim.betas),
                                              eps=optim.eps, weight_decay=optim.weight_decay,
                                              clip_grad=optim.clip_grad)
        else:  # frozen: no gradients, evaluation mode
            for chunk in model.chunks:
                chunk.requires_grad_(False).eval()
        sp = state.tp_size if state.sequence_parallel_active else 1
        batch, seq, hidden = micro_shape
        self.pipeline = PipelineEngine(model.chunks, state, (batch, seq // sp, hidden), dtype, device)
        self.stop = StopRequest()
        self.what = "the model"  # how errors name the unit's loss (the engine names the stage)
        self.last_step_stats: StepStats | None = None

    @property
    def chunks(self) -> list[torch.nn.Module]:
        return self.model.chunks

    @property
    def module(self) -> torch.nn.Module:
        return self.model.module

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        return self.model.params

    @property
    def metas(self) -> dict[str, ParamMeta]:
        return self.model.metas

    def join(self, stop: StopRequest, what: str) -> None:
        """Share the run's stop request (its global-count all-reduce carries it) and name the stage in errors."""
        self.stop, self.what = stop, what

    # -- one step ----------------------------------------------------------------------------------
    def _global_count(self, batches: list[MicroBatch], loss: LossFn) -> float:
        """The loss count of a whole step: every micro-batch of every DP rank (one all-reduce).

        The same all-reduce carries this rank's stop request (a signal received), summed over the
        whole job, so that every rank stops at the same step. It spans the world: the TP and PP ranks
        of a DP rank hold the same batches, so the sum counts each DP rank's count TP × PP times."""
        s = self.state
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for b in batches:
            total[0] += torch.as_tensor(loss.count(b), dtype=torch.float64, device=self.device)
        total[1] = float(self.stop.local())
        if s.tp_size * s.pp_size * s.dp_size > 1:
            compat.all_reduce(total)
        count, stop = total.tolist()
        self.stop.agree(stop > 0)
        return count / (s.tp_size * s.pp_size)

    def _step_loss(self, stats: StepStats, count: float) -> float:
        """The step's loss: the sum over every micro-batch and DP rank divided by ``count``. Also checks
        that the loss function counted what it said it would."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for loss_sum, n in stats.losses:  # only the last stage has losses; the others add zero
            total += torch.stack([loss_sum.double(), torch.as_tensor(n, dtype=torch.float64, device=self.device)])
        for group in (self.state.pp_group, self.state.dp_group):
            if group is not None:
                compat.all_reduce(total, group=group)
        loss_sum, counted = total.tolist()
        if abs(counted - count) > 1e-6 * max(count, 1.0):
            raise RuntimeError(f"{self.what}: the loss function summed over {counted:g} but its "
                               f"count() promised {count:g} for this step")
        return loss_sum / count if count else float("nan")

    def forward_backward(self, batches: list[MicroBatch], loss: LossFn, forward_only: bool = False) -> float:
        """Run ``batches`` through the pipeline (with backward unless ``forward_only``); the global mean loss.

        The gradient buffers average over DP, so each rank's loss sum is scaled by DP / global count:
        the averaged gradient is that of (sum over all ranks) / (global count)."""
        count = self._global_count(batches, loss)
        scale = self.state.dp_size / count if count else 0.0
        stats = self.pipeline.run(batches, loss_fn=loss, loss_scale=scale, forward_only=forward_only,
                                  no_sync=None if forward_only else self.buffers.no_sync)
        if not forward_only:
            self.last_step_stats = stats
        return self._step_loss(stats, count)

    def update(self, batches: list[MicroBatch], loss: LossFn, lr: float) -> tuple[float, StepResult | None]:
        """One optimizer update on ``batches`` (this DP rank's micro-batches): forward and backward,
        gradient reduction, clipping and AdamW at ``lr``. Returns the global mean loss and the
        optimizer's result (None when the loss was not finite and no update was made)."""
        self.buffers.zero_grad()
        self.module.train()
        value = self.forward_backward(batches, loss)
        for p in self.model.tied:
            compat.all_reduce(p.main_grad, group=self.state.embedding_group)
        self.buffers.finish_grad_sync()
        allreduce_sequence_parallel_grads(self.params.values(), self.state, grad_attr="main_grad")
        result = self.optimizer.step(lr) if math.isfinite(value) else None
        weights_changed(*self.chunks)  # cached inference copies of the weights are out of date
        return value, result

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint_tensors(self) -> dict[str, dict[str, tuple]]:
        """``{kind: {name: (local tensor, fragments, logical shape)}}`` of the weights and (with an
        optimizer) its state; collective over DP with the distributed optimizer. A TP-replicated tensor
        is written by TP rank 0 only."""
        optimizer_state = self.optimizer.local_state() if self.optimizer is not None else None
        kinds = STATE_KINDS if optimizer_state is not None else ()
        out: dict[str, dict[str, tuple]] = {self.weights_kind: {}, **{self.state_prefix + k: {} for k in kinds}}
        for name, p in self.params.items():
            m, key = self.metas[name], self.name_prefix + name
            frags = [] if (m.tp_replicated and self.state.tp_rank != 0) else m.fragments(p.shape)
            out[self.weights_kind][key] = (p.detach(), frags, m.logical_shape)
            for k in kinds:
                out[self.state_prefix + k][key] = (optimizer_state[name][k], frags, m.logical_shape)
        return out

    @torch.no_grad()
    def load_weights(self, ck: LoadedCheckpoint, kind: str | None = None, prefix: str | None = None,
                     skip: frozenset[str] | set[str] = frozenset()) -> None:
        """Each parameter's local shard of checkpoint ``ck`` (any layout), cast to its dtype: kind ``kind``
        and names prefixed ``prefix`` (default: the unit's own), but those in ``skip``."""
        kind = self.weights_kind if kind is None else kind
        prefix = self.name_prefix if prefix is None else prefix
        for name, p in self.params.items():
            if name not in skip:
                p.copy_(read_local(ck, kind, prefix + name, self.metas[name], p.shape).to(p.dtype))
        weights_changed(*self.chunks)

    @torch.no_grad()
    def load(self, ck: LoadedCheckpoint, with_optimizer: bool, step: int) -> None:
        """The unit's weights from ``ck`` and its optimizer state: every kind at AdamW step ``step`` with
        ``with_optimizer``, else the master weights only (step 0). Without saved master weights (e.g. an
        imported model) the master weights start from the weights."""
        self.load_weights(ck)
        if self.optimizer is None:
            return
        master = self.state_prefix + "master"
        if not ck.has(master):
            self.optimizer.reset_master()
            return
        kinds = STATE_KINDS if with_optimizer else ("master",)
        absent = [self.state_prefix + k for k in kinds if not ck.has(self.state_prefix + k)]
        if absent:
            raise CheckpointError(f"{ck.path}: optimizer state is incomplete (no {', '.join(absent)}; has "
                                  f"{', '.join(sorted(ck.record.tensors))})")
        state = {name: {k: (read_local(ck, self.state_prefix + k, self.name_prefix + name, self.metas[name], p.shape)
                            if k in kinds else torch.zeros(p.shape, dtype=torch.float32)) for k in STATE_KINDS}
                 for name, p in self.params.items()}
        self.optimizer.load_local_state(state, step if with_optimizer else 0)
