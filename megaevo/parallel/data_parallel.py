"""Data parallelism: flat parameter and fp32 main-grad buffers, reduced over DP in buckets.

The parameters of a model stage are laid end to end in one flat buffer (parameters become views
into it) and their gradients accumulate, across micro-batches, into one flat float32 buffer
(`param.main_grad`). The buffers are cut into buckets in reverse parameter order, roughly the order
backward produces gradients. When every gradient of a bucket has arrived during the last
micro-batch of a step, the bucket's reduction starts asynchronously, overlapping the rest of
backward: an all-reduce (average over DP), or for the distributed optimizer a reduce-scatter that
leaves each DP rank the average of its own 1/DP slice of every bucket. Each bucket is padded to a
multiple of the DP size so that those slices are equal.

Parameters of different ``groups`` (e.g. the model chunks of an interleaved pipeline, each with its
own last backward) never share a bucket. Parameters in ``deferred`` get buckets of their own that
backward never starts: :meth:`finish_grad_sync` does, after the caller has combined their
gradients with other stages' (tied embeddings).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from megaevo.parallel import compat
from megaevo.parallel.state import ParallelState


@dataclass
class Bucket:
    start: int  # range in the flat buffers, padding included
    end: int
    params: list[nn.Parameter] = field(default_factory=list)
    pending: int = 0
    handle: object = None
    deferred: bool = False

    @property
    def size(self) -> int:
        return self.end - self.start


class GradBuffers:
    """Flat buffers for `params` (name -> parameter, in model order) of one model stage."""

    def __init__(self, params: dict[str, nn.Parameter], state: ParallelState, param_dtype: torch.dtype,
                 bucket_size: int = 40_000_000, distributed: bool = False, overlap: bool = True,
                 groups: dict[str, int] | None = None, deferred: frozenset[str] | set[str] = frozenset()):
        self.state = state
        self.distributed = distributed
        self.overlap = overlap
        self.names = {p: n for n, p in params.items()}
        dp = state.dp_size
        order = [p for p in reversed(list(params.values())) if p.requires_grad]

        def key(p: nn.Parameter):  # parameters of different keys never share a bucket
            name = self.names[p]
            return (groups or {}).get(name, 0), name in deferred

        self.buckets: list[Bucket] = []
        self.ranges: dict[nn.Parameter, tuple[int, int]] = {}
        offset = 0
        bucket = Bucket(0, 0)
        for i, p in enumerate(order):
            self.ranges[p] = (offset, offset + p.numel())
            bucket.params.append(p)
            bucket.deferred = key(p)[1]
            offset += p.numel()
            if offset - bucket.start >= bucket_size or i == len(order) - 1 or key(order[i + 1]) != key(p):
                offset = bucket.start + -(-(offset - bucket.start) // dp) * dp
                bucket.end = offset
                self.buckets.append(bucket)
                bucket = Bucket(offset, offset)
        self.numel = offset
        device = order[0].device if order else None
        self.param_buffer = torch.zeros(self.numel, dtype=param_dtype, device=device)
        self.grad_buffer = torch.zeros(self.numel, dtype=torch.float32, device=device)
        self.bucket_of: dict[nn.Parameter, Bucket] = {}
        for b in self.buckets:
            for p in b.params:
                s, e = self.ranges[p]
                view = self.param_buffer[s:e].view_as(p)
                view.copy_(p.data)
                p.data = view
                p.main_grad = self.grad_buffer[s:e].view_as(p)
                self.bucket_of[p] = b
                p.register_post_accumulate_grad_hook(self._grad_ready)
        self._sync = True
        self._reset_pending()

    # -- gradient accumulation and reduction -----------------------------------------------------
    def _reset_pending(self) -> None:
        for b in self.buckets:
            b.pending, b.handle = len(b.params), None

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients without reducing them (every micro-batch but the last of a step)."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _grad_ready(self, p: nn.Parameter) -> None:
        p.main_grad.add_(p.grad)
        p.grad = None
        b = self.bucket_of[p]
        b.pending -= 1
        if b.pending == 0:
            b.pending = len(b.params)  # ready for the next backward pass
            if self._sync and self.overlap and not b.deferred:
                self._start(b)

    def shard_range(self, b: Bucket) -> tuple[int, int]:
        """The slice of bucket b that this DP rank owns under the distributed optimizer."""
        per_rank = b.size // self.state.dp_size
        start = b.start + self.state.dp_rank * per_rank
        return start, start + per_rank

    def _start(self, b: Bucket) -> None:
        group = self.state.dp_group
        if group is None:
            b.handle = True
            return
        grad = self.grad_buffer[b.start : b.end]
        grad.div_(self.state.dp_size)
        if self.distributed:
            s, e = self.shard_range(b)
            b.handle = compat.reduce_scatter_tensor(self.grad_buffer[s:e], grad, group=group, async_op=True)
        else:
            b.handle = compat.all_reduce(grad, group=group, async_op=True)

    def finish_grad_sync(self) -> None:
        """Wait for every bucket's reduction (starting those not yet started, e.g. unused parameters)."""
        for b in self.buckets:
            if b.handle is None:
                self._start(b)
            if b.handle is not True:
                b.handle.wait()
        self._reset_pending()

    def zero_grad(self) -> None:
        self.grad_buffer.zero_()
        self._reset_pending()

    # -- parameters after an update ----------------------------------------------------------------
    def gather_params(self) -> None:
        """All-gather every rank's updated slice of the parameters (distributed optimizer)."""
        if not self.distributed or self.state.dp_group is None:
            return
        handles = []
        for b in self.buckets:
            s, e = self.shard_range(b)
            shard = self.param_buffer[s:e].clone()
            handles.append(compat.all_gather_into_tensor(self.param_buffer[b.start : b.end], shard,
                                                         group=self.state.dp_group, async_op=True))
        for h in handles:
            h.wait()
