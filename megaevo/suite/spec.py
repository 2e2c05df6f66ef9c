"""A suite spec: the stages of a model's life, the axes each one varies, and the evaluation after each.

The spec is one YAML file::

    out: suite-out                   # default for --out (relative to this file); default: <spec name>-out
    overrides:                       # applied to every stage (after its config file), e.g. the model shape
      - model.preset=evolm-1b
    eval: {tasks: [gsm8k_platinum], limit: 200}   # the suite's downstream tasks: evaluated after every stage
    only: ["pretrain[tokens=40B]/cpt[replay=0.16]"]   # optional: these runs and their ancestors, not the grid
    stages:                          # in order: an increasing subsequence of pretrain, cpt, sft, rl
      - stage: pretrain
        config: configs/pretrain.yaml    # a megaevo train config, relative to this file (optional)
        overrides: [train.global_batch_size=512]   # dotted key=value, as `megaevo train` takes them
        axes:
          tokens:                    # axis name -> {value label: overrides}
            20B: [train.iters=20000]
            40B: [train.iters=40000]
        eval: {tasks: [hellaswag, arc_easy], limit: 500}
        nproc: 8                     # processes per node (torchrun); default 1
        slurm: {nodes: 2, gpus_per_node: 8, time: "48:00:00", partition: gpu, sbatch: ["--account=lm"],
                signal_before: 600, max_restarts: 0, eval_time: "02:00:00"}   # see megaevo/suite/launch.py
      - stage: cpt
        config: configs/cpt.yaml
        axes:
          - name: replay             # the list form: name + values
            values:
              - value: 0.0
                set: {data.train: [1.0, data/finemath]}
              - value: 0.16
                set: ["data.train=[0.84, data/finemath, 0.16, data/fineweb]"]
      - stage: sft
        config: configs/sft.yaml
        axes:
          - name: epochs
            key: train.epochs        # shorthand: one key, each value is the value itself
            values: [1, 2, 4]
        eval: {tasks: [gsm8k_platinum, math_500], limit: 200, samples: 0, template: evolm}

An axis is given either as a mapping ``{label: overrides}`` or as a list entry ``{name, values}`` where
each value is ``{value: LABEL, set: OVERRIDES}`` or, with ``key: DOTTED``, a bare value. OVERRIDES is a
list of ``key=value`` strings or a mapping ``{dotted.key: value}`` (a string value is read as YAML, as
on the command line). A stage's config is: its config file, then the top-level `overrides`, then the
stage's `overrides`, then its axes' overrides (axes in name order; two axes of one stage may not set
the same key, so the order of axes in the file never matters). Axis names are unique over the spec.

`stage` is set by the suite (cpt is a `stage: pretrain` run). Relative paths inside the configs and the
overrides (data prefixes, tokenizers) are relative to the spec's directory, where every run starts; a
run's train.yaml records them absolute (its id does not depend on where the spec is). `eval` takes the
`megaevo eval` options: `tasks`, `limit`, `samples`, `template`, and also `data_dir`, `max_length`,
`batch_size`, `seed`. The top-level `eval` holds the suite's downstream tasks: every run of every stage
is evaluated on them, so each row of the results can be compared with its parent's. A stage's own
`eval` adds its tasks to those, and its other keys replace the top-level ones for that stage's runs
(one `megaevo eval` per run); without a top-level `eval`, only the stages with an `eval` of their own
are evaluated. `out_dir` and `checkpoint.load` are the suite's: a run writes OUT/runs/STAGE-ID
and a stage after the first starts from its parent's final checkpoint, weights only.

`only` keeps the runs it names and their ancestors (names as `megaevo suite --dry-run` prints them;
the same rule as the `--only` flag, which replaces it): a study whose questions each need a few chains
of the tree, not the whole product of its axes.

With ``optim.schedule`` ``wsd`` or ``inf-cos``, a pretrain / cpt stage's grid points that differ only in
``train.iters`` (budgets) share one stable run and branch from its checkpoint, each running only its own
decay (megaevo.suite.tree); the suite then sets their ``data.train_samples`` too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megaevo.errors import UserError

STAGES = ("pretrain", "cpt", "sft", "rl")
TRAIN_STAGE = {"pretrain": "pretrain", "cpt": "pretrain", "sft": "sft", "rl": "rl"}
EVAL_KEYS = {"tasks", "limit", "samples", "template", "data_dir", "max_length", "batch_size", "seed"}
SIGNAL_BEFORE_S = 300  # default lead of the time-limit signal (slurm.signal_before)
SLURM_KEYS = {"nodes", "gpus_per_node", "time", "partition", "sbatch", "signal_before", "max_restarts", "eval_time"}
STAGE_KEYS = {"stage", "config", "overrides", "axes", "eval", "nproc", "slurm"}
TOP_KEYS = {"out", "overrides", "stages", "name", "eval", "only"}
# keys the suite sets itself
RESERVED = ("stage", "out_dir", "checkpoint.load", "checkpoint.finetune")


class SpecError(UserError):
    """A mistake in a suite spec."""


@dataclass
class AxisValue:
    label: Any
    overrides: list[str]


@dataclass
class Axis:
    name: str
    values: list[AxisValue]


@dataclass
class EvalSpec:
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    samples: int = 0
    template: str = "evolm"
    data_dir: str | None = None
    max_length: int | None = None
    batch_size: int | None = None
    seed: int | None = None

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in sorted(EVAL_KEYS)}


@dataclass
class StageSpec:
    name: str                        # pretrain | cpt | sft | rl
    config: Path | None              # absolute
    overrides: list[str]             # common + the stage's own
    axes: list[Axis]                 # sorted by name
    eval: EvalSpec | None
    nproc: int = 1
    slurm: dict = field(default_factory=dict)
    root: Path | None = None         # the spec's directory: relative paths in the configs are relative to it

    @property
    def signal_before(self) -> int:
        """Seconds before the time limit at which a train job's batch shell gets SIGUSR1 (0: none)."""
        return int(self.slurm.get("signal_before", SIGNAL_BEFORE_S) or 0)


@dataclass
class SuiteSpec:
    path: Path
    root: Path                       # the spec's directory: runs start there
    out: Path | None
    stages: list[StageSpec]
    eval: EvalSpec | None = None     # the suite's downstream tasks (top-level `eval`), in every stage's eval
    only: list[str] = field(default_factory=list)  # the runs the suite is (with their ancestors); [] for all


def _override_text(key: str, value: Any) -> str:
    if isinstance(value, str):
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"


def overrides_list(raw: Any, where: str) -> list[str]:
    """`key=value` strings from a list of them or a mapping {key: value}."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        return [_override_text(str(k), v) for k, v in raw.items()]
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise SpecError(f"{where}: overrides must be a list of key=value or a mapping, got {type(raw).__name__}")
    out = []
    for item in raw:
        if isinstance(item, dict):
            out += overrides_list(item, where)
        elif isinstance(item, str) and "=" in item:
            out.append(item)
        else:
            raise SpecError(f"{where}: {item!r} is not a dotted key=value override")
    return out


def _check_reserved(overrides: list[str], where: str) -> None:
    for o in overrides:
        key = o.partition("=")[0].strip()
        if key in RESERVED:
            raise SpecError(f"{where}: {key} is set by the suite (out_dir OUT/runs/STAGE-ID; a later stage starts "
                            f"from its parent's checkpoint); leave it out")


def _axis_values(name: str, raw: Any, key: str | None, where: str) -> list[AxisValue]:
    values = []
    if isinstance(raw, dict):  # {label: overrides}
        for label, ov in raw.items():
            values.append(AxisValue(label, [_override_text(key, ov)] if key else overrides_list(ov, where)))
    elif isinstance(raw, list):
        for item in raw:
            if isinstance(item, dict) and ("set" in item or "value" in item):
                unknown = set(item) - {"set", "value"}
                if unknown:
                    raise SpecError(f"{where}: unknown keys {sorted(unknown)} in a value (value, set)")
                label = item.get("value")
                ov = overrides_list(item.get("set"), where)
                if key and "set" not in item:
                    ov = [_override_text(key, label)]
                values.append(AxisValue(label, ov))
            elif key is not None:
                values.append(AxisValue(item, [_override_text(key, item)]))
            else:
                raise SpecError(f"{where}: a value is {{value: LABEL, set: OVERRIDES}} (or give the axis a `key`)")
    else:
        raise SpecError(f"{where}: values must be a list or a mapping")
    if not values:
        raise SpecError(f"{where}: no values")
    labels = [json.dumps(v.label, sort_keys=True, default=str) for v in values]
    if len(set(labels)) != len(labels):
        raise SpecError(f"{where}: repeated value labels")
    return values


def _axes(raw: Any, where: str) -> list[Axis]:
    if raw is None:
        return []
    axes = []
    if isinstance(raw, dict):
        for name, vals in raw.items():
            axes.append(Axis(str(name), _axis_values(str(name), vals, None, f"{where}.{name}")))
    elif isinstance(raw, list):
        for i, a in enumerate(raw):
            if not isinstance(a, dict) or "name" not in a or "values" not in a:
                raise SpecError(f"{where}[{i}]: an axis is {{name: ..., values: [...]}} (optionally key: DOTTED)")
            unknown = set(a) - {"name", "values", "key"}
            if unknown:
                raise SpecError(f"{where}[{i}]: unknown keys {sorted(unknown)} (name, values, key)")
            name = str(a["name"])
            axes.append(Axis(name, _axis_values(name, a["values"], a.get("key"), f"{where}.{name}")))
    else:
        raise SpecError(f"{where}: axes must be a mapping or a list")
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise SpecError(f"{where}: repeated axis names")
    for a in axes:
        for v in a.values:
            _check_reserved(v.overrides, f"{where}.{a.name}")
    # two axes of a stage may not set the same key: then their order never matters
    owner: dict[str, str] = {}
    for a in axes:
        keys = {o.partition("=")[0].strip() for v in a.values for o in v.overrides}
        for k in keys:
            if k in owner and owner[k] != a.name:
                raise SpecError(f"{where}: axes {owner[k]} and {a.name} both set {k}")
            owner[k] = a.name
    return sorted(axes, key=lambda a: a.name)


def _eval_dict(raw: Any, where: str) -> dict:
    """An `eval` entry as a mapping with `tasks` a list of strings ({} for none)."""
    if raw is None:
        return {}
    if isinstance(raw, list):
        raw = {"tasks": raw}
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: eval must be a mapping (tasks, limit, samples, template)")
    unknown = set(raw) - EVAL_KEYS
    if unknown:
        raise SpecError(f"{where}: unknown keys {sorted(unknown)} (known: {', '.join(sorted(EVAL_KEYS))})")
    tasks = raw.get("tasks") or []
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    return {**raw, "tasks": [str(t) for t in tasks]}


def _eval(raw: dict) -> EvalSpec | None:
    return EvalSpec(**raw) if raw.get("tasks") else None


def merge_eval(suite: dict, stage: dict) -> dict:
    """A stage's evaluation: the suite's tasks then the stage's own; the stage's other keys win."""
    tasks = list(dict.fromkeys(suite.get("tasks", []) + stage.get("tasks", [])))
    return {**suite, **stage, "tasks": tasks}


def load_spec(path: str | Path) -> SuiteSpec:
    """Read and check a suite spec (see the module docstring)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise SpecError(f"{path}: suite spec not found" if not path.exists() else
                        f"{path}: not a file (give the suite spec, a YAML file)")
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SpecError(f"{path}: cannot read the suite spec: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    return spec_from_dict(raw, path)


def spec_from_dict(raw: Any, path: str | Path) -> SuiteSpec:
    path = Path(path).resolve()
    root = path.parent
    if not isinstance(raw, dict) or not raw.get("stages"):
        raise SpecError(f"{path}: a suite spec is a mapping with `stages:` (a list)")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise SpecError(f"{path}: unknown keys {sorted(unknown)} (known: {', '.join(sorted(TOP_KEYS))})")
    common = overrides_list(raw.get("overrides"), f"{path.name}: overrides")
    _check_reserved(common, f"{path.name}: overrides")
    suite_eval = _eval_dict(raw.get("eval"), f"{path.name}: eval")
    stages, last, seen_axes = [], -1, set()
    for i, s in enumerate(raw["stages"]):
        where = f"{path.name}: stages[{i}]"
        if not isinstance(s, dict) or s.get("stage") not in STAGES:
            raise SpecError(f"{where}: `stage` must be one of {', '.join(STAGES)}")
        unknown = set(s) - STAGE_KEYS
        if unknown:
            raise SpecError(f"{where}: unknown keys {sorted(unknown)} (known: {', '.join(sorted(STAGE_KEYS))})")
        name = s["stage"]
        if STAGES.index(name) <= last:
            raise SpecError(f"{where}: stages go in the order {' -> '.join(STAGES)}, each at most once; "
                            f"{name} comes after {STAGES[last]}")
        last = STAGES.index(name)
        config = None
        if s.get("config"):
            config = (root / str(s["config"])).resolve()
            if not config.is_file():
                raise SpecError(f"{where}: config {config} not found")
        own = overrides_list(s.get("overrides"), f"{where}.overrides")
        _check_reserved(own, f"{where}.overrides")
        axes = _axes(s.get("axes"), f"{where}.axes")
        for a in axes:
            if a.name in seen_axes:
                raise SpecError(f"{where}: axis {a.name} is also an axis of an earlier stage (names are unique)")
            seen_axes.add(a.name)
        slurm = s.get("slurm") or {}
        if not isinstance(slurm, dict) or set(slurm) - SLURM_KEYS:
            raise SpecError(f"{where}.slurm: a mapping of {', '.join(sorted(SLURM_KEYS))}")
        for key in ("signal_before", "max_restarts"):
            if key in slurm and (isinstance(slurm[key], bool) or not isinstance(slurm[key], int) or slurm[key] < 0):
                unit = "seconds" if key == "signal_before" else "restarts"
                raise SpecError(f"{where}.slurm.{key}: a whole number of {unit} >= 0, got {slurm[key]!r}")
        nproc = int(s.get("nproc") or 1)
        if nproc < 1:
            raise SpecError(f"{where}: nproc must be >= 1")
        ev = merge_eval(suite_eval, _eval_dict(s.get("eval"), f"{where}.eval"))
        stages.append(StageSpec(name, config, common + own, axes, _eval(ev), nproc, dict(slurm), root))
    out = raw.get("out")
    only = raw.get("only") or []
    if not isinstance(only, list) or not all(isinstance(x, str) and x for x in only):
        raise SpecError(f"{path.name}: only must be a list of run names (as --only takes them), got {only!r}")
    return SuiteSpec(path, root, (root / str(out)).resolve() if out else None, stages, _eval(suite_eval), list(only))
