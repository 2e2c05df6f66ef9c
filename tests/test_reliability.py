"""Runs that go wrong: non-finite training, a stop by signal, mistakes under torchrun."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megaevo.config import save_config
from megaevo.training import trainer as trainer_module
from megaevo.training.checkpoint import LoadedCheckpoint
from test_trainer import config, fit, make_data

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def test_a_run_that_diverges_exits_non_zero_and_keeps_latest_finite(data, tmp_path, capsys):
    """An absurd learning rate: step 1 is finite, every later step is not (fewer than the stop rule's five)."""
    cfg = config(data, tmp_path, **{"optim.lr": 1e20, "optim.min_lr": 0.0, "optim.warmup": 0,
                                    "optim.schedule": "constant", "train.iters": 4, "checkpoint.interval": 1,
                                    "train.eval_interval": 0})
    path = save_config(cfg, tmp_path / "run.yaml")
    assert trainer_module.main(["--config", str(path)]) == 3
    root = tmp_path / "checkpoints"
    latest = root / (root / "latest").read_text().strip()
    assert latest.name == "iter_0000001" and not (root / "iter_0000004").exists()
    ck = LoadedCheckpoint(latest)
    for kind in ("model", "master", "exp_avg", "exp_avg_sq"):
        assert all(torch.isfinite(ck.tensor(kind, n)).all() for n in ck.names(kind)), kind
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"checkpoint.load={latest}" in errors[0], errors


SIGNALLED_RUN = """
import sys, time
from pathlib import Path
from megaevo.training import trainer
step = trainer.Trainer.train_step
def slow_step(self):
    time.sleep(0.15)  # time for the test to send its signal mid-run
    return step(self)
trainer.Trainer.train_step = slow_step
sys.exit(trainer.main(["--config", sys.argv[1]]))
"""


@pytest.mark.slow
def test_sigterm_saves_and_the_run_resumes_exactly(data, tmp_path):
    settings = {"train.iters": 30, "checkpoint.interval": 1000, "train.eval_interval": 0,
                "optim.schedule": "constant", "optim.warmup": 0}
    out = tmp_path / "run"
    path = save_config(config(data, out, **settings), tmp_path / "run.yaml")
    proc = subprocess.Popen([sys.executable, "-c", SIGNALLED_RUN, str(path)], cwd=TESTS, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr + stdout
    stopped = [line for line in (stdout + stderr).splitlines() if "stopped by SIGTERM" in line]
    assert len(stopped) == 1, stdout + stderr
    done = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 3 <= done < 30
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == f"iter_{done:07d}"
    resumed, trainer = fit(config(data, out, **{**settings, "checkpoint.load": "auto"}))
    assert trainer.run.iteration == 30
    whole, _ = fit(config(data, tmp_path / "whole", **settings))
    assert resumed == whole[done:]


def _torchrun(tmp_path: Path, *overrides: str) -> tuple[int, dict[int, str], int]:
    """torchrun with 2 processes on a config with ``overrides``: its exit code, each rank's output, and
    how many ranks its failure summary lists."""
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--redirects", "3",
           "--log-dir", str(logs), "-m", "megaevo.train", "--config", str(tmp_path / "run.yaml"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    out = {}
    for f in logs.rglob("*.log"):
        rank = int(f.parent.name)
        out[rank] = out.get(rank, "") + f.read_text()
    # torchrun's summary lists every rank that exited non-zero (once one fails it terminates the others)
    failed = len(re.findall(r"^\s*exitcode\s*:", proc.stderr, flags=re.M))
    return proc.returncode, out, failed


@pytest.mark.slow
@pytest.mark.parametrize("overrides, setting", [(("parallel.tp=3",), "parallel.tp"),
                                                (("optim.lr_min=0.1",), "optim.min_lr")])
def test_mistakes_under_torchrun_are_one_line(data, tmp_path, overrides, setting):
    save_config(config(data, tmp_path / "out"), tmp_path / "run.yaml")
    code, outputs, failed = _torchrun(tmp_path, *overrides)
    assert code != 0 and failed == 2
    assert sorted(outputs) == [0, 1]
    assert outputs[1].strip() == "", outputs[1]
    lines = [line for line in outputs[0].splitlines() if line.strip()]
    assert lines[0].startswith("error:") and len(lines) <= 6, outputs[0]  # every problem found, one line each
    assert any(setting in line for line in lines) and "Traceback" not in outputs[0], outputs[0]
