"""The grid of a suite spec expanded into a tree of runs.

Every grid point of stage k is a run started from its parent (a run of stage k-1), weights only. A run is
content-addressed: its id is a short hash of its resolved config (``config_to_dict`` of the loaded Config,
with ``out_dir`` and, after the first stage, ``checkpoint.load`` left out) and its parent's id, so grid
points that resolve to the same config on the same parent share one run, trained once.

    runs = expand(load_spec("suite.yaml"))       # parents before children (depth first)
    runs[0].id, runs[0].stage, runs[0].parent, runs[0].axes, runs[0].name
    cfg_dict = runs[0].resolved(out)            # the config.yaml its training reads

Budgets branch from a shared stable run. In a pretrain or cpt stage whose schedule is ``wsd`` or
``inf-cos``, grid points whose configs differ only in ``train.iters`` (the budgets; ``train.epochs`` and
``optim.warmup_fraction`` unset) share every learning rate up to the earliest decay (wsd) or anneal
(inf-cos) start among them, K (:func:`branch_step`). Such a group becomes one run marked
``branch == "stable"`` — the group's config with ``train.iters=K``, the decay held off
(``optim.decay_fraction=0`` / ``optim.anneal_iters=0``) and ``checkpoint.save`` on, so it ends with a
normal resumable checkpoint at iteration K and gets no evaluation — whose children are the budget runs
(``branch == "decay"``, the same stage). A budget run resumes the stable run's checkpoint (weights,
optimizer, iteration, data position, random state: ``checkpoint.finetune=false``) and runs only
iterations K..N of its own schedule; once it has checkpoints of its own, a restart resumes those. Every
run of the group (the stable run too) sets ``data.train_samples`` to the longest budget's samples, so all
read the same samples in the same order: a budget's run equals the same config trained from scratch in
one go. Later stages hang off the budget runs. A group of one budget, a decay start at or before
iteration 0 or at the end of a budget, or any step below K where the learning rates differ leaves the
group unbranched.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megaevo.config import OptimConfig, absolute_paths, config_to_dict, load_config
from megaevo.suite.spec import TRAIN_STAGE, EvalSpec, SpecError, StageSpec, SuiteSpec
from megaevo.training.schedules import lr_at

ID_LEN = 10
BRANCH_SCHEDULES = ("wsd", "inf-cos")
MAX_CHECKED_STEPS = 2_000_000  # branch_step compares the learning rates of at most this many steps


def digest(obj: Any) -> str:
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
    branch: str | None = None        # "stable" (shared prefix of budgets), "decay" (a budget branched off it)
    branch_step: int | None = None   # stable and decay runs: the iteration the budgets branch at

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
        own = [f"{k}={_label(v)}" for k, v in self.own_axes.items()]
        if self.branch == "stable":
            own.append(f"stable@{self.branch_step}")
        part = self.stage + (f"[{','.join(own)}]" if own else "")
        parent = self.parent.parent if self.branch == "decay" else self.parent  # a budget names its chain
        return f"{parent.name}/{part}" if parent else part

    @property
    def chain(self) -> list["Run"]:
        return (self.parent.chain if self.parent else []) + [self]

    def resolved(self, out: str | Path) -> dict:
        """The run's config as its training reads it: out_dir OUT/runs/STAGE-ID; the first stage resumes
        its own checkpoints (checkpoint.load=auto) or starts from the base config's checkpoint.load
        (weights only); a later stage starts from its parent's run, weights only, and resumes its own
        checkpoints once it has some. Relative paths (relative to the spec's directory) become absolute."""
        cfg = absolute_paths(copy.deepcopy(self.config), self.stage_spec.root)
        cfg["out_dir"] = str(Path(out).resolve() / "runs" / self.dir_name)
        if self.branch == "decay":  # resume the stable run's checkpoint, or its own once it has some
            own = (self.run_dir(out) / "checkpoints" / "latest").is_file()
            cfg["checkpoint"]["load"] = str(Path(out).resolve() / "runs" / (self.dir_name if own else
                                                                            self.parent.dir_name))
            cfg["checkpoint"]["finetune"] = False
        elif self.parent is not None:
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
            cfg = load_config(stage.config, overrides, resolve_paths=False)  # relative to the spec's directory
        except ValueError as e:
            where = ", ".join(f"{k}={_label(v)}" for k, v in point.items())
            raise SpecError(f"stage {stage.name}{f' ({where})' if where else ''}: {e}") from None
        d = config_to_dict(cfg)
        d["out_dir"] = None
        out.append((point, d))
    return out


def _optim(d: dict) -> OptimConfig:
    o = dict(d["optim"])
    o["betas"] = tuple(o.get("betas") or (0.9, 0.95))
    return OptimConfig(**o)


def _held(d: dict) -> dict:
    """The optim settings of a stable run: the schedule with its decay (wsd) or anneal (inf-cos) held off."""
    o = copy.deepcopy(d["optim"])
    if o["schedule"] == "wsd":
        o["decay_fraction"] = 0.0
    else:
        o["anneal_iters"] = 0
    return o


def _decay_start(o: OptimConfig, n: int) -> int:
    """The first iteration whose learning rate may depend on the run's length n (wsd / inf-cos)."""
    warmup = max(o.warmup, 0)
    if o.schedule == "wsd":
        length = round(o.decay_fraction * n)
        return n if length <= 0 else max(warmup, n - length)
    length = o.anneal_iters if o.anneal_iters is not None else round(o.anneal_fraction * n)
    return n if length <= 0 else max(warmup + max(o.cooldown_iters, 0), n - length)


def branch_step(configs: list[dict]) -> int | None:
    """The iteration K up to which budgets (configs equal but for ``train.iters``) and their stable run
    (:func:`_held` settings, K iterations) use the same learning rate at every step, or None when they
    do not branch (see the module docstring)."""
    d = configs[0]
    if (TRAIN_STAGE.get(d.get("stage"), d.get("stage")) != "pretrain" or d["optim"]["schedule"] not in BRANCH_SCHEDULES
            or d["train"].get("epochs") is not None or d["optim"].get("warmup_fraction") is not None):
        return None
    iters = sorted({int(c["train"]["iters"]) for c in configs})
    if len(iters) < 2:
        return None
    try:
        optim = _optim(d)
        held = _optim({"optim": _held(d)})
    except (TypeError, ValueError):
        return None
    k = min(_decay_start(optim, n) for n in iters)
    if not 0 < k < iters[0] or k > MAX_CHECKED_STEPS:
        return None
    for step in range(k):
        lr = lr_at(step, held, k)
        if any(lr_at(step, optim, n) != lr for n in iters):
            return None
    return k


def _budget_key(d: dict) -> str:
    d = copy.deepcopy(d)
    d["train"]["iters"] = None
    return digest(d)


def _branches(points: list[tuple[dict, dict]]) -> dict[str, tuple[int, int]]:
    """{budget key: (branch step, the index samples of the longest budget)} for the groups that branch."""
    groups: dict[str, list[dict]] = {}
    for _, d in points:
        groups.setdefault(_budget_key(d), []).append(d)
    out = {}
    for key, configs in groups.items():
        k = branch_step(configs)
        if k is not None:
            longest = max(int(c["train"]["iters"]) for c in configs)
            out[key] = (k, longest * int(configs[0]["train"]["global_batch_size"]))
    return out


def expand(spec: SuiteSpec) -> list[Run]:
    """Every run of the spec's grid, parents before children (depth first, in grid order); budgets of a
    WSD / Inf-Cos stage under their stable run (see the module docstring)."""
    by_hash: dict[str, Run] = {}
    level: list[Run | None] = [None]

    def add(h: str, stage: StageSpec, parent: Run | None, d: dict, ev: EvalSpec | None, point: dict,
            nxt: list[Run] | None, **extra) -> Run:
        run = by_hash.get(h)
        if run is None:
            run = Run(h[:ID_LEN], h, stage.name, parent, d, ev, stage, **extra)
            by_hash[h] = run
            if parent is not None:
                parent.children.append(run)
            if nxt is not None:
                nxt.append(run)
        if point not in run.points:
            run.points.append(point)
        return run

    for k, stage in enumerate(spec.stages):
        points = stage_configs(stage)
        branches = _branches(points)
        nxt: list[Run] = []
        for parent in level:
            for point, d in points:
                branch = branches.get(_budget_key(d))
                d = copy.deepcopy(d)
                if parent is None:
                    c = d["checkpoint"]
                    if c["load"] in (None, "auto", "none"):
                        c["load"] = "auto"  # resume the run's own checkpoints on a rerun
                    else:
                        c["finetune"] = True  # weights to start from; a rerun resumes the run's own checkpoints
                else:
                    d["checkpoint"]["load"] = None
                    d["checkpoint"]["finetune"] = True
                if branch is None:
                    h = digest({"config": d, "parent": parent.hash if parent else None})
                    add(h, stage, parent, d, stage.eval, point, nxt)
                    continue
                step, samples = branch
                d["data"]["train_samples"] = samples
                s = copy.deepcopy(d)
                s["train"]["iters"] = step
                s["optim"] = _held(d)
                s["checkpoint"]["save"] = True
                sh = digest({"config": s, "parent": parent.hash if parent else None, "branch": "stable"})
                stable = add(sh, stage, parent, s, None, point, None, branch="stable", branch_step=step)
                d["checkpoint"]["load"] = None  # resumes the stable run's checkpoint (see Run.resolved)
                d["checkpoint"]["finetune"] = False
                h = digest({"config": d, "parent": stable.hash, "branch": "decay"})
                add(h, stage, stable, d, stage.eval, point, nxt, branch="decay", branch_step=step)
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


def select(runs: list[Run], only: list[str] | None, flag: str = "--only") -> list[Run]:
    """The runs named in `only` (an id, a unique id prefix of 4+ digits, STAGE-ID or the run's name)
    and their ancestors, in tree order; all runs when `only` is empty. ``flag`` names `only` in errors."""
    if not only:
        return list(runs)
    keep: set[str] = set()
    for want in only:
        hits = [r for r in runs if want in (r.id, r.dir_name, r.name)]
        if not hits and len(want) >= 4:
            hits = [r for r in runs if r.id.startswith(want)]
        if len(hits) != 1:
            what = "no run" if not hits else f"{len(hits)} runs"
            raise SpecError(f"{flag} {want}: {what} match (give an id, STAGE-ID or a run name; "
                            f"`megaevo suite SPEC --dry-run` lists them)")
        for r in hits[0].chain:
            keep.add(r.hash)
    return [r for r in runs if r.hash in keep]
