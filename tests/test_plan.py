"""The layout planner (megaevo.plan): legal layouts, exact buffer sizes, the CLI, the check before a run."""
from __future__ import annotations

import json

import pytest

from megaevo.cli import main
from megaevo.model.args import ModelArgs
from megaevo.plan import Candidate, Workload, check_fits, hardware, plan
from megaevo.plan import model as plan_model
from megaevo.plan.model import padded_vocab

ROW_KEYS = {"tp", "pp", "dp", "virtual_pp", "micro_batch_size", "recompute", "distributed_optimizer", "memory_gb",
            "memory", "fits", "step_s", "tokens_per_s", "mfu", "overrides"}


def test_every_layout_is_legal_and_ranked_fitting_fastest_first():
    shape = ModelArgs.from_preset("evolm-4b")
    ranked = plan(Workload(shape, 2048, 512), hardware("h100-80g"), 64)
    assert ranked
    for e in ranked:
        c = e.candidate
        assert c.tp * c.pp * c.dp == 64 and c.tp <= 8
        assert shape.num_heads % c.tp == 0 and shape.num_kv_heads % c.tp == 0 and shape.ffn_hidden_size % c.tp == 0
        assert shape.num_layers % (c.pp * c.virtual_pp) == 0
        assert (512 // c.dp) % c.micro_batch_size == 0
        assert not c.sequence_parallel or c.tp > 1
    fits = [e.fits for e in ranked]
    assert fits == sorted(fits, reverse=True)
    times = [e.step_s for e in ranked if e.fits]
    assert times == sorted(times)
    # ZeRO-1 shards the optimizer state over DP; recompute shrinks activations
    base = next(e for e in ranked if e.candidate.dp > 1 and not e.candidate.distributed_optimizer)
    zero = next(e for e in ranked if e.candidate == Candidate(**{**base.candidate.__dict__, "distributed_optimizer": True}))
    assert zero.memory["optimizer"] < base.memory["optimizer"] / (base.candidate.dp / 2)
    full = next(e for e in ranked if e.candidate == Candidate(**{**base.candidate.__dict__, "recompute": "full"}))
    assert full.memory["activations"] < base.memory["activations"] / 4


def test_in_flight_and_vocab_padding_follow_the_engine():
    from megaevo.parallel.layers import padded_vocab_size
    from megaevo.common import activation_bound
    from megaevo.parallel.pipeline import simulate

    assert plan_model.activation_bound is activation_bound  # one rule: the engine's schedule's bound
    for m, pp, vpp in ((8, 4, 1), (8, 4, 2), (4, 4, 2), (2, 4, 1), (12, 2, 3)):
        live = simulate(m, pp, vpp).max_live
        for r in range(pp):
            assert live[r] <= plan_model.activation_bound(m, pp, r, vpp)
    shape = ModelArgs.from_preset("evolm-1b")
    for tp in (1, 2, 4, 8):
        assert padded_vocab(shape, tp) == padded_vocab_size(shape.vocab_size, tp, shape.vocab_pad_multiple)


def test_cli_prints_a_ranked_table_with_overrides(capsys):
    assert main(["plan", "--model", "evolm-4b", "--seq-len", "2048", "--global-batch", "512", "--gpus", "64",
                 "--gpu", "h100-80g", "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 + 3 and all("parallel.tp=" in x and "parallel.pp=" in x for x in lines[3:])


def test_cli_json_rows(capsys):
    assert main(["plan", "--model", "evolm-1b", "--gpus", "8", "--global-batch", "64", "--gpu", "a100-80g",
                 "--intra-node", "nvlink3", "--inter-node", "25", "--json", "--top", "4"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and all(ROW_KEYS <= set(r) for r in rows)
    assert all(abs(sum(r["memory"].values()) - r["memory_gb"]) < 0.01 for r in rows)


@pytest.mark.parametrize("argv, words", [
    (["--model", "evolm-4b", "--gpus", "3"], "no layout splits 3 GPUs"),
    (["--model", "evolm-5b", "--gpus", "8"], "unknown model preset"),
    (["--model", "evolm-4b", "--gpus", "64", "--tp", "16"], "--tp 16 is above --gpus-per-node 8"),
    (["--model", "evolm-4b", "--gpus", "8", "--gpu", "v100"], "unknown GPU"),
    (["--model", "evolm-4b", "--gpus", "8", "--inter-node", "carrier-pigeon"], "unknown interconnect"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, words):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: megaevo plan: ") and words in err


def test_check_fits_names_the_biggest_term_and_a_layout_that_fits():
    w = Workload(ModelArgs.from_preset("evolm-1b"), 2048, 64)
    own = Candidate(1, 1, 8, micro_batch_size=8)
    fit = check_fits(w, own, 24 * 2**30, gpus_per_node=8)
    assert not fit.estimate.fits and fit.best is not None and fit.best.fits
    message = fit.message()
    assert fit.estimate.biggest_term == "activations" and "biggest term is activations" in message
    assert " ".join(fit.best.candidate.overrides()) in message
    assert check_fits(w, own, 200 * 2**30, gpus_per_node=8).estimate.fits


def test_train_refuses_a_layout_that_cannot_fit_before_allocating(tmp_path, monkeypatch):
    from megaevo.config import config_from_dict
    from megaevo.errors import UserError
    from megaevo.stages import build_stage
    from megaevo.training import trainer

    def no_model(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(trainer, "build_model", no_model)
    monkeypatch.setenv("MEGAEVO_DEVICE_MEMORY_GB", "0.01")  # a fake 10 MB device on the CPU
    cfg = config_from_dict({"model": {"preset": "tiny"}, "train": {"micro_batch_size": 4, "global_batch_size": 8},
                            "data": {"seq_len": 256}, "out_dir": str(tmp_path)})
    with pytest.raises(UserError) as e:
        trainer.Trainer(cfg, build_stage)
    message = str(e.value)
    assert "\n" not in message and "biggest term is" in message and "GB per GPU" in message
    assert message.endswith("(train.memory_check=false runs it anyway)")
    skipped = config_from_dict({"model": {"preset": "tiny"}, "train": {"micro_batch_size": 4, "global_batch_size": 8,
                                                                     "memory_check": False},
                                "data": {"seq_len": 256}, "out_dir": str(tmp_path)})
    with pytest.raises(AssertionError, match="the model was built"):  # not checked: the run goes on
        trainer.Trainer(skipped, build_stage)
    # with enough memory the check passes and the run goes on to build its model
    monkeypatch.setenv("MEGAEVO_DEVICE_MEMORY_GB", "64")
    with pytest.raises(AssertionError, match="the model was built"):
        trainer.Trainer(cfg, build_stage)


@pytest.mark.slow
def test_plan_check_terms_are_exact_and_activations_within_10_percent(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # spawned ranks too
    import plan_check as check
    layouts = {name: lay for name, *rest in check.LAYOUTS for lay in [(name, *rest)]}
    rows = check.run_layout("tiny", layouts["tp1-pp1-dp1-selective"], 2, 32, 25.0)
    rows += check.run_layout("tiny", layouts["tp2-pp2-dp2-zero1-sp-selective"], 2, 32, 0.05)
    assert len(rows) == 8
    for r in rows:
        if r["term"] == "activations":
            assert abs(r["ratio"] - 1) <= 0.10, r
        else:
            assert r["estimate_bytes"] == r["measured_bytes"], r


def test_suite_dry_run_reports_each_runs_layout_and_gpu_hours(tmp_path):
    from megaevo.suite.plan import make_plan
    from megaevo.suite.spec import load_spec
    from megaevo.suite.tree import expand
    from test_suite import SPEC, write_spec

    spec = load_spec(write_spec(tmp_path, SPEC))
    runs = expand(spec)
    plan = make_plan(spec, runs, tmp_path / "out")
    fixed = [r for r in runs if r.stage in ("pretrain", "cpt")]
    assert plan.estimates[0].startswith("estimated GPU-hours per run")
    assert len(plan.estimates) == 1 + len(fixed)
    assert all("GPU-hours" in x and "MFU" in x and "tp 1 pp 1" in x for x in plan.estimates[1:])
    assert plan.estimates[1] in plan.lines()
