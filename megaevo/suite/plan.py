"""The summary that ends `megaevo suite SPEC --dry-run`: what the suite holds and what is left to do.

    plan = make_plan(spec, runs, out)
    print("\\n".join(plan.lines()))

* the runs per stage (a WSD / Inf-Cos stage's shared stable runs counted apart), how many are finished
  and how many are left to train and to evaluate (the `DONE` markers under OUT);
* the training tokens of the stages whose runs have a fixed length (pretrain and cpt without
  ``train.epochs``: iterations x global batch x sequence length, a budget branched from a stable run
  counting only its own iterations) and their training FLOPs
  (:func:`megaevo.model.flops.flops_per_token`); SFT and RL are left out (their length depends on
  the data and on generation);
* per run of those stages, its layout (TP x PP x DP over the stage's GPUs) and the GPU-hours the layout
  planner (:mod:`megaevo.plan`) estimates for it on H100-80GB, with the compute efficiency it assumed;
* the input paths of the runs' configs that do not exist: data prefixes (``data.train``,
  ``data.valid``), ``data.tokenizer``, ``rl.prompts`` files, ``rl.reference``, the first stage's
  ``checkpoint.load`` and the evaluation's ``data_dir`` (relative paths against the spec's directory,
  where the runs start). Those are usually the placeholders of an example spec, left to replace.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megaevo.config import config_from_dict
from megaevo.data import indexed
from megaevo.data.blended import parse_blend
from megaevo.model.args import ModelArgs
from megaevo.model.flops import flops_per_token
from megaevo.plan import estimate, hardware, of_config
from megaevo.suite.markers import eval_done, train_done
from megaevo.suite.spec import STAGES, SuiteSpec
from megaevo.suite.tree import Run

FIXED_LENGTH_STAGES = ("pretrain", "cpt")


@dataclass
class MissingPath:
    key: str                                         # the config key, e.g. data.tokenizer
    value: str                                       # the path as the config gives it
    stages: list[str] = field(default_factory=list)  # the stages whose runs use it


@dataclass
class Plan:
    runs: dict[str, int]                    # stage -> runs (stable runs included)
    stable: dict[str, int]                  # stage -> shared stable runs of its budgets
    finished: int                           # trained and evaluated
    to_train: int
    to_evaluate: int
    tokens: dict[str, int]                  # stage -> training tokens of its fixed-length runs
    flops: dict[str, float]                 # stage -> their training FLOPs
    missing: list[MissingPath]
    root: Path
    slurm: dict[str, int] | None = None     # launcher slurm: train and eval jobs to submit, signal leads (s)
    estimates: list[str] = field(default_factory=list)  # per fixed-length run: layout, GPU-hours (planner)

    @property
    def total(self) -> int:
        return sum(self.runs.values())

    def lines(self) -> list[str]:
        per_stage = ", ".join(f"{s} {n}" + (f" ({self.stable[s]} stable)" if self.stable.get(s) else "")
                              for s, n in self.runs.items())
        out = [f"{self.total} runs: {per_stage}",
               f"to train {self.to_train}, to evaluate {self.to_evaluate}, finished {self.finished}"]
        if self.slurm is not None:
            j = self.slurm
            lead = f"SIGUSR1 {j['signal_before']} s before --time: save and requeue" if j["signal_before"] else \
                "no time-limit signal: resubmit a job that reaches --time"
            out.append(f"slurm: {self.total} runs, {j['train'] + j['eval']} jobs ({j['train']} train, "
                       f"{j['eval']} eval), {len(self.runs)} stages; train jobs: {lead} until the run is complete")
        if self.tokens:
            parts = [f"{s} {_tokens(n)}" + (f" ({self.flops[s]:.3g} FLOPs)" if s in self.flops else "")
                     for s, n in self.tokens.items()]
            out.append("training tokens: " + ", ".join(parts))
        out += self.estimates
        if self.missing:
            out.append(f"warning: {len(self.missing)} input path(s) in the configs do not exist (placeholders to "
                       f"replace before running; relative paths are relative to {self.root}):")
            kw, vw = max(len(m.key) for m in self.missing), max(len(m.value) for m in self.missing)
            out += [f"  {m.key:<{kw}}  {m.value:<{vw}}  ({', '.join(m.stages)})" for m in self.missing]
        return out


def _tokens(n: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def run_tokens(run: Run) -> int | None:
    """The tokens a pretrain / cpt run trains on (its own iterations only), None when its length is not
    fixed by its config (train.epochs, SFT, RL)."""
    c = run.config
    if run.stage not in FIXED_LENGTH_STAGES or c["train"].get("epochs") is not None:
        return None
    start = run.branch_step if run.branch == "decay" else 0
    return (int(c["train"]["iters"]) - (start or 0)) * int(c["train"]["global_batch_size"]) * _seq_len(c)


def _seq_len(c: dict) -> int:
    return int(c["data"].get("seq_len") or c["model"]["max_seq_len"])


def _flops(run: Run, tokens: int) -> float | None:
    try:
        return flops_per_token(ModelArgs(**run.config["model"]), _seq_len(run.config)) * tokens
    except (TypeError, ValueError, KeyError):
        return None


def run_estimate(run: Run, tokens: int) -> str | None:
    """One line: the run's layout and the planner's GPU-hours for its tokens (None when it cannot say)."""
    try:
        cfg = config_from_dict({k: v for k, v in run.config.items() if v is not None})
        spec = run.stage_spec
        gpus = spec.nproc * int((spec.slurm or {}).get("nodes") or 1)
        p = cfg.parallel
        dp = gpus // (p.tp * p.pp)
        w, c = of_config(cfg, dp)
        if dp < 1 or c.gpus != gpus:
            return None
        e = estimate(w, c, hardware("h100-80g", gpus_per_node=spec.nproc))
    except (TypeError, ValueError, KeyError, ZeroDivisionError):
        return None
    hours = tokens / e.tokens_per_s * gpus / 3600
    return (f"  {run.dir_name}: tp {p.tp} pp {p.pp} dp {dp} on {gpus} GPU(s): ~{hours:.3g} H100 GPU-hours "
            f"(planner: {e.mfu:.0%} MFU, compute at {e.efficiency:.0%} of peak, {e.memory_bytes / 2**30:.1f} GB/GPU)")


def input_paths(run: Run) -> list[tuple[str, str, bool]]:
    """(key, path, is a dataset prefix) for every input path of a run's config and evaluation."""
    c = run.config
    data = c.get("data") or {}
    out: list[tuple[str, str, bool]] = []
    try:
        out += [("data.train", str(corpus.prefix), True) for corpus in parse_blend(data.get("train") or [])]
    except ValueError:
        pass  # the training itself names a malformed blend
    out += [("data.valid", str(prefix), True) for prefix in (data.get("valid") or {}).values()]
    if data.get("tokenizer"):
        out.append(("data.tokenizer", str(data["tokenizer"]), False))
    rl = c.get("rl") or {}
    if c.get("stage") == "rl":
        for spec in rl.get("prompts") or []:
            spec = str(spec)  # rg:NAME, or an EvoLM set's name in the eval data dir, is not a path
            if not spec.startswith("rg:") and ("/" in spec or spec.endswith((".jsonl", ".json", ".gz"))):
                out.append(("rl.prompts", spec, False))
        if rl.get("reference"):
            out.append(("rl.reference", str(rl["reference"]), False))
    load = (c.get("checkpoint") or {}).get("load")
    if run.parent is None and load not in (None, "auto", "none"):
        out.append(("checkpoint.load", str(load), False))
    if run.eval is not None and run.eval.data_dir:
        out.append(("eval.data_dir", str(run.eval.data_dir), False))
    return out


def _exists(path: str, prefix: bool, root: Path) -> bool:
    p = Path(path) if Path(path).is_absolute() else root / path
    return indexed.exists(p) if prefix else p.exists()


def missing_paths(runs: list[Run], root: Path) -> list[MissingPath]:
    """The input paths of `runs` that do not exist, each once, with the stages that use it."""
    found: dict[tuple[str, str], MissingPath] = {}
    checked: dict[tuple[str, bool], bool] = {}
    for run in runs:
        for key, path, prefix in input_paths(run):
            if (path, prefix) not in checked:
                checked[path, prefix] = _exists(path, prefix, root)
            if checked[path, prefix]:
                continue
            m = found.setdefault((key, path), MissingPath(key, path))
            if run.stage not in m.stages:
                m.stages.append(run.stage)
    for m in found.values():
        m.stages.sort(key=STAGES.index)
    return list(found.values())


def make_plan(spec: SuiteSpec, runs: list[Run], out: Path, launcher: str = "local") -> Plan:
    counts: dict[str, int] = {}
    stable: dict[str, int] = {}
    tokens: dict[str, int] = {}
    flops: dict[str, float] = {}
    finished = to_train = to_evaluate = 0
    no_flops: set[str] = set()
    estimates: list[str] = []
    for run in runs:
        counts[run.stage] = counts.get(run.stage, 0) + 1
        if run.branch == "stable":
            stable[run.stage] = stable.get(run.stage, 0) + 1
        trained, evaluated = train_done(run, out), eval_done(run, out)
        finished += trained and evaluated
        to_train += not trained
        to_evaluate += not evaluated
        n = run_tokens(run)
        if n is None:
            continue
        tokens[run.stage] = tokens.get(run.stage, 0) + n
        line = run_estimate(run, n)
        if line is not None:
            estimates.append(line)
        f = _flops(run, n)
        if f is None:
            no_flops.add(run.stage)
        else:
            flops[run.stage] = flops.get(run.stage, 0.0) + f
    for s in no_flops:
        flops.pop(s, None)
    slurm = None
    if launcher == "slurm":
        pending = [r for r in runs if not train_done(r, out)]
        slurm = {"train": len(pending), "eval": sum(r.eval is not None and not eval_done(r, out) for r in runs),
                 "signal_before": max((r.stage_spec.signal_before for r in pending), default=0)}
    if estimates:
        estimates.insert(0, "estimated GPU-hours per run (layout planner, megaevo plan):")
    return Plan(counts, stable, finished, to_train, to_evaluate, tokens, flops, missing_paths(runs, spec.root),
                spec.root, slurm, estimates)
