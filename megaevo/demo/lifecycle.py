"""The demo's life cycle: a built-in suite (pretrain -> cpt -> sft -> rl) on the tiny model, run locally.

`write_suite` writes DIR/suite.yaml and the four stage configs DIR/configs/{pretrain,cpt,sft,rl}.yaml,
each only when it is absent, so a user edits them and reruns. `run_life_cycle` trains and evaluates the
suite's tree into DIR/suite/ (finished runs are skipped on a rerun), writes DIR/suite/results.{json,csv,md}
and the plots in DIR/plots/, and returns the rows with a short table of the dynamics:

* pretrain on general+math (the base model's accuracy);
* cpt on math, axis ``replay`` (the fraction of general text replayed): ``loss/math`` falls, and replay
  limits the rise of ``loss/general`` (general text at weight 0 without replay: its held-out split is
  still measured, the same documents as in pre-training);
* sft on reasoning-gym GCD worked solutions (DIR/data/sft); accuracy on rg:gcd rises;
* rl (GRPO) on other GCD problems; the mean reward rises (first vs last steps of the run).

Every run is evaluated on the suite's downstream task, rg:gcd (the spec's top-level ``eval``), so each
row's accuracy can be compared with its parent's. While a run trains, its step lines are shown every few
seconds (megaevo.suite.progress).

SFT and RL continue from the last CPT run only (with replay), to fit the time; `all_chains=True` (and
`megaevo suite DIR/suite.yaml`) trains them after every CPT run.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from megaevo.demo.corpora import TRAIN_ITERS, VOCAB_SIZE
from megaevo.demo.training import grpo_settings, sft_settings, train_settings
from megaevo.metrics import METRICS_FILE, read_metrics
from megaevo.suite import collect, expand, load_spec, run_local, write_results
from megaevo.suite.launch import progress_runner
from megaevo.suite.report import report

SUITE_FILE = "suite.yaml"
SUITE_OUT = "suite"
EVAL_TASK = "rg:gcd:200"
REWARD_WINDOW = 3  # the mean reward of the first and of the last this many RL steps


@dataclass
class LifeCycleSizes:
    """How long each stage runs; the defaults fit about 15 minutes on two CPU cores."""

    pretrain_iters: int = TRAIN_ITERS
    cpt_iters: int = 100
    replay: tuple = (0.0, 0.25)
    sft_epochs: int = 1
    rl_iters: int = 20
    rl_prompts: int = 32
    rl_n: int = 8
    rl_max_new_tokens: int = 128
    eval_task: str = EVAL_TASK
    eval_batch_size: int = 50
    overrides: list = field(default_factory=list)  # dotted overrides applied to every stage


def stage_configs(vocab_size: int = VOCAB_SIZE, seed: int = 1234, sizes: LifeCycleSizes | None = None) -> dict:
    """The four stage configs, paths relative to the demo directory (where the suite's runs start)."""
    s = sizes or LifeCycleSizes()
    pretrain = train_settings(".", s.pretrain_iters, vocab_size, seed)
    cpt = train_settings(".", s.cpt_iters, vocab_size, seed)
    # general at weight 0 trains on nothing but keeps its held-out split: loss/general is measured on the
    # same documents as in pre-training, with and without replay
    cpt["data"]["train"] = {"math": {"prefix": "data/math", "weight": 1.0},
                            "general": {"prefix": "data/general", "weight": 0.0}}
    cpt["optim"] = {"lr": 1e-3, "min_lr": 1e-4, "warmup": max(1, s.cpt_iters // 10), "schedule": "cosine",
                    "weight_decay": 0.1}
    sft = sft_settings(".", vocab_size, seed)
    sft["train"]["epochs"] = s.sft_epochs
    rl = grpo_settings(".", vocab_size, seed)
    rl["rl"].update(prompts_per_step=s.rl_prompts, n=s.rl_n, max_new_tokens=s.rl_max_new_tokens)
    rl["train"]["iters"] = s.rl_iters
    rl["train"]["micro_batch_size"] = math.gcd(rl["train"]["micro_batch_size"], s.rl_prompts * s.rl_n)
    rl["checkpoint"]["interval"] = max(1, s.rl_iters // 2)
    configs = {"pretrain": pretrain, "cpt": cpt, "sft": sft, "rl": rl}
    for cfg in configs.values():  # the suite sets these itself
        cfg.pop("out_dir", None)
        if cfg is not pretrain:
            cfg["checkpoint"].pop("load", None)
        cfg["checkpoint"].pop("finetune", None)
    return configs


def suite_settings(sizes: LifeCycleSizes | None = None) -> dict:
    """The suite spec (see megaevo.suite.spec) over DIR/configs/STAGE.yaml."""
    s = sizes or LifeCycleSizes()
    ev = {"tasks": [s.eval_task], "batch_size": s.eval_batch_size, "template": "evolm"}

    def replay(r: float) -> dict:
        train = {"math": {"prefix": "data/math", "weight": round(1.0 - r, 6)},
                 "general": {"prefix": "data/general", "weight": r}}
        return {"value": r, "set": {"data.train": train}}

    spec = {
        "out": SUITE_OUT,
        "eval": ev,  # the suite's downstream task: every run of every stage
        "stages": [
            {"stage": "pretrain", "config": "configs/pretrain.yaml"},
            {"stage": "cpt", "config": "configs/cpt.yaml",
             "axes": [{"name": "replay", "values": [replay(r) for r in s.replay]}]},
            {"stage": "sft", "config": "configs/sft.yaml"},
            {"stage": "rl", "config": "configs/rl.yaml"},
        ],
    }
    if s.overrides:
        spec["overrides"] = list(s.overrides)
    return spec


def write_suite(root: str | os.PathLike, vocab_size: int = VOCAB_SIZE, seed: int = 1234,
                sizes: LifeCycleSizes | None = None, log=print) -> Path:
    """Write ROOT/suite.yaml and ROOT/configs/STAGE.yaml where absent (a user's edits survive); return the spec."""
    root = Path(root)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    files = {root / "configs" / f"{name}.yaml": cfg for name, cfg in stage_configs(vocab_size, seed, sizes).items()}
    files[root / SUITE_FILE] = suite_settings(sizes)
    for path, content in files.items():
        if path.is_file():
            continue
        path.write_text(yaml.safe_dump(content, sort_keys=False, default_flow_style=False))
        log(f"  wrote {path}")
    return root / SUITE_FILE


def rewards(run_dir: Path, window: int = REWARD_WINDOW) -> tuple[float, float] | None:
    """The mean reward_mean of the first and of the last `window` steps of an RL run's metrics.jsonl."""
    by_step: dict[int, float] = {}
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    for rec in read_metrics(path, quiet=True):
        if isinstance(rec.get("step"), int) and rec.get("reward_mean") is not None:
            by_step[rec["step"]] = float(rec["reward_mean"])
    if not by_step:
        return None
    vals = [by_step[k] for k in sorted(by_step)]
    w = max(1, min(window, len(vals) // 2 or 1))
    return sum(vals[:w]) / w, sum(vals[-w:]) / w


def accuracy_key(metrics: dict) -> str | None:
    keys = [k for k in metrics if k.endswith("/accuracy") and not k.startswith(("id_avg", "ood_avg"))]
    return keys[0] if keys else None


@dataclass
class LifeCycleResult:
    spec: str
    out: str
    rows: list = field(default_factory=list)      # megaevo.suite.collect rows, with reward/first, reward/last
    files: list = field(default_factory=list)     # results.{json,csv,md}
    plots: list = field(default_factory=list)
    trained: list = field(default_factory=list)
    evaluated: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        """One line per run: its chain, the upstream losses, the task accuracy and the RL reward."""
        cols = [("loss/general", "loss/general"), ("loss/math", "loss/math"), ("accuracy", None),
                ("reward first", "reward/first"), ("reward last", "reward/last")]
        names = [r.get("chain") or r["run"] for r in self.rows]
        width = max([len(n) for n in names] + [5])
        lines = [f"  {'run':<{width}}" + "".join(f"{c:>14}" for c, _ in cols)]
        for name, row in zip(names, self.rows):
            m = row["metrics"]
            cells = []
            for _, key in cols:
                v = m.get(key or accuracy_key(m) or "")
                cells.append(f"{v:>14.3f}" if isinstance(v, (int, float)) else f"{'-':>14}")
            lines.append(f"  {name:<{width}}" + "".join(cells))
        return "\n".join(lines)


def demo_runs(runs: list, all_chains: bool = False) -> list:
    """The runs the demo trains: every pretrain and cpt run, and the later stages only after the last cpt
    run (the last value of its axes: with replay), unless `all_chains` (the whole tree, as `megaevo suite`)."""
    cpt = [r for r in runs if r.stage == "cpt"]
    if all_chains or len(cpt) < 2:
        return runs
    keep = cpt[-1]
    return [r for r in runs if r.stage in ("pretrain", "cpt") or any(c is keep for c in r.chain)]


def run_life_cycle(root: str | os.PathLike, log=print, show=print, all_chains: bool = False) -> LifeCycleResult:
    """Train and evaluate ROOT/suite.yaml's runs (see `demo_runs`; finished runs are skipped), write the
    results and the plots."""
    start = time.perf_counter()
    root = Path(root).resolve()
    spec = load_spec(root / SUITE_FILE)
    out = spec.out or root / SUITE_OUT
    runs = demo_runs(expand(spec), all_chains)
    # a model this small trains fastest on few threads (see train_demo); children inherit the setting
    saved = os.environ.get("OMP_NUM_THREADS")
    if saved is None:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
    try:
        outcome = run_local(spec, runs, out, runner=progress_runner(log), echo=log)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    rows = collect(runs, out)
    chains = {r.dir_name: r.name for r in runs}
    for row in rows:
        row["chain"] = chains.get(row["run"])
        if row["stage"] == "rl":
            got = rewards(out / "runs" / row["run"])
            if got:
                row["metrics"]["reward/first"], row["metrics"]["reward/last"] = got
    files = write_results(rows, out, runs)
    plots = []
    if rows:
        try:
            plots = report([out], root / "plots")
        except Exception as e:  # plots are a bonus: a missing matplotlib must not lose the table
            log(f"  no plots: {e}")
    result = LifeCycleResult(str(spec.path), str(out), rows, [str(p) for p in files], [str(p) for p in plots],
                             outcome.trained, outcome.evaluated, list(outcome.problems),
                             round(time.perf_counter() - start, 1))
    show(result.table())
    show(f"  table   {out / 'results.md'}  (every metric: results.csv, results.json)")
    if plots:
        show(f"  plots   {root / 'plots'}  ({len(plots)} files)")
    for p in outcome.problems:
        show(f"  {p}")
    return result
