"""Pipeline parallelism: schedules checked without processes, and TP x PP x DP runs equal to one process."""
import json
import math
from pathlib import Path

import pytest
import torch

import torch.distributed as dist

from megaevo.checkpoint import LoadedCheckpoint
from megaevo.convert import reshard
from megaevo.model import ModelArgs
from megaevo.model.llama import build_chunks
from megaevo.common import activation_bound
from megaevo.parallel.pipeline import BACKWARD, FORWARD, ScheduleError, schedule, simulate
from megaevo.parallel.state import ParallelState
from dist_utils import run_distributed
from helpers import assert_close_runs, config, fit, logical_weights, make_data

GRID = [(m, pp, v) for pp in (2, 3, 4) for v in (1, 2, 3) for m in range(1, 13) if v == 1 or m % pp == 0]


@pytest.mark.parametrize("m,pp,v", GRID)
def test_schedules_complete_in_order(m, pp, v):
    """Every forward and backward runs once, backward after forward, no rank waits forever, and every
    receive gets the micro-batch it expects (simulate raises otherwise)."""
    for r in range(pp):
        plan = schedule(m, pp, r, v)
        assert sorted((a.kind, a.chunk, a.micro) for a in plan) == sorted(
            (k, c, i) for k in (FORWARD, BACKWARD) for c in range(v) for i in range(m))
    result = simulate(m, pp, v)
    # One tick per action of a chunk: the step takes 2 (v m + p - 1) ticks, i.e. a bubble of
    # (p - 1) / (v m + p - 1) of the step, (p - 1) / (m + p - 1) without interleaving.
    assert result.ticks == 2 * (v * m + pp - 1)
    for r in range(pp):
        assert result.max_live[r] <= activation_bound(m, pp, r, v)
        if v == 1:  # 1F1B: at most pp - r micro-batches alive, however many micro-batches there are
            assert result.max_live[r] == min(pp - r, m)
    simulate(m, pp, v, forward_only=True)
    # Receives match their messages by order alone too, as NCCL (which ignores tags) needs: with
    # two stages the wrap-around of the interleaved schedule carries activations and gradients
    # over the same pair of ranks.
    assert simulate(m, pp, v, tags=False).ticks == result.ticks


def test_interleaving_needs_whole_groups_of_micro_batches():
    with pytest.raises(ScheduleError, match=r"micro-batches per step \(6\) to be a multiple of parallel.pp=4"):
        schedule(6, 4, 0, 2)


def test_chunks_hold_the_virtual_stages():
    args = ModelArgs(num_layers=6, hidden_size=32, num_heads=4, num_kv_heads=2, ffn_hidden_size=64, vocab_size=100,
                     max_seq_len=16, tie_embeddings=True)
    ranges = {}
    for rank in range(2):
        for c, chunk in enumerate(build_chunks(args, ParallelState(pp_size=2, pp_rank=rank), virtual_pp=2,
                                               layers_per_stage=[2, 1, 2, 1])):
            ranges[c * 2 + rank] = (chunk.first_layer, chunk.end_layer, chunk.has_embedding, chunk.has_head)
            names = [n for n, _, _ in chunk.named_parameters_with_meta()]
            if chunk.has_head:  # the tied copy of the embedding, under its logical name
                assert "embedding.weight" in names and not chunk.has_embedding
    assert ranges == {0: (0, 2, True, False), 1: (2, 3, False, False), 2: (3, 5, False, False),
                      3: (5, 6, False, True)}


# -- TP x PP x DP against one process ----------------------------------------------------------------
ITERS = 4


def pipeline_config(data, out, **overrides):
    base = {"model.num_layers": 6, "model.tie_embeddings": True, "train.micro_batch_size": 1,
            "train.global_batch_size": 16, "train.iters": ITERS, "train.eval_interval": 2, "checkpoint.interval": 2}
    return config(data, out, **{**base, **overrides})


RUNS = {
    "tp2pp2dp2": {"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True,
                  "parallel.distributed_optimizer": True},
    "interleaved": {"parallel.tp": 2, "parallel.pp": 2, "parallel.virtual_pp": 2, "parallel.pp_layers": "[2,1,2,1]"},
    "pp4_uneven": {"parallel.pp": 4, "parallel.pp_layers": "[1,2,2,1]", "model.tie_embeddings": False},
}


def _pipeline_runs(rank, world, data, root):
    out = {}
    for name, extra in RUNS.items():
        losses, trainer = fit(pipeline_config(data, Path(root) / name, **extra))
        stats = trainer.actor.last_step_stats
        out[name] = {"losses": losses, "pp_rank": trainer.state.pp_rank, "max_live": stats.max_live,
                     "micro": trainer.layout.micro_batches_per_step}
    # Reshard the PP=2 run's checkpoint offline for TP=1 x PP=4 (uneven split) and resume it there:
    # each rank reads its own file only (the last stage also the first's, for the tied embedding).
    ck = Path(root) / "tp2pp2dp2" / "checkpoints" / "iter_0000002"
    converted = Path(root) / "converted_1x4"
    if rank == 0:
        reshard(ck, converted, tp=1, pp=4, pp_layers=[1, 2, 2, 1], progress=False)
    dist.barrier()
    opened = set()
    real = LoadedCheckpoint._file
    LoadedCheckpoint._file = lambda self, name: opened.add(name) or real(self, name)
    try:
        losses, trainer = fit(pipeline_config(data, Path(root) / "resume_pp4", **{
            "parallel.pp": 4, "parallel.pp_layers": "[1,2,2,1]", "checkpoint.load": str(converted)}))
    finally:
        LoadedCheckpoint._file = real
    out["resume_pp4"] = {"losses": losses, "opened": sorted(opened), "pp_rank": trainer.state.pp_rank}
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def _reference(data, out, **overrides):
    losses, _ = fit(pipeline_config(data, out, **overrides))
    return losses, logical_weights(out / "checkpoints" / f"iter_{ITERS:07d}")


def _validation(out: Path) -> dict:
    """{(step, val/name): loss} from a run's metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): v for r in records for k, v in r.items() if k.startswith("val/")}


def _assert_losses(losses, expected, name):
    assert len(losses) == len(expected), name
    for a, b in zip(losses, expected):
        assert math.isclose(a, b, rel_tol=1e-5), (name, losses, expected)


@pytest.mark.slow
def test_pipeline_layouts_match_one_process(data, tmp_path):
    results = run_distributed(_pipeline_runs, 8, data, str(tmp_path))
    tied = _reference(data, tmp_path / "ref_tied")
    untied = _reference(data, tmp_path / "ref_untied", **{"model.tie_embeddings": False})
    for name, (losses, weights), ref in (("tp2pp2dp2", tied, "ref_tied"), ("interleaved", tied, "ref_tied"),
                                         ("pp4_uneven", untied, "ref_untied")):
        _assert_losses(results[0][name]["losses"], losses, name)
        assert_close_runs(logical_weights(tmp_path / name / "checkpoints" / f"iter_{ITERS:07d}"), weights)
        # Validation runs forward-only through the pipeline: the same per-corpus losses.
        got, want = _validation(tmp_path / name), _validation(tmp_path / ref)
        assert len(want) == 2 * 2 and got.keys() == want.keys(), (got, want)
        _assert_losses(list(got.values()), list(want.values()), name + " validation")
    _assert_losses(results[0]["resume_pp4"]["losses"], tied[0][2:], "resume_pp4")
    assert_close_runs(logical_weights(tmp_path / "resume_pp4" / "checkpoints" / f"iter_{ITERS:07d}"), tied[1])
    for r in results:
        stage = r["resume_pp4"]["pp_rank"]
        assert r["resume_pp4"]["opened"] == sorted({f"model_tp0_pp{stage}.safetensors"} |
                                                   ({"model_tp0_pp0.safetensors"} if stage == 3 else set()))
    # The original checkpoint continues at PP = 1 directly, and converted to 1 x 1 x 1.
    original = tmp_path / "tp2pp2dp2" / "checkpoints" / "iter_0000002"
    reshard(tmp_path / "converted_1x4", tmp_path / "converted_1x1", progress=False)
    for name, source in (("resume_pp1", original), ("resume_converted_1x1", tmp_path / "converted_1x1")):
        losses, _ = fit(pipeline_config(data, tmp_path / name, **{"checkpoint.load": str(source)}))
        _assert_losses(losses, tied[0][2:], name)
        assert_close_runs(logical_weights(tmp_path / name / "checkpoints" / f"iter_{ITERS:07d}"), tied[1])
    # And back to TP=2 x PP=2: every tensor, optimizer state included, is what the run saved.
    back = reshard(tmp_path / "converted_1x1", tmp_path / "back_2x2", tp=2, pp=2, progress=False)
    a, b = LoadedCheckpoint(original), LoadedCheckpoint(back)
    assert sorted(a.meta["tensors"]) == sorted(b.meta["tensors"]) == ["exp_avg", "exp_avg_sq", "master", "model"]
    for kind in a.meta["tensors"]:
        assert sorted(a.names(kind)) == sorted(b.names(kind))
        for n in a.names(kind):
            assert torch.equal(a.tensor(kind, n), b.tensor(kind, n)), (kind, n)
    # Live activations per stage: the 1F1B bound (pp - stage), well under the 8 micro-batches of a step.
    for name, vpp in (("tp2pp2dp2", 1), ("interleaved", 2)):
        for r in results:
            run = r[name]
            assert run["micro"] == 8
            assert run["max_live"] == activation_bound(8, 2, run["pp_rank"], vpp), (name, run)
    assert [r["tp2pp2dp2"]["max_live"] for r in results] == [2, 2, 2, 2, 1, 1, 1, 1]

