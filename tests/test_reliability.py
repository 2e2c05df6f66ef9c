"""Runs that go wrong: non-finite training, a stop by signal, mistakes under torchrun."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import megaevo.checkpoint as ckpt
from megaevo.checkpoint import LoadedCheckpoint, verify_checkpoint
from megaevo import cli
from megaevo.config import save_config
from megaevo.training import trainer as trainer_module
from helpers import config, fit, make_data

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
    assert cli.main(["train", "--config", str(path)]) == 3
    root = tmp_path / "checkpoints"
    latest = root / (root / "latest").read_text().strip()
    assert latest.name == "iter_0000001" and not (root / "iter_0000004").exists()
    ck = LoadedCheckpoint(latest)
    for kind in ("model", "master", "exp_avg", "exp_avg_sq"):
        assert all(torch.isfinite(ck.tensor(kind, n)).all() for n in ck.names(kind)), kind
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"checkpoint.load={latest}" in errors[0], errors


SLOWED_RUN = """
import os, sys, time
from pathlib import Path
from megaevo import cli
from megaevo.training import trainer
step = trainer.Trainer.train_step
def slow_step(self):
    time.sleep(float(sys.argv[2]))  # time for the test to signal or kill it mid-run
    return step(self)
trainer.Trainer.train_step = slow_step
if len(sys.argv) > 3:  # where each worker says its pid, by rank and restart attempt
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    Path(sys.argv[3], f"pid_rank{os.environ['RANK']}_attempt{attempt}").write_text(str(os.getpid()))
sys.exit(cli.main(["train", "--config", sys.argv[1]]))
"""


@pytest.mark.slow
def test_sigterm_saves_and_the_run_resumes_exactly(data, tmp_path):
    settings = {"train.iters": 30, "checkpoint.interval": 1000, "train.eval_interval": 0,
                "optim.schedule": "constant", "optim.warmup": 0}
    out = tmp_path / "run"
    path = save_config(config(data, out, **settings), tmp_path / "run.yaml")
    proc = subprocess.Popen([sys.executable, "-c", SLOWED_RUN, str(path), "0.15"], cwd=TESTS, stdout=subprocess.PIPE,
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


def _interrupt_at(monkeypatch, iteration: int, *, in_step: tuple = (), in_save: tuple = ()) -> None:
    """Deliver signals to this process as a user would, each handled at once: ``in_step`` at the end of
    step ``iteration``, ``in_save`` once the save that follows is under way (a synchronous save has
    begun writing; a background one is being waited for)."""
    step, write, wait = trainer_module.Trainer.train_step, ckpt.Checkpointer._write, ckpt.Checkpointer.wait
    pending = list(in_save)

    def send(signals) -> None:
        for sig in signals:
            signal.raise_signal(sig)

    def step_then_signal(self):
        stats = step(self)
        if self.run.iteration == iteration:
            send(in_step)
        return stats

    def signal_then_write(self, tmp, plan, *args):
        if plan.iteration == iteration and not self.async_save:
            send(pending)
            pending.clear()
        return write(self, tmp, plan, *args)

    def signal_then_wait(self):
        if self._thread is not None:  # raised from this (the main) thread while the writer works
            send(pending)
            pending.clear()
        return wait(self)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step_then_signal)
    monkeypatch.setattr(ckpt.Checkpointer, "_write", signal_then_write)
    monkeypatch.setattr(ckpt.Checkpointer, "wait", signal_then_wait)


@pytest.mark.parametrize("in_step, in_save", [((signal.SIGINT, signal.SIGINT), ()),
                                              ((signal.SIGINT,), (signal.SIGINT, signal.SIGINT)),
                                              ((signal.SIGTERM,), (signal.SIGINT,))])
@pytest.mark.parametrize("async_save", [False, True])
def test_more_signals_wait_for_the_checkpoint(data, tmp_path, monkeypatch, caplog, in_step, in_save, async_save):
    """Ctrl-C twice (or more) in a step or during its save: the run saves that step, commits it and stops."""
    caplog.set_level("INFO", logger="megaevo")
    _interrupt_at(monkeypatch, 2, in_step=in_step, in_save=in_save)
    cfg = config(data, tmp_path, **{"train.iters": 6, "checkpoint.interval": 0, "train.eval_interval": 0,
                                    "checkpoint.async": async_save})
    try:
        losses, trainer = fit(cfg)
    except KeyboardInterrupt:
        pytest.fail(f"interrupted unsaved; checkpoints: {sorted(p.name for p in tmp_path.glob('checkpoints/*'))}")
    assert trainer.run.iteration == 2 and len(losses) == 2
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "iter_0000002" and verify_checkpoint(root)["iteration"] == 2
    messages = [r.getMessage() for r in caplog.records]
    first = signal.Signals(in_step[0]).name
    assert [m for m in messages if "received" in m][0].startswith(f"{first} received: saving a checkpoint")
    assert sum("already stopping" in m for m in messages) == len(in_step) + len(in_save) - 1
    assert any(m.startswith(f"stopped by {first} at iteration 2: saved") for m in messages)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back


def test_a_failing_run_commits_the_checkpoint_being_written_in_the_background(data, tmp_path, monkeypatch):
    step, write = trainer_module.Trainer.train_step, ckpt.Checkpointer._write

    def slow_write(self, *args):
        time.sleep(0.5)  # still writing when the next step fails
        return write(self, *args)

    def failing_step(self):
        if self.run.iteration == 1:
            raise RuntimeError("boom")
        return step(self)

    monkeypatch.setattr(ckpt.Checkpointer, "_write", slow_write)
    monkeypatch.setattr(trainer_module.Trainer, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        fit(config(data, tmp_path, **{"train.iters": 4, "checkpoint.interval": 1, "checkpoint.async": True,
                                      "train.eval_interval": 0}))
    assert verify_checkpoint(tmp_path / "checkpoints")["iteration"] == 1


INTERRUPTED_RUN = """
import sys, time
from megaevo import checkpoint, cli
from megaevo.training import trainer
step, write = trainer.Trainer.train_step, checkpoint.Checkpointer._write
def slow_step(self):
    time.sleep(0.2)  # time for the test's signals to land in the middle of a step
    return step(self)
def slow_write(self, *args):
    time.sleep(0.5)  # and in the middle of the save
    return write(self, *args)
trainer.Trainer.train_step, checkpoint.Checkpointer._write = slow_step, slow_write
sys.exit(cli.main(["train", "--config", sys.argv[1]]))
"""


class _Lines:
    """The lines of a subprocess's stream, read in the background as they come."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self._thread.start()

    def wait_for(self, text: str, proc: subprocess.Popen, timeout: float = 60) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if any(text in line for line in self.lines):
                return True
            time.sleep(0.02)
        return any(text in line for line in self.lines)

    def text(self) -> str:
        self._thread.join(timeout=60)
        return "".join(self.lines)


def _steps_done(metrics: Path) -> int:
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.mark.slow
@pytest.mark.parametrize("first, second, async_save", [("SIGINT", "SIGINT", False), ("SIGTERM", "SIGINT", True)])
def test_a_second_signal_waits_for_the_checkpoint(data, tmp_path, first, second, async_save):
    """`megaevo train` stopped by two signals in a row: the first is acknowledged at once, the second (in
    the rest of the step or during the save) waits for the checkpoint, which loads and continues the run."""
    settings = {"train.iters": 1000, "checkpoint.interval": 0, "checkpoint.async": async_save,
                "train.eval_interval": 0}
    out = tmp_path / "run"
    path = save_config(config(data, out, **settings), tmp_path / "run.yaml")
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_RUN, str(path)], cwd=TESTS, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stdout, stderr = _Lines(proc.stdout), _Lines(proc.stderr)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and _steps_done(metrics) < 3:
        time.sleep(0.05)
    seen = _steps_done(metrics)
    proc.send_signal(getattr(signal, first))
    stderr.wait_for(f"{first} received", proc)  # the acknowledgement, before a second Ctrl-C
    proc.send_signal(getattr(signal, second))
    proc.wait(timeout=120)
    err, output = stderr.text(), stdout.text() + stderr.text()
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "interrupted" not in output, output
    assert [line.split(": ", 1)[1] for line in err.splitlines() if " received: " in line] == [
        f"{first} received: saving a checkpoint at the end of this step, then stopping (a second Ctrl-C waits for the "
        f"save)",
        f"{second} received: already stopping; waiting for the checkpoint to be committed (kill -9 {proc.pid} ends "
        f"the run now, without it)"], err
    stopped = re.findall(rf"stopped by {first} at iteration (\d+): saved ", output)
    assert len(stopped) == 1, output
    root = out / "checkpoints"
    done = int(stopped[0])
    assert done >= max(seen, 1) and (root / "latest").read_text().strip() == f"iter_{done:07d}"
    assert not any(p.name.startswith(".tmp_") for p in root.iterdir())
    assert verify_checkpoint(root)["iteration"] == done
    _, resumed = fit(config(data, out, **{**settings, "train.iters": done + 1, "checkpoint.load": "auto"}))
    assert resumed.run.iteration == done + 1


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


def _records(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []


@pytest.mark.slow
def test_torchrun_restarts_a_killed_group_from_the_latest_checkpoint(data, tmp_path):
    """torchrun --max-restarts 1: one worker SIGKILLed mid-run; the restarted group resumes the latest
    checkpoint (the default checkpoint.load) and ends with the uninterrupted run's losses, each step once."""
    settings = {"train.iters": 12, "checkpoint.interval": 2, "train.eval_interval": 0}
    out = tmp_path / "run"
    save_config(config(data, out, **settings), tmp_path / "run.yaml")
    (tmp_path / "worker.py").write_text(SLOWED_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGAEVO_CHECKPOINT_TIMEOUT": "5",
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5", "PYTHONPATH": str(TESTS.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", str(tmp_path / "worker.py"), str(tmp_path / "run.yaml"), "0.2", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = _Lines(proc.stdout)
    metrics, pid = out / "metrics.jsonl", tmp_path / "pid_rank1_attempt0"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(_records(metrics)) < 5:
        time.sleep(0.05)
    killed_at = len(_records(metrics))
    os.kill(int(pid.read_text()), signal.SIGKILL)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"torchrun did not finish:\n{output.text()}")
    text = output.text()
    assert proc.returncode == 0, text
    assert 5 <= killed_at < 12 and (tmp_path / "pid_rank1_attempt1").exists(), text  # the group was restarted
    assert re.search(r"resuming from .*iter_\d+ \(the latest checkpoint in out_dir\)", text), text
    records = _records(metrics)
    assert [r["step"] for r in records] == list(range(1, 13))
    whole, _ = fit(config(data, tmp_path / "whole", **settings))
    assert [r["loss"] for r in records] == pytest.approx(whole, rel=1e-5)


@pytest.mark.slow
def test_a_run_stopped_at_random_and_relaunched_ends_as_an_uninterrupted_one(tmp_path):
    """benchmarks/soak.py, short: stopped 4 times (SIGKILL, SIGTERM or SIGUSR1 at random moments) and
    launched again with the same command each time; the same losses and weights, each step logged once."""
    res = subprocess.run([sys.executable, str(TESTS.parent / "benchmarks" / "soak.py"), "--kills", "4", "--iters", "40",
                          "--seed", "1", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    result = json.loads(res.stdout)
    assert res.returncode == 0 and result["ok"], res.stdout + res.stderr
    assert result["kills"] == 4 and result["each_step_once"] and result["losses_equal"] and result["weights_equal"]
