"""metrics.jsonl: one schema and one reader (megaevo.metrics), which every reader of the file in megaevo goes
through, so they all see the same records: blank lines, lines that are not a JSON object and a last line cut
short by a killed run are left out by each of them alike."""
from __future__ import annotations

import json
import logging

import pytest

from megaevo.demo import lifecycle
from megaevo.demo import training as demo_training
from megaevo.metrics import METRICS_FILE, TRAIN_KEYS, metrics_path, parse_record, read_metrics
from megaevo.suite import launch, markers, report, results
from megaevo.training.metrics import MetricsWriter, truncate_metrics

RECORDS = [
    {"step": 1, "consumed_samples": 8, "tokens": 256, "loss": 4.1, "lr": 1e-4, "grad_norm": 1.5,
     "tokens_per_s": 900.0, "mfu": None, "mem_gb": 0.5, "skipped_steps": 0, "reward_mean": 0.25},
    {"step": 2, "consumed_samples": 16, "tokens": 512, "loss": 3.7, "lr": 2e-4, "grad_norm": 1.2,
     "tokens_per_s": 950.0, "mfu": None, "mem_gb": 0.5, "skipped_steps": 0, "reward_mean": 0.5,
     "val/general": 3.9, "val/math": 4.4, "eval/gsm8k/accuracy": 0.1},
    {"step": 3, "consumed_samples": 24, "tokens": 768, "loss": 3.2, "lr": 3e-4, "grad_norm": 0.9,
     "tokens_per_s": 990.0, "mfu": None, "mem_gb": 0.5, "skipped_steps": 1, "reward_mean": 0.75,
     "val/general": 3.5},
]
# Between and after the records: a blank line, lines that are JSON but not an object, and a last line cut
# off in the middle of a record (no newline), as a killed run leaves it.
NOT_RECORDS = ["", "[1, 2]", "   ", "7"]
CUT_SHORT = '{"step": 4, "consumed_samples": 32, "tok'


def _write(run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(RECORDS[0]), NOT_RECORDS[0], NOT_RECORDS[1], json.dumps(RECORDS[1]), NOT_RECORDS[2],
             NOT_RECORDS[3], json.dumps(RECORDS[2])]
    path = run_dir / METRICS_FILE
    path.write_text("\n".join(lines) + "\n" + CUT_SHORT)
    return path


def test_the_reader_keeps_the_records_in_order_from_a_file_or_a_run_dir(tmp_path):
    path = _write(tmp_path / "run")
    assert read_metrics(path) == RECORDS
    assert read_metrics(tmp_path / "run") == RECORDS
    assert metrics_path(tmp_path / "run") == path and metrics_path(path) == path
    assert [parse_record(x) for x in NOT_RECORDS + [CUT_SHORT]] == [None] * (len(NOT_RECORDS) + 1)
    assert all(k in RECORDS[0] for k in TRAIN_KEYS)


def test_the_reader_says_how_many_lines_it_left_out_unless_quiet(tmp_path):
    path = _write(tmp_path / "run")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("megaevo.metrics")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        read_metrics(path, quiet=True)
        assert seen == []
        read_metrics(path)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    non_blank = sum(1 for x in NOT_RECORDS + [CUT_SHORT] if x.strip())
    assert seen == [f"{path}: left out {non_blank} line(s) that are not a JSON record"]


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=METRICS_FILE):
        read_metrics(tmp_path)


def test_every_reader_in_megaevo_sees_the_same_records(tmp_path):
    run = tmp_path / "run"
    path = _write(run)

    # megaevo report plots the records themselves
    assert report.read_metrics(path) == RECORDS

    # the suite's results table: the last step, tokens and val/NAME of the run
    last = {}
    for r in RECORDS:
        last.update({k: v for k, v in r.items() if (k in ("step", "tokens") or k.startswith("val/")) and v is not None})
    assert results.last_metrics(run) == last

    # the launcher: the run is complete at its last recorded step, not at the step of the line cut short
    final = RECORDS[-1]["step"]
    assert launch.training_complete is markers.training_complete
    assert markers.training_complete(run, final) and not markers.training_complete(run, final + 1)

    # the demo: rewards of an RL run (first and last window) and the validation losses per step
    rewards = [r["reward_mean"] for r in RECORDS]
    assert lifecycle.rewards(run, window=1) == (rewards[0], rewards[-1])
    evals = [{"step": r["step"], **{k: v for k, v in r.items() if k.startswith("val/")}}
             for r in RECORDS if any(k.startswith("val/") for k in r)]
    assert demo_training._evals(path) == evals

    # a resumed run's writer keeps the records up to where it continues, and drops what is not a record
    dropped = truncate_metrics(path, start=final)
    assert dropped == sum(1 for x in NOT_RECORDS + [CUT_SHORT] if x.strip())
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in RECORDS)
    assert read_metrics(path) == RECORDS


def test_the_writer_appends_to_the_schemas_file(tmp_path):
    writer = MetricsWriter(tmp_path, iters=3)
    for r in RECORDS:
        writer.write(r)
    writer.close()
    assert writer.path == tmp_path / METRICS_FILE
    assert read_metrics(tmp_path) == RECORDS
