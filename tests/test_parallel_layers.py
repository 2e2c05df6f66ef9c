"""Tensor-parallel building blocks: compat collectives, state, mappings, layers, vocab-parallel loss.

The distributed checks share one spawn of 2 gloo processes; each is reported as its own test.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from dist_utils import assert_check_passed, run_checks, run_distributed
from megaevo.parallel import (ColumnParallelLinear, ParallelState, ParamLayout, RowParallelLinear,
                              VocabParallelEmbedding, allreduce_sequence_parallel_grads, compat, gather_from_sequence,
                              gather_from_tp, gather_vocab_logits, init_parallel_state, mappings, padded_vocab_size,
                              param_meta, reduce_scatter_to_sequence, scatter_to_sequence, scatter_to_tp,
                              vocab_parallel_cross_entropy)

WORLD = 2


def _close(a, b, **kw):
    torch.testing.assert_close(a, b, rtol=kw.get("rtol", 1e-5), atol=kw.get("atol", 1e-6))


def _tp_state(sequence_parallel=False):
    return init_parallel_state(tp=WORLD, sequence_parallel=sequence_parallel, device_type="cpu")


def _gather_logical(param_or_grad, layout, state):
    """Unshard a local tensor to its logical layout with an all-gather over TP."""
    parts = [torch.empty_like(param_or_grad) for _ in range(state.tp_size)]
    torch.distributed.all_gather(parts, param_or_grad.contiguous(), group=state.tp_group)
    return layout.unshard(parts)


# ---------------------------------------------------------------- distributed checks (run in the spawn)

def check_compat(rank, world):
    import torch.distributed as dist

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        x = torch.arange(3.0) + 10 * rank
        out = torch.empty(3 * world)
        compat.all_gather_into_tensor(out, x)
        _close(out, torch.cat([torch.arange(3.0) + 10 * r for r in range(world)]))
        big = torch.arange(2.0 * world) * (rank + 1)
        piece = torch.empty(2)
        compat.reduce_scatter_tensor(piece, big)
        total = sum(r + 1 for r in range(world))
        _close(piece, (torch.arange(2.0 * world) * total)[2 * rank: 2 * rank + 2])
        work = compat.all_reduce(x.clone(), async_op=True)
        work.wait()
        group = dist.group.WORLD
        g = compat.functional_all_gather(torch.full((2,), float(rank)), 0, group)
        _close(torch.as_tensor(g).clone(), torch.tensor([0.0, 0.0, 1.0, 1.0]))
        rs = compat.functional_reduce_scatter(torch.ones(2 * world), "sum", 0, group)
        _close(torch.as_tensor(rs).clone(), torch.full((2,), float(world)))


def check_state(rank, world):
    tp = _tp_state(sequence_parallel=True)
    assert (tp.tp_size, tp.dp_size, tp.pp_size) == (2, 1, 1) and tp.tp_rank == rank
    assert tp.tp_group is not None and tp.dp_group is None and tp.sequence_parallel_active
    dp = init_parallel_state(tp=1, pp=1, device_type="cpu")
    assert (dp.tp_size, dp.dp_size, dp.dp_rank, dp.tp_group) == (1, 2, rank, None)
    pp = init_parallel_state(pp=2, device_type="cpu")
    assert (pp.pp_size, pp.pp_rank, pp.is_first_stage, pp.is_last_stage) == (2, rank, rank == 0, rank == 1)
    with pytest.raises(ValueError, match="must equal the world size"):
        init_parallel_state(tp=2, dp=2, device_type="cpu")


def check_mappings(rank, world):
    state = _tp_state()
    g = state.tp_group
    torch.manual_seed(0)
    full = torch.randn(2, 4, 6, requires_grad=True)
    # scatter / gather along the last dim round trip; the gradient comes back whole
    local = scatter_to_tp(full, g)
    _close(local, full.detach().chunk(world, -1)[rank])
    back = gather_from_tp(local, g)
    _close(back, full.detach())
    back.backward(torch.ones_like(back) * (rank + 1))
    # gather's backward keeps each rank's slice of its gradient, scatter's backward gathers the slices
    expect = torch.cat([torch.full((2, 4, 6 // world), float(r + 1)) for r in range(world)], dim=-1)
    _close(full.grad, expect)
    # copy / reduce: forward sum and gradient sum
    x = torch.full((3,), float(rank + 1), requires_grad=True)
    y = mappings.reduce_from_tp(mappings.copy_to_tp(x, g) * 2, g)
    _close(y, torch.full((3,), 2.0 * sum(range(1, world + 1))))
    y.sum().backward()
    _close(x.grad, torch.full((3,), 2.0 * world))
    # sequence round trip: scatter then gather is the identity, for values and gradients
    seq = torch.randn(2, 4, 5, requires_grad=True)
    part = scatter_to_sequence(seq, g)
    assert part.shape == (2, 2, 5)
    whole = gather_from_sequence(part, g, reduce_grad=False)
    _close(whole, seq.detach())
    whole.backward(seq.detach())
    _close(seq.grad, seq.detach())
    # reduce-scatter along the sequence, and its gradient (all-gather)
    z = (torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3) * (rank + 1)).requires_grad_()
    rs = reduce_scatter_to_sequence(z, g)
    expect = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3) * sum(range(1, world + 1))
    _close(rs, expect.chunk(world, 1)[rank])
    rs.backward(torch.full_like(rs, float(rank + 1)))
    _close(z.grad, torch.cat([torch.full((2, 2, 3), float(r + 1)) for r in range(world)], dim=1))
    # all-gather along the sequence with a reduce-scattered gradient
    p = torch.randn(2, 2, 3, requires_grad=True)
    out = gather_from_sequence(p, g)
    out.backward(torch.ones_like(out))
    _close(p.grad, torch.full_like(p, float(world)))


def _linear_reference(x, w, b=None):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    y = F.linear(x, w, b)
    return x, w, b, y


def check_column_row(rank, world):
    state = _tp_state()
    torch.manual_seed(1)
    x_full = torch.randn(2, 4, 8)
    w1, b1 = torch.randn(12, 8), torch.randn(12)
    w2, b2 = torch.randn(8, 12), torch.randn(8)
    col = ColumnParallelLinear(8, 12, state, bias=True, gather_output=True)
    row = RowParallelLinear(12, 8, state, bias=True, input_is_parallel=False)
    with torch.no_grad():
        col.weight.copy_(col.weight.tp_layout.shard(w1, rank, world))
        col.bias.copy_(col.bias.tp_layout.shard(b1, rank, world))
        row.weight.copy_(row.weight.tp_layout.shard(w2, rank, world))
        row.bias.copy_(b2)
    x = x_full.clone().requires_grad_()
    y = row(col(x))
    rx, rw1, rb1, h = _linear_reference(x_full, w1, b1)
    rw2 = w2.clone().requires_grad_()
    rb2 = b2.clone().requires_grad_()
    ref = F.linear(h, rw2, rb2)
    _close(y, ref)
    grad_out = torch.randn_like(ref)
    y.backward(grad_out)
    ref.backward(grad_out)
    _close(x.grad, rx.grad)
    _close(_gather_logical(col.weight.grad, col.weight.tp_layout, state), rw1.grad)
    _close(_gather_logical(col.bias.grad, col.bias.tp_layout, state), rb1.grad)
    _close(_gather_logical(row.weight.grad, row.weight.tp_layout, state), rw2.grad)
    _close(row.bias.grad, rb2.grad)


def check_column_row_parallel_pair(rank, world):
    """The MLP pattern: column (no gather) -> row (input parallel), with and without sequence parallel."""
    for sp in (False, True):
        state = _tp_state(sequence_parallel=sp)
        torch.manual_seed(2)
        x_full = torch.randn(2, 4, 8)
        w_gate_up, w_down = torch.randn(2 * 6, 8), torch.randn(8, 6)
        col = ColumnParallelLinear(8, 12, state, chunks=(6, 6))
        row = RowParallelLinear(6, 8, state)
        with torch.no_grad():
            col.weight.copy_(col.weight.tp_layout.shard(w_gate_up, rank, world))
            row.weight.copy_(row.weight.tp_layout.shard(w_down, rank, world))
        x = (x_full.chunk(world, 1)[rank] if sp else x_full).clone().requires_grad_()
        gate, up = col(x).chunk(2, -1)
        y = row(F.silu(gate) * up)
        rx = x_full.clone().requires_grad_()
        rw1, rw2 = w_gate_up.clone().requires_grad_(), w_down.clone().requires_grad_()
        rg, ru = F.linear(rx, rw1).chunk(2, -1)
        ref = F.linear(F.silu(rg) * ru, rw2)
        _close(y, ref.chunk(world, 1)[rank] if sp else ref)
        y.sum().backward()
        ref.sum().backward()
        _close(x.grad, rx.grad.chunk(world, 1)[rank] if sp else rx.grad)
        _close(_gather_logical(col.weight.grad, col.weight.tp_layout, state), rw1.grad)
        _close(_gather_logical(row.weight.grad, row.weight.tp_layout, state), rw2.grad)


def check_vocab_embedding(rank, world):
    for sp, vocab, padded in ((False, 300, None), (True, 300, None), (False, 100, 512)):
        state = _tp_state(sequence_parallel=sp)
        torch.manual_seed(3)
        table = torch.randn(vocab, 6)
        emb = VocabParallelEmbedding(vocab, 6, state, padded_num_embeddings=padded)
        assert emb.padded_num_embeddings == (padded or padded_vocab_size(vocab, world))
        with torch.no_grad():
            emb.weight.copy_(emb.weight.tp_layout.shard(table, rank, world))
        ids = torch.randint(0, vocab, (2, 4))
        ids[0, 0], ids[1, 3] = vocab - 1, 0
        out = emb(ids)
        rt = table.clone().requires_grad_()
        ref = F.embedding(ids, rt)
        _close(out, ref.chunk(world, 1)[rank] if sp else ref)
        grad = torch.randn_like(ref)
        out.backward(grad.chunk(world, 1)[rank] if sp else grad)
        ref.backward(grad)
        _close(_gather_logical(emb.weight.grad, emb.weight.tp_layout, state), rt.grad)
        local = emb.weight.shape[0]
        pad_rows = [i for i in range(local) if rank * local + i >= vocab]
        if pad_rows:
            assert emb.weight.grad[pad_rows].abs().max() == 0 and emb.weight[pad_rows].abs().max() == 0


def check_vocab_cross_entropy(rank, world):
    state = _tp_state()
    for vocab, padded in ((300, 512), (100, 512), (256, 256)):
        torch.manual_seed(4)
        logits_real = torch.randn(2, 5, vocab)
        target = torch.randint(0, vocab, (2, 5))
        target[0, 1] = -100
        target[1, 4] = vocab - 1
        # the padded logits hold garbage that must not matter
        padded_logits = torch.cat([logits_real, 50 * torch.randn(2, 5, padded - vocab)], dim=-1)
        local = padded_logits.chunk(world, -1)[rank].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target, state, vocab_size=vocab)
        rl = logits_real.clone().requires_grad_()
        ref = F.cross_entropy(rl.reshape(-1, vocab), target.reshape(-1), ignore_index=-100,
                              reduction="none").reshape(2, 5)
        _close(loss, ref)
        weights = torch.rand(2, 5)
        (loss * weights).sum().backward()
        (ref * weights).sum().backward()
        full_grad = torch.cat([rl.grad, torch.zeros(2, 5, padded - vocab)], dim=-1)
        _close(local.grad, full_grad.chunk(world, -1)[rank])
        assert torch.isfinite(local.grad).all()
        # gathering for eval drops the padding (only after masking it)
        full = gather_vocab_logits(local.detach(), state, vocab)
        _close(full, logits_real)


def check_sequence_parallel_grad_sync(rank, world):
    state = _tp_state(sequence_parallel=True)
    from megaevo.parallel import tag_param

    p = tag_param(torch.nn.Parameter(torch.zeros(3)), ParamLayout(), sequence_parallel=True)
    q = tag_param(torch.nn.Parameter(torch.zeros(2)), ParamLayout())
    p.grad = torch.full((3,), float(rank + 1))
    q.grad = torch.full((2,), float(rank + 1))
    allreduce_sequence_parallel_grads([p, q], state)
    _close(p.grad, torch.full((3,), float(sum(range(1, world + 1)))))
    _close(q.grad, torch.full((2,), float(rank + 1)))  # not tagged: untouched


CHECKS = {name: fn for name, fn in globals().items() if name.startswith("check_")}


def _run_all(rank, world):
    return run_checks(rank, world, CHECKS)


@pytest.fixture(scope="module")
def dist_results():
    return run_distributed(_run_all, WORLD)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_distributed(dist_results, name):
    assert_check_passed(dist_results, name)


# ---------------------------------------------------------------- single process

def test_single_state_layers_are_plain_torch():
    state = ParallelState.single(sequence_parallel=True)
    assert state.tp_group is None and not state.sequence_parallel_active
    torch.manual_seed(5)
    col = ColumnParallelLinear(4, 6, state, bias=True)
    row = RowParallelLinear(6, 4, state)
    emb = VocabParallelEmbedding(10, 4, state)
    assert emb.weight.shape == (128, 4)
    ids = torch.tensor([[1, 9]])
    x = emb(ids)
    _close(x, F.embedding(ids, emb.weight))
    _close(row(col(x)), F.linear(F.linear(x, col.weight, col.bias), row.weight))


def test_init_is_layout_independent():
    """A layer built at TP=2 holds slices of the same logical weight as at TP=1 for the same seed."""
    one = ParallelState.single()
    torch.manual_seed(6)
    ref = ColumnParallelLinear(4, 8, one, chunks=(4, 4)).weight.detach()
    shards = []
    for r in range(2):
        torch.manual_seed(6)
        shards.append(ColumnParallelLinear(4, 8, ParallelState(tp_size=2, tp_rank=r), chunks=(4, 4)).weight.detach())
    _close(ParamLayout(0, (4, 4)).unshard(shards), ref)


@pytest.mark.parametrize("layout,shape", [
    (ParamLayout(0), (8, 3)),
    (ParamLayout(1), (3, 8)),
    (ParamLayout(0, chunks=(4, 12)), (16, 2)),
    (ParamLayout(0, logical_size=5, padded_size=8), (5, 2)),
    (ParamLayout(0, logical_size=3, padded_size=16), (3, 2)),
])
def test_layout_shard_unshard_fragments(layout, shape):
    full = torch.arange(torch.tensor(shape).prod().item(), dtype=torch.float32).reshape(shape)
    for tp in (1, 2, 4):
        shards = [layout.shard(full, r, tp) for r in range(tp)]
        _close(layout.unshard(shards), full)
        rebuilt = torch.full_like(full, -1.0)
        for r, local in enumerate(shards):
            for frag in layout.fragments(local.shape, r, tp):
                index = tuple(slice(o, o + s) for o, s in zip(frag.logical_offset, frag.shape))
                assert (rebuilt[index] == -1).all(), "fragments overlap"
                rebuilt[index] = frag.local_view(local)
            assert layout.logical_shape(local.shape, tp) == tuple(shape)
        _close(rebuilt, full)


def test_param_meta_is_json():
    state = ParallelState(tp_size=2, tp_rank=1)
    lin = ColumnParallelLinear(4, 8, state, chunks=(4, 4))
    meta = param_meta("layers.3.mlp.gate_up.weight", lin.weight, state.tp_rank, state.tp_size)
    d = json.loads(json.dumps(meta.to_dict()))
    assert d["logical_shape"] == [8, 4] and d["chunks"] == [4, 4] and d["partition_dim"] == 0
    assert [f.logical_offset for f in meta.fragments(lin.weight.shape)] == [(2, 0), (6, 0)]


def test_not_divisible_errors():
    state = ParallelState(tp_size=4, tp_rank=0)
    with pytest.raises(ValueError, match="not divisible by tensor_parallel"):
        ColumnParallelLinear(4, 6, state)
    with pytest.raises(ValueError, match="not divisible by tensor_parallel"):
        RowParallelLinear(6, 4, state)
    with pytest.raises(ValueError, match="chunk"):
        ColumnParallelLinear(4, 16, state, chunks=(6, 10))
