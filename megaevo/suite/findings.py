"""EvoLM's five questions answered from a suite's runs: ``megaevo report --findings SUITE_DIR [--out OUT]``.

Writes, for each question the suite's axes allow, ``OUT/finding_X.png`` (the metric against the axis, one
line per branch — a combination of the other axes — and the mean over seeds with error bars where seeds
repeat), and ``OUT/findings.md`` and ``OUT/findings.json`` = ``{"questions": {"a": {...}, ..., "e": {...}}}``,
each with ``question``, ``axis``, ``metric``, ``figure``, ``values`` (per branch, per axis value: the
mean, the seeds' standard deviation, the values, the standard error), ``answer`` and ``reproduced``
(true, false, or null when the suite cannot tell).

How the runs of each question are recognised — from what the runs' ``train.yaml`` says, never from names:

* a **seed axis**: an axis of some stage whose values change nothing of the runs' configs but
  ``train.seed``; its values are repeats (error bars), never a line or a point of their own;
* (a) **pre-training budget**: the pretrain stage's axis whose values change ``train.iters``; the metric
  is the ID accuracy of the deepest post-training stage (rl, else sft) below each budget;
* (b) **replay**: the cpt stage's runs, their replay share ``1 - r`` read from ``data.train`` (the domain
  corpus is the one with the largest mean weight over the CPT runs, see megaevo.suite.fit); the metric is
  the general corpus's final validation loss (``loss/GENERAL``) against the replay share, beside the loss
  before CPT (the parent's). Reproduced when CPT without replay raises the general loss, the smallest
  replay share lowers it, and that replay keeps at least ``DOMAIN_KEPT`` of the domain loss's fall without
  replay ("a small share limits forgetting at little cost to the domain");
* (c) **CPT before post-training**: sft (and rl) runs grouped by their CPT ancestor: "no domain CPT" is a
  CPT run with domain share 0 (continued training on the general corpus only, the same steps) or one that
  does not train (``optim.lr`` 0 or ``train.iters`` 0); every other share is domain CPT;
* (d) **SFT epochs**: the sft stage's axis whose values change ``train.epochs`` (or ``train.iters``); ID and
  OOD accuracy of the sft runs;
* (e) **RL after light and heavy SFT**: the rl runs' gain in ID accuracy over their parent sft run, against
  the same SFT axis as (d).

In-domain (ID) tasks are EvoLM's in-domain sets (``id_avg``) and the reasoning-gym families the rl stage
trains on (``rl.prompts`` ``rg:FAMILY...`` -> task ``rg_FAMILY``); every other task evaluated is OOD.
A difference counts only when it exceeds twice its standard error: the seeds' spread where seeds repeat,
and at least the binomial error of an accuracy over the task's problems (``sqrt(p (1 - p) / n)``); a loss
difference without seed repeats counts when above ``LOSS_FLOOR`` of the loss.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from megaevo.suite.figures import Branch, axis_figure
from megaevo.suite.report import axis_number
from megaevo.suite.study import Suite, SuiteRun, label, load_suite, number

QUESTIONS = {
    "a": "Returns of pre-training budget on downstream accuracy after post-training (diminishing?)",
    "b": "Domain CPT without replay raises the general-domain loss; how much replay limits it (EvoLM: ~5%)",
    "c": "CPT before SFT/RL raises in-domain accuracy (CPT bridges pre- and post-training)",
    "d": "More SFT epochs raise in-domain (ID) accuracy but can hurt out-of-domain (OOD) accuracy",
    "e": "RL's gain depends on how much SFT came before it (smaller after heavy SFT)",
}
LOSS_FLOOR = 0.005   # a loss difference without seed repeats counts above this fraction of the loss
Z = 2.0              # a difference counts above Z standard errors
DOMAIN_KEPT = 0.8    # (b): "little cost to the domain": the smallest replay keeps this share of the domain gain
IGNORED = ("out_dir", "checkpoint", "data.train_samples")


# -- values with their noise ----------------------------------------------------------------------

@dataclass
class Point:
    """The values of one axis value on one branch: one per seed, with each value's own standard error."""

    x: Any
    values: list = field(default_factory=list)
    errors: list = field(default_factory=list)   # per value: binomial error of an accuracy (0: unknown)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float:
        n = len(self.values)
        return math.sqrt(sum((v - self.mean) ** 2 for v in self.values) / (n - 1)) if n > 1 else 0.0

    @property
    def se(self) -> float:
        n = len(self.values)
        own = math.sqrt(sum(e * e for e in self.errors)) / n if self.errors else 0.0
        return max(self.std / math.sqrt(n), own)

    def as_dict(self) -> dict:
        return {"x": self.x, "mean": self.mean, "std": self.std, "n": len(self.values), "values": self.values,
                "se": self.se}


def differs(a: Point, b: Point, loss: bool = False) -> int:
    """+1 when b is above a beyond the noise, -1 below, 0 within it."""
    se = math.sqrt(a.se ** 2 + b.se ** 2)
    if se == 0 and loss:
        se = LOSS_FLOOR * abs(a.mean) / Z
    diff = b.mean - a.mean
    return 0 if abs(diff) <= Z * se else (1 if diff > 0 else -1)


# -- what the runs did ----------------------------------------------------------------------------

def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changed(runs: list[SuiteRun]) -> set[str]:
    """The config keys (dotted, `data.train` whole) that differ between runs."""
    flats = [_flat({k: v for k, v in r.config.items() if k != "data"}) for r in runs]
    for f, r in zip(flats, runs):
        for k, v in (r.config.get("data") or {}).items():
            f[f"data.{k}"] = json.dumps(v, sort_keys=True, default=str)
    keys = set().union(*flats) if flats else set()
    return {k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1
            and not k.startswith(IGNORED)}


def axis_keys(suite: Suite, stage: str, axis: str) -> set[str]:
    """The config keys that the values of a stage's axis change (between runs that differ only in it)."""
    runs = [r for r in suite.stage(stage) if axis in r.axes and r.config]
    groups: dict[str, list[SuiteRun]] = {}
    for r in runs:
        key = json.dumps({k: label(v) for k, v in r.axes.items() if k != axis} | {"parent": r.parent}, sort_keys=True)
        groups.setdefault(key, []).append(r)
    keys: set[str] = set()
    for g in groups.values():
        if len(g) > 1:
            keys |= _changed(g)
    return keys


@dataclass
class Layout:
    """The suite's axes, classified."""

    seeds: set = field(default_factory=set)
    budget: str | None = None
    sft: str | None = None
    keys: dict = field(default_factory=dict)   # (stage, axis) -> changed keys


def layout(suite: Suite) -> Layout:
    out = Layout()
    for stage in ("pretrain", "cpt", "sft", "rl"):
        for axis in suite.stage_axes(stage):
            keys = axis_keys(suite, stage, axis)
            out.keys[(stage, axis)] = sorted(keys)
            if keys == {"train.seed"}:
                out.seeds.add(axis)
            elif stage == "pretrain" and "train.iters" in keys and out.budget is None:
                out.budget = axis
            elif stage == "sft" and keys & {"train.epochs", "train.iters"} and out.sft is None:
                out.sft = axis
    return out


def id_tasks(suite: Suite) -> set[str]:
    """The in-domain task names: ``id_avg`` and the rg families the rl runs train on."""
    out = {"id_avg"}
    for r in suite.stage("rl"):
        for p in (r.config.get("rl") or {}).get("prompts") or []:
            if isinstance(p, str) and p.startswith("rg:"):
                out.add("rg_" + p.split(":")[1])
    return out


def _task_n(run: SuiteRun) -> dict:
    path = run.dir / "eval" / "results.json"
    try:
        tasks = json.loads(path.read_text()).get("tasks") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v.get("n") for k, v in tasks.items() if isinstance(v, dict)}


def accuracy(run: SuiteRun, which: str, ids: set[str]) -> tuple[float, float] | None:
    """(mean accuracy over the run's ID or OOD tasks, its binomial standard error; 0 when n is unknown)."""
    tasks = {k.rpartition("/")[0]: number(v) for k, v in run.metrics.items() if k.endswith("/accuracy")}
    if which == "id" and tasks.get("id_avg") is not None:
        chosen = {"id_avg": tasks["id_avg"]}
    else:
        chosen = {k: v for k, v in tasks.items() if v is not None and not k.endswith("_avg")
                  and ((k in ids) == (which == "id"))}
    if not chosen:
        return None
    ns = _task_n(run)
    var = sum(p * (1 - p) / ns[k] for k, p in chosen.items() if number(ns.get(k)))
    known = all(number(ns.get(k)) for k in chosen)
    return sum(chosen.values()) / len(chosen), (math.sqrt(var) / len(chosen) if known else 0.0)


# -- one question ---------------------------------------------------------------------------------

@dataclass
class Finding:
    key: str
    axis: str | None
    metric: str
    branches: dict = field(default_factory=dict)   # label -> {x label: Point}
    answer: str = ""
    reproduced: bool | None = None
    figure: str | None = None
    xlabel: str = ""

    def as_dict(self) -> dict:
        return {"question": QUESTIONS[self.key], "axis": self.axis, "metric": self.metric, "figure": self.figure,
                "values": {b: [p.as_dict() for p in pts.values()] for b, pts in self.branches.items()},
                "answer": self.answer, "reproduced": self.reproduced}


def _branch(run: SuiteRun, drop: set) -> str:
    return ", ".join(f"{k}={label(v)}" for k, v in sorted(run.axes.items()) if k not in drop) or "all"


def collect(runs: list[SuiteRun], x: Callable, y: Callable, drop: set) -> dict:
    """{branch: {x: Point}} over runs (x(run) None or y(run) None leaves a run out); points in x order."""
    out: dict[str, dict] = {}
    for r in runs:
        xv, yv = x(r), y(r)
        if xv is None or yv is None:
            continue
        value, err = yv
        p = out.setdefault(_branch(r, drop), {}).setdefault(label(xv), Point(xv))
        p.values.append(value)
        p.errors.append(err)
    return {b: dict(sorted(pts.items(), key=lambda kv: _order(kv[1].x))) for b, pts in sorted(out.items())}


def _order(v: Any):
    n = axis_number(v)
    return (0, n, "") if n is not None else (1, 0.0, str(v))


def _unanimous(verdicts: list) -> bool | None:
    """The branches' common verdict (those that cannot tell left out); None when they disagree or none can tell."""
    told = [v for v in verdicts if v is not None]
    return told[0] if told and all(v is told[0] for v in told) else None


def _fmt(p: Point) -> str:
    return f"{p.mean:.3f}" + (f"±{p.std:.3f}" if len(p.values) > 1 else "")


def q_budget(suite: Suite, lay: Layout, ids: set) -> Finding:
    f = Finding("a", lay.budget, "ID accuracy after post-training", xlabel=f"pre-training budget ({lay.budget})")
    post = suite.stage("rl") or suite.stage("sft")
    if lay.budget is None or not post:
        f.answer = "the suite cannot tell: " + ("no pretrain axis changes train.iters" if lay.budget is None else
                                                "no sft or rl runs after the budgets")
        return f
    f.metric = f"ID accuracy after {post[0].stage}"
    f.branches = collect(post, lambda r: r.axes.get(lay.budget), lambda r: accuracy(r, "id", ids),
                         lay.seeds | {lay.budget})
    verdicts, parts = [], []
    for b, pts in f.branches.items():
        p = list(pts.values())
        if len(p) < 2:
            continue
        rise = differs(p[0], p[-1])
        desc = " -> ".join(f"{label(q.x)}: {_fmt(q)}" for q in p)
        if rise <= 0:
            verdicts.append(False)
            parts.append(f"{b}: {desc}; no rise above the noise (not reproduced at this scale)")
        elif len(p) < 3:
            verdicts.append(None)
            parts.append(f"{b}: {desc}; rises, two budgets cannot show diminishing returns")
        else:
            xs = [axis_number(q.x) for q in p]
            first = (p[1].mean - p[0].mean) / max(math.log2(xs[1] / xs[0]), 1e-9) if None not in xs[:2] else 0
            last = (p[-1].mean - p[-2].mean) / max(math.log2(xs[-1] / xs[-2]), 1e-9) if None not in xs[-2:] else 0
            dim = last < first
            verdicts.append(dim)
            parts.append(f"{b}: {desc}; rises, the gain per doubling {'shrinks' if dim else 'does not shrink'} "
                         f"({first:+.3f} -> {last:+.3f})")
    f.reproduced = _unanimous(verdicts)
    f.answer = "; ".join(parts) or "fewer than two budgets with a post-training accuracy"
    return f


def domain_of(cpt: list[SuiteRun]) -> tuple[str | None, str | None]:
    mean: dict[str, float] = {}
    for r in cpt:
        for k, w in r.mixture.items():
            mean[k] = mean.get(k, 0.0) + w
    ranked = sorted(mean, key=lambda k: -mean[k])
    return (ranked[0] if ranked else None), (ranked[1] if len(ranked) > 1 else None)


def q_replay(suite: Suite, lay: Layout) -> Finding:
    cpt = [r for r in suite.stage("cpt") if r.mixture]
    domain, general = domain_of(cpt)
    f = Finding("b", "replay", f"loss/{general}", xlabel=f"replay (share of {general} in the CPT mixture)")
    if general is None or len({round(r.mixture.get(general, 0), 9) for r in cpt}) < 2:
        f.answer = "the suite cannot tell: no CPT runs that differ in their replay share"
        return f
    f.branches = collect(cpt, lambda r: round(r.mixture.get(general, 0.0), 6),
                         lambda r: (r.last_val(general), 0.0) if r.last_val(general) is not None else None,
                         lay.seeds | set(suite.stage_axes("cpt")))
    verdicts, parts = [], []
    for b, pts in f.branches.items():
        p = list(pts.values())
        if len(p) < 2:
            continue
        runs = [r for r in cpt if _branch(r, lay.seeds | set(suite.stage_axes("cpt"))) == b]
        parent = suite.parent(runs[0]) if runs else None
        before = parent.last_val(general) if parent else None
        if before is None or p[0].x != 0:
            parts.append(f"{b}: " + ("no replay-0 run" if p[0].x != 0 else "no loss before CPT") + "; cannot tell")
            verdicts.append(None)
            continue
        base = Point("before", [before], [0.0])
        rise0 = p[0].mean - before
        small = p[1]
        if differs(base, p[0], loss=True) <= 0:
            verdicts.append(False)
            parts.append(f"{b}: general loss {before:.3f} before CPT, {_fmt(p[0])} without replay: no rise above the "
                         "noise (not reproduced at this scale)")
            continue
        kept = (small.mean - before) / rise0 if rise0 else float("nan")
        lower = differs(p[0], small, loss=True) < 0
        cost = _domain_cost(runs, domain, general, parent.last_val(domain) if parent else None, small.x)
        verdicts.append(lower and cost is not None and cost >= DOMAIN_KEPT)
        domain_text = (f"; the domain loss falls {cost:.0%} as far as without replay" if cost is not None
                       else "; no domain loss to weigh the cost")
        if cost is not None and cost < DOMAIN_KEPT:
            domain_text += f" (less than {DOMAIN_KEPT:.0%}: not at little cost to the domain)"
        parts.append(f"{b}: general loss {before:.3f} before CPT rises to {_fmt(p[0])} without replay (+{rise0:.3f}); "
                     f"replay {small.x:g} gives {_fmt(small)} ({kept:.0%} of the rise"
                     f"{'' if lower else ', not lower beyond the noise'}){domain_text}"
                     + "".join(f"; replay {q.x:g}: {_fmt(q)}" for q in p[2:]))
    f.reproduced = _unanimous(verdicts)
    f.answer = "; ".join(parts)
    return f


def _domain_cost(runs: list[SuiteRun], domain: str | None, general: str, before: float | None,
                 replay: float) -> float | None:
    """How far the domain loss falls with ``replay`` as a share of its fall without replay (mean over seeds)."""
    def fall(share: float) -> float | None:
        vals = [r.last_val(domain) for r in runs if abs(r.mixture.get(general, 0.0) - share) < 1e-6]
        vals = [v for v in vals if v is not None]
        return before - sum(vals) / len(vals) if vals and before is not None else None

    if domain is None:
        return None
    none, some = fall(0.0), fall(replay)
    return some / none if none and some is not None and none > 0 else None


def _no_cpt(run: SuiteRun, domain: str | None) -> bool:
    return not run.trains or (domain is not None and run.mixture.get(domain, 0.0) == 0.0)


def q_cpt(suite: Suite, lay: Layout, ids: set) -> Finding:
    cpt = [r for r in suite.stage("cpt") if r.config]
    domain, _ = domain_of([r for r in cpt if r.mixture])
    f = Finding("c", "cpt", "ID accuracy", xlabel=f"CPT before post-training (domain share of {domain})")
    post = suite.stage("sft") + suite.stage("rl")
    with_anc = [(r, suite.ancestor(r, "cpt")) for r in post]
    with_anc = [(r, a) for r, a in with_anc if a is not None]
    if not any(_no_cpt(a, domain) for _, a in with_anc) or all(_no_cpt(a, domain) for _, a in with_anc):
        f.answer = "the suite cannot tell: it needs post-training runs both after domain CPT and after none " \
                   "(a CPT run with domain share 0, or one that does not train)"
        return f
    share = {a.name: (0.0 if _no_cpt(a, domain) else round(a.mixture.get(domain, 1.0), 6)) for _, a in with_anc}
    drop = lay.seeds | set(suite.stage_axes("cpt"))
    f.branches = {}
    for stage in ("sft", "rl"):
        runs = [r for r, _ in with_anc if r.stage == stage]
        got = collect(runs, lambda r: share[suite.ancestor(r, "cpt").name], lambda r: accuracy(r, "id", ids), drop)
        f.branches.update({f"{stage}: {b}": pts for b, pts in got.items()})
    verdicts, parts = [], []
    for b, pts in f.branches.items():
        none = pts.get(label(0.0))
        cpts = [p for x, p in pts.items() if x != label(0.0)]
        if none is None or not cpts:
            continue
        pooled = Point("cpt", [v for p in cpts for v in p.values], [e for p in cpts for e in p.errors])
        d = differs(none, pooled)
        verdicts.append(d > 0)
        parts.append(f"{b}: no domain CPT {_fmt(none)}, after domain CPT {pooled.mean:.3f} (shares "
                     + ", ".join(f"{p.x:g}: {_fmt(p)}" for p in cpts) + ") — "
                     + ("higher" if d > 0 else "lower" if d < 0 else "no difference above the noise")
                     + ("" if d > 0 else " (not reproduced at this scale)"))
    f.reproduced = _unanimous(verdicts)
    f.answer = "; ".join(parts) or "no branch has runs both with and without domain CPT"
    return f


def q_epochs(suite: Suite, lay: Layout, ids: set) -> Finding:
    f = Finding("d", lay.sft, "ID and OOD accuracy after SFT", xlabel=f"SFT ({lay.sft})")
    if lay.sft is None:
        f.answer = "the suite cannot tell: no sft axis changes train.epochs or train.iters"
        return f
    runs = suite.stage("sft")
    drop = lay.seeds | {lay.sft}
    for which in ("id", "ood"):
        got = collect(runs, lambda r: r.axes.get(lay.sft), lambda r, w=which: accuracy(r, w, ids), drop)
        f.branches.update({f"{which.upper()}: {b}": pts for b, pts in got.items()})
    verdicts, parts = [], []
    for b, pts in f.branches.items():
        if not b.startswith("ID: "):
            continue
        p = list(pts.values())
        ood = list(f.branches.get("OOD: " + b[4:], {}).values())
        if len(p) < 2:
            continue
        up = differs(p[0], p[-1])
        text = f"{b[4:]}: ID " + " -> ".join(f"{label(q.x)}: {_fmt(q)}" for q in p)
        if ood:
            down = differs(ood[0], ood[-1])
            text += "; OOD " + " -> ".join(f"{label(q.x)}: {_fmt(q)}" for q in ood)
            text += f" ({'falls' if down < 0 else 'rises' if down > 0 else 'no change above the noise'})"
            verdicts.append(up > 0 and down <= 0)
        else:
            text += "; no OOD task evaluated"
            verdicts.append(up > 0)
        if up <= 0:
            text += "; ID does not rise above the noise (not reproduced at this scale)"
        parts.append(text)
    f.reproduced = _unanimous(verdicts)
    f.answer = "; ".join(parts) or "fewer than two SFT settings with an accuracy"
    return f


def q_rl(suite: Suite, lay: Layout, ids: set) -> Finding:
    f = Finding("e", lay.sft, "RL gain in ID accuracy (RL run minus its SFT parent)",
                xlabel=f"SFT before RL ({lay.sft})")
    rl = suite.stage("rl")
    if lay.sft is None or not rl:
        f.answer = "the suite cannot tell: " + ("no sft axis changes train.epochs" if lay.sft is None else "no rl runs")
        return f

    def gain(r: SuiteRun):
        parent = suite.parent(r)
        a, b = accuracy(r, "id", ids), accuracy(parent, "id", ids) if parent else None
        return None if a is None or b is None else (a[0] - b[0], math.sqrt(a[1] ** 2 + b[1] ** 2))

    f.branches = collect(rl, lambda r: r.axes.get(lay.sft), gain, lay.seeds | {lay.sft})
    verdicts, parts = [], []
    for b, pts in f.branches.items():
        p = list(pts.values())
        if len(p) < 2:
            continue
        d = differs(p[0], p[-1])
        verdicts.append(d < 0)
        parts.append(f"{b}: RL gain " + " -> ".join(f"{label(q.x)}: {q.mean:+.3f}"
                                                     + (f"±{q.std:.3f}" if len(q.values) > 1 else "") for q in p)
                     + (" — smaller after heavy SFT" if d < 0 else " — larger after heavy SFT (not reproduced)"
                        if d > 0 else " — no difference above the noise (not reproduced at this scale)"))
    f.reproduced = _unanimous(verdicts)
    f.answer = "; ".join(parts) or "fewer than two SFT settings with an RL run"
    return f


# -- the report -----------------------------------------------------------------------------------

def _draw(f: Finding, out: Path) -> None:
    xs = list(dict.fromkeys(x for pts in f.branches.values() for x in pts))
    if not xs:
        return
    nums = [axis_number(next(p.x for pts in f.branches.values() for k, p in pts.items() if k == x)) for x in xs]
    numeric = all(n is not None for n in nums)
    pos = dict(zip(xs, nums if numeric else range(len(xs))))
    branches = [Branch(b, [pos[k] for k in pts], [p.mean for p in pts.values()], [p.std for p in pts.values()],
                       [len(p.values) for p in pts.values()]) for b, pts in f.branches.items()]
    name = f"finding_{f.key}.png"
    axis_figure(out / name, f"({f.key}) {QUESTIONS[f.key]}", f.xlabel, f.metric, branches,
                None if numeric else xs)
    f.figure = name


def findings(suite_dir: str | Path) -> list[Finding]:
    suite = load_suite(suite_dir)
    lay, ids = layout(suite), id_tasks(suite)
    return [q_budget(suite, lay, ids), q_replay(suite, lay), q_cpt(suite, lay, ids), q_epochs(suite, lay, ids),
            q_rl(suite, lay, ids)]


def _markdown(found: list[Finding]) -> str:
    lines = ["# Findings", "", "| question | axis | metric | reproduced | figure |", "|---|---|---|---|---|"]
    for f in found:
        rep = {True: "yes", False: "no", None: "cannot tell"}[f.reproduced]
        lines.append(f"| ({f.key}) {QUESTIONS[f.key]} | {f.axis or '-'} | {f.metric} | {rep} | "
                     f"{f'![]({f.figure})' if f.figure else '-'} |")
    lines.append("")
    for f in found:
        lines += [f"## ({f.key}) {QUESTIONS[f.key]}", "", f.answer, ""]
    return "\n".join(lines)


def write_findings(suite_dir: str | Path, out: str | Path) -> tuple[list[Finding], list[Path]]:
    """Answer the questions, draw their figures, write OUT/findings.{json,md}; returns them and the files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    found = findings(suite_dir)
    files = []
    for f in found:
        if f.branches:
            _draw(f, out)
            if f.figure:
                files.append(out / f.figure)
    data = {"suite": str(Path(suite_dir).resolve()), "questions": {f.key: f.as_dict() for f in found}}
    (out / "findings.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / "findings.md").write_text(_markdown(found))
    return found, files + [out / "findings.json", out / "findings.md"]
