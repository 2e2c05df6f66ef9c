"""`megaevo suite SPEC.yaml`: train and evaluate every run of a suite's tree, then collect the results.

Launchers:

* ``local`` runs the tree here, one run after another (parents first) as subprocesses:
  ``python -m megaevo.train --config OUT/runs/STAGE-ID/train.yaml`` (``torchrun --nproc_per_node N`` when
  the stage gives ``nproc``), logging to ``train.log``, then ``megaevo eval`` into ``OUT/runs/STAGE-ID/eval/``
  (``eval.log``); while a child runs, its step lines are shown every few seconds, and a line when it is
  quiet for long (:mod:`megaevo.suite.progress`). A run's ``DONE`` marker (its config hash) is written
  last, so a rerun skips what finished and resumes what was stopped (the run's own checkpoints:
  ``checkpoint.load`` resumes them first). A
  failed run is reported with its log and its descendants are skipped; other runs go on. Ctrl-C stops the
  child (it saves a checkpoint on the signal) and the suite, leaving no marker.
* ``slurm`` writes ``OUT/slurm/STAGE-ID.sbatch`` (training) and ``OUT/slurm/STAGE-ID.eval.sbatch`` (its
  evaluation, one GPU) per run and submits them in tree order with ``sbatch --parsable
  --dependency=afterok:JOB`` (a train job after its parent's train job, an evaluation after its run's).
  A train job gets SIGUSR1 ``slurm.signal_before`` seconds before its time limit, the run saves on it,
  and the job requeues itself until the run is complete (:func:`sbatch_script`); with ``--dry-run`` it
  prints the submission lines instead (``--verbose``: each script before its line).

``--dry-run`` lists the runs, one line each (``--verbose``: with their commands, or for slurm the sbatch
scripts), and ends with a summary (:mod:`megaevo.suite.plan`): runs per stage, what is left to train and
evaluate, the training tokens and FLOPs, and the input paths that do not exist (placeholders).

A WSD / Inf-Cos stage's budgets run under their shared stable run (megaevo.suite.tree): the stable run
trains and saves first, each budget resumes its checkpoint (local: parents first; slurm: afterok on the
stable run's job); ``--dry-run`` marks both. Every run starts in the spec's directory (relative data
paths are relative to it). Results:
:mod:`megaevo.suite.results` (OUT/results.{csv,json,md}).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from megaevo.errors import report_user_error
from megaevo.suite.markers import DONE, eval_done, eval_hash, run_iters, train_done, training_complete, write_marker
from megaevo.suite.plan import make_plan
from megaevo.suite.progress import POLL_S, Progress
from megaevo.suite.results import collect, write_results
from megaevo.suite.spec import SpecError, SuiteSpec, load_spec
from megaevo.suite.tree import Run, expand, select

# runner(cmd, log_path, cwd, env) -> exit code; the default runs a subprocess (tests inject their own)
Runner = Callable[[list, Path, Path, dict], int]
STOP_GRACE_S = 120.0  # how long a child may take to save on Ctrl-C before it is killed


# ------------------------------------------------------------------------------------ commands


def train_command(run: Run, out: Path, python: str = sys.executable) -> list[str]:
    cfg = str(run.run_dir(out).resolve() / "train.yaml")
    nproc = run.stage_spec.nproc
    if nproc > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                "-m", "megaevo.train", "--config", cfg]
    return [python, "-m", "megaevo.train", "--config", cfg]


def eval_command(run: Run, out: Path, python: str = sys.executable) -> list[str] | None:
    e = run.eval
    if e is None:
        return None
    d = run.run_dir(out).resolve()
    cmd = [python, "-m", "megaevo.cli", "eval", "--load", str(d), "--tasks", ",".join(e.tasks),
           "--out", str(d / "eval"), "--template", e.template, "--samples", str(e.samples), "--quiet"]
    for key, flag in (("limit", "--limit"), ("data_dir", "--data-dir"), ("max_length", "--max-length"),
                      ("batch_size", "--batch-size"), ("seed", "--seed")):
        if getattr(e, key) is not None:
            cmd += [flag, str(getattr(e, key))]
    return cmd


def write_run_config(run: Run, out: Path) -> Path:
    d = run.run_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "train.yaml"
    text = yaml.safe_dump(run.resolved(out), sort_keys=False, default_flow_style=False)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


# ------------------------------------------------------------------------------------ local


def subprocess_runner(cmd: list, log_path: Path, cwd: Path, env: dict, progress: Progress | None = None,
                      poll: float = POLL_S) -> int:
    """Run `cmd` with stdout and stderr appended to `log_path`, feeding what it writes to `progress` every
    `poll` seconds. On Ctrl-C the child is sent SIGTERM and given STOP_GRACE_S seconds to save its
    checkpoint and exit, then killed; KeyboardInterrupt goes on."""
    with open(log_path, "ab") as log:
        log.write(f"\n$ {shlex.join(map(str, cmd))}\n".encode())
        log.flush()
        start = log.tell()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        try:
            if progress is None:
                return proc.wait()
            with open(log_path, "rb") as tail:
                tail.seek(start)
                while True:
                    try:
                        rc = proc.wait(timeout=poll)
                    except subprocess.TimeoutExpired:
                        progress.feed_bytes(tail.read())
                        progress.tick()
                        continue
                    progress.feed_bytes(tail.read(), final=True)
                    return rc
        except KeyboardInterrupt:
            # a stop request for a child the terminal's SIGINT did not reach; one that had it waits for its save
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


def progress_runner(echo: Callable[[str], None], **settings) -> Runner:
    """A runner that shows each child's progress through `echo` (see megaevo.suite.progress; `settings`:
    Progress's `every`, `quiet`)."""

    def run(cmd: list, log_path: Path, cwd: Path, env: dict) -> int:
        return subprocess_runner(cmd, log_path, cwd, env, progress=Progress(echo, **settings))

    return run


@dataclass
class Outcome:
    """What a suite did: run dir names per status, and the problems (one line each, log path included)."""

    trained: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)       # already finished
    blocked: list[str] = field(default_factory=list)       # an ancestor failed
    failed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked and not self.interrupted


def run_local(spec: SuiteSpec, runs: list[Run], out: Path, runner: Runner = subprocess_runner,
              echo: Callable[[str], None] = print) -> Outcome:
    """Train and evaluate `runs` (parents before children) one after another."""
    out = Path(out).resolve()
    result, bad = Outcome(), set()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        for run in runs:
            d = run.run_dir(out)
            if run.parent is not None and run.parent.hash in bad:
                bad.add(run.hash)
                result.blocked.append(run.dir_name)
                echo(f"SKIP    {run.dir_name}  {run.name}: parent {run.parent.dir_name} did not finish")
                continue
            if train_done(run, out):
                result.skipped.append(run.dir_name)
            else:
                write_run_config(run, out)
                echo(f"TRAIN   {run.dir_name}  {run.name}  (log {d / 'train.log'})")
                rc = runner(train_command(run, out), d / "train.log", spec.root, env)
                if rc != 0 or not training_complete(d, run_iters(run)):
                    why = f"exit code {rc}" if rc != 0 else "stopped before its last iteration"
                    msg = f"FAILED  {run.dir_name}  {run.name}: training {why}; see {d / 'train.log'}"
                    echo(msg)
                    result.failed.append(run.dir_name)
                    result.problems.append(msg)
                    bad.add(run.hash)
                    continue
                write_marker(d / DONE, run.hash, run=run.id, name=run.name)
                result.trained.append(run.dir_name)
            if not eval_done(run, out):
                (d / "eval").mkdir(parents=True, exist_ok=True)
                (d / "eval" / DONE).unlink(missing_ok=True)
                echo(f"EVAL    {run.dir_name}  {', '.join(run.eval.tasks)}  (log {d / 'eval.log'})")
                rc = runner(eval_command(run, out), d / "eval.log", spec.root, env)
                if rc != 0:
                    msg = f"FAILED  {run.dir_name}  {run.name}: evaluation exit code {rc}; see {d / 'eval.log'}"
                    echo(msg)
                    result.failed.append(run.dir_name)
                    result.problems.append(msg)
                    continue  # the checkpoint is fine: its children still train
                write_marker(d / "eval" / DONE, eval_hash(run), run=run.id)
                result.evaluated.append(run.dir_name)
    except KeyboardInterrupt:
        result.interrupted = True
        echo("interrupted: the suite stopped; rerun the same command to go on (finished runs are skipped, "
             "a stopped run resumes from its checkpoint)")
    return result


# ------------------------------------------------------------------------------------ slurm


# torchrun (--signals-to-handle, read from PET_SIGNALS_TO_HANDLE) passes these on to its workers (SIGUSR1:
# the time-limit warning they save on)
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def _header(run: Run, d: Path, name: str, nodes: int, gpus: int, time: str | None) -> list[str]:
    s = run.stage_spec.slurm
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --gpus-per-node={gpus}", f"#SBATCH --output={d}/slurm-%j.log", "#SBATCH --open-mode=append"]
    if time:
        lines.append(f"#SBATCH --time={time}")
    if s.get("partition"):
        lines.append(f"#SBATCH --partition={s['partition']}")
    extra = s.get("sbatch") or []
    for line in [extra] if isinstance(extra, str) else extra:
        line = str(line).strip()
        lines.append(line if line.startswith("#SBATCH") else f"#SBATCH {line}")
    return lines


def sbatch_script(run: Run, out: Path, root: Path, python: str = sys.executable) -> str:
    """The train job of a run: srun torchrun over the nodes; `slurm.signal_before` seconds before the
    time limit the batch shell gets SIGUSR1 and passes it to the workers, which save a checkpoint and
    stop; a run stopped before its last iteration requeues the job (``scontrol requeue``: same job id,
    so the jobs that wait on it keep waiting), and its next start resumes the checkpoint. The job ends
    successfully once the run is complete, writing its DONE marker."""
    out = Path(out).resolve()
    d = run.run_dir(out)
    s = run.stage_spec.slurm
    nodes = int(s.get("nodes") or 1)
    gpus = int(s.get("gpus_per_node") or run.stage_spec.nproc)
    lead = run.stage_spec.signal_before
    lines = _header(run, d, f"megaevo-{run.dir_name}", nodes, gpus, s.get("time"))
    lines.insert(7, "#SBATCH --requeue")
    if lead:
        lines.insert(8, f"#SBATCH --signal=B:USR1@{lead}")
    q = shlex.quote
    cfg = d / "train.yaml"
    restarts = int(s.get("max_restarts") or 0)
    train = (f"srun --kill-on-bad-exit=1 {q(python)} -m torch.distributed.run --nnodes {nodes} "
             f"--nproc_per_node {gpus} --max-restarts {restarts} --rdzv_backend c10d "
             f"--rdzv_endpoint \"$MASTER_ADDR:${{MASTER_PORT:-29500}}\" --rdzv_id \"$SLURM_JOB_ID\" "
             f"-m megaevo.train --config {q(str(cfg))}")
    check = (f"{q(python)} -c 'import sys; from megaevo.suite.launch import training_complete; "
             f"sys.exit(0 if training_complete(sys.argv[1], None if sys.argv[2] == \"-\" else int(sys.argv[2])) "
             f"else 1)' {q(str(d))} {run_iters(run) if run_iters(run) is not None else '-'}")
    done = q(str(d / DONE))
    lines += ["", "set -uo pipefail", f"# {run.name}", f"cd {q(str(root))}", "export PYTHONUNBUFFERED=1",
              f"export PET_SIGNALS_TO_HANDLE={TORCHRUN_SIGNALS}",
              f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={max(lead, 30)}  # time the workers have to save",
              f"if [ -f {done} ]; then echo 'already trained'; exit 0; fi",
              "MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)",
              "signalled=0 train=''",
              "trap 'signalled=1; echo \"$(date): SIGUSR1 before the time limit: the run saves and stops\"; "
              "kill -USR1 \"$train\" 2>/dev/null' USR1",
              f"{train} >> {q(str(d / 'train.log'))} 2>&1 &",
              "train=$!",
              "while true; do wait \"$train\"; rc=$?; kill -0 \"$train\" 2>/dev/null || break; done",
              f"if {check}; then",
              f"  echo '{json.dumps({'hash': run.hash, 'run': run.id})}' > {done}",
              "  exit 0",
              "fi",
              "if [ \"$signalled\" = 1 ] || [ \"$rc\" = 0 ]; then",
              "  echo \"$(date): stopped before its last iteration: requeueing job $SLURM_JOB_ID to resume it\"",
              "  scontrol requeue \"$SLURM_JOB_ID\" && exit 0",
              "  echo 'scontrol requeue failed: submit this script again to resume the run'",
              "  exit 1",
              "fi",
              f"echo \"training failed (exit code $rc): see {d / 'train.log'}\"",
              "exit \"$rc\""]
    return "\n".join(lines) + "\n"


def eval_sbatch_script(run: Run, out: Path, root: Path, python: str = sys.executable) -> str | None:
    """The evaluation job of a run (None without one): one node, one GPU (`slurm.eval_time` its time
    limit), after the train job; writes the eval DONE marker."""
    ev = eval_command(run, out, python)
    if ev is None:
        return None
    out = Path(out).resolve()
    d = run.run_dir(out)
    q = shlex.quote
    marker = d / "eval" / DONE
    lines = _header(run, d, f"megaevo-{run.dir_name}-eval", 1, 1, run.stage_spec.slurm.get("eval_time"))
    lines += ["", "set -euo pipefail", f"# {run.name}: evaluation", f"cd {q(str(root))}", "export PYTHONUNBUFFERED=1",
              f"if [ -f {q(str(marker))} ]; then echo 'already evaluated'; exit 0; fi",
              f"mkdir -p {q(str(d / 'eval'))}",
              f"{shlex.join(ev)} >> {q(str(d / 'eval.log'))} 2>&1",
              f"echo '{json.dumps({'hash': eval_hash(run), 'run': run.id})}' > {q(str(marker))}"]
    return "\n".join(lines) + "\n"


def eval_job(dir_name: str) -> str:
    """The key of a run's evaluation job in run_slurm's result."""
    return f"{dir_name}.eval"


def run_slurm(spec: SuiteSpec, runs: list[Run], out: Path, dry_run: bool = False,
              submit: Callable[[list[str]], str] | None = None, echo: Callable[[str], None] = print,
              verbose: bool = False) -> dict[str, str]:
    """Write OUT/slurm/STAGE-ID.sbatch (training) and OUT/slurm/STAGE-ID.eval.sbatch (evaluation) per
    unfinished run and submit them in tree order: a train job after its parent's train job, an eval job
    after its run's (afterok). Returns {run dir name: train job id, run dir name + ".eval": eval job id}
    (placeholders with dry_run, which prints one submission line per job, each script before its line
    with `verbose`)."""
    out = Path(out).resolve()
    submit = submit or _sbatch
    jobs: dict[str, str] = {}

    def submit_script(key: str, path: Path, script: str, after: str | None, what: str) -> None:
        if not dry_run:  # a dry run writes nothing
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(script)
        cmd = ["sbatch", "--parsable"] + ([f"--dependency=afterok:{after}"] if after else []) + [str(path)]
        if dry_run:
            jobs[key] = f"${{JOB_{re.sub(r'[^A-Za-z0-9_]', '_', key)}}}"
            if verbose:
                echo(f"# ---- {path}\n{script}")
            shown = " ".join(a if a.startswith("--dependency=") else shlex.quote(a) for a in cmd)
            echo(f"{jobs[key][2:-1]}=$({shown})  # {what}")
        else:
            jobs[key] = submit(cmd)
            echo(f"submitted {key} as job {jobs[key]}" + (f" (after {after})" if after else ""))

    for run in runs:
        trained, evaluated = train_done(run, out), eval_done(run, out)
        if trained and evaluated:
            echo(f"# {run.dir_name}: finished, not submitted")
            continue
        if not dry_run:
            write_run_config(run, out)
            (run.run_dir(out) / "eval").mkdir(parents=True, exist_ok=True)
        if not trained:
            parent = jobs.get(run.parent.dir_name) if run.parent is not None else None
            submit_script(run.dir_name, out / "slurm" / f"{run.dir_name}.sbatch", sbatch_script(run, out, spec.root),
                          parent, run.name)
        if not evaluated:
            submit_script(eval_job(run.dir_name), out / "slurm" / f"{run.dir_name}.eval.sbatch",
                          eval_sbatch_script(run, out, spec.root), jobs.get(run.dir_name), f"{run.name}: evaluation")
    return jobs


def _sbatch(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise SpecError("sbatch not found: the slurm launcher runs on a SLURM login node (--dry-run prints "
                        "the scripts without it)") from None
    except subprocess.CalledProcessError as e:
        raise SpecError(f"{shlex.join(cmd)} failed: {e.stderr.strip()}") from None
    return res.stdout.strip().split(";")[0]


# ------------------------------------------------------------------------------------ the command


def describe(runs: list[Run], out: Path, commands: bool = False) -> str:
    """The run tree, one line per run (indented by depth); `commands`: each with its train and eval
    commands below it."""
    lines = []
    for run in runs:
        depth = len(run.chain) - 1
        status = "finished" if train_done(run, out) and eval_done(run, out) else \
            "trained (eval pending)" if train_done(run, out) else "pending"
        parent = run.parent.dir_name if run.parent else "-"
        branch = ""
        if run.branch == "stable":
            branch = f"  branch: stable (the first {run.branch_step} iterations of the budgets below; no eval, no row)"
        elif run.branch == "decay":
            branch = f"  branch: decay (resumes {parent} at iteration {run.branch_step})"
        lines.append(f"{'  ' * depth}{run.dir_name}  {run.name}  parent {parent}  axes {json.dumps(run.axes)}  "
                     f"[{status}]{branch}")
        if commands:
            lines.append(f"{'  ' * depth}    $ {shlex.join(train_command(run, out))}")
            ev = eval_command(run, out)
            if ev:
                lines.append(f"{'  ' * depth}    $ {shlex.join(ev)}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megaevo suite", description="train and evaluate a grid of runs over the "
                                "stages of a model's life (see megaevo/suite/spec.py for the spec format)")
    p.add_argument("spec", help="the suite spec (YAML)")
    p.add_argument("--out", default=None, help="output directory (default: the spec's `out`, else SPEC-out beside it)")
    p.add_argument("--dry-run", action="store_true", help="print the run tree, one line per run (slurm: the "
                   "submission order), and a summary: runs per stage, what is left to do, training tokens, input "
                   "paths that do not exist; run nothing")
    p.add_argument("--verbose", action="store_true", help="with --dry-run: each run's train and eval commands "
                                                          "(slurm: the sbatch scripts)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these runs (id, STAGE-ID or run name) and "
                                                             "their ancestors (replaces the spec's `only`)")
    return p


def dry_run(spec: SuiteSpec, runs: list[Run], out: Path, launcher: str, verbose: bool = False,
            echo: Callable[[str], None] = print) -> None:
    """Print the runs (local: the tree; slurm: the submission order) and the summary; run nothing."""
    if launcher == "slurm":
        run_slurm(spec, runs, out, dry_run=True, echo=echo, verbose=verbose)
    else:
        echo(describe(runs, out, commands=verbose))
    echo("")
    for line in make_plan(spec, runs, out, launcher).lines():
        echo(line)


def main(argv: list[str] | None = None, runner: Runner | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = load_spec(args.spec)
        out = Path(args.out).resolve() if args.out else (spec.out or spec.path.with_name(spec.path.stem + "-out"))
        runs = select(expand(spec), args.only or spec.only, flag="--only" if args.only else f"{spec.path.name}: only")
        if args.dry_run:
            dry_run(spec, runs, out, args.launcher, args.verbose)
            return 0
        if args.launcher == "slurm":
            run_slurm(spec, runs, out)
            return 0
        outcome = run_local(spec, runs, out, runner=runner or progress_runner(print))
    except (ValueError, OSError) as e:
        return report_user_error(e, "suite")
    rows = collect(runs, out)
    paths = write_results(rows, out, runs)
    print(f"trained {len(outcome.trained)}, evaluated {len(outcome.evaluated)}, already finished "
          f"{len(outcome.skipped)}, failed {len(outcome.failed)}, skipped after a failure {len(outcome.blocked)}")
    for line in outcome.problems:
        print(line, file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    if outcome.interrupted:
        return 130
    return 0 if outcome.ok else 1
