"""The demo's training settings (pretrain, SFT, GRPO) and the single pre-training run `train_demo`."""
from __future__ import annotations


import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from megaevo.checkpoint import Checkpointer, LoadedCheckpoint
from megaevo.config import config_from_dict, config_to_dict, save_config, validate
from megaevo.data import indexed
from megaevo.data.blended import parse_blend
from megaevo.demo.common import reporters, sha256
from megaevo.demo.corpora import TRAIN_ITERS, VOCAB_SIZE
from megaevo.log import get_logger
from megaevo.metrics import METRICS_FILE, VAL_PREFIX, read_metrics
from megaevo.stages import build_stage
from megaevo.training.trainer import Trainer

logger = get_logger(__name__)

TRAIN_RECORD = "demo-run.json"  # in the run directory: the config and data a demo run was started with


def train_settings(
    directory: str | os.PathLike = "megaevo-demo",
    iters: int = TRAIN_ITERS,
    vocab_size: int = VOCAB_SIZE,
    seed: int = 1234,
) -> dict:
    """The config the demo trains with, as a YAML file holds it, with paths under `directory`.

    examples/tiny-cpu.yaml is `train_settings("../megaevo-demo")`. Warmup and the log, eval and
    checkpoint intervals follow `iters`, so a short run still warms up, logs, evaluates and saves.
    """

    def path(*parts: str) -> str:
        return Path(directory, *parts).as_posix()

    return {
        "model": {"preset": "tiny", "vocab_size": vocab_size},
        "data": {
            "train": {
                "general": {"prefix": path("data", "general"), "weight": 0.8},
                "math": {"prefix": path("data", "math"), "weight": 0.2},
            },
            "tokenizer": path("tokenizer", "demo.model"),
            "seq_len": 256,
            "split": "95,5,0",
        },
        "train": {
            "micro_batch_size": 4,
            "global_batch_size": 8,
            "iters": iters,
            "seed": seed,
            "log_interval": max(1, iters // 20),
            "eval_interval": max(1, iters // 5),
            "eval_iters": 4,
            "dtype": "fp32",
        },
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup": iters // 10, "schedule": "cosine", "weight_decay": 0.1},
        "checkpoint": {"interval": max(1, iters // 4), "keep_last": 2, "load": "auto"},
        "out_dir": path("run"),
    }


def sft_settings(directory: str | os.PathLike = "megaevo-demo", vocab_size: int = VOCAB_SIZE, seed: int = 1234) -> dict:
    """The config that fine-tunes the demo's model on DIR/data/sft (written by `megaevo preprocess --sft`
    from DIR/corpus/sft.jsonl): two epochs of packed conversations, from the demo run's last checkpoint.

    examples/demo-sft.yaml is `sft_settings("../megaevo-demo")`."""

    def path(*parts: str) -> str:
        return Path(directory, *parts).as_posix()

    return {
        "stage": "sft",
        "model": {"preset": "tiny", "vocab_size": vocab_size},
        "data": {"train": [path("data", "sft")], "tokenizer": path("tokenizer", "demo.model"), "seq_len": 256,
                 "split": "98,2,0"},
        "sft": {"packing": True, "loss_normalization": "global_tokens"},
        "train": {"micro_batch_size": 8, "global_batch_size": 16, "epochs": 2, "seed": seed, "log_interval": 10,
                  "eval_interval": 50, "eval_iters": 2, "dtype": "fp32"},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_fraction": 0.1, "schedule": "cosine", "weight_decay": 0.0},
        "checkpoint": {"load": path("run"), "finetune": True, "interval": 50, "keep_last": 1},
        "out_dir": path("sft-run"),
    }


def grpo_settings(directory: str | os.PathLike = "megaevo-demo", vocab_size: int = VOCAB_SIZE, seed: int = 1234) -> dict:
    """The config that continues the demo's SFT model (DIR/sft-run) with GRPO on reasoning-gym GCD
    problems (another seed than the SFT conversations'), rewarded by reasoning-gym's own scorer.

    examples/demo-grpo.yaml is `grpo_settings("../megaevo-demo")`."""

    def path(*parts: str) -> str:
        return Path(directory, *parts).as_posix()

    return {
        "stage": "rl",
        "model": {"preset": "tiny", "vocab_size": vocab_size},
        "data": {"tokenizer": path("tokenizer", "demo.model"), "seq_len": 256},
        "rl": {"algorithm": "grpo", "prompts": ["rg:gcd:2000:7"], "template": "evolm", "prompts_per_step": 32,
               "n": 8, "max_prompt_len": 96, "max_new_tokens": 128, "temperature": 1.0, "top_p": 1.0,
               "epochs": 1, "mini_batches": 1, "loss_agg": "token-mean"},
        "train": {"micro_batch_size": 32, "iters": 20, "seed": seed, "log_interval": 1, "eval_interval": 0,
                  "dtype": "fp32"},
        "optim": {"lr": 3e-4, "min_lr": 3e-4, "warmup": 0, "schedule": "constant", "weight_decay": 0.0},
        "checkpoint": {"load": path("sft-run"), "finetune": True, "interval": 10, "keep_last": 1},
        "out_dir": path("grpo-run"),
    }


@dataclass
class TrainingResult:
    config: str  # DIR/config.yaml
    out_dir: str
    iterations: int  # where the run stands now
    status: str  # "trained", "resumed" or "already trained"
    evals: list[dict] = field(default_factory=list)  # validation records by step: {"step": n, "val/general": x, ...}
    seconds: float = 0.0

    def table(self) -> str:
        """Validation loss per domain at the first and the last evaluation."""
        if not self.evals:
            return "  no validation loss was recorded (train.eval_interval=0)"
        first, last = self.evals[0], self.evals[-1]
        shown = [first, last] if last is not first else [first]
        names = [k for k in last if k.startswith("val/")]
        head = f"  {'validation loss':<16}" + "".join(f"{'step ' + str(r['step']):>11}" for r in shown)
        lines = [head + (f"{'change':>10}" if len(shown) == 2 else "")]
        for name in names:
            row = f"  {name:<16}" + "".join(f"{r[name]:>11.3f}" if name in r else f"{'-':>11}" for r in shown)
            if len(shown) == 2 and name in first:
                row += f"{last[name] - first[name]:>+10.3f}"
            lines.append(row)
        return "\n".join(lines)


def train_demo(
    root: str | os.PathLike,
    vocab_size: int = VOCAB_SIZE,
    seed: int = 1234,
    iters: int = TRAIN_ITERS,
    overrides: Sequence[str] = (),
    verbose: bool = True,
) -> TrainingResult:
    """Train the tiny model on the demo data under `root` (made by run_demo); print what happened.

    Writes the exact config to ROOT/config.yaml first. The run in ROOT/run resumes from its last
    checkpoint when it was interrupted, is left alone when it is finished, and starts over when the
    config or the data changed since it began.
    """
    start = time.perf_counter()
    log, show = reporters(verbose)
    root = Path(root).resolve()
    cfg = config_from_dict(train_settings(root, iters, vocab_size, seed), list(overrides), source="megaevo demo")
    validate(cfg, world_size=1)
    out = Path(cfg.out_dir)
    setup = {"config": config_to_dict(cfg), "data": _data_fingerprint(cfg.data.train)}
    at = _prepare_run(out, setup, log)
    config_path = save_config(cfg, root / "config.yaml")
    t = cfg.train
    log(f"  config  {config_path}\n"
        f"          rerun or vary it: megaevo train --config {config_path} out_dir={out}-2 optim.lr=1e-3")
    # A model this small gains little from more threads, and on a machine that is busy with other
    # work every extra thread slows the rest down (measured: 1 thread 3-4x faster than 2 on two shared
    # cores), so the demo trains on half of torch's threads.
    threads = torch.get_num_threads()
    use = max(1, threads // 2)
    log(f"  model   tiny preset, {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
        f"vocabulary {cfg.model.vocab_size:,}, {cfg.train.dtype} on the CPU ({use} of {threads} threads)")
    log(f"  data    {_describe_blend(cfg.data.train)}, {cfg.seq_len} tokens per sample, "
        f"{t.global_batch_size} samples per step")
    if at >= t.iters:
        status = "already trained"
        log(f"  {out} already holds the finished run (iteration {at} of {t.iters}): not training again.\n"
            f"  Delete {out} to train from scratch, or vary the run in a new directory, e.g.\n"
            f"    megaevo train --config {config_path} out_dir={out}-long train.iters={2 * t.iters}")
    else:
        status = "resumed" if at else "trained"
        what = f"resuming from iteration {at}" if at else "from scratch"
        log(f"  {t.iters} iterations {what}: a line every {t.log_interval}, validation every {t.eval_interval}, "
            f"a checkpoint every {cfg.checkpoint.interval} (Ctrl-C is safe: rerun to resume)")
        torch.set_num_threads(use)
        try:
            with contextlib.ExitStack() as quiet:
                if not verbose:  # the trainer's progress lines go to stdout (its logger's INFO lines)
                    quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
                trainer = Trainer(cfg, build_stage)
                trainer.fit()
        except KeyboardInterrupt:
            log(f"\ninterrupted: rerun `megaevo demo --dir {root}` to resume from the last checkpoint in {out}")
            raise
        finally:
            torch.set_num_threads(threads)
        if trainer.stop_requested:  # a signal: the run saved and stopped before its end
            log(f"\nstopped at iteration {trainer.run.iteration}, saved: rerun `megaevo demo --dir {root}` to resume")
            raise KeyboardInterrupt
    result = TrainingResult(str(config_path), str(out), _latest_iteration(out) or 0, status,
                            _evals(out / METRICS_FILE), round(time.perf_counter() - start, 1))
    show(result.table())
    show(f"  (cross-entropy in nats per token; a model that has learnt nothing scores about "
         f"ln {cfg.model.vocab_size} = {math.log(cfg.model.vocab_size):.2f})")
    show(f"  run     {out}  (metrics.jsonl, config.yaml, checkpoints/)")
    return result


def _describe_blend(spec) -> str:
    corpora = parse_blend(spec)
    total = sum(c.weight for c in corpora)
    return " + ".join(f"{100 * c.weight / total:.0f}% {c.name}" for c in corpora)


def _data_fingerprint(spec) -> dict:
    """sha256 of every training dataset's .idx and .bin: a rebuilt dataset makes an old run stale."""
    out = {}
    for corpus in parse_blend(spec):
        idx, bin_ = indexed.paths(corpus.prefix)
        out[corpus.name] = [sha256(idx) if idx.is_file() else None, sha256(bin_) if bin_.is_file() else None]
    return out


def _latest_iteration(out: Path) -> int | None:
    latest = Checkpointer(out / "checkpoints").resolve("auto")
    return LoadedCheckpoint(latest).iteration if latest is not None else None


def _prepare_run(out: Path, setup: dict, log) -> int:
    """Make `out` ready for the run described by `setup`; return the iteration it resumes from."""
    if out.is_dir() and any(out.iterdir()):
        record = out / TRAIN_RECORD
        try:
            previous = json.loads(record.read_text())
        except (OSError, ValueError):
            raise FileExistsError(f"{out} exists but holds no demo run ({record.name} is missing): "
                                  f"move it away or give another out_dir") from None
        at = _latest_iteration(out) if previous == setup else None
        if at:
            return at
        log(f"  {out}: " + ("no checkpoint yet" if previous == setup else "the config or the data changed")
            + ", starting over")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / TRAIN_RECORD).write_text(json.dumps(setup, indent=1) + "\n")
    return 0


def _evals(metrics: Path) -> list[dict]:
    """The validation records of a run, one per step (the latest when a resumed run repeated a step)."""
    by_step: dict[int, dict] = {}
    if metrics.is_file():
        for record in read_metrics(metrics, quiet=True):
            vals = {k: v for k, v in record.items() if k.startswith(VAL_PREFIX)}
            if vals and isinstance(record.get("step"), int):
                by_step[record["step"]] = {"step": record["step"], **vals}
    return [by_step[s] for s in sorted(by_step)]
