"""`megaevo report --findings`: EvoLM's questions answered from a suite tree (a fake one written here, shaped as
`megaevo suite` writes it, and a tiny real one, slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megaevo.cli import main as cli_main
from megaevo.suite.findings import write_findings

pytest.importorskip("matplotlib")

N = 2000  # problems per task: a small binomial error, so the planted differences are real


class FakeSuite:
    """A suite directory: results.json rows and runs/STAGE-ID/{train.yaml, metrics.jsonl, eval/results.json}."""

    def __init__(self, root: Path):
        self.root, self.rows, self.count = root, [], 0

    def run(self, stage: str, parent: dict | None, axes: dict, config: dict, metrics: dict,
            records: list[dict] = (), n: int = N) -> dict:
        self.count += 1
        name = f"{stage}-{self.count:010d}"
        d = self.root / "runs" / name
        (d / "eval").mkdir(parents=True)
        (d / "train.yaml").write_text(yaml.safe_dump(config))
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        tasks = {k.split("/")[0]: {"n": n, "accuracy": v} for k, v in metrics.items() if k.endswith("/accuracy")}
        (d / "eval" / "results.json").write_text(json.dumps({"tasks": tasks}))
        row = {"run": name, "stage": stage, "parent": parent["run"] if parent else None,
               "axes": {**(parent["axes"] if parent else {}), **axes}, "metrics": metrics}
        self.rows.append(row)
        return row

    def write(self) -> Path:
        (self.root / "results.json").write_text(json.dumps(self.rows))
        return self.root


def pretrain_cfg(iters: int) -> dict:
    return {"stage": "pretrain", "train": {"iters": iters, "seed": 1},
            "data": {"train": {"general": {"prefix": "/d/general", "weight": 0.8}, "math": {"prefix": "/d/math", "weight": 0.2}}},
            "optim": {"lr": 3e-3}}


def cpt_cfg(replay: float) -> dict:
    return {"stage": "pretrain", "train": {"iters": 100, "seed": 1},
            "data": {"train": {"math": {"prefix": "/d/math", "weight": round(1 - replay, 6)},
                               "general": {"prefix": "/d/general", "weight": replay}}},
            "optim": {"lr": 1e-3}}


def curve(before: float, after: float) -> list[dict]:
    return [{"step": s, "tokens": s * 2048, "val/general": before + (after - before) * s / 100,
             "val/math": 2.5 - 0.5 * s / 100} for s in (20, 40, 60, 80, 100)]


GENERAL_AFTER = {0.0: 3.5, 0.05: 3.1, 0.5: 3.02, 1.0: 2.98}   # general loss before CPT: 3.0


def fake_suite(root: Path, rl_gain_heavy: float = 0.02, with_post: bool = True,
               domain_after: dict | None = None) -> Path:
    """Budgets 100/200/400 (ID accuracy after post-training 0.2/0.3/0.34: diminishing), CPT replay 0-1 under the
    largest budget (forgetting without replay, limited by 5%), SFT 1 or 4 epochs x 2 seeds (ID up, OOD down),
    RL after each (gain 0.10 after 1 epoch, `rl_gain_heavy` after 4). ``domain_after``: the math loss after
    CPT by replay share (default 2.0 for all; 2.5 before CPT)."""
    s = FakeSuite(root)
    base = {100: 0.20, 200: 0.30, 400: 0.34}
    for tokens, acc in base.items():
        p = s.run("pretrain", None, {"tokens": tokens}, pretrain_cfg(tokens), {"loss/general": 3.0, "loss/math": 2.5})
        for replay in (GENERAL_AFTER if tokens == 400 else (0.05,)):
            c = s.run("cpt", p, {"replay": replay}, cpt_cfg(replay),
                      {"loss/general": GENERAL_AFTER[replay], "loss/math": (domain_after or {}).get(replay, 2.0)},
                      curve(3.0, GENERAL_AFTER[replay]))
            if not with_post or replay not in (0.05, 1.0):
                continue
            for epochs in (1, 4):
                for seed in (1, 2):
                    id_acc = acc - (0.10 if replay == 1.0 else 0) + (0.10 if epochs == 4 else 0) + 0.003 * seed
                    ood = (0.30 if epochs == 1 else 0.20) + 0.003 * seed
                    cfg = {"stage": "sft", "train": {"epochs": epochs, "seed": seed}, "optim": {"lr": 1e-3},
                           "data": {"train": ["/d/sft"]}}
                    f = s.run("sft", c, {"epochs": epochs, "seed": seed}, cfg,
                              {"rg_gcd/accuracy": id_acc, "rg_sum/accuracy": ood})
                    gain = 0.10 if epochs == 1 else rl_gain_heavy
                    s.run("rl", f, {}, {"stage": "rl", "rl": {"prompts": ["rg:gcd:2000:7"]}, "train": {"iters": 5}},
                          {"rg_gcd/accuracy": id_acc + gain, "rg_sum/accuracy": ood})
    return s.write()


def test_findings_answer_the_planted_effects(tmp_path):
    suite = fake_suite(tmp_path / "suite")
    found, files = write_findings(suite, tmp_path / "out")
    got = json.loads((tmp_path / "out" / "findings.json").read_text())["questions"]
    assert sorted(got) == ["a", "b", "c", "d", "e"]
    for key in "abcde":
        q = got[key]
        assert {"question", "axis", "metric", "figure", "values", "answer", "reproduced"} <= set(q)
        assert q["reproduced"] is True, (key, q["answer"])
        assert (tmp_path / "out" / q["figure"]).is_file()
    assert got["a"]["axis"] == "tokens" and got["d"]["axis"] == "epochs"
    # the seed axis repeats points (error bars), it is no line of its own
    line = got["d"]["values"]["ID: replay=0.05, tokens=400"]
    assert [p["n"] for p in line] == [2, 2] and line[0]["std"] > 0
    assert "seed" not in " ".join(got["d"]["values"])
    assert got["b"]["metric"] == "loss/general"
    assert [p["x"] for p in got["b"]["values"]["tokens=400"]] == [0.0, 0.05, 0.5, 1.0]
    assert "(b)" in (tmp_path / "out" / "findings.md").read_text()


def test_a_gain_within_the_noise_is_not_reproduced(tmp_path):
    suite = fake_suite(tmp_path / "suite", rl_gain_heavy=0.1)
    found, _ = write_findings(suite, tmp_path / "out")
    e = {f.key: f for f in found}["e"]
    assert e.reproduced is False and "not reproduced at this scale" in e.answer


def test_replay_that_costs_the_domain_its_gain_does_not_reproduce_b(tmp_path):
    suite = fake_suite(tmp_path / "suite", with_post=False, domain_after={0.05: 2.45})
    b = {f.key: f for f in write_findings(suite, tmp_path / "out")[0]}["b"]
    assert b.reproduced is False and "falls 10% as far as without replay" in b.answer


def test_questions_the_suite_cannot_answer(tmp_path):
    suite = fake_suite(tmp_path / "suite", with_post=False)
    got = {f.key: f for f in write_findings(suite, tmp_path / "out")[0]}
    assert got["b"].reproduced is True
    for key in "acde":
        assert got[key].reproduced is None and "cannot tell" in got[key].answer, key
        assert got[key].figure is None
    data = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert data["questions"]["c"]["reproduced"] is None


def test_cli_findings_and_a_directory_that_is_no_suite(tmp_path, capsys):
    suite = fake_suite(tmp_path / "suite")
    assert cli_main(["report", "--findings", str(suite), "--out", str(tmp_path / "o")]) == 0
    assert "(a) reproduced" in capsys.readouterr().out
    assert cli_main(["report", "--findings", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error: megaevo report:" in err and "results.json" in err and len(err.strip().splitlines()) == 1


SPEC = """
out: out
eval: {tasks: ["rg:gcd:20"], batch_size: 20, max_length: 160}
overrides: [train.log_interval=1, checkpoint.interval=0]
stages:
  - stage: pretrain
    config: pretrain.yaml
  - stage: cpt
    config: pretrain.yaml
    overrides: [train.iters=6, train.eval_interval=2, optim.warmup=0]
    axes:
      - name: replay
        values:
          - {value: 0.0, set: {"data.train": {math: {prefix: DEMO/data/math, weight: 1.0}, general: {prefix: DEMO/data/general, weight: 0.0}}}}
          - {value: 0.25, set: {"data.train": {math: {prefix: DEMO/data/math, weight: 0.75}, general: {prefix: DEMO/data/general, weight: 0.25}}}}
          - {value: 0.5, set: {"data.train": {math: {prefix: DEMO/data/math, weight: 0.5}, general: {prefix: DEMO/data/general, weight: 0.5}}}}
          - {value: 1.0, set: {"data.train": {math: {prefix: DEMO/data/math, weight: 0.0}, general: {prefix: DEMO/data/general, weight: 1.0}}}}
"""


@pytest.mark.slow
def test_a_tiny_real_suite_end_to_end(tmp_path):
    """`megaevo suite` (pretrain 12 iterations, CPT 6 at four replay shares), then --findings and --fit."""
    pytest.importorskip("scipy")
    pytest.importorskip("reasoning_gym")
    from megaevo.demo import run_demo, train_settings

    demo = tmp_path / "demo"
    run_demo(demo, train=False, scale=0.1, verbose=False)
    cfg = train_settings(str(demo), iters=12)
    cfg["train"].update(eval_interval=4, eval_iters=1)
    cfg["checkpoint"].pop("load", None)
    cfg.pop("out_dir")
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "suite.yaml").write_text(SPEC.replace("DEMO", str(demo)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "megaevo.cli", "suite", str(tmp_path / "suite.yaml")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rep = subprocess.run([sys.executable, "-m", "megaevo.cli", "report", "--findings", str(tmp_path / "out"),
                          "--fit", str(tmp_path / "out"), "--out", str(tmp_path / "rep")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    got = json.loads((tmp_path / "rep" / "findings.json").read_text())["questions"]
    assert got["b"]["figure"] and got["a"]["reproduced"] is None
    fit = json.loads((tmp_path / "rep" / "fit.json").read_text())
    assert fit["domain"] == "math" and fit["general"] == "general" and fit["axis"] == "replay"
    assert {"params", "r2", "heldout", "critical_ratio"} <= set(fit)
    assert (tmp_path / "rep" / "fit.png").is_file()
