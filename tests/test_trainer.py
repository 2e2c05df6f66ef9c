"""The training loop: layouts give the same run, resume is exact, checkpoints are layout-free and safe."""
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from megaevo.checkpoint import CheckpointError, LoadedCheckpoint
from megaevo.config import ConfigError
from megaevo.stages import build_stage
from megaevo.training.trainer import Trainer
from dist_utils import run_distributed
from helpers import VOCAB, assert_close_runs, config, fit, logical_weights, make_data

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The 1 x 1 x 1 run, 6 steps with checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("ref")
    losses, _ = fit(config(data, out))
    return {"out": out, "losses": losses,
            "w3": logical_weights(out / "checkpoints" / "iter_0000003"),
            "w6": logical_weights(out / "checkpoints" / "iter_0000006")}


def test_loss_falls_and_metrics_are_logged(reference):
    lines = [json.loads(l) for l in (reference["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4, 5, 6]
    for key in ("consumed_samples", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb"):
        assert key in lines[0]
    assert lines[-1]["consumed_samples"] == 48 and lines[-1]["tokens"] == 48 * 32
    assert {"val/web", "val/math"} <= lines[2].keys()
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.5
    assert lines[-1]["val/web"] < lines[2]["val/web"]
    assert (reference["out"] / "checkpoints" / "latest").read_text().strip() == "iter_0000006"


def test_resume_is_bit_exact(data, reference, tmp_path):
    out = tmp_path / "run"
    first, _ = fit(config(data, out, **{"train.iters": 3}))
    second, trainer = fit(config(data, out, **{"checkpoint.load": "auto"}))
    assert trainer.run.iteration == 6
    assert first + second == reference["losses"]
    resumed = logical_weights(out / "checkpoints" / "iter_0000006")
    for n, t in reference["w6"].items():
        assert torch.equal(resumed[n], t), n


def test_async_checkpoints_equal_sync_ones(data, reference, tmp_path):
    losses, _ = fit(config(data, tmp_path, **{"checkpoint.async": True}))
    assert losses == reference["losses"]
    for it, key in ((3, "w3"), (6, "w6")):
        weights = logical_weights(tmp_path / "checkpoints" / f"iter_{it:07d}")
        assert all(torch.equal(weights[n], t) for n, t in reference[key].items())


def _layouts(rank, world, data, root, ref_dir):
    """Runs on `world` gloo processes; returns rank 0's losses for each layout."""
    results = {}
    if world == 2:
        for name, extra in {"tp2": {"parallel.tp": 2},
                            "dp2": {},
                            "dp2_zero": {"parallel.distributed_optimizer": True},
                            "tp2_sp": {"parallel.tp": 2, "parallel.sequence_parallel": True}}.items():
            out = Path(root) / name
            results[name] = fit(config(data, out, **{"checkpoint.interval": 0, **extra}))[0]
    else:
        base = {"parallel.tp": 2, "parallel.sequence_parallel": True, "parallel.distributed_optimizer": True}
        results["tp2dp2"] = fit(config(data, Path(root) / "tp2dp2", **base))[0]
        # Continue the 1x1x1 run's step-3 checkpoint on TP=2 x DP=2.
        results["from_1x1"] = fit(config(data, Path(root) / "from_1x1",
                                         **{**base, "checkpoint.load": str(Path(ref_dir) / "checkpoints" /
                                                                              "iter_0000003")}))[0]
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_layouts_match_the_single_process_run(data, reference, tmp_path, world):
    results = run_distributed(_layouts, world, data, str(tmp_path), str(reference["out"]))[0]
    for name, losses in results.items():
        expected = reference["losses"][3:] if name == "from_1x1" else reference["losses"]
        assert len(losses) == len(expected), name
        for a, b in zip(losses, expected):
            assert math.isclose(a, b, rel_tol=1e-5), (name, losses, expected)
        assert_close_runs(logical_weights(tmp_path / name / "checkpoints" / "iter_0000006"), reference["w6"])
    if world == 4:
        # A checkpoint saved at TP=2 x DP=2 (distributed optimizer) continues at 1 x 1 x 1.
        out = tmp_path / "back_to_1x1"
        losses, _ = fit(config(data, out, **{"checkpoint.load": str(tmp_path / "tp2dp2" / "checkpoints" /
                                                                      "iter_0000003")}))
        for a, b in zip(losses, reference["losses"][3:]):
            assert math.isclose(a, b, rel_tol=1e-5)
        assert_close_runs(logical_weights(out / "checkpoints" / "iter_0000006"), reference["w6"])


def test_bad_configs_are_refused(data, tmp_path):
    with pytest.raises(ConfigError, match="tp"):
        Trainer(config(data, tmp_path, **{"parallel.tp": 2}), build_stage)  # world size 1
    with pytest.raises(ConfigError, match="vocab_size"):
        cfg = config(data, tmp_path, **{"model.vocab_size": 200, "train.iters": 1, "optim.warmup": 0})
        Trainer(cfg, build_stage).fit()


def test_bad_checkpoints_are_refused(data, reference, tmp_path):
    src = reference["out"] / "checkpoints" / "iter_0000003"
    with pytest.raises(CheckpointError, match="shape"):
        Trainer(config(data, tmp_path / "a", **{"model.hidden_size": 128, "checkpoint.load": str(src)}),
                build_stage).fit()
    broken = tmp_path / "broken"
    broken.mkdir()
    meta = json.loads((src / "metadata.json").read_text())
    frag = meta["tensors"]["model"]["layers.0.attention.qkv.weight"]["fragments"]
    frag.append(dict(frag[0]))  # the same block twice
    (broken / "metadata.json").write_text(json.dumps(meta))
    for f in src.iterdir():
        if not f.name.startswith("metadata.json"):  # edited on purpose: without its checksum beside it
            os.symlink(f, broken / f.name)
    with pytest.raises(CheckpointError, match="duplicated"):
        Trainer(config(data, tmp_path / "b", **{"checkpoint.load": str(broken)}), build_stage).fit()
    meta["tensors"]["model"]["layers.0.attention.qkv.weight"]["fragments"][0]["file"] = "../../etc/passwd"
    (broken / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="outside"):
        Trainer(config(data, tmp_path / "c", **{"checkpoint.load": str(broken)}), build_stage).fit()
    del meta["tensors"]["model"]["layers.0.attention.qkv.weight"]
    (broken / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="layers.0.attention.qkv.weight"):
        Trainer(config(data, tmp_path / "d", **{"checkpoint.load": str(broken)}), build_stage).fit()


KILL_DURING_SAVE = """
import os, sys
import megaevo.checkpoint.save as ck
from helpers import config
real = ck.write_safetensors
def dying_write(path, tensors, checksum=None):
    record = real(path, tensors, checksum)
    if "iter_0000006" in str(path) and "model_" in str(path):
        os._exit(9)  # killed in the middle of the second save
    return record
ck.write_safetensors = dying_write
from megaevo.stages import build_stage
from megaevo.training.trainer import Trainer
Trainer(config({"web": sys.argv[1], "math": sys.argv[2]}, sys.argv[3]), build_stage).fit()
"""


@pytest.mark.slow
def test_kill_during_save_keeps_the_previous_checkpoint(data, reference, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, data["web"], data["math"], str(out)],
                          cwd=Path(__file__).parent, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "iter_0000003"
    assert not (root / "iter_0000006").exists()
    # The run continues from the intact checkpoint and finishes as the uninterrupted run did.
    losses, _ = fit(config(data, out, **{"checkpoint.load": "auto"}))
    assert losses == reference["losses"][3:]
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_stop_the_run(data, tmp_path):
    trainer = Trainer(config(data, tmp_path, **{"checkpoint.interval": 1, "train.iters": 20}), build_stage)
    forward = trainer.actor.module.forward
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = forward(*args, **kwargs)
        return loss * float("nan") if len(calls) > 8 else loss  # 4 micro-batches a step: NaN from step 3
    trainer.actor.module.forward = poisoned
    with pytest.raises(RuntimeError, match="non-finite"):
        trainer.fit()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[2]["skipped_steps"] == 1 and lines[-1]["skipped_steps"] == 5
    ck = LoadedCheckpoint(tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip())
    weights = {n: ck.tensor("model", n) for n in ck.names()}
    good = LoadedCheckpoint(tmp_path / "checkpoints" / "iter_0000002")
    assert all(torch.equal(weights[n], good.tensor("model", n)) for n in weights)  # skipped steps change nothing
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_kernel_settings_reach_the_kernels(data, tmp_path, monkeypatch):
    from megaevo.kernels import dispatch

    monkeypatch.delenv(dispatch.AUTOTUNE_ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_default_autotune", True)
    monkeypatch.setattr(dispatch, "_default_backend", "auto")
    trainer = Trainer(config(data, tmp_path, **{"kernels.autotune": False, "kernels.backend": "torch",
                                                "train.iters": 1, "train.eval_interval": 0}), build_stage)
    seen = []
    step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda: seen.append((dispatch.get_backend(),
                                                                    dispatch.autotune_enabled())) or step())
    trainer.fit()
    assert seen == [("torch", False)]  # while the run trains
    assert dispatch.get_backend() == "auto" and dispatch.autotune_enabled() is True  # and the defaults after it


def test_inspect_checkpoint(reference, capsys):
    from megaevo import cli

    assert cli.main(["inspect", str(reference["out"] / "checkpoints"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["iteration"] == 6 and info["consumed_samples"] == 48
    assert info["layout"]["tp"] == 1 and info["optimizer_state"] == ["master", "exp_avg", "exp_avg_sq"]
    assert info["tensors"]["embedding.weight"]["shape"] == [VOCAB, 64]
    assert info["parameters"] == sum(t.numel() for t in reference["w6"].values())


@pytest.mark.slow
def test_finetune_takes_weights_and_starts_a_new_run(data, reference, tmp_path):
    src = str(reference["out"] / "checkpoints" / "iter_0000006")
    settings = {"checkpoint.load": src, "checkpoint.finetune": True, "train.iters": 3, "optim.warmup": 0,
                "optim.schedule": "constant", "optim.lr": 1e-9, "optim.min_lr": 1e-9}
    losses, trainer = fit(config(data, tmp_path, **settings))
    assert trainer.run.iteration == 3 and trainer.run.consumed_samples == 24 and trainer.actor.optimizer.step_count == 3
    assert losses[0] < reference["losses"][0] - 0.5  # starts from the trained weights
    weights = logical_weights(tmp_path / "checkpoints" / "iter_0000003")
    assert_close_runs(weights, reference["w6"], rtol=1e-6)  # a tiny lr barely moves them
    # Restarting the fine-tuning run continues its own checkpoints, not the source's weights.
    more, trainer = fit(config(data, tmp_path, **{**settings, "train.iters": 5}))
    assert trainer.run.iteration == 5 and len(more) == 2


def test_a_block_is_read_from_the_fragments_that_hold_it(tmp_path):
    from safetensors.torch import save_file

    full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    save_file({"w/0": full[:4].contiguous()}, str(tmp_path / "model_tp0_pp0.safetensors"))
    save_file({"w/1": full[4:].contiguous()}, str(tmp_path / "model_tp1_pp0.safetensors"))
    frags = [{"file": f"model_tp{i}_pp0.safetensors", "key": f"w/{i}", "offset": [4 * i, 0], "shape": [4, 6]}
             for i in range(2)]
    meta = {"format_version": 1, "iteration": 0, "tensors": {"model": {"w": {"shape": [8, 6], "dtype": "float32",
                                                                              "fragments": frags}}}}
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    ck = LoadedCheckpoint(tmp_path)
    opened = []
    real = ck._file
    ck._file = lambda name: opened.append(name) or real(name)
    assert torch.equal(ck.region("model", "w", (5, 2), (3, 3)), full[5:8, 2:5])
    assert opened == ["model_tp1_pp0.safetensors"]  # the other rank's file is never touched
    assert torch.equal(ck.region("model", "w", (2, 0), (4, 6)), full[2:6])  # across the two fragments
    assert torch.equal(ck.tensor("model", "w"), full)
    with pytest.raises(CheckpointError, match="outside"):
        ck.region("model", "w", (6, 0), (4, 6))
    meta["tensors"]["model"]["w"]["fragments"] = frags[:1]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    assert torch.equal(LoadedCheckpoint(tmp_path).region("model", "w", (0, 0), (4, 6)), full[:4])
    with pytest.raises(CheckpointError, match="missing"):
        LoadedCheckpoint(tmp_path).region("model", "w", (3, 0), (2, 6))


@pytest.mark.slow
def test_loading_names_model_settings_the_shapes_cannot_show(data, reference, tmp_path, caplog):
    src = str(reference["out"] / "checkpoints" / "iter_0000006")
    settings = {"checkpoint.load": src, "checkpoint.finetune": True, "train.iters": 1, "optim.warmup": 0,
                "checkpoint.save": False}
    fit(config(data, tmp_path / "same", **settings))
    assert not [r for r in caplog.records if "other model settings" in r.getMessage()]
    fit(config(data, tmp_path / "theta", **{**settings, "model.rope_theta": 500000.0}))
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("megaevo")]
    assert any("model.rope_theta: 10000.0 in the checkpoint, 500000.0 here" in r.getMessage() for r in warnings)


def _steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_launching_again_continues_or_says_finished(data, reference, tmp_path, caplog):
    """The same config launched again (no checkpoint.load): a finished run trains nothing; a run whose
    latest checkpoint is behind its metrics continues from it, and metrics.jsonl holds each step once."""
    caplog.set_level("INFO", logger="megaevo")
    out = tmp_path / "run"
    fit(config(data, out))
    root = out / "checkpoints"
    stamps = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    again, trainer = fit(config(data, out))
    assert again == [] and trainer.run.iteration == 0
    assert any("is finished: iter_0000006 is at iteration 6 of 6" in r.getMessage() for r in caplog.records)
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == stamps and _steps(out) == [1, 2, 3, 4, 5, 6]
    # killed after logging step 6 but before its save: the relaunch continues at 3, each step logged once
    shutil.rmtree(root / "iter_0000006")
    (root / "latest").write_text("iter_0000003\n")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a line cut off by the kill
    caplog.clear()
    losses, trainer = fit(config(data, out))
    assert losses == reference["losses"][3:] and _steps(out) == [1, 2, 3, 4, 5, 6]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming from")] == [
        f"resuming from {root / 'iter_0000003'} (the latest checkpoint in out_dir) at iteration 3 of 6"]


def test_load_none_starts_fresh_over_existing_checkpoints(data, reference, tmp_path):
    out = tmp_path / "run"
    fit(config(data, out, **{"train.iters": 4}))
    losses, trainer = fit(config(data, out, **{"checkpoint.load": "none"}))
    assert losses == reference["losses"] and trainer.run.iteration == 6
    assert _steps(out) == [1, 2, 3, 4, 5, 6]
    assert config(data, out).checkpoint.load == "auto"  # the default


def test_a_run_started_from_another_resumes_its_own_checkpoints(data, reference, tmp_path):
    """checkpoint.load=PATH (a parent run: resume it, or take its weights) is only where the run starts:
    relaunched, it continues its own checkpoints instead of loading the parent again."""
    parent = str(reference["out"] / "checkpoints" / "iter_0000003")
    out = tmp_path / "branch"
    settings = {"checkpoint.load": parent, "checkpoint.interval": 1}
    first, _ = fit(config(data, out, **settings))
    assert first == reference["losses"][3:]
    root = out / "checkpoints"
    (root / "latest").write_text("iter_0000004\n")  # as if killed after saving iteration 4
    for name in ("iter_0000005", "iter_0000006"):
        shutil.rmtree(root / name)
    more, trainer = fit(config(data, out, **settings))
    assert more == reference["losses"][4:] and trainer.run.iteration == 6 and _steps(out) == [4, 5, 6]
    # a path to one of the run's own checkpoints resumes exactly that one (a roll-back)
    back, _ = fit(config(data, out, **{**settings, "checkpoint.load": str(root / "iter_0000005")}))
    assert back == reference["losses"][5:] and _steps(out) == [4, 5, 6]
