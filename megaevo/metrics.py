"""The metrics record of a training run and the one reader of its file, ``metrics.jsonl``.

A run directory holds ``metrics.jsonl``: one JSON object a line, one line per logged step, appended by rank 0
(megaevo.training.metrics.MetricsWriter). A record is a flat dict:

* ``step`` (the iteration), ``consumed_samples``, ``tokens`` (consumed so far);
* at a training step: ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu`` (against the device's dense
  bf16 peak; null where unknown), ``mem_gb``, ``skipped_steps``;
* after an evaluation: ``val/NAME`` (the loss of validation set NAME) and ``eval/TASK/METRIC`` (a downstream
  task's score);
* an RL step adds its own keys (``reward_mean``, ``accuracy``, ``response_length_mean``, ...).

Readers take the records through :func:`read_metrics`: blank lines, and lines that are not a JSON object (a line
cut short while the run was writing it), are left out, the same way for every reader.
"""
from __future__ import annotations

import json
from pathlib import Path

from megaevo.log import get_logger

logger = get_logger(__name__)

METRICS_FILE = "metrics.jsonl"
"""The file a run's records go to, in the run directory."""

STEP, CONSUMED_SAMPLES, TOKENS = "step", "consumed_samples", "tokens"
LOSS, LR, GRAD_NORM = "loss", "lr", "grad_norm"
TOKENS_PER_S, MFU, MEM_GB, SKIPPED_STEPS = "tokens_per_s", "mfu", "mem_gb", "skipped_steps"
TRAIN_KEYS = (STEP, CONSUMED_SAMPLES, TOKENS, LOSS, LR, GRAD_NORM, TOKENS_PER_S, MFU, MEM_GB, SKIPPED_STEPS)
"""The keys of a training step's record, in the order the engine writes them."""
VAL_PREFIX = "val/"
"""``val/NAME``: the loss of validation set NAME."""
EVAL_PREFIX = "eval/"
"""``eval/TASK/METRIC``: a downstream task's score logged during training."""


def metrics_path(path: str | Path) -> Path:
    """The metrics file of ``path``: ``path/metrics.jsonl`` for a directory, else ``path`` itself."""
    path = Path(path)
    return path / METRICS_FILE if path.is_dir() else path


def parse_record(line: str) -> dict | None:
    """The record on one line of a metrics file; None for a blank line or one that is not a JSON object."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(path: str | Path, *, quiet: bool = False) -> list[dict]:
    """The records of a metrics file, or of the ``metrics.jsonl`` of a run directory, in file order (a step
    repeated by a resumed run appears twice; the later one is the kept one). Blank lines, and lines that are
    not a JSON object, are left out; how many non-blank lines were left out is logged unless ``quiet``.
    A missing file raises FileNotFoundError."""
    path = metrics_path(path)
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = parse_record(line)
            if record is not None:
                records.append(record)
            elif line.strip():
                bad += 1
    if bad and not quiet:
        logger.info("%s: left out %d line(s) that are not a JSON record", path, bad)
    return records
