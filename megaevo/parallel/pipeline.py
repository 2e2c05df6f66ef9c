"""Pipeline parallelism: the 1F1B and interleaved schedules and the point-to-point exchange.

A rank of pipeline stage ``r`` (of ``pp``) holds ``virtual_pp`` model chunks; chunk ``c`` is
virtual stage ``c * pp + r``, so activations travel rank 0 → 1 → … → pp-1 → 0 (next chunk) → …
and gradients the other way. The token embedding sits on virtual stage 0 and the head and loss
on the last one.

A schedule is each rank's ordered list of :class:`Action` (forward or backward of one chunk on
one micro-batch), built by pure functions (:func:`schedule`) so that it can be checked without
processes (:func:`simulate`). :class:`PipelineEngine` runs a rank's list: a forward receives its
input from the previous virtual stage (unless it is the first), a backward receives its output's
gradient from the next (unless it is the last); sends are posted without waiting and go out with
the next receive in one ``batch_isend_irecv`` (so a send and the opposite receive between two
neighbours never wait on each other), and every send is complete before :meth:`run` returns.

1F1B (``virtual_pp == 1``): stage ``r`` runs ``pp - r - 1`` warm-up forwards, then alternates one
forward and one backward, then drains the remaining backwards, so at most ``pp - r`` micro-batches'
activations are alive on it. Interleaved 1F1B (Megatron's virtual pipeline) walks the micro-batches
in groups of ``pp`` through the chunks, which shrinks the bubble by ``virtual_pp`` at the price of
more warm-up activations; it needs the number of micro-batches to be a multiple of ``pp``.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from megaevo.parallel.state import ParallelState

# A last-stage loss: (chunk, input, micro-batch) -> (loss sum, count of what the sum is over).
LossFn = Callable[[torch.nn.Module, torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor]]

FORWARD, BACKWARD = "F", "B"
_TAGS = {FORWARD: 1, BACKWARD: 2}  # activations and gradients never match each other's receives


@dataclass(frozen=True)
class Action:
    kind: str  # FORWARD or BACKWARD
    chunk: int  # model chunk on this rank
    micro: int  # micro-batch of the step


class ScheduleError(ValueError):
    """A schedule that cannot run with these sizes."""


def _interleaved_slot(k: int, pp: int, vpp: int, backward: bool) -> tuple[int, int]:
    """(chunk, micro-batch) of a rank's k-th forward (or backward) in the interleaved order."""
    group = pp * vpp
    chunk = (k % group) // pp
    if backward:
        chunk = vpp - 1 - chunk
    return chunk, (k // group) * pp + k % pp


def schedule(num_micro: int, pp: int, rank: int, virtual_pp: int = 1, forward_only: bool = False) -> list[Action]:
    """The ordered actions of pipeline rank ``rank`` for one step of ``num_micro`` micro-batches."""
    if num_micro < 1 or pp < 1 or virtual_pp < 1 or not 0 <= rank < pp:
        raise ScheduleError(f"schedule: bad sizes num_micro={num_micro} pp={pp} rank={rank} virtual_pp={virtual_pp}")
    if virtual_pp > 1 and num_micro % pp:
        raise ScheduleError(f"the interleaved schedule (parallel.virtual_pp={virtual_pp}) needs the micro-batches per "
                            f"step ({num_micro}) to be a multiple of parallel.pp={pp}: change train.global_batch_size")
    total = num_micro * virtual_pp

    def fwd(k: int) -> Action:
        return Action(FORWARD, *_interleaved_slot(k, pp, virtual_pp, False))

    def bwd(k: int) -> Action:
        return Action(BACKWARD, *_interleaved_slot(k, pp, virtual_pp, True))

    if forward_only:
        return [fwd(k) for k in range(total)]
    if virtual_pp == 1:
        warmup = min(pp - rank - 1, total)
    elif num_micro == pp:
        warmup = total  # every forward first: the steady phase would have nothing to overlap
    else:
        warmup = min((pp - rank - 1) * 2 + (virtual_pp - 1) * pp, total)
    actions = [fwd(k) for k in range(warmup)]
    for k in range(total - warmup):
        actions += [fwd(warmup + k), bwd(k)]
    actions += [bwd(k) for k in range(total - warmup, total)]
    return actions


# -- checking schedules without processes ------------------------------------------------------------
@dataclass
class SimulationResult:
    ticks: int  # rounds of the simulation until every rank finished
    max_live: list[int]  # per rank, the most activation sets alive at once
    busy: list[int]  # per rank, actions run


def simulate(num_micro: int, pp: int, virtual_pp: int = 1, forward_only: bool = False,
             tags: bool = True) -> SimulationResult:
    """Run every rank's schedule against the others, one action per rank per tick, with sends that
    never block and receives that wait for their message, in order, per (sender, receiver, kind);
    with ``tags=False`` per (sender, receiver) only, as on a backend that ignores message tags (NCCL).

    Raises ScheduleError on a deadlock or when a receive would get another message than its own:
    the properties the real exchange relies on.
    """
    plans = [schedule(num_micro, pp, r, virtual_pp, forward_only) for r in range(pp)]
    last_stage = pp * virtual_pp - 1
    channels: dict[tuple, list[tuple[int, int]]] = {}
    width = 3 if tags else 2  # how much of (sender, receiver, kind) tells channels apart
    pos, live, max_live, done = [0] * pp, [0] * pp, [0] * pp, set()
    ticks = 0
    while any(pos[r] < len(plans[r]) for r in range(pp)):
        ticks += 1
        progressed = False
        sends = []
        for r in range(pp):
            if pos[r] == len(plans[r]):
                continue
            a = plans[r][pos[r]]
            stage = a.chunk * pp + r
            need = None  # the message this action waits for
            if a.kind == FORWARD and stage > 0:
                need = ((r - 1) % pp, r, FORWARD, (FORWARD, stage - 1, a.micro))
            elif a.kind == BACKWARD and stage < last_stage:
                need = ((r + 1) % pp, r, BACKWARD, (BACKWARD, stage + 1, a.micro))
            if need is not None:
                queue = channels.get(need[:width], [])
                if not queue:
                    continue
                if queue[0] != need[3]:
                    raise ScheduleError(f"rank {r} expects {need[3]} from rank {need[0]} but the next message "
                                        f"is {queue[0]}")
                queue.pop(0)
            if a.kind == FORWARD:
                if (r, a.chunk, a.micro) in done:
                    raise ScheduleError(f"rank {r} runs forward {a} twice")
                done.add((r, a.chunk, a.micro))
                if not forward_only:
                    live[r] += 1
                    max_live[r] = max(max_live[r], live[r])
                if stage < last_stage:
                    sends.append(((r, (r + 1) % pp, FORWARD), (FORWARD, stage, a.micro)))
            else:
                if (r, a.chunk, a.micro) not in done:
                    raise ScheduleError(f"rank {r} runs backward {a} before its forward")
                live[r] -= 1
                if stage > 0:
                    sends.append(((r, (r - 1) % pp, BACKWARD), (BACKWARD, stage, a.micro)))
            pos[r] += 1
            progressed = True
        for key, message in sends:  # delivered after the tick: a message takes one tick to arrive
            channels.setdefault(key[:width], []).append(message)
        if not progressed and not sends:
            stuck = {r: plans[r][pos[r]] for r in range(pp) if pos[r] < len(plans[r])}
            raise ScheduleError(f"deadlock: every unfinished rank waits for a message: {stuck}")
    return SimulationResult(ticks, max_live, [len(p) for p in plans])


# -- running a schedule ------------------------------------------------------------------------------
class _P2P:
    """Point-to-point exchange with the neighbouring pipeline ranks (same DP and TP coordinates)."""

    def __init__(self, state: ParallelState):
        self.state = state
        self.ranks = dist.get_process_group_ranks(state.pp_group) if state.pp_group is not None else [0]
        self.pending: list = []
        self.in_flight: list = []  # (work, tensor) until the send completes
        self.wait_s = 0.0

    def send(self, tensor: torch.Tensor, pp_rank: int, kind: str) -> None:
        tensor = tensor.contiguous()
        self.pending.append(dist.P2POp(dist.isend, tensor, self.ranks[pp_rank], tag=_TAGS[kind]))

    def recv(self, shape, dtype, device, pp_rank: int, kind: str) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        ops = self.pending + [dist.P2POp(dist.irecv, buf, self.ranks[pp_rank], tag=_TAGS[kind])]
        works = dist.batch_isend_irecv(ops)
        self.in_flight += [(w, op.tensor) for w, op in zip(works[:-1], self.pending)]
        self.pending = []
        start = time.perf_counter()
        works[-1].wait()
        self.wait_s += time.perf_counter() - start
        return buf

    def flush(self) -> None:
        """Post what is pending and wait for every send."""
        if self.pending:
            works = dist.batch_isend_irecv(self.pending)
            self.in_flight += [(w, op.tensor) for w, op in zip(works, self.pending)]
            self.pending = []
        start = time.perf_counter()
        for work, _ in self.in_flight:
            work.wait()
        self.wait_s += time.perf_counter() - start
        self.in_flight = []


@dataclass
class StepStats:
    """What one :meth:`PipelineEngine.run` did on this rank."""

    losses: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (sum, count) per micro-batch,
    #                                                                                   on the last stage
    max_live: int = 0  # most activation sets held at once
    wait_s: float = 0.0  # time spent waiting for messages
    total_s: float = 0.0


class PipelineEngine:
    """Runs this rank's model chunks through a schedule.

    ``chunks[c]`` is virtual stage ``c * pp + pp_rank``; ``activation_shape`` is the shape of the
    hidden states between stages for one micro-batch ((batch, seq, hidden), or (batch, seq / tp,
    hidden) under sequence parallelism).
    """

    def __init__(self, chunks: list[torch.nn.Module], state: ParallelState, activation_shape: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device):
        self.chunks, self.state = chunks, state
        self.vpp = len(chunks)
        self.shape, self.dtype, self.device = tuple(activation_shape), dtype, device
        self.last_stage = state.pp_size * self.vpp - 1

    def _stage(self, chunk: int) -> int:
        return chunk * self.state.pp_size + self.state.pp_rank

    def run(self, batches: list[dict[str, torch.Tensor]], *, loss_fn: LossFn, loss_scale: float,
            forward_only: bool = False,
            no_sync: Callable[[], contextlib.AbstractContextManager] | None = None) -> StepStats:
        """Forward (and backward) every micro-batch of ``batches`` (named tensors: ``tokens``, and
        whatever ``loss_fn`` reads; ``position_ids`` and ``doc_ids`` reach every chunk).

        On the last stage ``loss_fn(chunk, x, batch)`` runs the head and returns ``(loss_sum,
        count)``; backward starts from ``loss_sum * loss_scale`` (the engine's: data-parallel size over the
        step's global count, see megaevo.training.unit). Backwards run inside
        ``no_sync()`` except the last one of each chunk (that chunk's gradient reduction may then
        start while the remaining backwards run).
        """
        s = self.state
        p2p = _P2P(s)
        n = len(batches)
        plan = schedule(n, s.pp_size, s.pp_rank, self.vpp, forward_only)
        last_backward = {a.chunk: i for i, a in enumerate(plan) if a.kind == BACKWARD}
        stats = StepStats()
        saved: dict[tuple[int, int], tuple] = {}
        start = time.perf_counter()
        grad_mode = torch.no_grad() if forward_only else contextlib.nullcontext()
        with grad_mode:
            for i, a in enumerate(plan):
                stage = self._stage(a.chunk)
                chunk = self.chunks[a.chunk]
                if a.kind == FORWARD:
                    batch = batches[a.micro]
                    if stage == 0:
                        x = batch["tokens"]
                    else:
                        x = p2p.recv(self.shape, self.dtype, self.device, (s.pp_rank - 1) % s.pp_size, FORWARD)
                        x.requires_grad_(not forward_only)
                    if stage == self.last_stage:
                        loss_sum, count = loss_fn(chunk, x, batch)
                        out = loss_sum.float()
                        stats.losses.append((out.detach(), torch.as_tensor(count).detach()))
                    else:
                        out = chunk(x, position_ids=batch.get("position_ids"), doc_ids=batch.get("doc_ids"))
                        p2p.send(out.detach(), (s.pp_rank + 1) % s.pp_size, FORWARD)
                    if not forward_only:
                        saved[(a.chunk, a.micro)] = (x, out)
                        stats.max_live = max(stats.max_live, len(saved))
                else:
                    x, out = saved.pop((a.chunk, a.micro))
                    if stage == self.last_stage:
                        grad = None
                        out = out * loss_scale
                    else:
                        grad = p2p.recv(out.shape, out.dtype, self.device, (s.pp_rank + 1) % s.pp_size, BACKWARD)
                    sync = no_sync is None or i == last_backward[a.chunk]
                    with contextlib.nullcontext() if sync else no_sync():
                        torch.autograd.backward(out, grad)
                    if stage > 0:
                        p2p.send(x.grad, (s.pp_rank - 1) % s.pp_size, BACKWARD)
        p2p.flush()
        stats.wait_s = p2p.wait_s
        stats.total_s = time.perf_counter() - start
        return stats
