"""A suite's results: one row per trained run (its final checkpoint), written as OUT/results.{json,csv,md}.

``results.json`` is a list of ``{"run", "stage", "parent", "axes", "metrics"}``: `run` and `parent` are run
dir names (STAGE-ID; parent null for the first stage), `axes` the axis values of the run's whole chain, and
`metrics`:

* ``tokens/STAGE``, ``steps/STAGE`` for every stage of the chain (the last ``tokens`` / ``step`` in that
  run's metrics.jsonl),
* ``loss/NAME``: the last ``val/NAME`` in the run's metrics.jsonl (upstream loss per validation domain),
* ``TASK/METRIC`` from the run's ``eval/results.json`` (``megaevo eval``), the ``id_avg`` / ``ood_avg``
  averages included (``id_avg/METRIC``); counts (``n``, ``tasks``) are left out.

A budget's chain is its stages' runs; the stable run a WSD / Inf-Cos budget branched from (see
megaevo.suite.tree) gets no row, is no row's `parent` (a budget's is the stable run's parent) and adds no
``steps``/``tokens`` of its own: the budget's run resumed its
checkpoint, so the budget's last ``step`` and ``tokens`` already count the shared iterations.

The csv and markdown tables hold the same rows: run, stage, parent, chain, one column per axis and per
metric.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from megaevo.metrics import METRICS_FILE, STEP, TOKENS, VAL_PREFIX, read_metrics
from megaevo.suite.tree import Run

COUNTS = ("n", "tasks")


def last_metrics(run_dir: Path) -> dict:
    """The last `step`, `tokens` and each `val/NAME` of a run's metrics.jsonl ({} when there is none)."""
    path = Path(run_dir) / METRICS_FILE
    out: dict = {}
    if not path.is_file():
        return out
    for rec in read_metrics(path, quiet=True):
        for k, v in rec.items():
            if k in (STEP, TOKENS) or k.startswith(VAL_PREFIX):
                if v is not None:
                    out[k] = v
    return out


def read_eval(run_dir: Path) -> dict:
    """``TASK/METRIC`` from the run's eval/results.json ({} when there is none)."""
    path = Path(run_dir) / "eval" / "results.json"
    if not path.is_file():
        return {}
    res = json.loads(path.read_text())
    groups = dict(res.get("tasks") or {})
    groups.update({k: v for k, v in res.items() if k.endswith("_avg") and isinstance(v, dict)})
    out = {}
    for task, metrics in groups.items():
        for k, v in (metrics or {}).items():
            if k in COUNTS or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            out[f"{task}/{k}"] = None if isinstance(v, float) and math.isnan(v) else v
    return out


def collect(runs: list[Run], out: str | Path) -> list[dict]:
    """One row per run that has trained (has metrics.jsonl or an evaluation), in tree order."""
    out = Path(out)
    rows = []
    for run in runs:
        if run.branch == "stable":  # a budget's shared prefix, not a result of its own
            continue
        d = run.run_dir(out)
        own, ev = last_metrics(d), read_eval(d)
        if not own and not ev:
            continue
        metrics: dict = {}
        for r in [r for r in run.chain if r.branch != "stable"]:
            m = own if r is run else last_metrics(r.run_dir(out))
            if "tokens" in m:
                metrics[f"tokens/{r.stage}"] = m["tokens"]
            if "step" in m:
                metrics[f"steps/{r.stage}"] = m["step"]
        metrics.update({f"loss/{k[len(VAL_PREFIX):]}": v for k, v in own.items() if k.startswith(VAL_PREFIX)})
        metrics.update(ev)
        parent = run.parent.parent if run.branch == "decay" else run.parent  # the stable run has no row
        rows.append({"run": run.dir_name, "stage": run.stage,
                     "parent": parent.dir_name if parent else None,
                     "axes": run.axes, "metrics": metrics})
    return rows


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def table(rows: list[dict], chains: dict[str, str] | None = None) -> tuple[list[str], list[list[str]]]:
    axes = list(dict.fromkeys(k for r in rows for k in r["axes"]))
    metrics = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    head = ["run", "stage", "parent"] + (["chain"] if chains else []) + axes + metrics
    body = []
    for r in rows:
        body.append([r["run"], r["stage"], r["parent"] or ""] + ([chains.get(r["run"], "")] if chains else [])
                    + [_cell(r["axes"].get(a)) for a in axes] + [_cell(r["metrics"].get(m)) for m in metrics])
    return head, body


def write_results(rows: list[dict], out: str | Path, runs: list[Run] | None = None) -> list[Path]:
    """Write OUT/results.json, results.csv and results.md; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chains = {r.dir_name: r.name for r in runs} if runs else None
    paths = [out / "results.json", out / "results.csv", out / "results.md"]
    paths[0].write_text(json.dumps(rows, indent=1) + "\n")
    head, body = table(rows, chains)
    with open(paths[1], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        w.writerows(body)
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    paths[2].write_text("\n".join(md) + "\n")
    return paths
