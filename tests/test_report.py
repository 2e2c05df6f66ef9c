"""`megaevo report`: the plots of runs and suites (matplotlib, drawn off-screen with Agg)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from megaevo.errors import UserError  # noqa: E402
from megaevo.suite import report as rp  # noqa: E402

PNG = b"\x89PNG"


def _write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pretrain_records(n: int = 10, val_every: int = 3, base: float = 6.0, evals: bool = True):
    out = []
    for i in range(1, n + 1):
        r = {"step": i * 10, "tokens": i * 10 * 2048, "loss": base - 0.3 * i, "lr": 1e-3 * min(1.0, i / 3),
             "grad_norm": 1.0 / i, "tokens_per_s": 1000.0, "mfu": None}
        if i % val_every == 0:
            r["val/general"] = base - 0.2 * i
            r["val/math"] = base - 0.25 * i
            if evals:
                r["eval/gsm8k/accuracy"] = 0.01 * i
                r["eval/hellaswag/acc"] = 0.25 + 0.01 * i
                r["eval/hellaswag/acc_norm"] = 0.26 + 0.01 * i
        out.append(r)
    return out


def rl_records(n: int = 6):
    return [{"step": i, "tokens": i * 1000, "loss": 0.01, "lr": 3e-4, "grad_norm": 0.2, "reward_mean": 0.1 * i,
             "reward_std": 0.3, "accuracy": 0.1 * i, "response_length_mean": 80.0 - i, "entropy": 0.7,
             "approx_kl": 0.0} for i in range(1, n + 1)]


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:4] == PNG


def test_run_dirs_plots(tmp_path):
    pre = tmp_path / "pre"
    _write_jsonl(pre / "metrics.jsonl", pretrain_records())
    rl = tmp_path / "grpo"
    _write_jsonl(rl / "metrics.jsonl", rl_records())
    out = tmp_path / "plots"

    files = rp.report([pre, rl], out)

    expected = {"loss_pre.png", "eval_pre.png", "loss_grpo.png", "rl_grpo.png", "compare_loss.png"}
    assert {f.name for f in files} == expected
    assert len(files) == len(expected)
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)  # exactly the files written
    assert all(_is_png(f) for f in files)


def test_single_run_default_out_and_main(tmp_path, capsys):
    pre = tmp_path / "pre"
    _write_jsonl(pre / "metrics.jsonl", pretrain_records(evals=False))
    assert rp.main([str(pre)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(pre / "plots" / "loss_pre.png")]
    assert _is_png(pre / "plots" / "loss_pre.png")


def test_loss_panel_data():
    records = pretrain_records()
    loss, lr, grad = rp.run_loss_panels(records)
    labels = [line.label for line in loss.lines]
    assert labels == ["train", "val/general", "val/math"]
    general = loss.lines[1]
    assert general.xs == [r["tokens"] for r in records if "val/general" in r]
    assert general.ys == [r["val/general"] for r in records if "val/general" in r]
    assert lr.lines[0].ys == [r["lr"] for r in records]
    assert grad.lines[0].xs == [r["tokens"] for r in records]
    tasks = {p.title: [line.label for line in p.lines] for p in rp.run_eval_panels(records)}
    assert tasks == {"gsm8k": ["accuracy"], "hellaswag": ["acc", "acc_norm"]}


def test_few_and_odd_records_do_not_crash(tmp_path):
    one = tmp_path / "one"
    _write_jsonl(one / "metrics.jsonl", [{"step": 1, "tokens": 10, "loss": 3.0, "lr": None,
                                          "grad_norm": float("nan")}])
    with open(one / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "tok')  # a line cut short while the run was writing it
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    noloss = tmp_path / "noloss"
    _write_jsonl(noloss / "metrics.jsonl", [{"step": 1, "tokens_per_s": 5.0}])
    files = rp.report([one, empty, noloss], tmp_path / "out")
    assert [f.name for f in files] == ["loss_one.png"]
    assert _is_png(files[0])


def test_same_named_runs_get_distinct_files(tmp_path):
    a = tmp_path / "a" / "run"
    b = tmp_path / "b" / "run"
    _write_jsonl(a / "metrics.jsonl", pretrain_records(evals=False))
    _write_jsonl(b / "metrics.jsonl", pretrain_records(evals=False, base=7.0))
    files = rp.report([a, b], tmp_path / "out")
    assert [f.name for f in files] == ["loss_run.png", "loss_run_2.png", "compare_loss.png"]


# -- suites -----------------------------------------------------------------------------------------------

def suite_rows():
    rows = [{"run": "pt", "stage": "pretrain", "parent": None, "axes": {"pt_tokens": 1000},
             "metrics": {"loss/general": 4.0, "loss/math": 4.5}}]
    for replay in (0.0, 0.1, 0.3):
        rows.append({"run": f"cpt-r{replay}", "stage": "cpt", "parent": "pt", "axes": {"replay": replay},
                     "metrics": {"loss/general": 4.4 - replay, "loss/math": 3.0 + replay,
                                 "gsm8k/accuracy": 0.1 + replay}})
    for replay in (0.0, 0.3):
        for epochs in (1, 2, 4):
            rows.append({"run": f"sft-r{replay}-e{epochs}", "stage": "sft", "parent": f"cpt-r{replay}",
                         "axes": {"replay": replay, "epochs": epochs},
                         "metrics": {"gsm8k/accuracy": 0.2 + 0.05 * epochs + replay, "gsm8k/pass@16": 0.5 + replay,
                                     "id_avg/accuracy": 0.15 + 0.04 * epochs, "gsm8k/no_answer": 0.1,
                                     "loss/general": 5.0 + 0.1 * epochs}})
    return rows


def make_suite(root: Path) -> Path:
    rows = suite_rows()
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(rows))
    _write_jsonl(root / "runs" / "pt" / "metrics.jsonl", pretrain_records(n=10, val_every=5))
    for row in rows:
        if row["stage"] == "cpt":
            _write_jsonl(root / "runs" / row["run"] / "metrics.jsonl",
                         pretrain_records(n=20, val_every=1, base=5.0 + row["axes"]["replay"]))
        elif row["stage"] == "sft":
            _write_jsonl(root / "runs" / row["run"] / "metrics.jsonl", [{"step": 1, "tokens": 10, "loss": 1.0}])
    return root


def test_suite_plots(tmp_path):
    suite = make_suite(tmp_path / "suite")
    files = rp.report([suite])
    names = {f.name for f in files}
    out = suite / "plots"
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert all(_is_png(f) for f in files)
    assert {"axis_cpt_replay_loss-general.png", "axis_cpt_replay_loss-math.png",
            "axis_cpt_replay_gsm8k-accuracy.png", "axis_sft_epochs_gsm8k-accuracy.png",
            "axis_sft_epochs_gsm8k-pass@16.png", "axis_sft_epochs_id_avg-accuracy.png",
            "axis_sft_replay_gsm8k-accuracy.png", "axis_sft_epochs_loss-general.png",
            "stability_gap.png"} <= names
    # pretrain has a single value of its axis: nothing to draw against it; no_answer is not an accuracy
    assert not any(n.startswith("axis_pretrain_") or "no_answer" in n for n in names)


def test_axis_series_is_the_rows_metrics():
    rows = suite_rows()
    forgetting = rp.axis_series(rows, "cpt", "replay", "loss/general")
    assert list(forgetting) == ["loss/general"]  # no other axis: one line
    xs, ys = forgetting["loss/general"]
    assert xs == [0.0, 0.1, 0.3]
    assert ys == [r["metrics"]["loss/general"] for r in rows if r["stage"] == "cpt"]

    by_epochs = rp.axis_series(rows, "sft", "epochs", "gsm8k/accuracy")
    assert list(by_epochs) == ["replay=0.0", "replay=0.3"]
    for replay, label in ((0.0, "replay=0.0"), (0.3, "replay=0.3")):
        xs, ys = by_epochs[label]
        assert xs == [1, 2, 4]
        expected = {r["axes"]["epochs"]: r["metrics"]["gsm8k/accuracy"] for r in rows
                    if r["stage"] == "sft" and r["axes"]["replay"] == replay}
        assert ys == [expected[e] for e in xs]

    by_replay = rp.axis_series(rows, "sft", "replay", "id_avg/accuracy")
    assert list(by_replay) == ["epochs=1", "epochs=2", "epochs=4"]
    assert by_replay["epochs=2"] == ([0.0, 0.3], [0.15 + 0.08, 0.15 + 0.08])
    assert rp.axis_series(rows, "sft", "epochs", "no/such") == {}


def test_axis_panel_categories():
    rows = [{"run": f"r{d}", "stage": "cpt", "parent": None, "axes": {"data": d}, "metrics": {"loss/general": i}}
            for i, d in enumerate(("math", "code"))]
    panel = rp.axis_panel(rows, "cpt", "data", "loss/general")
    assert panel.categories == ["code", "math"]
    assert panel.lines[0].xs == [0, 1] and panel.lines[0].ys == [1.0, 0.0]


def test_stability_series(tmp_path):
    suite = make_suite(tmp_path / "suite")
    rows = suite_rows()
    gap = rp.stability_series(suite, rows)
    assert set(gap) == {"val/general", "val/math", "eval/gsm8k/accuracy", "eval/hellaswag/acc",
                        "eval/hellaswag/acc_norm"}
    cpt_runs = [r["run"] for r in rows if r["stage"] == "cpt"]
    assert set(gap["val/general"]) == set(cpt_runs)
    records = rp.read_metrics(suite / "runs" / "cpt-r0.1" / "metrics.jsonl")
    parent = rp.read_metrics(suite / "runs" / "pt" / "metrics.jsonl")
    xs, ys = gap["val/general"]["cpt-r0.1"]
    last_step = records[-1]["step"]
    # step 0 is the parent's last value; then the run's own values over its first 20% of steps
    assert xs[0] == 0 and ys[0] == [r["val/general"] for r in parent if "val/general" in r][-1]
    own = [(r["step"], r["val/general"]) for r in records if r["step"] <= 0.2 * last_step]
    assert list(zip(xs[1:], ys[1:])) == own
    assert all(x <= 0.2 * last_step for x in xs)


def test_missing_inputs_are_user_errors(tmp_path):
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(UserError, match="neither metrics.jsonl .* nor results.json") as e:
        rp.report([nothing], tmp_path / "out")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not a directory"):
        rp.report([tmp_path / "absent"])
    evalout = tmp_path / "evalout"
    evalout.mkdir()
    (evalout / "results.json").write_text(json.dumps({"model": "m", "tasks": {}}))
    with pytest.raises(UserError, match="not a suite's results"):
        rp.report([evalout])
    assert not (tmp_path / "out").exists()


def test_main_prints_one_line_error(tmp_path, capsys):
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    assert rp.main([str(nothing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: megaevo report: ") and "\n" not in err


def test_missing_matplotlib_is_a_user_error(tmp_path, monkeypatch):
    import sys

    pre = tmp_path / "pre"
    _write_jsonl(pre / "metrics.jsonl", pretrain_records())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UserError, match="matplotlib"):
        rp.report([pre])


def test_accuracy_metric_names():
    for key in ("gsm8k/accuracy", "eval/gsm8k/accuracy", "id_avg/pass@16", "ood_avg/maj@16", "piqa/acc_norm",
                "arc/acc", "math/score"):
        assert rp.is_accuracy_metric(key), key
    for key in ("loss/general", "gsm8k/no_answer", "id_avg/tasks", "accuracy", "gsm8k/n"):
        assert not rp.is_accuracy_metric(key), key
    assert rp.is_suite_metric("loss/general") and not rp.is_suite_metric("loss/")


def test_size_labels_are_numbers(tmp_path):
    rows = [{"run": f"pt-{t}", "stage": "pretrain", "parent": None, "axes": {"tokens": t},
             "metrics": {"loss/general": 5.0 - i}} for i, t in enumerate(("20B", "40B", "160B", "320B"))]
    xs, ys = rp.axis_series(rows, "pretrain", "tokens", "loss/general")["loss/general"]
    assert xs == ["20B", "40B", "160B", "320B"] and ys == [5.0, 4.0, 3.0, 2.0]
    panel = rp.axis_panel(rows, "pretrain", "tokens", "loss/general")
    assert panel.lines[0].xs == [20e9, 40e9, 160e9, 320e9] and panel.categories is None
    assert panel.ticks == ([20e9, 40e9, 160e9, 320e9], ["20B", "40B", "160B", "320B"])
    assert rp.axis_number("1.5M") == 1.5e6 and rp.axis_number(0.16) == 0.16 and rp.axis_number("math") is None
    (tmp_path / "results.json").write_text(json.dumps(rows))
    files = rp.report([tmp_path], tmp_path / "out")  # no runs/: the stability gap is skipped, not a crash
    assert [f.name for f in files] == ["axis_pretrain_tokens_loss-general.png"] and _is_png(files[0])
