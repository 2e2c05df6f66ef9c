"""Training metrics: one record per log step to metrics.jsonl, TensorBoard and the console.

A record is a flat dict (its keys: :mod:`megaevo.metrics`): ``step``, ``consumed_samples``, ``tokens``,
``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu`` (against the device's dense bf16 peak; null where
unknown), ``mem_gb``, ``skipped_steps``, and ``val/NAME`` after an evaluation. Only rank 0 writes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megaevo.log import get_logger
from megaevo.metrics import EVAL_PREFIX, METRICS_FILE, VAL_PREFIX, parse_record

log = get_logger(__name__)

# Dense bf16 peak of the devices MFU is reported against, in FLOP/s.
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


def memory_gb(device: torch.device) -> float:
    """Peak memory: allocated on the GPU, else this process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except ImportError:
        return 0.0


def describe(r: dict, iters: int) -> str:
    """The console line of a record."""
    parts = [f"step {r['step']:>6}/{iters}"]
    if "loss" in r:
        parts += [f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}", f"grad {r['grad_norm']:.3f}"]
        if "tokens_per_s" in r:
            parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
        if r.get("mfu") is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        if "mem_gb" in r:
            parts.append(f"mem {r['mem_gb']:.2f} GB")
        if r.get("skipped_steps"):
            parts.append(f"skipped {r['skipped_steps']}")
    if "reward_mean" in r:  # a rollout step (stage rl)
        parts += [f"reward {r['reward_mean']:.3f}", f"acc {r.get('accuracy', float('nan')):.3f}",
                  f"len {r.get('response_length_mean', float('nan')):.0f}"]
        if r.get("explained_variance") is not None:
            parts.append(f"ev {r['explained_variance']:.3f}")
        if "generation_share" in r:
            parts.append(f"gen {100 * r['generation_share']:.0f}%")
    parts += [f"{k} {v:.4f}" for k, v in r.items() if k.startswith((VAL_PREFIX, EVAL_PREFIX))]
    return "  ".join(parts)


class MetricsWriter:
    """Appends records to ``out_dir/metrics.jsonl``, TensorBoard (when installed) and the log (rank 0).

    ``start`` is the iteration the run starts from (0 fresh, else the resumed checkpoint's): records of
    later steps, written by an earlier launch that got further than its last checkpoint, are dropped
    first (the file is rewritten atomically; TensorBoard purges them too), so metrics.jsonl holds each
    step once whatever stopped and relaunched the run."""

    def __init__(self, out_dir: str | Path, iters: int, enabled: bool = True, start: int = 0):
        self.path = Path(out_dir) / METRICS_FILE
        self.iters = iters
        self.enabled = enabled
        if enabled:
            truncate_metrics(self.path, start)
        self.board = _tensorboard(Path(out_dir) / "tensorboard", start) if enabled else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info(describe(record, self.iters))
        if self.board is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.board.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None


def truncate_metrics(path: str | Path, start: int) -> int:
    """Keep only the records of ``path`` up to step ``start`` (and lines that are whole JSON objects: a
    line cut off by a killed process goes too); rewrites the file atomically when anything is dropped.
    Returns how many lines were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        record = parse_record(line)
        if record is not None and isinstance(record.get("step"), int) and record["step"] <= start:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        log.info(f"{path}: dropped {dropped} record(s) past iteration {start}, where the run continues")
    return dropped


def _tensorboard(path: Path, start: int = 0):
    """A TensorBoard writer when the tensorboard package is installed, else None; events past step
    ``start`` are purged."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path), purge_step=start + 1)
