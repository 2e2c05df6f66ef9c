"""What a suite's run has done, read from its directory: the ``DONE`` markers the launchers write last (the
run's config hash: a rerun skips what finished) and whether a training reached its last iteration.

The launchers (:mod:`megaevo.suite.launch`) write and read them; the dry-run summary
(:mod:`megaevo.suite.plan`) reads them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from megaevo.metrics import METRICS_FILE, read_metrics
from megaevo.suite.tree import Run, digest

DONE = "DONE"


def eval_hash(run: Run) -> str | None:
    return digest({"run": run.hash, "eval": run.eval.as_dict()}) if run.eval else None


def marker_ok(path: Path, expected: str) -> bool:
    try:
        return json.loads(path.read_text()).get("hash") == expected
    except (OSError, ValueError, AttributeError):
        return False


def write_marker(path: Path, h: str, **extra) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"hash": h, **extra}) + "\n")
    os.replace(tmp, path)


def train_done(run: Run, out: Path) -> bool:
    return marker_ok(run.run_dir(out) / DONE, run.hash)


def eval_done(run: Run, out: Path) -> bool:
    return run.eval is None or marker_ok(run.run_dir(out) / "eval" / DONE, eval_hash(run))


def training_complete(run_dir: Path, iters: int | None) -> bool:
    """Whether the run reached its last iteration: its latest checkpoint's (checkpoints/latest) when it
    has one, else the last step of its metrics.jsonl (a train process stopped by a signal exits 0 after
    saving). Without either, or without a fixed length (train.epochs), the exit code decides."""
    if iters is None:
        return True
    latest = Path(run_dir) / "checkpoints" / "latest"
    if latest.is_file():
        name = re.fullmatch(r"iter_(\d+)", latest.read_text().strip())
        if name is not None:
            return int(name.group(1)) >= iters
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return True
    steps = [rec["step"] for rec in read_metrics(path, quiet=True) if "step" in rec]
    last = steps[-1] if steps else None
    return last is None or last >= iters


def run_iters(run: Run) -> int | None:
    """The run's fixed length in iterations (None when train.epochs sets it)."""
    t = run.config["train"]
    return None if t.get("epochs") is not None else t.get("iters")
