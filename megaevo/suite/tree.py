"""The grid of a suite spec expanded into a tree of runs.

Every grid point of stage k is a run started from its parent (a run of stage k-1), weights only. A run is
content-addressed: its id is a short hash of its resolved config (``config_to_dict`` of the loaded Config,
with ``out_dir`` and, after the first stage, ``checkpoint.load`` left out) and its parent's id, so grid
points that resolve to the same config on the same parent share one run, trained once.

    runs = expand(load_spec("suite.yaml"))       # parents before children (depth first)
    runs[0].id, runs[0].stage, runs[0].parent, runs[0].axes, runs[0].name
    cfg_dict = runs[0].resolved(out)            # the config.yaml its training reads
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megaevo.config import config_to_dict, load_config
from megaevo.suite.spec import TRAIN_STAGE, EvalSpec, SpecError, StageSpec, SuiteSpec

ID_LEN = 10


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Run:
    id: str                          # short hash (ID_LEN hex digits)
    hash: str                        # the full hash: config + parent
    stage: str                       # pretrain | cpt | sft | rl
    parent: "Run | None"
    config: dict                     # config_to_dict, out_dir / checkpoint.load normalised (None)
    eval: EvalSpec | None
    stage_spec: StageSpec
    points: list[dict] = field(default_factory=list)   # the axis values of every grid point it stands for
    children: list["Run"] = field(default_factory=list)

    @property
    def dir_name(self) -> str:
        return f"{self.stage}-{self.id}"

    def run_dir(self, out: str | Path) -> Path:
        return Path(out) / "runs" / self.dir_name

    @property
    def own_axes(self) -> dict:
        """This stage's axis values (a list where grid points that share the run differ)."""
        names = [a.name for a in self.stage_spec.axes]
        out = {}
        for n in names:
            vals = []
            for p in self.points:
                if n in p and p[n] not in vals:
                    vals.append(p[n])
            out[n] = vals[0] if len(vals) == 1 else vals
        return out

    @property
    def axes(self) -> dict:
        """The axis values of the whole chain, the first stage's first."""
        return {**(self.parent.axes if self.parent else {}), **self.own_axes}

    @property
    def name(self) -> str:
        """The chain of stages and axis values, e.g. ``pretrain[tokens=20B]/cpt[replay=0.05]``."""
        own = self.own_axes
        part = self.stage + (f"[{','.join(f'{k}={_label(v)}' for k, v in own.items())}]" if own else "")
        return f"{self.parent.name}/{part}" if self.parent else part

    @property
    def chain(self) -> list["Run"]:
        return (self.parent.chain if self.parent else []) + [self]

    def resolved(self, out: str | Path) -> dict:
        """The run's config as its training reads it: out_dir OUT/runs/STAGE-ID; the first stage resumes
        its own checkpoints (checkpoint.load=auto) or starts from the base config's checkpoint.load
        (weights only); a later stage starts from its parent's run, weights only, and resumes its own
        checkpoints once it has some."""
        cfg = copy.deepcopy(self.config)
        cfg["out_dir"] = str(Path(out).resolve() / "runs" / self.dir_name)
        if self.parent is not None:
            cfg["checkpoint"]["load"] = str(Path(out).resolve() / "runs" / self.parent.dir_name)
            cfg["checkpoint"]["finetune"] = True
        return cfg


def _label(v: Any) -> str:
    if isinstance(v, list):
        return "|".join(map(_label, v))
    return v if isinstance(v, str) else json.dumps(v)


def stage_configs(stage: StageSpec) -> list[tuple[dict, dict]]:
    """(axis values, normalised config dict) per grid point of one stage (axes in name order)."""
    out = []
    for combo in itertools.product(*[a.values for a in stage.axes]):
        point = {a.name: v.label for a, v in zip(stage.axes, combo)}
        overrides = [f"stage={TRAIN_STAGE[stage.name]}"] + stage.overrides + [o for v in combo for o in v.overrides]
        try:
            cfg = load_config(stage.config, overrides)
        except ValueError as e:
            where = ", ".join(f"{k}={_label(v)}" for k, v in point.items())
            raise SpecError(f"stage {stage.name}{f' ({where})' if where else ''}: {e}") from None
        d = config_to_dict(cfg)
        d["out_dir"] = None
        out.append((point, d))
    return out


def expand(spec: SuiteSpec) -> list[Run]:
    """Every run of the spec's grid, parents before children (depth first, in grid order)."""
    by_hash: dict[str, Run] = {}
    level: list[Run | None] = [None]
    for k, stage in enumerate(spec.stages):
        points = stage_configs(stage)
        nxt: list[Run] = []
        for parent in level:
            for point, d in points:
                d = copy.deepcopy(d)
                if parent is None:
                    c = d["checkpoint"]
                    if c["load"] in (None, "auto"):
                        c["load"] = "auto"  # resume the run's own checkpoints on a rerun
                    else:
                        c["finetune"] = True  # weights to start from; a rerun resumes the run's own checkpoints
                else:
                    d["checkpoint"]["load"] = None
                    d["checkpoint"]["finetune"] = True
                h = _digest({"config": d, "parent": parent.hash if parent else None})
                run = by_hash.get(h)
                if run is None:
                    run = Run(h[:ID_LEN], h, stage.name, parent, d, stage.eval, stage)
                    by_hash[h] = run
                    if parent is not None:
                        parent.children.append(run)
                    nxt.append(run)
                if point not in run.points:
                    run.points.append(point)
        level = nxt
    roots = [r for r in by_hash.values() if r.parent is None]
    ordered: list[Run] = []

    def visit(r: Run) -> None:
        ordered.append(r)
        for c in r.children:
            visit(c)

    for r in roots:
        visit(r)
    ids = [r.id for r in ordered]
    if len(set(ids)) != len(ids):  # a short-hash collision: practically never
        raise SpecError("two runs share a short id; raise megaevo.suite.tree.ID_LEN")
    return ordered


def select(runs: list[Run], only: list[str] | None) -> list[Run]:
    """The runs named in `only` (an id, a unique id prefix of 4+ digits, STAGE-ID or the run's name)
    and their ancestors, in tree order; all runs when `only` is empty."""
    if not only:
        return list(runs)
    keep: set[str] = set()
    for want in only:
        hits = [r for r in runs if want in (r.id, r.dir_name, r.name)]
        if not hits and len(want) >= 4:
            hits = [r for r in runs if r.id.startswith(want)]
        if len(hits) != 1:
            what = "no run" if not hits else f"{len(hits)} runs"
            raise SpecError(f"--only {want}: {what} match (give an id, STAGE-ID or a run name; "
                            f"`megaevo suite SPEC --dry-run` lists them)")
        for r in hits[0].chain:
            keep.add(r.hash)
    return [r for r in runs if r.hash in keep]
