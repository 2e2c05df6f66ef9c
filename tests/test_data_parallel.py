"""Data parallelism and the (distributed) optimizer: DP=2 equals DP=1, bucket overlap, clipping, state."""
import math

import pytest
import torch
from torch import nn

from megaevo.parallel.data_parallel import GradBuffers
from megaevo.parallel.layers import tag_param
from megaevo.parallel.layout import ParamLayout, param_meta
from megaevo.parallel.state import ParallelState, init_parallel_state
from megaevo.training.optimizer import DistributedAdamW
from dist_utils import run_distributed

GLOBAL_BATCH, STEPS = 8, 3


class Net(nn.Module):
    """A small MLP with a no-decay gain vector, enough parameters for several buckets."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(16, 32) * 0.2)
        self.gain = tag_param(nn.Parameter(torch.ones(32)), ParamLayout(), weight_decay=False)
        self.w2 = nn.Parameter(torch.randn(32, 5) * 0.2)
        self.unused = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return torch.tanh(x @ self.w1) * self.gain @ self.w2


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randn(GLOBAL_BATCH, 5, generator=g)


def train(state: ParallelState, distributed: bool, micro_batch: int, steps=STEPS, clip=1.0, bucket=100):
    net = Net()
    params = dict(net.named_parameters())
    buffers = GradBuffers(params, state, torch.float32, bucket_size=bucket, distributed=distributed)
    metas = {n: param_meta(n, p) for n, p in params.items()}
    opt = DistributedAdamW(buffers, metas, state, lr=0.05, weight_decay=0.1, clip_grad=clip)
    per_rank = GLOBAL_BATCH // state.dp_size
    micro = per_rank // micro_batch
    losses, norms = [], []
    for step in range(steps):
        x, y = batch(step)
        x, y = x[state.dp_rank * per_rank:][:per_rank], y[state.dp_rank * per_rank:][:per_rank]
        buffers.zero_grad()
        total = 0.0
        for m in range(micro):
            xs, ys = x[m * micro_batch:][:micro_batch], y[m * micro_batch:][:micro_batch]
            loss = ((net(xs) - ys) ** 2).mean() / micro
            if m < micro - 1:
                with buffers.no_sync():
                    loss.backward()
            else:
                loss.backward()
            total += loss.item()
        buffers.finish_grad_sync()
        result = opt.step()
        losses.append(total)
        norms.append(result.grad_norm)
    return {"params": {n: p.detach().clone() for n, p in params.items()}, "norms": norms,
            "state": opt.local_state(), "buckets": len(buffers.buckets)}


def _dp_worker(rank, world):
    state = init_parallel_state(tp=1, pp=1)
    return {"plain": train(state, False, 2), "distributed": train(state, True, 2),
            "noclip": train(state, True, 4, clip=0.0)}


@pytest.mark.slow
def test_dp2_equals_dp1_with_and_without_distributed_optimizer():
    ref = train(ParallelState.single(), False, 4)
    ref_accum = train(ParallelState.single(), False, 2)  # gradient accumulation over 4 micro-batches
    ref_noclip = train(ParallelState.single(), False, 8, clip=0.0)
    assert ref["buckets"] > 1
    results = run_distributed(_dp_worker, 2)
    for name, p in ref["params"].items():
        torch.testing.assert_close(ref_accum["params"][name], p, rtol=1e-5, atol=1e-6)
        for r in range(2):
            for mode in ("plain", "distributed"):
                torch.testing.assert_close(results[r][mode]["params"][name], p, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(results[r]["noclip"]["params"][name], ref_noclip["params"][name],
                                       rtol=1e-5, atol=1e-6)
            for kind in ("master", "exp_avg", "exp_avg_sq"):  # the gathered optimizer state is whole
                torch.testing.assert_close(results[r]["distributed"]["state"][name][kind],
                                           ref["state"][name][kind], rtol=1e-5, atol=1e-7)
    for r in range(2):
        for a, b in zip(results[r]["distributed"]["norms"], ref["norms"]):
            assert math.isclose(a, b, rel_tol=1e-5)
    # The unused parameter never moves (no gradient, no decay from its zero start).
    assert torch.equal(ref["params"]["unused"], torch.zeros(3))


def test_clipping_uses_the_global_norm_and_nan_skips():
    state = ParallelState.single()
    net = Net()
    params = dict(net.named_parameters())
    buffers = GradBuffers(params, state, torch.float32, bucket_size=10**9)
    opt = DistributedAdamW(buffers, {n: param_meta(n, p) for n, p in params.items()}, state, lr=0.1,
                           clip_grad=0.5)
    x, y = batch(0)
    ((net(x) - y) ** 2).mean().backward()
    buffers.finish_grad_sync()
    expected = torch.sqrt(sum((p.main_grad.double() ** 2).sum() for p in params.values())).item()
    before = {n: p.detach().clone() for n, p in params.items()}
    result = opt.step()
    assert math.isclose(result.grad_norm, expected, rel_tol=1e-6) and not result.skipped
    buffers.grad_buffer[0] = float("nan")
    after = {n: p.detach().clone() for n, p in params.items()}
    result = opt.step()
    assert result.skipped and opt.step_count == 1
    assert all(torch.equal(after[n], p) for n, p in params.items())
    assert any(not torch.equal(before[n], after[n]) for n in params)


def test_state_round_trip_restores_the_run():
    state = ParallelState.single()
    a = train(state, False, 4, steps=2)
    net = Net()
    params = dict(net.named_parameters())
    buffers = GradBuffers(params, state, torch.float32)
    opt = DistributedAdamW(buffers, {n: param_meta(n, p) for n, p in params.items()}, state, lr=0.05)
    opt.load_local_state(a["state"], step=2)
    assert opt.local_state().keys() == a["state"].keys()
    for name, kinds in opt.local_state().items():
        for kind, t in kinds.items():
            assert torch.equal(t, a["state"][name][kind])


def test_groups_never_share_a_bucket_and_deferred_buckets_wait():
    net = Net()
    params = {n: p for n, p in net.named_parameters() if n != "unused"}
    groups = {"w1": 0, "gain": 0, "w2": 1}
    buffers = GradBuffers(params, ParallelState.single(), torch.float32, bucket_size=10**9, groups=groups,
                          deferred={"w1"})
    layout = [([buffers.names[p] for p in b.params], b.deferred) for b in buffers.buckets]
    assert layout == [(["w2"], False), (["gain"], False), (["w1"], True)]
    x, y = batch(0)
    ((net(x) - y) ** 2).mean().backward()  # the last micro-batch: every bucket but the deferred one starts
    assert [b.handle is not None for b in buffers.buckets] == [True, True, False]
    buffers.finish_grad_sync()
    assert all(b.handle is None for b in buffers.buckets)  # ready for the next step
