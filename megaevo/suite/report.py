"""`megaevo report`: PNG plots of training runs and of suites, with matplotlib (an optional package).

``megaevo report DIR... [--out OUT]`` takes run directories and suite directories:

* a **run directory** holds ``metrics.jsonl`` (one JSON record per logged step: ``step``, ``tokens``,
  ``loss``, ``lr``, ``grad_norm``, at eval steps ``val/DOMAIN`` and ``eval/TASK/METRIC``; RL runs add
  ``reward_mean``, ``accuracy``, ``response_length_mean``, ...). Files written, ``RUN`` being the
  directory's name:

  - ``loss_RUN.png``: training loss and each ``val/DOMAIN`` loss against tokens, the learning rate
    and the gradient norm beside it;
  - ``eval_RUN.png``: the ``eval/TASK/METRIC`` values logged during training against tokens, one panel
    per task;
  - ``rl_RUN.png``: an RL run's reward, accuracy, response length (and entropy, KL, clip and truncation
    fractions when logged) against step;
  - ``compare_loss.png`` / ``compare_rl.png`` (two or more runs given): the same curves with one line
    per run, overlaid.

* a **suite directory** holds ``results.json`` (a list of rows ``{"run", "stage", "parent", "axes",
  "metrics"}``) and ``runs/ID/metrics.jsonl`` for each run. Files written:

  - ``axis_STAGE_AXIS_METRIC.png``: for each stage, each axis taking two or more values among that
    stage's rows and each metric, the final metric against the axis with one line per combination of
    the other axes. Metrics: the downstream accuracies (``TASK/accuracy``, ``acc``, ``acc_norm``,
    ``pass@K``, ``maj@K``, ``score``, and ``id_avg/*``, ``ood_avg/*``) and the upstream losses
    (``loss/DOMAIN``; ``loss/general`` against ``replay`` shows forgetting). ``/`` in a metric's name
    becomes ``-`` in the file name (``axis_cpt_replay_loss-general.png``);
  - ``stability_gap.png``: for the CPT runs, each ``val/DOMAIN`` loss and ``eval/*`` accuracy over the
    first 20% of the run's steps (one line per run), starting at step 0 from the parent run's last
    logged value when the CPT run itself logged nothing at step 0.

Plots whose data is absent are skipped with one line each. The files go to ``--out`` (default
``DIR/plots`` for a single directory, else ``./plots``); their paths are printed, one a line.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from megaevo.errors import UserError, report_user_error
from megaevo.log import configured, get_logger, setup_logging
from megaevo.metrics import EVAL_PREFIX, METRICS_FILE, VAL_PREFIX, read_metrics

logger = get_logger(__name__)

STAGES = ("pretrain", "cpt", "sft", "rl")
STABILITY_FRACTION = 0.2
RL_KEYS = (("reward_mean", "reward"), ("accuracy", "accuracy"), ("response_length_mean", "response length (tokens)"),
           ("entropy", "entropy"), ("approx_kl", "approx. KL"), ("clipfrac", "clip fraction"),
           ("truncated_fraction", "truncated fraction"))
_ACCURACY = re.compile(r"(accuracy|acc|acc_norm|score|exact_match|pass@\d+|maj@\d+)")


# -- data ---------------------------------------------------------------------------------------------

def _number(v: Any) -> float | None:
    """v as a finite float, or None (bools, strings, None, NaN and infinities are not plottable)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def series(records: Sequence[dict], key: str, x: str = "tokens") -> tuple[list[float], list[float]]:
    """(xs, ys): ``key`` against ``x`` over the records holding both as finite numbers."""
    xs, ys = [], []
    for r in records:
        xv, yv = _number(r.get(x)), _number(r.get(key))
        if xv is not None and yv is not None:
            xs.append(xv)
            ys.append(yv)
    return xs, ys


def _x_key(records: Sequence[dict]) -> str:
    """``tokens`` when the records log it, else ``step``."""
    return "tokens" if any(_number(r.get("tokens")) is not None for r in records) else "step"


def _keys(records: Iterable[dict], prefix: str) -> list[str]:
    """The numeric keys starting with ``prefix``, in the order they first appear."""
    seen: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k.startswith(prefix) and _number(v) is not None:
                seen.setdefault(k, None)
    return list(seen)


def is_accuracy_metric(key: str) -> bool:
    """Whether ``key`` (``TASK/METRIC``, ``eval/TASK/METRIC``, ``id_avg/METRIC``) is a downstream accuracy."""
    parts = key.split("/")
    return len(parts) >= 2 and parts[0] != "loss" and _ACCURACY.fullmatch(parts[-1]) is not None


def is_suite_metric(key: str) -> bool:
    """The suite metrics drawn against the axes: ``loss/DOMAIN`` and the downstream accuracies."""
    return (key.startswith("loss/") and len(key) > 5) or is_accuracy_metric(key)


@dataclass
class Line:
    label: str | None
    xs: list
    ys: list
    style: dict = field(default_factory=dict)


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    lines: list[Line]
    xlog: bool = False
    categories: list[str] | None = None  # tick labels when the xs are category positions
    integer_x: bool = False  # ticks at whole numbers only
    ticks: tuple[list[float], list[str]] | None = None  # fixed tick positions and labels

    @property
    def empty(self) -> bool:
        return not any(line.xs for line in self.lines)


# -- run panels ---------------------------------------------------------------------------------------

def run_loss_panels(records: Sequence[dict]) -> list[Panel]:
    """Training loss with each ``val/DOMAIN`` loss, the learning rate and the gradient norm, against tokens."""
    x = _x_key(records)
    losses = [Line("train", *series(records, "loss", x), {"linewidth": 1.0, "alpha": 0.7})]
    losses += [Line(k, *series(records, k, x), {"marker": "o"}) for k in _keys(records, VAL_PREFIX)]
    return [Panel("loss", x, "loss", losses),
            Panel("learning rate", x, "lr", [Line(None, *series(records, "lr", x))]),
            Panel("gradient norm", x, "grad norm", [Line(None, *series(records, "grad_norm", x))])]


def run_eval_panels(records: Sequence[dict]) -> list[Panel]:
    """One panel per task of the ``eval/TASK/METRIC`` values, each metric a line, against tokens."""
    x = _x_key(records)
    tasks: dict[str, list[str]] = {}
    for k in _keys(records, EVAL_PREFIX):
        task, _, metric = k[len(EVAL_PREFIX):].rpartition("/")
        tasks.setdefault(task or metric, []).append(k)
    return [Panel(task, x, "value", [Line(k.rpartition("/")[2], *series(records, k, x), {"marker": "o"})
                                     for k in keys]) for task, keys in tasks.items()]


def is_rl_run(records: Sequence[dict]) -> bool:
    return any(_number(r.get("reward_mean")) is not None for r in records)


def run_rl_panels(records: Sequence[dict]) -> list[Panel]:
    """Reward, accuracy, response length (and the other RL statistics logged) against step."""
    panels = [Panel(title, "step", title, [Line(None, *series(records, key, "step"))]) for key, title in RL_KEYS]
    return [p for i, p in enumerate(panels) if i < 3 or not p.empty]


def compare_panels(runs: dict[str, Sequence[dict]], build) -> list[Panel]:
    """The panels ``build`` makes for each run, overlaid: one line per run (and per line of the run's
    panel, labelled ``RUN LINE`` when a panel has several)."""
    merged: dict[str, Panel] = {}
    for name, records in runs.items():
        for p in build(records):
            into = merged.setdefault(p.title, Panel(p.title, p.xlabel, p.ylabel, []))
            for line in p.lines:
                if line.xs:
                    label = name if line.label is None or len(p.lines) == 1 else f"{name} {line.label}"
                    into.lines.append(Line(label, line.xs, line.ys, {k: v for k, v in line.style.items()
                                                                     if k == "marker"}))
    return list(merged.values())


# -- suite data ---------------------------------------------------------------------------------------

def read_suite(path: str | Path) -> list[dict]:
    """The rows of a suite's ``results.json`` (a list of ``{"run", "stage", "parent", "axes", "metrics"}``)."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path} is not a suite's results (a list of rows with run, stage, axes, metrics)")
    return rows


def _stages(rows: Sequence[dict]) -> list[str]:
    present = {str(r.get("stage")) for r in rows if r.get("stage") is not None}
    return [s for s in STAGES if s in present] + sorted(present - set(STAGES))


def _stage_rows(rows: Sequence[dict], stage: str) -> list[dict]:
    return [r for r in rows if str(r.get("stage")) == stage]


def _axes(row: dict) -> dict:
    axes = row.get("axes")
    return axes if isinstance(axes, dict) else {}


def _metrics(row: dict) -> dict:
    metrics = row.get("metrics")
    return metrics if isinstance(metrics, dict) else {}


_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMbBtT]?)\s*")
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def axis_number(v: Any) -> float | None:
    """An axis value as a number: a number, or a label such as ``"20B"``, ``"1.5M"``, ``"500"``
    (suffix K, M, B or T); None for any other label."""
    n = _number(v)
    if n is not None or not isinstance(v, str):
        return n
    m = _SIZE.fullmatch(v)
    return float(m.group(1)) * _SCALE[m.group(2).lower()] if m else None


def _value_key(v: Any):
    """A sort key putting numbers (and size labels such as ``20B``) first in numeric order, then
    everything else by its text."""
    n = axis_number(v)
    return (0, n, "") if n is not None else (1, 0.0, str(v))


def _fmt(v: Any) -> str:
    n = _number(v)
    if n is not None and n == int(n) and abs(n) >= 1e6:
        return f"{n:.3g}"
    return str(v)


def axis_series(rows: Sequence[dict], stage: str, axis: str, metric: str) -> dict[str, tuple[list, list[float]]]:
    """The lines of the plot of ``metric`` against ``axis`` for ``stage``: ``{label: (axis values,
    metric values)}``, one line per combination of the stage's other axes (label ``"a=1, b=x"``, or
    ``metric`` when there is no other axis), its points in the axis's order. Rows without the axis or
    without a finite value of the metric are left out."""
    stage_rows = _stage_rows(rows, stage)
    others = sorted({a for r in stage_rows for a in _axes(r)} - {axis})
    lines: dict[tuple, list[tuple[Any, float]]] = {}
    for r in stage_rows:
        axes, y = _axes(r), _number(_metrics(r).get(metric))
        if axis not in axes or y is None:
            continue
        combo = tuple((a, axes[a]) for a in others if a in axes)
        lines.setdefault(combo, []).append((axes[axis], y))
    out = {}
    for combo in sorted(lines, key=lambda c: [(a, _value_key(v)) for a, v in c]):
        points = sorted(lines[combo], key=lambda p: _value_key(p[0]))
        label = ", ".join(f"{a}={_fmt(v)}" for a, v in combo) or metric
        out[label] = ([p[0] for p in points], [p[1] for p in points])
    return out


def axis_panel(rows: Sequence[dict], stage: str, axis: str, metric: str) -> Panel:
    """The panel of ``metric`` against ``axis`` for ``stage``: a numeric x axis when every value is a
    number or a size label (``20B``, ticks then labelled with the labels), else a category axis."""
    lines = axis_series(rows, stage, axis, metric)
    values = [v for xs, _ in lines.values() for v in xs]
    numeric = all(axis_number(v) is not None for v in values)
    panel = Panel(f"{stage}: {metric} vs {axis}", axis, metric, [])
    if numeric:
        nums = [axis_number(v) for v in values]
        panel.xlog = bool(nums) and min(nums) > 0 and max(nums) / min(nums) >= 50
        panel.integer_x = all(n == int(n) for n in nums)
        if any(_number(v) is None for v in values):  # size labels: tick each value with its label
            ticks = {axis_number(v): str(v) for v in values}
            panel.ticks = (list(ticks), list(ticks.values()))
        panel.lines = [Line(label, [axis_number(v) for v in xs], ys, {"marker": "o"})
                       for label, (xs, ys) in lines.items()]
    else:
        categories = [str(v) for v in sorted(set(map(str, values)), key=_value_key)]
        pos = {c: i for i, c in enumerate(categories)}
        panel.categories = categories
        panel.lines = [Line(label, [pos[str(v)] for v in xs], ys, {"marker": "o"})
                       for label, (xs, ys) in lines.items()]
    if len(panel.lines) == 1 and panel.lines[0].label == metric:
        panel.lines[0].label = None
    return panel


def suite_axis_plots(rows: Sequence[dict]) -> list[tuple[str, Panel]]:
    """``(file stem, panel)`` for each stage, each axis with two or more values there, each suite metric."""
    out = []
    for stage in _stages(rows):
        stage_rows = _stage_rows(rows, stage)
        axes = sorted({a for r in stage_rows for a in _axes(r)})
        metrics = sorted({k for r in stage_rows for k, v in _metrics(r).items()
                          if is_suite_metric(k) and _number(v) is not None},
                         key=lambda k: (not k.startswith("loss/"), k))
        for axis in axes:
            if len({json.dumps(_axes(r)[axis], sort_keys=True, default=str)
                    for r in stage_rows if axis in _axes(r)}) < 2:
                continue
            for metric in metrics:
                panel = axis_panel(rows, stage, axis, metric)
                if not panel.empty:
                    out.append((f"axis_{_safe(stage)}_{_safe(axis)}_{_safe(metric)}", panel))
    return out


def stability_series(suite_dir: str | Path, rows: Sequence[dict], fraction: float = STABILITY_FRACTION
                     ) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """``{key: {run: (steps, values)}}`` for the CPT runs' ``val/DOMAIN`` losses and ``eval/*``
    accuracies over the first ``fraction`` of each run's steps (at least its first two points of each
    key). When the run logged nothing at step 0 and its parent's ``metrics.jsonl`` holds the key, the
    parent's last value is the point at step 0: where the CPT run starts from."""
    runs_dir = Path(suite_dir) / "runs"
    out: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for row in _stage_rows(rows, "cpt"):
        run = str(row.get("run"))
        path = runs_dir / run / METRICS_FILE
        if not path.is_file():
            logger.info("stability gap: no %s", path)
            continue
        records = read_metrics(path)
        steps = [s for s in (_number(r.get("step")) for r in records) if s is not None]
        if not steps:
            continue
        limit = fraction * max(steps)
        parent = None
        parent_path = runs_dir / str(row.get("parent")) / METRICS_FILE
        if row.get("parent") is not None and parent_path.is_file():
            parent = read_metrics(parent_path)
        keys = _keys(records, VAL_PREFIX) + [k for k in _keys(records, EVAL_PREFIX) if is_accuracy_metric(k)]
        for key in keys:
            xs, ys = series(records, key, "step")
            n = max(sum(1 for s in xs if s <= limit), min(2, len(xs)))
            xs, ys = xs[:n], ys[:n]
            if parent is not None and (not xs or xs[0] > 0):
                _, pys = series(parent, key, "step")
                if pys:
                    xs, ys = [0.0] + xs, [pys[-1]] + ys
            if xs:
                out.setdefault(key, {})[run] = (xs, ys)
    return out


# -- drawing ------------------------------------------------------------------------------------------

def _safe(name: str) -> str:
    """``name`` fit for a file name: ``/`` and other characters outside ``[A-Za-z0-9._@=+-]`` become ``-``."""
    return re.sub(r"[^A-Za-z0-9._@=+-]", "-", str(name)) or "-"


def _figure_class():
    """matplotlib's Figure (drawn with Agg: no display and no pyplot state), or a one-line UserError."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("megaevo report needs the optional package 'matplotlib', which is not installed: "
                        "pip install matplotlib") from None
    return Figure


def draw(panels: Sequence[Panel], path: Path, title: str) -> Path:
    """Draw the panels side by side (three a row) into the PNG ``path``; an empty panel says "no data"."""
    Figure = _figure_class()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.8 * rows + 0.4), layout="constrained")
    fig.suptitle(title)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax, panel in zip(axes, panels):
        ax.set_title(panel.title)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if panel.empty:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
            continue
        for line in panel.lines:
            if not line.xs:
                continue
            style = dict(line.style)
            if len(line.xs) <= 2 or "marker" in style:
                style["marker"] = "o" if len(line.xs) <= 60 else None
                style.setdefault("markersize", 4)
            ax.plot(line.xs, line.ys, label=line.label, **style)
        if panel.xlog:
            ax.set_xscale("log")
        elif panel.integer_x or panel.xlabel == "step":
            ax.xaxis.get_major_locator().set_params(integer=True)
        if panel.categories is not None:
            ax.set_xticks(range(len(panel.categories)), panel.categories)
        if panel.ticks is not None:
            ax.minorticks_off()
            ax.set_xticks(*panel.ticks)
        if any(line.label for line in panel.lines if line.xs):
            ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path


# -- the command --------------------------------------------------------------------------------------

def _classify(dirs: Sequence[str | Path]) -> tuple[dict[str, Path], list[tuple[Path, list[dict]]]]:
    """The run directories (by unique name) and the suites (with their rows) among ``dirs``."""
    runs: dict[str, Path] = {}
    suites = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise UserError(f"{d}: not a directory (give a run directory or a suite directory)")
        metrics, results = d / METRICS_FILE, d / "results.json"
        suite = None
        if results.is_file():
            try:
                suite = read_suite(results)
            except UserError:
                if not metrics.is_file():
                    raise
        if not metrics.is_file() and suite is None:
            raise UserError(f"{d}: neither metrics.jsonl (a run) nor results.json (a suite) is there; "
                            "give a run directory or a suite directory")
        if suite is not None:
            suites.append((d, suite))
        if metrics.is_file():
            name, i = _safe(d.resolve().name), 2
            while name in runs:
                name, i = f"{_safe(d.resolve().name)}_{i}", i + 1
            runs[name] = metrics
    return runs, suites


def report(dirs: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """Draw the plots of the run and suite directories ``dirs`` into ``out`` (default ``DIR/plots`` for
    one directory, else ``./plots``) and return the files written (see the module's doc for their
    names). Plots without data are skipped with one logged line each."""
    dirs = list(dirs)
    if not dirs:
        raise UserError("give at least one run or suite directory")
    runs, suites = _classify(dirs)
    _figure_class()
    out = Path(out) if out is not None else (Path(dirs[0]) / "plots" if len(dirs) == 1 else Path("plots"))
    written: list[Path] = []

    def skip(what: str, why: str) -> None:
        logger.info("skipped %s: %s", what, why)

    loaded: dict[str, list[dict]] = {}
    for name, path in runs.items():
        records = read_metrics(path)
        if not records:
            skip(f"{name}", f"{path} has no records")
            continue
        loaded[name] = records
        loss = run_loss_panels(records)
        if loss[0].empty:
            skip(f"loss_{name}.png", "no loss or val/* values")
        else:
            written.append(draw(loss, out / f"loss_{name}.png", f"{name}: loss, learning rate, gradient norm"))
        evals = run_eval_panels(records)
        if evals:
            written.append(draw(evals, out / f"eval_{name}.png", f"{name}: downstream evaluation during training"))
        if is_rl_run(records):
            written.append(draw(run_rl_panels(records), out / f"rl_{name}.png", f"{name}: RL"))
    with_loss = {n: r for n, r in loaded.items() if not run_loss_panels(r)[0].empty}
    if len(with_loss) >= 2:
        panels = [p for p in compare_panels(with_loss, run_loss_panels) if not p.empty]
        if panels:
            written.append(draw(panels, out / "compare_loss.png", "runs compared: loss, learning rate, gradient norm"))
    rl = {n: r for n, r in loaded.items() if is_rl_run(r)}
    if len(rl) >= 2:
        written.append(draw([p for p in compare_panels(rl, run_rl_panels) if not p.empty],
                            out / "compare_rl.png", "RL runs compared"))

    for suite_dir, rows in suites:
        prefix = "" if len(suites) == 1 else f"{_safe(suite_dir.resolve().name)}_"
        plots = suite_axis_plots(rows)
        if not plots:
            skip(f"{suite_dir} axis plots", "no stage has an axis with two or more values and a metric")
        for stem, panel in plots:
            written.append(draw([panel], out / f"{prefix}{stem}.png", f"suite {suite_dir.resolve().name}"))
        gap = stability_series(suite_dir, rows)
        if not gap:
            skip(f"{prefix}stability_gap.png", "no CPT run with val/* or eval/* records")
        else:
            color = {run: f"C{i % 10}" for i, run in enumerate(dict.fromkeys(r for lines in gap.values()
                                                                              for r in lines))}
            panels = [Panel(key, "step", "loss" if key.startswith(VAL_PREFIX) else key.rpartition("/")[2],
                            [Line(run, xs, ys, {"marker": "o", "color": color[run]})
                             for run, (xs, ys) in lines.items()])
                      for key, lines in gap.items()]
            written.append(draw(panels, out / f"{prefix}stability_gap.png",
                                f"stability gap: the first {STABILITY_FRACTION:.0%} of each CPT run"))
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megaevo report", description="Draw PNG plots of training runs "
                                "(DIR/metrics.jsonl) and suites (DIR/results.json with DIR/runs/ID/metrics.jsonl).")
    p.add_argument("dirs", nargs="+", metavar="RUN_OR_SUITE_DIR", help="run or suite directories")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: DIR/plots for one "
                   "directory, else ./plots)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``megaevo report``: print the files written, one a line; a mistake in the input (a UserError, a
    path that cannot be read or written) is one line on stderr, ``error: megaevo report: ...``, exit 2."""
    args = build_parser().parse_args(argv)
    if not configured():
        setup_logging()
    try:
        files = report(args.dirs, args.out)
    except (ValueError, OSError, ImportError) as e:
        return report_user_error(e, "report")
    for f in files:
        print(f)
    return 0
