"""Downstream evaluation during training: train.eval_tasks logs eval/TASK/METRIC beside val/NAME."""
import json
from pathlib import Path

import pytest

from megaevo.config import ConfigError
from megaevo.stages import build_stage
from megaevo.training.trainer import Trainer
from helpers import config, make_data

EVALS = Path(__file__).resolve().parents[2] / "shared" / "evolm-evals"  # ../shared beside the repository
needs_evals = pytest.mark.skipif(not EVALS.is_dir(), reason="EvoLM eval copies (../shared/evolm-evals) not present")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
@needs_evals
def test_eval_tasks_are_logged_at_every_eval_interval(data, spm_model, tmp_path):
    tasks = [str(EVALS / "GSM8KPlatinum.jsonl"), "rg:basic_arithmetic:3:1"]
    # The model's vocabulary (640) is larger than the tokenizer's (600): ids it cannot decode are never sampled.
    cfg = config(data, tmp_path, **{"model.vocab_size": 640, "data.tokenizer": spm_model, "train.iters": 4,
                                    "train.eval_interval": 2, "train.eval_tasks": json.dumps(tasks),
                                    "train.eval_tasks_limit": 3, "train.eval_tasks_max_length": 48,
                                    "checkpoint.save": False})
    Trainer(cfg, build_stage).fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluated = [line for line in lines if "val/web" in line]
    assert [line["step"] for line in evaluated] == [2, 4]
    for line in evaluated:
        for key in ("eval/GSM8KPlatinum/accuracy", "eval/rg_basic_arithmetic/accuracy"):
            assert 0.0 <= line[key] <= 1.0, (key, sorted(line))
        assert line["eval/GSM8KPlatinum/timeouts"] == 0


@needs_evals
def test_eval_tasks_need_a_tokenizer_and_a_known_task(data, tmp_path):
    with pytest.raises(ConfigError, match="data.tokenizer"):
        Trainer(config(data, tmp_path, **{"train.eval_tasks": json.dumps([str(EVALS / "MATHLevel1.jsonl")])}),
                build_stage)
    with pytest.raises(ValueError, match="no-such-task"):
        Trainer(config(data, tmp_path, **{"train.eval_tasks": "[no-such-task]"}), build_stage)


@pytest.mark.slow
def test_eval_tasks_during_training_equal_megaevo_eval_on_the_saved_checkpoint(data, spm_model, tmp_path, monkeypatch):
    """The scores logged at a step are those of `megaevo eval` on the checkpoint saved at that step: the
    live model generates with the weights it trained to (no stale inference copy), text for text."""
    from megaevo import cli
    from megaevo.eval.tasks import GenerativeTask

    seen = []
    run = GenerativeTask.run

    def spy(self, *args, **kwargs):
        result = run(self, *args, **kwargs)
        seen.append([row["completions"] for row in result["samples"]])
        return result

    monkeypatch.setattr(GenerativeTask, "run", spy)
    task, limit, max_length = "rg:basic_arithmetic:6:1", 6, 64
    cfg = config(data, tmp_path / "run", **{"model.vocab_size": 640, "model.max_seq_len": max_length,
                                            "data.tokenizer": spm_model, "train.iters": 4,
                                            "train.eval_interval": 2, "train.eval_tasks": f"[{task}]",
                                            "train.eval_tasks_limit": limit, "train.eval_tasks_max_length": max_length,
                                            "checkpoint.interval": 4})
    trainer = Trainer(cfg, build_stage)
    trainer.fit()
    packed = trainer.actor.chunks[0].__dict__["_decode_steps"]["steps"]
    assert any(rows > 0 for rows in packed), "the test needs decoding on packed weights, which may go stale"
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    at_4 = next(line for line in logged if line.get("step") == 4 and "eval/rg_basic_arithmetic/accuracy" in line)
    assert len(seen) == 2 and seen[0] != seen[1]  # the model changed between the two evaluations
    monkeypatch.setattr(GenerativeTask, "run", run)
    out = tmp_path / "eval"
    assert cli.main(["eval", "--load", str(tmp_path / "run" / "checkpoints" / "iter_0000004"), "--tasks", task,
                     "--limit", str(limit), "--batch-size", str(limit), "--max-length", str(max_length),
                     "--seed", str(cfg.train.seed), "--out", str(out), "--quiet", "--workers", "1"]) == 0
    results = json.loads((out / "results.json").read_text())["tasks"]["rg_basic_arithmetic"]
    rows = [json.loads(line) for line in (out / "samples" / "rg_basic_arithmetic.jsonl").read_text().splitlines()]
    assert [row["completions"] for row in rows] == seen[1]
    for key in ("accuracy", "generated_tokens", "no_answer"):
        assert at_4[f"eval/rg_basic_arithmetic/{key}"] == pytest.approx(results[key]), key
