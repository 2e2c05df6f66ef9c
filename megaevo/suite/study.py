"""A finished suite as the findings and the mixture-law fits read it (:mod:`megaevo.suite.findings`,
:mod:`megaevo.suite.fit`).

A suite directory holds ``results.json`` (rows ``{"run", "stage", "parent", "axes", "metrics"}``, see
:mod:`megaevo.suite.results`) and, per run, ``runs/STAGE-ID/`` with ``train.yaml`` (the config the run
trained with) and ``metrics.jsonl`` (its records). :func:`load_suite` reads them into :class:`SuiteRun`
objects that know their parent, their stage, their axis values, the data mixture of their training
(``data.train`` of train.yaml, as weights per corpus) and their learning rate, so that questions are
answered from what each run did rather than from its name.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megaevo.errors import UserError
from megaevo.metrics import METRICS_FILE, read_metrics
from megaevo.suite.report import read_suite


def number(v: Any) -> float | None:
    """v as a finite float, or None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def blend_weights(train: Any) -> dict[str, float]:
    """``{corpus name: weight}`` of a ``data.train`` blend (normalised to sum 1): ``{name: {prefix, weight}}``,
    ``{name: prefix}``, ``[w, prefix, ...]`` or bare prefixes (a corpus is named by its prefix's last part,
    as the validation loss ``val/NAME`` names it). {} for anything else."""
    out: dict[str, float] = {}
    if isinstance(train, dict):
        for name, v in train.items():
            w = number(v.get("weight", 1.0)) if isinstance(v, dict) else 1.0
            out[str(name)] = out.get(str(name), 0.0) + (w or 0.0)
    elif isinstance(train, (list, tuple)) and train:
        items = list(train)
        if len(items) % 2 == 0 and all(number(w) is not None for w in items[0::2]):
            pairs = zip(items[1::2], items[0::2])
        else:
            pairs = ((p, 1.0) for p in items)
        for prefix, w in pairs:
            name = Path(str(prefix)).name
            out[name] = out.get(name, 0.0) + float(w)
    total = sum(out.values())
    return {k: v / total for k, v in out.items()} if total > 0 else {}


@dataclass
class SuiteRun:
    """One row of a suite's results with what its run directory says."""

    name: str                         # STAGE-ID
    stage: str                        # pretrain | cpt | sft | rl
    parent: str | None                # the parent row's run (STAGE-ID)
    axes: dict
    metrics: dict
    dir: Path
    config: dict = field(default_factory=dict)   # train.yaml ({} when absent)
    _records: list | None = None

    @property
    def records(self) -> list[dict]:
        """The run's metrics.jsonl records ([] without one)."""
        if self._records is None:
            path = self.dir / METRICS_FILE
            self._records = read_metrics(path) if path.is_file() else []
        return self._records

    @property
    def mixture(self) -> dict[str, float]:
        """The training blend's weights per corpus (normalised); {} for SFT / RL runs or without train.yaml."""
        if self.stage not in ("pretrain", "cpt"):
            return {}
        return blend_weights((self.config.get("data") or {}).get("train"))

    @property
    def trains(self) -> bool:
        """Whether the run changes its weights: a positive learning rate and at least one iteration."""
        optim, train = self.config.get("optim") or {}, self.config.get("train") or {}
        lr = number(optim.get("lr"))
        iters = number(train.get("iters"))
        return (lr is None or lr > 0) and (iters is None or iters > 0 or train.get("epochs") is not None)

    def seed(self) -> Any:
        return (self.config.get("train") or {}).get("seed")

    def tokens_per_sample(self) -> float | None:
        """``tokens / consumed_samples`` of the run's records (the engine's rule for ``tokens``)."""
        for r in self.records:
            t, s = number(r.get("tokens")), number(r.get("consumed_samples"))
            if t is not None and s:
                return t / s
        return None

    def val_curve(self, name: str) -> tuple[list[float], list[float]]:
        """(tokens, loss) of ``val/NAME`` over the run's records (tokens of this run). A record of an
        evaluation alone may hold ``consumed_samples`` and no ``tokens``: its tokens follow from the others'."""
        xs, ys = [], []
        per_sample = self.tokens_per_sample()
        for r in self.records:
            t, v = number(r.get("tokens")), number(r.get(f"val/{name}"))
            if t is None and per_sample is not None and number(r.get("consumed_samples")) is not None:
                t = number(r.get("consumed_samples")) * per_sample
            if t is not None and v is not None:
                xs.append(t)
                ys.append(v)
        return xs, ys

    def last_val(self, name: str) -> float | None:
        """The run's final ``loss/NAME`` (results.json), else its last ``val/NAME`` record."""
        v = number(self.metrics.get(f"loss/{name}"))
        if v is not None:
            return v
        _, ys = self.val_curve(name)
        return ys[-1] if ys else None


@dataclass
class Suite:
    dir: Path
    runs: list[SuiteRun]

    def by_name(self, name: str | None) -> SuiteRun | None:
        return next((r for r in self.runs if r.name == name), None)

    def stage(self, stage: str) -> list[SuiteRun]:
        return [r for r in self.runs if r.stage == stage]

    def parent(self, run: SuiteRun) -> SuiteRun | None:
        return self.by_name(run.parent)

    def ancestor(self, run: SuiteRun, stage: str) -> SuiteRun | None:
        """The run's ancestor (or itself) of ``stage``."""
        while run is not None and run.stage != stage:
            run = self.parent(run)
        return run

    def stage_axes(self, stage: str) -> list[str]:
        """The axes a stage's runs add to their parent's (the stage's own axes), in name order."""
        own = set()
        for r in self.stage(stage):
            p = self.parent(r)
            own |= set(r.axes) - set(p.axes if p else {})
        return sorted(own)


def load_suite(suite_dir: str | Path) -> Suite:
    """Read SUITE_DIR/results.json and each row's run directory; a one-line UserError when it is not a suite."""
    d = Path(suite_dir)
    results = d / "results.json"
    if not results.is_file():
        raise UserError(f"{d}: no results.json (give a suite directory: `megaevo suite` writes OUT/results.json)")
    runs = []
    for row in read_suite(results):
        name = str(row.get("run"))
        run_dir = d / "runs" / name
        config: dict = {}
        cfg_path = run_dir / "train.yaml"
        if cfg_path.is_file():
            try:
                loaded = yaml.safe_load(cfg_path.read_text())
            except yaml.YAMLError as e:
                raise UserError(f"{cfg_path}: not valid YAML: {e}") from None
            config = loaded if isinstance(loaded, dict) else {}
        axes = row.get("axes") if isinstance(row.get("axes"), dict) else {}
        metrics = row.get("metrics") if isinstance(row.get("metrics"), dict) else {}
        runs.append(SuiteRun(name, str(row.get("stage")), row.get("parent"), axes, metrics, run_dir, config))
    if not runs:
        raise UserError(f"{results}: no rows (has the suite trained anything yet?)")
    return Suite(d, runs)


def label(v: Any) -> str:
    """An axis value as text."""
    return v if isinstance(v, str) else json.dumps(v)
