"""A run stopped at random moments and relaunched with the same command ends as an uninterrupted one.

    python benchmarks/soak.py [--kills 20] [--iters 100] [--interval 2] [--seed 0] [--dir DIR]

Trains a tiny model on the CPU (random counting sequences written under --dir, default a temporary
directory) twice with the same config: once without interruption, and once launched again and again
with the same `megaevo train --config FILE` command, each launch stopped by a signal picked at random
(SIGKILL, SIGTERM or SIGUSR1) at a random moment after it has logged a new step — during a step or a
checkpoint save, SIGKILL included — until --kills stops have happened; a last launch then runs to the
end. Each step sleeps a little so that the signals land inside the run.

Prints one JSON object: the stops (signal, last logged step, exit code), whether metrics.jsonl holds
each step once, whether every step's loss and the final weights equal the uninterrupted run's, and
`ok` when all three hold (exit code 1 otherwise).
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megaevo.checkpoint import LoadedCheckpoint, latest_checkpoint
from megaevo.config import config_from_dict, save_config
from megaevo.data.indexed import IndexedDatasetWriter

SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1)
# `megaevo train` with a short sleep in each step, so that a stop can land anywhere in the run
WORKER = """
import sys, time
from megaevo import cli
from megaevo.training import trainer
step = trainer.Trainer.train_step
def slow_step(self):
    time.sleep(0.05)
    return step(self)
trainer.Trainer.train_step = slow_step
sys.exit(cli.main(["train", "--config", sys.argv[1]]))
"""


def write_config(root: Path, out_dir: Path, iters: int, interval: int) -> Path:
    data = root / "data"
    if not (data / "web.bin").exists():
        rng = np.random.default_rng(0)
        with IndexedDatasetWriter(data / "web", np.uint16) as w:
            for _ in range(120):
                start, n = rng.integers(0, 250), int(rng.integers(5, 80))
                w.add_document((start + np.arange(n)) % 250)
    raw = {"model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_heads": 4, "num_kv_heads": 2,
                     "vocab_size": 256, "max_seq_len": 32},
           "data": {"train": [str(data / "web")], "seq_len": 32, "split": "100,0,0", "cache_dir": str(data / "cache")},
           "train": {"micro_batch_size": 2, "global_batch_size": 4, "iters": iters, "seed": 3, "log_interval": 1,
                     "eval_interval": 0, "dtype": "fp32"},
           "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup": 2},
           "checkpoint": {"interval": interval}, "kernels": {"backend": "torch"}, "out_dir": str(out_dir)}
    return save_config(config_from_dict(raw), root / f"{out_dir.name}.yaml") or root / f"{out_dir.name}.yaml"


def launch(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def records(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return rows


def last_step(out_dir: Path) -> int:
    rows = records(out_dir)
    return rows[-1]["step"] if rows else 0


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    ck = LoadedCheckpoint(latest_checkpoint(out_dir / "checkpoints"))
    return {n: ck.tensor("model", n) for n in ck.names("model")}


def stop_once(config: Path, out_dir: Path, rng: random.Random, timeout: float = 120) -> dict:
    """Launch the run, wait until it logs a step past where it was, then send a random signal at a random
    moment; the stop's signal, last logged step and exit code."""
    before, proc = last_step(out_dir), launch(config)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and last_step(out_dir) <= before:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.3))
    sig = rng.choice(SIGNALS)
    if proc.poll() is None:
        proc.send_signal(sig)
    code = proc.wait(timeout=timeout)
    return {"signal": sig.name, "step": last_step(out_dir), "exit_code": code}


def soak(root: Path, kills: int, iters: int, interval: int, seed: int) -> dict:
    start = time.perf_counter()
    whole_dir, soak_dir = root / "whole", root / "soak"
    whole_cfg = write_config(root, whole_dir, iters, interval)
    soak_cfg = write_config(root, soak_dir, iters, interval)
    if launch(whole_cfg).wait() != 0:
        raise SystemExit(f"the uninterrupted run failed: see {whole_dir}")
    rng, stops = random.Random(seed), []
    while len(stops) < kills and last_step(soak_dir) < iters:
        stops.append(stop_once(soak_cfg, soak_dir, rng))
    final = launch(soak_cfg).wait()
    steps = [r["step"] for r in records(soak_dir)]
    losses = [r["loss"] for r in records(soak_dir)]
    whole = [r["loss"] for r in records(whole_dir)]
    a, b = final_weights(soak_dir), final_weights(whole_dir)
    result = {"kills": len(stops), "iters": iters, "checkpoint_interval": interval, "seed": seed, "stops": stops,
              "final_exit_code": final, "each_step_once": steps == list(range(1, iters + 1)),
              "losses_equal": losses == whole,
              "weights_equal": a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a),
              "seconds": round(time.perf_counter() - start, 1)}
    result["ok"] = final == 0 and result["each_step_once"] and result["losses_equal"] and result["weights_equal"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20, help="how many times the run is stopped (default 20)")
    p.add_argument("--iters", type=int, default=100, help="the run's train.iters (default 100)")
    p.add_argument("--interval", type=int, default=2, help="checkpoint.interval (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stops' signals and moments")
    p.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed after)")
    args = p.parse_args(argv)
    if args.dir:
        root = Path(args.dir)
        root.mkdir(parents=True, exist_ok=True)
        result = soak(root, args.kills, args.iters, args.interval, args.seed)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = soak(Path(tmp), args.kills, args.iters, args.interval, args.seed)
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
