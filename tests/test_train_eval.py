"""Downstream evaluation during training: train.eval_tasks logs eval/TASK/METRIC beside val/NAME."""
import json
from pathlib import Path

import pytest

from megaevo.config import ConfigError
from megaevo.training.trainer import Trainer
from test_trainer import config, make_data

EVALS = Path(__file__).resolve().parents[2] / "shared" / "evolm-evals"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
def test_eval_tasks_are_logged_at_every_eval_interval(data, spm_model, tmp_path):
    tasks = [str(EVALS / "GSM8KPlatinum.jsonl"), "rg:basic_arithmetic:3:1"]
    # The model's vocabulary (640) is larger than the tokenizer's (600): ids it cannot decode are never sampled.
    cfg = config(data, tmp_path, **{"model.vocab_size": 640, "data.tokenizer": spm_model, "train.iters": 4,
                                    "train.eval_interval": 2, "train.eval_tasks": json.dumps(tasks),
                                    "train.eval_tasks_limit": 3, "train.eval_tasks_max_length": 48,
                                    "checkpoint.save": False})
    Trainer(cfg).fit()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluated = [line for line in lines if "val/web" in line]
    assert [line["step"] for line in evaluated] == [2, 4]
    for line in evaluated:
        for key in ("eval/GSM8KPlatinum/accuracy", "eval/rg_basic_arithmetic/accuracy"):
            assert 0.0 <= line[key] <= 1.0, (key, sorted(line))
        assert line["eval/GSM8KPlatinum/timeouts"] == 0


def test_eval_tasks_need_a_tokenizer_and_a_known_task(data, tmp_path):
    with pytest.raises(ConfigError, match="data.tokenizer"):
        Trainer(config(data, tmp_path, **{"train.eval_tasks": json.dumps([str(EVALS / "MATHLevel1.jsonl")])}))
    with pytest.raises(ValueError, match="no-such-task"):
        Trainer(config(data, tmp_path, **{"train.eval_tasks": "[no-such-task]"}))
