"""Mixture-law fits (megaevo.suite.fit): the D-CPT law and CMR's power laws recover known parameters from
noisy synthetic curves, the critical mixture ratio of synthetic curves is the planted one, and a suite
without a mixture axis gets a one-line error."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from megaevo.cli import main as cli_main
from megaevo.suite.fit import RatioEnd, critical_ratio, fit_dcpt, fit_power, fit_suite, write_fit
from megaevo.suite.laws import TOKENS_UNIT, dcpt, power

pytest.importorskip("scipy")

DOMAIN = [2.0, 0.8, 0.5, 0.7, 0.3, 0.4]     # E, B, beta, eta, C, gamma
GENERAL = [2.5, 0.05, 0.5, 0.5, 0.1, 0.5]


def test_dcpt_fit_recovers_the_parameters_of_noisy_curves():
    rng = np.random.default_rng(0)
    d, r = (a.ravel() for a in np.meshgrid(np.geomspace(0.05, 5, 8), [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]))
    y = dcpt(DOMAIN, d, r) + rng.normal(0, 0.003, d.size)
    fit = fit_dcpt(d, r, y)
    assert fit.r2 > 0.999
    for name, true, got, err in zip(fit.names, DOMAIN, fit.values, fit.stderr):
        assert abs(got - true) <= max(5 * err, 0.02 * abs(true)) + 0.01, (name, got, true, err)
        assert 0 < err < 0.1, name


def test_power_law_fit_recovers_a_rising_general_loss():
    rng = np.random.default_rng(1)
    t = np.geomspace(0.02, 0.5, 6)
    fit = fit_power(t, power([3.0, -0.2, 0.5], t) + rng.normal(0, 0.002, t.size))
    assert fit.r2 > 0.99
    for true, got, err in zip([3.0, -0.2, 0.5], fit.values, fit.stderr):
        assert abs(got - true) <= 5 * err + 0.01


def test_critical_ratio_is_where_the_general_loss_crosses_the_tolerance():
    # the general loss at the end rises linearly with the domain share: 3.0 + 0.4 r; tolerance 0.1 -> r = 0.25
    ends = [RatioEnd(s, 3.0 + 0.4 * s, 2.5 - s) for s in (0.0, 0.1, 0.2, 0.5, 0.8, 1.0)]
    got = critical_ratio(ends, 3.0, 2.6, tolerance=0.1)
    assert got["value"] == pytest.approx(0.25) and got["tolerance"] == 0.1 and got["threshold"] == pytest.approx(3.1)
    assert [e["feasible"] for e in got["ratios"]] == [True, True, True, False, False, False]
    # the domain loss must fall: a share that keeps the general loss but does not lower the domain one is out
    low = critical_ratio(ends, 3.0, 2.45, tolerance=0.1)
    assert [e["feasible"] for e in low["ratios"]] == [False, True, True, False, False, False]
    assert critical_ratio(ends, 3.0, 2.0, tolerance=0.1)["value"] is None
    assert critical_ratio(ends, 3.0, 2.6, tolerance=1.0)["value"] == 1.0
    assert critical_ratio(ends, 2.0, 2.6, tolerance=0.1)["value"] is None


def _suite(root: Path, shares, law: bool = True, eval_only: bool = False) -> Path:
    """A suite directory of one pretrain run and CPT runs at the given domain shares, their validation losses
    made with the D-CPT law (general loss before CPT: 2.62), plus noise. ``eval_only``: every other record
    is an evaluation between log steps, with ``consumed_samples`` and no ``tokens`` (as runs before the
    engine wrote tokens on such records logged them)."""
    rng = np.random.default_rng(2)
    rows = [{"run": "pretrain-0", "stage": "pretrain", "parent": None, "axes": {},
             "metrics": {"loss/general": 2.62, "loss/math": 3.4}}]
    (root / "runs" / "pretrain-0").mkdir(parents=True)
    for i, share in enumerate(shares):
        name = f"cpt-{i}"
        d = root / "runs" / name
        d.mkdir(parents=True)
        train = {"math": {"prefix": "/x/math", "weight": share}, "general": {"prefix": "/x/general", "weight": 1 - share}}
        (d / "train.yaml").write_text(yaml.safe_dump({"stage": "pretrain", "data": {"train": train if law else
                                                                                    {"math": {"prefix": "/x/math"}}}}))
        tokens = np.geomspace(0.05, 2.0, 6)
        lines = []
        for k, t in enumerate(tokens):
            rec = {"step": int(t * 1000), "consumed_samples": float(t * TOKENS_UNIT / 256),
                   **({} if eval_only and k % 2 else {"tokens": float(t * TOKENS_UNIT)}),
                   "val/math": float(dcpt(DOMAIN, t, share) + rng.normal(0, 0.002)),
                   "val/general": float(dcpt(GENERAL, t, 1 - share) + rng.normal(0, 0.002))}
            lines.append(json.dumps(rec))
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        rows.append({"run": name, "stage": "cpt", "parent": "pretrain-0", "axes": {"replay": round(1 - share, 6)},
                     "metrics": {}})
    (root / "results.json").write_text(json.dumps(rows))
    return root


def test_fit_of_a_suite_predicts_the_held_out_ratio(tmp_path):
    suite = _suite(tmp_path / "s", [0.2, 0.4, 0.5, 0.6, 0.8, 1.0])
    result, files = write_fit(suite, tmp_path / "out")
    assert [f.name for f in files] == ["fit.json", "fit.png"] and all(f.is_file() for f in files)
    saved = json.loads((tmp_path / "out" / "fit.json").read_text())
    assert {"params", "r2", "heldout", "critical_ratio"} <= set(saved)
    assert saved["domain"] == "math" and saved["general"] == "general" and saved["axis"] == "replay"
    assert saved["r2"]["domain"] > 0.99 and saved["r2"]["general"] > 0.99
    h = saved["heldout"]
    assert h["ratio"] in (0.5, 0.6) and set(h["predicted"]) == {"domain", "general"}
    assert max(h["rel_error"].values()) < 0.01
    c = saved["critical_ratio"]
    assert c["tolerance"] == pytest.approx(0.01 * 2.62) and c["threshold"] == pytest.approx(1.01 * 2.62)
    # the planted general loss at the end (2 M tokens) crosses the threshold between the measured shares
    final = {s: float(dcpt(GENERAL, 2.0, 1 - s)) for s in (0.2, 0.4, 0.5, 0.6, 0.8, 1.0)}
    below = max(s for s, v in final.items() if v <= c["threshold"])
    assert below <= c["value"] <= min(s for s, v in final.items() if v > c["threshold"])
    tol = fit_suite(suite, tolerance=0.5)["critical_ratio"]
    assert tol["tolerance"] == 0.5 and tol["value"] >= below


def test_evaluations_between_log_steps_are_points_of_the_fit(tmp_path):
    full = fit_suite(_suite(tmp_path / "a", [0.2, 0.5, 1.0]))
    sparse = fit_suite(_suite(tmp_path / "b", [0.2, 0.5, 1.0], eval_only=True))
    assert [len(p["tokens"]) for p in sparse["points"]] == [6, 6, 6]  # tokens from consumed_samples
    for a, b in zip(sparse["points"], full["points"]):
        assert a["tokens"] == pytest.approx(b["tokens"])


def test_a_suite_without_a_mixture_axis_is_one_line(tmp_path, capsys):
    suite = _suite(tmp_path / "s", [0.5, 0.5, 0.5])
    assert cli_main(["report", "--fit", str(suite)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: megaevo report:") and "no mixture axis" in err and len(err.splitlines()) == 1
    one = _suite(tmp_path / "one", [0.5], law=False)
    assert cli_main(["report", "--fit", str(one)]) == 2
    assert "no mixture axis" in capsys.readouterr().err


def test_cli_fit_prints_the_fit(tmp_path, capsys):
    suite = _suite(tmp_path / "s", [0.2, 0.4, 0.6, 0.8, 1.0])
    assert cli_main(["report", "--fit", str(suite), "--holdout", "0.4", "--tolerance", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "held out domain share 0.4" in out and "critical mixture ratio" in out and "R²=" in out
    assert (suite / "fit" / "fit.json").is_file()


def test_two_shares_cannot_hold_one_out(tmp_path, capsys):
    suite = _suite(tmp_path / "s", [0.5, 1.0])
    assert cli_main(["report", "--fit", str(suite)]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs 3 shares or more, and the CPT runs have 2 (0.5, 1)" in err and len(err.splitlines()) == 1
