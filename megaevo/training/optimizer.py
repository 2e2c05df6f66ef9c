"""AdamW with fp32 master weights over the flat buffers of megaevo.parallel.data_parallel.

Without the distributed optimizer every DP rank keeps fp32 master weights and both Adam moments
for all of its parameters. With it (ZeRO-1), DP rank r keeps them only for its slice of every
bucket, updates that slice, and the updated parameters are all-gathered. The update is one fused
AdamW call per contiguous range of the flat buffers (one per bucket, or per owned slice); weight
decay goes first, per parameter ("segments": the runs of a range inside one parameter), so that
norms take none.

Gradient clipping uses the true global norm: every element of the model counted once (TP-
replicated parameters only on TP rank 0, a pipeline-tied copy only on its first stage). A
non-finite norm skips the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megaevo.checkpoint.format import STATE_KINDS
from megaevo.kernels import adamw_step, sum_of_squares
from megaevo.parallel import compat
from megaevo.parallel.data_parallel import GradBuffers
from megaevo.parallel.layout import ParamMeta
from megaevo.parallel.state import ParallelState


@dataclass
class Segment:
    start: int  # range in the flat param / grad buffers
    end: int
    master_start: int  # range in the master / moment buffers
    decay: bool
    counted: bool  # contributes to the global grad norm


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool


class DistributedAdamW:
    def __init__(self, buffers: GradBuffers, metas: dict[str, ParamMeta], state: ParallelState, *,
                 lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, clip_grad: float = 1.0):
        self.buffers, self.state = buffers, state
        self.betas, self.eps, self.weight_decay, self.clip_grad, self.lr = betas, eps, weight_decay, clip_grad, lr
        self.step_count = 0
        self.segments: list[Segment] = []
        self.ranges: list[tuple[int, int, int]] = []  # (start, end) in the buffers, start in the master buffer
        offset = 0
        for b in buffers.buckets:
            own = buffers.shard_range(b) if buffers.distributed else (b.start, b.end)
            self.ranges.append((own[0], own[1], offset))
            for p in b.params:
                ps, pe = buffers.ranges[p]
                s, e = max(ps, own[0]), min(pe, own[1])
                if s >= e:
                    continue
                meta = metas[buffers.names[p]]
                counted = (not meta.tp_replicated or state.tp_rank == 0) and not (meta.pipeline_tied and
                                                                                 not state.is_first_stage)
                self.segments.append(Segment(s, e, offset + s - own[0], meta.weight_decay, counted))
            offset += own[1] - own[0]
        self.master = torch.cat([buffers.param_buffer[s:e].float() for s, e, _ in self.ranges]) if self.ranges \
            else torch.zeros(0, device=buffers.param_buffer.device)
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self._norm_groups = ([state.dp_group] if buffers.distributed else []) + [state.tp_group, state.pp_group]

    def reset_master(self) -> None:
        """Take the fp32 master weights from the parameters again (after loading weights only)."""
        for start, end, m0 in self.ranges:
            self.master[m0 : m0 + end - start] = self.buffers.param_buffer[start:end].float()

    def _views(self, seg: Segment):
        n = seg.end - seg.start
        m = slice(seg.master_start, seg.master_start + n)
        return self.master[m], self.exp_avg[m], self.exp_avg_sq[m]

    def grad_norm(self) -> float:
        """The global L2 norm of the (reduced) gradients of the whole model."""
        grads = [self.buffers.grad_buffer[s.start : s.end] for s in self.segments if s.counted]
        total = sum_of_squares(grads) if grads else torch.zeros((), device=self.master.device)
        total = total.reshape(1).to(torch.float32)
        for group in self._norm_groups:
            if group is not None:
                compat.all_reduce(total, group=group)
        return math.sqrt(total.item()) if math.isfinite(total.item()) else float("nan")

    def step(self, lr: float | None = None) -> StepResult:
        """Clip, update and (distributed) all-gather. Gradients must already be reduced."""
        norm = self.grad_norm()
        if not math.isfinite(norm):
            return StepResult(norm, True)
        lr = self.lr if lr is None else lr
        scale = 1.0
        if self.clip_grad and self.clip_grad > 0 and norm > self.clip_grad:
            scale = self.clip_grad / (norm + 1e-6)
        self.step_count += 1
        pbuf, gbuf = self.buffers.param_buffer, self.buffers.grad_buffer
        if self.weight_decay:  # decoupled decay first, on the parameters that take it (as AdamW does)
            for seg in self.segments:
                if seg.decay:
                    self._views(seg)[0].mul_(1 - lr * self.weight_decay)
        for start, end, m0 in self.ranges:  # then one fused update per contiguous range
            m = slice(m0, m0 + end - start)
            adamw_step(self.master[m], gbuf[start:end], self.exp_avg[m], self.exp_avg_sq[m], lr=lr,
                       beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, weight_decay=0.0,
                       step=self.step_count, grad_scale=scale, out=pbuf[start:end])
        self.buffers.gather_params()
        return StepResult(norm, False)

    # -- layout-free state -------------------------------------------------------------------------
    def _full(self, kind: str) -> torch.Tensor:
        """A flat buffer-shaped copy of master / exp_avg / exp_avg_sq, complete on every DP rank."""
        source = getattr(self, kind)
        full = torch.zeros(self.buffers.numel, dtype=torch.float32, device=source.device)
        for seg in self.segments:
            full[seg.start : seg.end] = source[seg.master_start : seg.master_start + seg.end - seg.start]
        if self.buffers.distributed and self.state.dp_group is not None:
            compat.all_reduce(full, group=self.state.dp_group)  # every element is owned by one rank
        return full

    def local_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """{parameter name: {kind: tensor shaped like the local parameter}} for every parameter."""
        fulls = {k: self._full(k) for k in STATE_KINDS}
        out = {}
        for p, (s, e) in self.buffers.ranges.items():
            out[self.buffers.names[p]] = {k: fulls[k][s:e].view(p.shape).clone() for k in STATE_KINDS}
        return out

    def load_local_state(self, tensors: dict[str, dict[str, torch.Tensor]], step: int) -> None:
        """Inverse of local_state: take this rank's segments from local-parameter-shaped tensors."""
        for kind in STATE_KINDS:
            full = torch.zeros(self.buffers.numel, dtype=torch.float32, device=self.master.device)
            for p, (s, e) in self.buffers.ranges.items():
                full[s:e] = tensors[self.buffers.names[p]][kind].reshape(-1).to(full)
            target = getattr(self, kind)
            for seg in self.segments:
                target[seg.master_start : seg.master_start + seg.end - seg.start] = full[seg.start : seg.end]
        self.step_count = int(step)
