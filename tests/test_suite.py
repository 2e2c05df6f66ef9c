"""megaevo suite: the grid's run tree, the local and slurm launchers, the results table."""
from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from megaevo.suite import expand, load_spec, main, select
from megaevo.suite.launch import run_local, run_slurm, sbatch_script
from megaevo.suite.results import collect, write_results
from megaevo.suite.spec import SpecError

SPEC = """
overrides: [model.num_layers=2, model.hidden_size=64, train.iters=4]
stages:
  - stage: pretrain
    overrides: {optim.lr: 3.0e-4}
    axes:
      tokens: {small: [train.iters=10], big: [train.iters=20]}
    eval: {tasks: [hellaswag, arc_easy], limit: 5}
  - stage: cpt
    axes:
      - name: replay
        values:
          - {value: 0.0, set: {data.train: [1.0, data/math]}}
          - {value: 0.05, set: ["data.train=[0.95, data/math, 0.05, data/web]"]}
      - name: lr
        values:   # two labels, one config: one run
          - {value: a, set: [optim.lr=1e-4]}
          - {value: b, set: [optim.lr=0.0001]}
  - stage: sft
    axes:
      - {name: epochs, key: train.epochs, values: [1, 2]}
    eval: {tasks: [gsm8k_platinum], limit: 3, samples: 2}
    nproc: 2
    slurm: {nodes: 2, gpus_per_node: 4, time: "01:00:00", partition: gpu, sbatch: ["--account=lm"]}
"""


def write_spec(tmp_path: Path, text: str = SPEC, name: str = "suite.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------------------------------- the tree


def test_grid_expands_into_a_tree_with_shared_runs(tmp_path):
    runs = expand(load_spec(write_spec(tmp_path)))
    by_stage = {s: [r for r in runs if r.stage == s] for s in ("pretrain", "cpt", "sft")}
    # 2 pretrain; 2 replay x (lr a == lr b) = 2 cpt per parent; 2 epochs per cpt
    assert [len(by_stage[s]) for s in ("pretrain", "cpt", "sft")] == [2, 4, 8]
    for r in runs:  # parents come first
        assert r.parent is None or runs.index(r.parent) < runs.index(r)
    cpt = by_stage["cpt"][0]
    assert cpt.points == [{"lr": "a", "replay": 0.0}, {"lr": "b", "replay": 0.0}]
    assert cpt.axes == {"tokens": "small", "lr": ["a", "b"], "replay": 0.0}
    assert cpt.name == 'pretrain[tokens=small]/cpt[lr=a|b,replay=0.0]'
    # resolved configs
    pre = by_stage["pretrain"]
    assert [r.config["train"]["iters"] for r in pre] == [10, 20]
    assert pre[0].config["optim"]["lr"] == 3e-4 and pre[0].config["model"]["num_layers"] == 2
    assert pre[0].config["checkpoint"]["load"] == "auto"
    assert {tuple(r.config["data"]["train"]) for r in by_stage["cpt"]} == {
        (1.0, "data/math"), (0.95, "data/math", 0.05, "data/web")}
    assert all(r.config["stage"] == "pretrain" for r in by_stage["cpt"])
    sft = by_stage["sft"][0]
    assert sft.config["stage"] == "sft" and sft.config["train"]["epochs"] in (1, 2)
    resolved = sft.resolved(tmp_path / "out")
    assert resolved["checkpoint"]["load"] == str((tmp_path / "out" / "runs" / sft.parent.dir_name).resolve())
    assert resolved["checkpoint"]["finetune"] is True
    assert resolved["out_dir"] == str((tmp_path / "out" / "runs" / sft.dir_name).resolve())
    # train.yaml records relative paths absolute, against the spec's directory (the id keeps them as written)
    cpt_run = [r for r in by_stage["cpt"] if r.config["data"]["train"] == [1.0, "data/math"]][0]
    assert cpt_run.resolved(tmp_path / "out")["data"]["train"] == [1.0, str(tmp_path.resolve() / "data" / "math")]


def test_ids_are_stable_and_independent_of_axis_order(tmp_path):
    a = [r.id for r in expand(load_spec(write_spec(tmp_path)))]
    assert a == [r.id for r in expand(load_spec(write_spec(tmp_path)))]
    swapped = SPEC.replace("small: [train.iters=10], big: [train.iters=20]", "big: [train.iters=20], small: "
                           "[train.iters=10]")
    lines = swapped.splitlines()
    i = lines.index("      - name: replay")
    j = lines.index("      - name: lr")
    k = lines.index("  - stage: sft")
    lines = lines[:i] + lines[j:k] + lines[i:j] + lines[k:]  # lr axis before replay
    other = expand(load_spec(write_spec(tmp_path, "\n".join(lines), "reordered.yaml")))
    assert sorted(a) == sorted(r.id for r in other)
    # the out dir does not enter the id; a changed setting does
    changed = [r.id for r in expand(load_spec(write_spec(tmp_path, SPEC.replace("3.0e-4", "2.0e-4"), "c.yaml")))]
    assert set(changed).isdisjoint(a)


def test_spec_mistakes_are_reported(tmp_path):
    with pytest.raises(SpecError, match="order"):
        load_spec(write_spec(tmp_path, "stages: [{stage: sft}, {stage: pretrain}]"))
    with pytest.raises(SpecError, match="set by the suite"):
        load_spec(write_spec(tmp_path, "stages: [{stage: pretrain, overrides: [out_dir=x]}]"))
    with pytest.raises(SpecError, match="both set"):
        load_spec(write_spec(tmp_path, "stages: [{stage: pretrain, axes: {a: {x: [train.iters=1]}, "
                                       "b: {y: [train.iters=2]}}}]"))
    with pytest.raises(SpecError, match="model.num_layer"):
        expand(load_spec(write_spec(tmp_path, "stages: [{stage: pretrain, overrides: [model.num_layer=2]}]")))


SUITE_EVAL_SPEC = """
overrides: [model.num_layers=2, model.hidden_size=64, train.iters=4]
eval: {tasks: [rg:gcd:4], batch_size: 4}
stages:
  - stage: pretrain
  - stage: cpt
    axes:
      - {name: replay, values: [{value: 0.0, set: [optim.lr=1e-4]}, {value: 0.1, set: [optim.lr=2e-4]}]}
  - stage: sft
    eval: {tasks: [gsm8k_platinum, rg:gcd:4], samples: 2}
"""


def test_the_suites_eval_runs_after_every_stage(tmp_path):
    spec = load_spec(write_spec(tmp_path, SUITE_EVAL_SPEC))
    assert spec.eval.tasks == ["rg:gcd:4"]
    runs = expand(spec)
    assert all(r.eval is not None for r in runs)
    for r in runs:
        if r.stage in ("pretrain", "cpt"):
            assert (r.eval.tasks, r.eval.batch_size, r.eval.samples) == (["rg:gcd:4"], 4, 0)
        else:  # the stage's own tasks are added; its other keys win
            assert (r.eval.tasks, r.eval.batch_size, r.eval.samples) == (["rg:gcd:4", "gsm8k_platinum"], 4, 2)
    out = tmp_path / "out"
    fake = FakeRunner()
    assert main([str(spec.path), "--out", str(out)], runner=fake) == 0
    assert sorted(n for kind, n in fake.calls if kind == "eval") == sorted(r.dir_name for r in runs)
    rows = {r["run"]: r for r in json.loads((out / "results.json").read_text())}
    for run in runs:  # CPT rows too: every row holds the suite's task, comparable with its parent's
        assert "rg:gcd:4/accuracy" in rows[run.dir_name]["metrics"], run.name
        if run.parent is not None:
            assert "rg:gcd:4/accuracy" in rows[run.parent.dir_name]["metrics"]
    with pytest.raises(SpecError, match="eval: unknown keys"):
        load_spec(write_spec(tmp_path, SUITE_EVAL_SPEC.replace("batch_size: 4", "batch: 4"), "bad.yaml"))


def test_a_suite_eval_added_later_evaluates_without_training_again(tmp_path):
    # the earlier form: an eval per stage, none for cpt (its rows had no accuracy)
    per_stage = SUITE_EVAL_SPEC.replace("eval: {tasks: [rg:gcd:4], batch_size: 4}\n", "").replace(
        "  - stage: pretrain\n", "  - stage: pretrain\n    eval: {tasks: [rg:gcd:4], batch_size: 4}\n").replace(
        "eval: {tasks: [gsm8k_platinum, rg:gcd:4], samples: 2}", "eval: {tasks: [rg:gcd:4, gsm8k_platinum], "
        "samples: 2, batch_size: 4}")
    out = tmp_path / "out"
    before = expand(load_spec(write_spec(tmp_path, per_stage, "a.yaml")))
    assert [r.eval is None for r in before].count(True) == 2  # the cpt runs
    assert main([str(tmp_path / "a.yaml"), "--out", str(out)], runner=FakeRunner()) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [("rg:gcd:4/accuracy" in r["metrics"]) for r in rows if r["stage"] == "cpt"] == [False, False]
    again = FakeRunner()
    assert main([str(write_spec(tmp_path, SUITE_EVAL_SPEC, "b.yaml")), "--out", str(out)], runner=again) == 0
    assert again.calls == [("eval", r.dir_name) for r in before if r.stage == "cpt"]
    rows = json.loads((out / "results.json").read_text())
    assert all("rg:gcd:4/accuracy" in r["metrics"] for r in rows)


def test_only_selects_runs_and_their_ancestors(tmp_path):
    runs = expand(load_spec(write_spec(tmp_path)))
    sft = [r for r in runs if r.stage == "sft"][3]
    for name in (sft.id, sft.dir_name, sft.name, sft.id[:6]):
        assert select(runs, [name]) == sft.chain
    with pytest.raises(SpecError, match="no run"):
        select(runs, ["nothing-like-this"])




def test_the_specs_only_is_the_default_selection(tmp_path, capsys):
    runs = expand(load_spec(write_spec(tmp_path)))
    sft = [r for r in runs if r.stage == "sft"][3]
    spec = write_spec(tmp_path, f"only: [{json.dumps(sft.name)}]\n" + SPEC, "only.yaml")
    assert load_spec(spec).only == [sft.name]
    assert main([str(spec), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    assert f"{len(sft.chain)} runs:" in capsys.readouterr().out  # the chain, not the grid
    other = [r for r in runs if r.stage == "cpt"][0]
    assert main([str(spec), "--dry-run", "--only", other.id, "--out", str(tmp_path / "o")]) == 0  # --only replaces it
    assert f"{len(other.chain)} runs:" in capsys.readouterr().out
    bad = write_spec(tmp_path, "only: [no-such-run]\n" + SPEC, "bad.yaml")
    assert main([str(bad), "--dry-run", "--out", str(tmp_path / "o")]) == 2
    assert "bad.yaml: only no-such-run: no run match" in capsys.readouterr().err
    with pytest.raises(SpecError, match="only must be a list of run names"):
        load_spec(write_spec(tmp_path, "only: 3\n" + SPEC, "worse.yaml"))
# ---------------------------------------------------------------------------------------- local launcher


class FakeRunner:
    """Stands in for the subprocesses: training writes metrics.jsonl, evaluation writes results.json."""

    def __init__(self, fail: str | None = None, interrupt_at: int | None = None):
        self.calls: list[tuple[str, str]] = []
        self.fail, self.interrupt_at = fail, interrupt_at

    def __call__(self, cmd, log_path, cwd, env):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("log\n")
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if "megaevo.train" in cmd:
            cfg = yaml.safe_load(Path(cmd[cmd.index("--config") + 1]).read_text())
            out = Path(cfg["out_dir"])
            self.calls.append(("train", out.name))
            if self.fail and self.fail in out.name:
                return 1
            iters = cfg["train"]["iters"]
            seed = sum(map(ord, out.name)) % 97
            with open(out / "metrics.jsonl", "w") as f:
                for step in range(1, iters + 1):
                    f.write(json.dumps({"step": step, "tokens": step * 1000, "loss": 5.0 / step}) + "\n")
                f.write(json.dumps({"step": iters, "consumed_samples": iters * 8, "val/web": 2.0 + seed / 100,
                                    "val/math": 3.0 + seed / 100}) + "\n")
            return 0
        out = Path(cmd[cmd.index("--out") + 1])
        self.calls.append(("eval", out.parent.name))
        out.mkdir(parents=True, exist_ok=True)
        tasks = cmd[cmd.index("--tasks") + 1].split(",")
        seed = sum(map(ord, out.parent.name)) % 89
        res = {"model": str(out.parent), "settings": {}, "tasks": {t: {"n": 5, "accuracy": seed / 100 + i / 10}
                                                                    for i, t in enumerate(tasks)}}
        if len(tasks) > 1:
            res["id_avg"] = {"tasks": len(tasks), "accuracy": seed / 100 + 0.05}
        (out / "results.json").write_text(json.dumps(res))
        return 0


def test_local_runs_each_run_once_and_a_rerun_nothing(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    runs, out = expand(spec), tmp_path / "out"
    fake = FakeRunner()
    outcome = run_local(spec, runs, out, runner=fake, echo=lambda s: None)
    assert outcome.ok
    trained = [name for kind, name in fake.calls if kind == "train"]
    assert trained == [r.dir_name for r in runs]  # once each, in tree order
    assert sorted(name for kind, name in fake.calls if kind == "eval") == sorted(
        r.dir_name for r in runs if r.eval is not None)
    for r in runs:
        assert (out / "runs" / r.dir_name / "DONE").is_file()
        assert yaml.safe_load((out / "runs" / r.dir_name / "train.yaml").read_text())["out_dir"] == str(
            (out / "runs" / r.dir_name).resolve())
    again = FakeRunner()
    outcome = run_local(spec, runs, out, runner=again, echo=lambda s: None)
    assert again.calls == [] and outcome.ok and len(outcome.skipped) == len(runs)


def test_a_failed_run_skips_only_its_descendants(tmp_path, capsys):
    spec_path = write_spec(tmp_path)
    runs = expand(load_spec(spec_path))
    bad = [r for r in runs if r.stage == "cpt"][0]
    descendants = {r.dir_name for r in runs if bad in r.chain and r is not bad}
    fake = FakeRunner(fail=bad.id)
    rc = main([str(spec_path), "--out", str(tmp_path / "out")], runner=fake)
    assert rc == 1
    trained = {name for kind, name in fake.calls if kind == "train"}
    assert trained == {r.dir_name for r in runs} - descendants
    err = capsys.readouterr().err
    assert f"FAILED  {bad.dir_name}" in err and str(tmp_path / "out" / "runs" / bad.dir_name / "train.log") in err
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["run"] for r in rows} == {r.dir_name for r in runs} - descendants - {bad.dir_name}
    # the fix: a rerun trains the failed run and its descendants only
    fixed = FakeRunner()
    assert main([str(spec_path), "--out", str(tmp_path / "out")], runner=fixed) == 0
    assert {name for kind, name in fixed.calls if kind == "train"} == descendants | {bad.dir_name}


def test_an_interrupted_suite_reruns_to_the_same_results(tmp_path):
    spec_path = write_spec(tmp_path)
    assert main([str(spec_path), "--out", str(tmp_path / "a")], runner=FakeRunner()) == 0
    stopped = FakeRunner(interrupt_at=5)
    assert main([str(spec_path), "--out", str(tmp_path / "b")], runner=stopped) == 130
    assert len(stopped.calls) == 5
    runs = expand(load_spec(spec_path))
    assert sum((tmp_path / "b" / "runs" / r.dir_name / "DONE").is_file() for r in runs) < len(runs)
    assert main([str(spec_path), "--out", str(tmp_path / "b")], runner=FakeRunner()) == 0
    assert (json.loads((tmp_path / "a" / "results.json").read_text())
            == json.loads((tmp_path / "b" / "results.json").read_text()))


def test_a_run_stopped_by_a_signal_is_not_finished(tmp_path):
    spec = load_spec(write_spec(tmp_path, "stages: [{stage: pretrain, overrides: [train.iters=5]}]"))
    runs, out = expand(spec), tmp_path / "out"

    def stopped(cmd, log_path, cwd, env):  # exit 0 after saving at iteration 2
        (log_path.parent / "metrics.jsonl").write_text(json.dumps({"step": 2, "tokens": 10}) + "\n")
        return 0

    outcome = run_local(spec, runs, out, runner=stopped, echo=lambda s: None)
    assert outcome.failed == [runs[0].dir_name] and not (out / "runs" / runs[0].dir_name / "DONE").exists()


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def step_lines(first: int, last: int, total: int) -> str:
    return "".join(f"step {i:>6}/{total}  loss 5.0000  lr 1.00e-03  grad 1.000  4,000 tok/s\n"
                   for i in range(first, last + 1))


def test_progress_echoes_step_lines_at_most_every_few_seconds():
    from megaevo.suite.progress import Progress

    seen, clock = [], Clock()
    p = Progress(seen.append, every=10.0, quiet=30.0, clock=clock)
    p.feed("loaded the weights of x\n" + step_lines(1, 3, 50))
    assert [x.split()[1] for x in seen] == ["1/50"]  # the first step at once, the others too soon
    clock.now += 4
    p.feed(step_lines(4, 4, 50))
    assert len(seen) == 1
    clock.now += 7
    p.feed(step_lines(5, 6, 50)[:40])  # half a line: kept until its end arrives
    assert len(seen) == 1
    p.feed(step_lines(5, 6, 50)[40:])
    assert [x.split()[1] for x in seen] == ["1/50", "5/50"]
    assert seen[-1].startswith("        step      5/50  loss 5.0000")
    p.feed(step_lines(7, 50, 50))  # the last step always
    assert [x.split()[1] for x in seen] == ["1/50", "5/50", "50/50"]
    # a quiet child: one line saying it still runs, then again only after another quiet period
    p.tick()
    assert len(seen) == 3
    clock.now += 95
    p.tick()
    p.tick()
    assert seen[-1] == "        ... running for 1m46s" and len(seen) == 4


def test_progress_reads_rank_prefixes_and_progress_bars():
    from megaevo.suite.progress import Progress

    seen = []
    p = Progress(seen.append, every=0.0, clock=Clock())
    p.feed_bytes("[rank0]: step 1/2  loss 1.0\nbar 10%\rbar 100%\rstep 2/2  loss 0.5 \u00e9".encode()[:-1])
    p.feed_bytes("\u00e9\n".encode()[1:] + b"warning: not a step\n", final=True)  # a character split in two
    assert seen == ["        [rank0]: step 1/2  loss 1.0", "        step 2/2  loss 0.5 \u00e9"]


def test_the_subprocess_runner_shows_the_childs_steps_and_logs_everything(tmp_path):
    from megaevo.suite.launch import progress_runner

    seen = []
    child = ("import time\nfor i in range(1, 4):\n    print(f'step {i:>6}/3  loss {1 / i:.4f}', flush=True)\n"
             "    time.sleep(0.05)\nprint('done')")
    runner = progress_runner(seen.append, every=0.0)
    log = tmp_path / "train.log"
    assert runner([sys.executable, "-c", child], log, tmp_path, {}) == 0
    assert [x.split()[1] for x in seen] == ["1/3", "2/3", "3/3"]
    text = log.read_text()
    assert "step      3/3  loss 0.3333" in text and text.rstrip().endswith("done")


def test_dry_run_prints_the_tree_and_runs_nothing(tmp_path, capsys):
    spec_path = write_spec(tmp_path)
    runs = expand(load_spec(spec_path))
    assert main([str(spec_path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    listing, summary = text.split("\n\n", 1)
    assert len(listing.splitlines()) == len(runs)  # one line per run
    for r, line in zip(runs, listing.splitlines()):
        assert r.dir_name in line and "[pending]" in line
    assert "megaevo.train" not in text and "megaevo.cli eval" not in text
    assert f"{len(runs)} runs: pretrain 2, cpt 4, sft 8" in summary
    assert f"to train {len(runs)}, to evaluate {sum(r.eval is not None for r in runs)}, finished 0" in summary
    assert "warning: 2 input path(s)" in summary and "data/math" in summary and "data/web" in summary
    # --verbose: the commands too
    assert main([str(spec_path), "--out", str(tmp_path / "out"), "--dry-run", "--verbose"]) == 0
    text = capsys.readouterr().out
    for r in runs:
        assert r.dir_name in text
    assert "[pending]" in text and "-m megaevo.train --config" in text and "megaevo.cli eval" in text
    assert "torch.distributed.run --standalone --nproc_per_node 2" in text  # sft's nproc
    assert text.endswith(summary)
    assert not (tmp_path / "out").exists()


def test_dry_run_summary_counts_what_is_left_tokens_and_missing_paths(tmp_path):
    from megaevo.data.indexed import IndexedDatasetWriter
    from megaevo.suite.plan import make_plan

    spec_text = SPEC.replace("overrides: [", "overrides: [data.tokenizer=path/to/tokenizer.model, ", 1)
    spec = load_spec(write_spec(tmp_path, spec_text))
    runs, out = expand(spec), tmp_path / "out"
    plan = make_plan(spec, runs, out)
    assert plan.runs == {"pretrain": 2, "cpt": 4, "sft": 8} and plan.total == len(runs) == 14
    assert (plan.to_train, plan.to_evaluate, plan.finished) == (14, 10, 0)  # cpt has no eval
    pre = [r for r in runs if r.stage == "pretrain"]
    seq = pre[0].config["data"]["seq_len"] or pre[0].config["model"]["max_seq_len"]
    assert plan.tokens["pretrain"] == sum(r.config["train"]["iters"] for r in pre) * 8 * seq
    assert "sft" not in plan.tokens  # its length depends on its data (train.epochs)
    assert plan.flops["pretrain"] > 0 and plan.flops["cpt"] > 0
    missing = {(m.key, m.value): m.stages for m in plan.missing}
    assert missing == {("data.tokenizer", "path/to/tokenizer.model"): ["pretrain", "cpt", "sft"],
                       ("data.train", "data/math"): ["cpt"], ("data.train", "data/web"): ["cpt"]}
    # a dataset that exists is no longer listed; relative paths are relative to the spec's directory
    with IndexedDatasetWriter(tmp_path / "data" / "web", np.uint16) as w:
        w.add_document(np.arange(5))
    assert {m.value for m in make_plan(spec, runs, out).missing} == {"path/to/tokenizer.model", "data/math"}
    lines = make_plan(spec, runs, out).lines()
    assert lines[-3].startswith("warning: 2 input path(s)") and str(tmp_path) in lines[-3]
    # after the runs: nothing left
    run_local(spec, runs, out, runner=FakeRunner(), echo=lambda s: None)
    plan = make_plan(spec, runs, out)
    assert (plan.to_train, plan.to_evaluate, plan.finished) == (0, 0, 14)


def test_dry_run_tokens_count_a_budget_only_from_its_branch(tmp_path):
    from megaevo.suite.plan import make_plan

    spec = load_spec(write_spec(tmp_path, WSD_SPEC))
    runs = expand(spec)
    plan = make_plan(spec, runs, tmp_path / "out")
    assert plan.runs["pretrain"] == 8 and plan.stable == {"pretrain": 2}
    seq = runs[0].config["model"]["max_seq_len"]
    # per lr: the stable run's 9 iterations, then each budget's own decay (12, 16 and 20 iterations)
    assert plan.tokens == {"pretrain": 2 * (9 + 3 + 7 + 11) * 4 * seq}
    assert "pretrain 8 (2 stable)" in plan.lines()[0]


# ---------------------------------------------------------------------------------------- slurm


def test_slurm_scripts_chain_jobs_after_their_parents(tmp_path, capsys):
    spec_path = write_spec(tmp_path)
    spec = load_spec(spec_path)
    runs = select(expand(spec), [[r for r in expand(spec) if r.stage == "sft"][0].id])
    out = tmp_path / "out"
    submitted = []

    def submit(cmd):
        submitted.append(cmd)
        return str(100 + len(submitted))

    jobs = run_slurm(spec, runs, out, submit=submit, echo=lambda s: None)
    pre, cpt, sft_run = (r.dir_name for r in runs)
    slurm_dir = out.resolve() / "slurm"
    # train jobs after their parent's train job; each evaluation in a job of its own after its run's
    assert [c[-1] for c in submitted] == [str(slurm_dir / name) for name in (
        f"{pre}.sbatch", f"{pre}.eval.sbatch", f"{cpt}.sbatch", f"{sft_run}.sbatch", f"{sft_run}.eval.sbatch")]
    assert submitted[0][:2] == ["sbatch", "--parsable"] and not any("dependency" in a for a in submitted[0])
    assert [next((a for a in c if a.startswith("--dependency")), None) for c in submitted[1:]] == [
        "--dependency=afterok:101", "--dependency=afterok:101", "--dependency=afterok:103",
        "--dependency=afterok:104"]
    assert jobs == {pre: "101", f"{pre}.eval": "102", cpt: "103", sft_run: "104", f"{sft_run}.eval": "105"}
    sft = (slurm_dir / f"{sft_run}.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --time=01:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lm", f"cd {spec.root}", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@300", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in sft
    assert "srun" in sft and "--nnodes 2 --nproc_per_node 4" in sft and "-m megaevo.train --config" in sft
    assert "megaevo.cli eval" not in sft and sft == sbatch_script(runs[2], out, spec.root)
    evaluation = (slurm_dir / f"{sft_run}.eval.sbatch").read_text()
    for line in ("#SBATCH --nodes=1", "#SBATCH --gpus-per-node=1", "#SBATCH --partition=gpu", "#SBATCH --account=lm"):
        assert line in evaluation
    assert "megaevo.cli eval" in evaluation and "--samples 2" in evaluation and "--time" not in evaluation
    assert "--requeue" not in evaluation and "srun" not in evaluation
    # dry run: the submission order, one line per run, then the summary; nothing written, no sbatch needed
    capsys.readouterr()
    assert main([str(spec_path), "--out", str(tmp_path / "dry"), "--launcher", "slurm", "--dry-run"]) == 0
    text = capsys.readouterr().out
    all_runs = expand(spec)
    listing = text.split("\n\n")[0].splitlines()
    with_eval = [r for r in all_runs if r.eval is not None]
    assert len(listing) == len(all_runs) + len(with_eval) and "#!/bin/bash" not in text
    trains = [line.split("  # ")[1] for line in listing if not line.endswith(": evaluation")]
    assert trains == [r.name for r in all_runs]
    assert f"{len(all_runs)} runs: " in text
    stages = len({r.stage for r in all_runs})
    assert (f"slurm: {len(all_runs)} runs, {len(all_runs) + len(with_eval)} jobs ({len(all_runs)} train, "
            f"{len(with_eval)} eval), {stages} stages; train jobs: SIGUSR1 300 s before --time: save and requeue "
            f"until the run is complete") in text.splitlines()
    # --verbose: each sbatch script before its submission line
    assert main([str(spec_path), "--out", str(tmp_path / "dry"), "--launcher", "slurm", "--dry-run",
                 "--verbose"]) == 0
    text = capsys.readouterr().out
    assert not (tmp_path / "dry").exists()
    assert text.count("#!/bin/bash") == len(all_runs) + len(with_eval)
    assert text.count("#SBATCH --signal=B:USR1@300") == text.count("#SBATCH --requeue") == len(all_runs)
    for r in all_runs:
        var = "JOB_" + r.dir_name.replace("-", "_")
        assert f"{var}=$(sbatch --parsable" in text
        if r.parent is not None:
            parent_var = "JOB_" + r.parent.dir_name.replace("-", "_")
            assert f"--dependency=afterok:${{{parent_var}}} " in text.split(f"{var}=$(")[1].split("\n")[0] + " "
            assert text.index(f"{parent_var}=$(") < text.index(f"{var}=$(")


# ---------------------------------------------------------------------------------------- results


def test_results_table_matches_metrics_and_evaluations(tmp_path):
    spec_path = write_spec(tmp_path)
    out = tmp_path / "out"
    assert main([str(spec_path), "--out", str(out)], runner=FakeRunner()) == 0
    runs = expand(load_spec(spec_path))
    rows = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in rows] == [r.dir_name for r in runs]
    for row, run in zip(rows, runs):
        assert set(row) == {"run", "stage", "parent", "axes", "metrics"}
        assert row["stage"] == run.stage and row["axes"] == json.loads(json.dumps(run.axes))
        assert row["parent"] == (run.parent.dir_name if run.parent else None)
        d = out / "runs" / run.dir_name
        last = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()][-1]
        m = row["metrics"]
        assert m["loss/web"] == last["val/web"] and m["loss/math"] == last["val/math"]
        for r in run.chain:
            assert m[f"steps/{r.stage}"] == r.config["train"]["iters"]
            assert m[f"tokens/{r.stage}"] == r.config["train"]["iters"] * 1000
        if run.eval is not None:
            res = json.loads((d / "eval" / "results.json").read_text())
            for task, metrics in res["tasks"].items():
                assert m[f"{task}/accuracy"] == metrics["accuracy"] and f"{task}/n" not in m
            if "id_avg" in res:
                assert m["id_avg/accuracy"] == res["id_avg"]["accuracy"]
        else:
            assert not any(k.count("/") and k.split("/")[0] in ("hellaswag", "gsm8k_platinum") for k in m)
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == [r["run"] for r in rows]
    assert float(table[0]["loss/web"]) == pytest.approx(rows[0]["metrics"]["loss/web"])
    assert "replay" in table[0] and "chain" in table[0]
    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("| run | stage | parent |") and len(md) == len(rows) + 2


def test_collect_leaves_out_runs_that_never_trained(tmp_path):
    runs = expand(load_spec(write_spec(tmp_path)))
    assert collect(runs, tmp_path / "out") == []
    paths = write_results([], tmp_path / "out")
    assert json.loads(paths[0].read_text()) == []


# ---------------------------------------------------------------------------------------- end to end


def test_end_to_end_pretrain_then_cpt_with_two_replay_values(tmp_path):
    from megaevo.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    for name, lo in (("web", 0), ("math", 250)):
        with IndexedDatasetWriter(tmp_path / "data" / name, np.uint16) as w:
            for _ in range(60):
                start, n = rng.integers(0, 250), int(rng.integers(5, 60))
                w.add_document(lo + (start + np.arange(n)) % 250)
    spec = """
overrides:
  - model.num_layers=2
  - model.hidden_size=64
  - model.ffn_hidden_size=128
  - model.num_heads=4
  - model.num_kv_heads=2
  - model.vocab_size=500
  - model.max_seq_len=32
  - data.seq_len=32
  - data.split=90,10,0
  - data.cache_dir=cache
  - train.micro_batch_size=2
  - train.global_batch_size=4
  - train.iters=3
  - train.log_interval=1
  - train.eval_interval=3
  - train.eval_iters=1
  - train.dtype=fp32
  - optim.warmup=1
  - checkpoint.interval=0
  - kernels.backend=torch
  - "data.valid={web_v: data/web, math_v: data/math}"
eval: {tasks: [data/math], limit: 4}
stages:
  - stage: pretrain
    overrides: ["data.train=[data/web]"]
  - stage: cpt
    axes:
      - name: replay
        values:
          - {value: 0.0, set: ["data.train=[1.0, data/math]"]}
          - {value: 0.25, set: ["data.train=[0.75, data/math, 0.25, data/web]"]}
"""
    spec_path = write_spec(tmp_path, spec)
    start = time.time()
    res = subprocess.run([sys.executable, "-c", "import sys; from megaevo.suite import main; "
                          "sys.exit(main(sys.argv[1:]))", str(spec_path), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    # each run's progress under its TRAIN line: its first and its last step line
    assert len(re.findall(r"^TRAIN   \S+ .*\n        step +1/3 .*\n(?:.*\n)*?        step +3/3 ", res.stdout,
                          re.M)) == 3, res.stdout
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["stage"] for r in rows] == ["pretrain", "cpt", "cpt"]
    assert {r["axes"]["replay"] for r in rows[1:]} == {0.0, 0.25}
    for r in rows:
        assert r["metrics"]["steps/pretrain"] == 3 and np.isfinite(r["metrics"]["loss/math_v"])
    assert all(any(k.startswith("math/") for k in r["metrics"]) for r in rows)  # the suite's eval: every run
    # a rerun trains nothing
    res = subprocess.run([sys.executable, "-c", "import sys; from megaevo.suite import main; "
                          "sys.exit(main(sys.argv[1:]))", str(spec_path), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "trained 0, evaluated 0, already finished 3" in res.stdout, res.stdout
    print(f"end to end: {time.time() - start:.1f} s")


# ---------------------------------------------------------------------------------------- wsd branches

WSD_SPEC = """
overrides: [model.num_layers=2, model.hidden_size=64, train.global_batch_size=4]
stages:
  - stage: pretrain
    overrides: [optim.schedule=wsd, optim.decay_fraction=0.25, optim.warmup=2, optim.lr=1e-3]
    axes:
      tokens: {small: [train.iters=12], big: [train.iters=20], mid: [train.iters=16]}
      lr: {lo: [optim.lr=1e-3], hi: [optim.lr=2e-3]}
    eval: {tasks: [hellaswag], limit: 5}
  - stage: sft
    axes:
      - {name: epochs, key: train.epochs, values: [1, 2]}
"""


def test_wsd_budgets_branch_from_one_stable_run(tmp_path, capsys):
    spec_path = write_spec(tmp_path, WSD_SPEC)
    runs = expand(load_spec(spec_path))
    stable = [r for r in runs if r.branch == "stable"]
    assert len(stable) == 2  # one per lr: the budgets differ only in train.iters
    for s in stable:
        # decay starts: 12 - 3 = 9, 16 - 4 = 12, 20 - 5 = 15: the budgets share iterations 0..9
        assert s.stage == "pretrain" and s.parent is None and s.eval is None and s.branch_step == 9
        assert s.config["train"]["iters"] == 9 and s.config["optim"]["decay_fraction"] == 0.0
        assert s.config["data"]["train_samples"] == 20 * 4 and s.config["checkpoint"]["save"] is True
        assert sorted(c.config["train"]["iters"] for c in s.children) == [12, 16, 20]
        assert {c.own_axes["tokens"] for c in s.children} == {"small", "mid", "big"}
        for c in s.children:
            assert c.branch == "decay" and c.stage == "pretrain" and c.eval is not None
            assert c.config["data"]["train_samples"] == 80 and c.config["optim"]["decay_fraction"] == 0.25
            assert len(c.children) == 2 and all(g.stage == "sft" for g in c.children)
            res = c.resolved(tmp_path / "out")  # resumes the stable run, not weights only
            assert res["checkpoint"]["load"] == str((tmp_path / "out" / "runs" / s.dir_name).resolve())
            assert res["checkpoint"]["finetune"] is False
            assert c.name == f"pretrain[lr={c.own_axes['lr']},tokens={c.own_axes['tokens']}]"
            assert runs.index(s) < runs.index(c)
    assert len([r for r in runs if r.stage == "pretrain"]) == 2 + 6 and len(runs) == 2 + 6 + 12
    # once a budget has checkpoints of its own, a restart resumes those
    c = stable[0].children[0]
    (c.run_dir(tmp_path / "out") / "checkpoints").mkdir(parents=True)
    (c.run_dir(tmp_path / "out") / "checkpoints" / "latest").write_text("iter_0000010\n")
    assert c.resolved(tmp_path / "out")["checkpoint"]["load"] == str(c.run_dir(tmp_path / "out").resolve())
    # the local launcher trains the stable run first, never evaluates it, and gives it no row
    fake = FakeRunner()
    assert main([str(spec_path), "--out", str(tmp_path / "o2")], runner=fake) == 0
    trained = [n for kind, n in fake.calls if kind == "train"]
    assert trained == [r.dir_name for r in runs]
    assert not {n for kind, n in fake.calls if kind == "eval"} & {s.dir_name for s in stable}
    rows = json.loads((tmp_path / "o2" / "results.json").read_text())
    assert {r["run"] for r in rows} == {r.dir_name for r in runs if r.branch != "stable"}
    big = next(r for r in rows if r["stage"] == "pretrain" and r["axes"]["tokens"] == "big")
    assert big["metrics"]["steps/pretrain"] == 20 and big["parent"] is None
    sft_row = next(r for r in rows if r["stage"] == "sft")
    assert sft_row["parent"] in {r["run"] for r in rows if r["stage"] == "pretrain"}
    # the dry run marks the branch
    capsys.readouterr()
    assert main([str(spec_path), "--out", str(tmp_path / "dry"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert text.count("branch: stable") == 2 and text.count("branch: decay") == 6
    # slurm: each budget's job waits for its stable run's
    submitted = []

    def submit(cmd):
        submitted.append(cmd)
        return str(100 + len(submitted))

    jobs = run_slurm(load_spec(spec_path), runs, tmp_path / "o3", submit=submit, echo=lambda s: None)
    for s in stable:
        for c in s.children:
            cmd = next(x for x in submitted if x[-1].endswith(f"{c.dir_name}.sbatch"))
            assert f"--dependency=afterok:{jobs[s.dir_name]}" in cmd


@pytest.mark.parametrize("change, branches", [
    ("optim.schedule=wsd", True),
    ("optim.schedule=cosine", False),
    ("optim.schedule=constant", False),
    ("[optim.schedule=inf-cos, optim.constant_lr=5e-4, optim.cooldown_iters=2]", True),
    ("[optim.schedule=wsd, optim.warmup_fraction=0.1]", False),  # the warmup depends on the budget
    ("[optim.schedule=wsd, optim.decay_fraction=1.0, optim.warmup=0]", False),  # nothing to share
])
def test_only_wsd_and_inf_cos_budgets_branch(tmp_path, change, branches):
    text = f"""
overrides: [model.num_layers=2, model.hidden_size=64, optim.warmup=2]
stages:
  - stage: pretrain
    overrides: {change if change.startswith('[') else [change]}
    axes:
      tokens: {{small: [train.iters=12], big: [train.iters=20]}}
"""
    runs = expand(load_spec(write_spec(tmp_path, text.replace("'", ""))))
    assert any(r.branch == "stable" for r in runs) is branches
    assert len(runs) == (3 if branches else 2)
    if "inf-cos" in change:  # anneal starts: 12 - 1 = 11, 20 - 2 = 18
        s = runs[0]
        assert s.branch_step == 11 and s.config["optim"]["anneal_iters"] == 0


def test_a_single_budget_does_not_branch(tmp_path):
    text = """
overrides: [model.num_layers=2, model.hidden_size=64, optim.schedule=wsd, optim.warmup=2]
stages:
  - stage: pretrain
    axes:
      lr: {lo: [optim.lr=1e-4], hi: [optim.lr=2e-4]}
"""
    runs = expand(load_spec(write_spec(tmp_path, text)))
    assert len(runs) == 2 and all(r.branch is None for r in runs)


def _final_state(run_dir: Path) -> tuple[int, dict]:
    from megaevo.checkpoint import LoadedCheckpoint, latest_checkpoint

    ck = LoadedCheckpoint(latest_checkpoint(run_dir / "checkpoints"))
    kinds = [k for k in ("model", "master", "exp_avg", "exp_avg_sq") if ck.has(k)]
    return ck.iteration, {(k, n): ck.tensor(k, n) for k in kinds for n in ck.names(k)}


def test_wsd_branch_equals_the_budget_trained_from_scratch(tmp_path):
    """The suite (real subprocesses) trains one stable run and two budgets resumed from it; each budget's
    final state equals its config trained from scratch in one go."""
    from megaevo.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(1)
    for name, lo in (("web", 0), ("math", 250)):
        with IndexedDatasetWriter(tmp_path / "data" / name, np.uint16) as w:
            for _ in range(30):  # few documents: the longest budget reads each corpus more than once
                start, n = rng.integers(0, 250), int(rng.integers(5, 50))
                w.add_document(lo + (start + np.arange(n)) % 250)
    spec = """
overrides: [model.num_layers=2, model.hidden_size=64, model.ffn_hidden_size=128, model.num_heads=4,
            model.num_kv_heads=2, model.vocab_size=500, model.max_seq_len=32, data.seq_len=32, "data.split=90,10,0",
            data.cache_dir=cache, train.micro_batch_size=2, train.global_batch_size=4, train.log_interval=1,
            train.eval_interval=4, train.eval_iters=1, train.dtype=fp32, checkpoint.interval=0,
            kernels.backend=torch, "data.train=[0.7, data/web, 0.3, data/math]"]
stages:
  - stage: pretrain
    overrides: [optim.schedule=wsd, optim.decay_fraction=0.3, optim.warmup=2, optim.lr=2e-3, optim.min_lr=1e-4]
    axes:
      tokens: {short: [train.iters=10], long: [train.iters=14]}
"""
    spec_path = write_spec(tmp_path, spec)
    runs = expand(load_spec(spec_path))
    stable = runs[0]
    assert stable.branch == "stable" and stable.branch_step == 7 and len(runs) == 3  # 10 - 3, 14 - 4
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", "import sys; from megaevo.suite import main; "
                          "sys.exit(main(sys.argv[1:]))", str(spec_path), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _final_state(stable.run_dir(out))[0] == 7
    for budget in stable.children:
        d = budget.run_dir(out)
        steps = [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert steps[0] == 8 and steps[-1] == budget.config["train"]["iters"]  # only its own iterations
        scratch = tmp_path / f"scratch-{budget.id}"
        res = subprocess.run([sys.executable, "-m", "megaevo.train", "--config", str(d / "train.yaml"),
                              f"out_dir={scratch}", "checkpoint.load=null", "checkpoint.finetune=false"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        it_a, a = _final_state(d)
        it_b, b = _final_state(scratch)
        assert it_a == it_b == budget.config["train"]["iters"] and a.keys() == b.keys() and a
        for key in a:
            torch_close = np.allclose(a[key].float().numpy(), b[key].float().numpy(), rtol=0, atol=1e-6)
            assert torch_close, key
        # the same losses at every step the two runs share
        ours = {r["step"]: r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}
        theirs = {r["step"]: r for r in map(json.loads, (scratch / "metrics.jsonl").read_text().splitlines())}
        for step, r in ours.items():
            if "loss" in r:
                assert theirs[step]["loss"] == pytest.approx(r["loss"], rel=1e-6, abs=1e-6)
    rows = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in rows] == [c.dir_name for c in stable.children]
    assert sorted(r["metrics"]["steps/pretrain"] for r in rows) == [10, 14]


def test_the_example_suites_dry_run_is_a_short_listing_and_a_summary(capsys):
    example = Path(__file__).resolve().parent.parent / "examples" / "suite-evolm-1b.yaml"
    runs = expand(load_spec(example))
    assert main([str(example), "--dry-run"]) == 0
    listing, summary = capsys.readouterr().out.split("\n\n", 1)
    assert len(listing.splitlines()) == len(runs)
    assert summary.startswith(f"{len(runs)} runs: pretrain 5, cpt 5, sft 30, rl 150\n")
    # the example's data paths are placeholders: each one is named once, with the stages using it
    warning = summary[summary.index("warning: "):].splitlines()
    assert "relative to " + str(example.parent) in warning[0]
    assert any(line.split()[:2] == ["data.tokenizer", "tokenizers/spm32k.model"] for line in warning[1:])
    assert any(line.split()[:2] == ["rl.prompts", "data/rl/math-problems.jsonl"] for line in warning[1:])


STAND_INS = {  # SLURM's commands, as the generated scripts and `megaevo suite --launcher slurm` use them
    "sbatch": 'echo "$*" >> "$FAKE_SLURM/sbatch.calls"\nn=$(wc -l < "$FAKE_SLURM/sbatch.calls")\necho "$((700 + n))"\n',
    "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n',
    "scontrol": 'case "$1" in\n  show) echo localhost ;;\n  requeue) echo "$2" >> "$FAKE_SLURM/requeued" ;;\n'
                '  *) exit 1 ;;\nesac\n',
}


def _fake_slurm(tmp_path: Path) -> dict:
    import os
    import socket

    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir()
    for name, body in STAND_INS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM": str(bin_dir), "OMP_NUM_THREADS": "1",
            "SLURM_JOB_ID": "701", "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": str(port)}


@pytest.mark.slow
def test_a_slurm_job_saves_on_its_time_limit_signal_and_requeues_until_complete(tmp_path):
    """`megaevo suite --launcher slurm` with stand-ins for sbatch, srun and scontrol: the train job's batch
    shell gets SIGUSR1 (as --signal=B:USR1@N sends it) mid-run; the run saves and stops, the job requeues
    itself; its next start resumes the checkpoint, completes the run and writes DONE; a third start trains
    nothing. metrics.jsonl holds each step once."""
    from megaevo.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(2)
    with IndexedDatasetWriter(tmp_path / "data" / "web", np.uint16) as w:
        for _ in range(40):
            w.add_document((rng.integers(0, 250) + np.arange(int(rng.integers(5, 50)))) % 250)
    iters = 150
    spec_path = write_spec(tmp_path, f"""
overrides: [model.num_layers=1, model.hidden_size=32, model.ffn_hidden_size=64, model.num_heads=2,
            model.num_kv_heads=1, model.vocab_size=256, model.max_seq_len=16, data.seq_len=16, "data.split=100,0,0",
            data.cache_dir=cache, train.micro_batch_size=2, train.global_batch_size=2, train.log_interval=1,
            train.eval_interval=0, train.dtype=fp32, checkpoint.interval=0, kernels.backend=torch,
            "data.train=[data/web]", train.iters={iters}]
stages:
  - stage: pretrain
    slurm: {{time: "00:30:00", signal_before: 120}}
""")
    env, out = _fake_slurm(tmp_path), tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "megaevo.cli", "suite", str(spec_path), "--out", str(out),
                          "--launcher", "slurm"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    (run,) = expand(load_spec(spec_path))
    script, d = out / "slurm" / f"{run.dir_name}.sbatch", run.run_dir(out)
    calls = (tmp_path / "fake-slurm" / "sbatch.calls").read_text().splitlines()
    assert calls == [f"--parsable {script}"] and "submitted" in res.stdout
    text = script.read_text()
    assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text

    def start_job() -> subprocess.Popen:
        return subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    job = start_job()
    metrics = d / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None and (not metrics.exists() or
                                                              len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # the time limit is near
    first, _ = job.communicate(timeout=120)
    assert job.returncode == 0, first + (d / "train.log").read_text()
    assert "requeueing job 701" in first and (tmp_path / "fake-slurm" / "requeued").read_text() == "701\n"
    log = (d / "train.log").read_text()
    stopped = re.findall(r"stopped by SIGUSR1 at iteration (\d+): saved", log)
    assert len(stopped) == 1 and int(stopped[0]) < iters and not (d / "DONE").exists(), log
    job = start_job()  # SLURM starts the requeued job again
    second, _ = job.communicate(timeout=120)
    assert job.returncode == 0 and (d / "DONE").exists(), second + (d / "train.log").read_text()
    assert f"resuming from {d / 'checkpoints' / f'iter_{int(stopped[0]):07d}'}" in (d / "train.log").read_text()
    assert (tmp_path / "fake-slurm" / "requeued").read_text() == "701\n"  # not requeued again
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, iters + 1))
    job = start_job()
    third, _ = job.communicate(timeout=60)
    assert job.returncode == 0 and "already trained" in third
