"""What several test modules share: a tiny two-corpus pre-training setup and its config, an RL setup on the
session's SentencePiece model, running a config to the end, and comparing runs by their logical weights.

Fixtures built on these live in conftest.py; tests import the plain functions from here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from megaevo.checkpoint import LoadedCheckpoint
from megaevo.config import config_from_dict
from megaevo.data.indexed import IndexedDatasetWriter
from megaevo.stages import build_stage
from megaevo.training.trainer import Trainer

VOCAB = 500


def make_data(root: Path) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for name, lo in (("web", 0), ("math", 250)):
        with IndexedDatasetWriter(root / name, np.uint16) as w:
            for _ in range(120):  # counting sequences: learnable within a few steps
                start, n = rng.integers(0, 250), int(rng.integers(5, 80))
                w.add_document(lo + (start + np.arange(n)) % 250)
        out[name] = str(root / name)
    return out


def config(data: dict, out_dir, **overrides):
    raw = {
        "model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_heads": 4, "num_kv_heads": 2,
                  "vocab_size": VOCAB, "max_seq_len": 32},
        "data": {"train": [0.7, data["web"], 0.3, data["math"]], "seq_len": 32, "split": "90,10,0",
                 "cache_dir": str(Path(data["web"]).parent / "cache")},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "iters": 6, "seed": 7, "log_interval": 1,
                  "eval_interval": 3, "eval_iters": 1, "dtype": "fp32"},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup": 2},
        "checkpoint": {"interval": 3},
        "out_dir": str(out_dir),
    }
    return config_from_dict(raw, [f"{k}={v}" for k, v in overrides.items()])


def fit(cfg):
    trainer = Trainer(cfg, build_stage)
    records = trainer.fit()
    return [r["loss"] for r in records if "loss" in r], trainer


def logical_weights(path) -> dict:
    ck = LoadedCheckpoint(path)
    return {n: ck.tensor("model", n) for n in ck.names("model")}


def assert_close_runs(a: dict, b: dict, rtol=1e-5):
    """Each logical tensor within rtol of the reference, relative to the reference's norm."""
    assert a.keys() == b.keys()
    for n in a:
        err = (a[n].double() - b[n].double()).norm() / b[n].double().norm().clamp_min(1e-12)
        assert err <= rtol, f"{n}: relative difference {err:.2e}"


# ---------------------------------------------------------------- RL
TOKENIZER_ENV = "MEGAEVO_TEST_RL_TOKENIZER"
LOW = 300  # the reward: the share of response tokens with an id below LOW
_tokenizer = None


def low_ids_reward(prompt: dict, completion: str) -> float:
    """The share of the completion's tokens (re-encoded) whose id is below LOW: about 0.5 at random init."""
    global _tokenizer
    if _tokenizer is None:
        from megaevo.data.tokenizers import SentencePieceTokenizer

        _tokenizer = SentencePieceTokenizer(os.environ[TOKENIZER_ENV])
    ids = _tokenizer.encode(completion)
    return sum(i < LOW for i in ids) / max(len(ids), 1)


def rl_config(setup, out_dir, **overrides):
    raw = {
        "stage": "rl",
        "model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128, "num_heads": 4, "num_kv_heads": 2,
                  "vocab_size": 600, "max_seq_len": 64},
        "data": {"tokenizer": setup["tokenizer"]},
        "train": {"micro_batch_size": 4, "iters": 2, "seed": 3, "log_interval": 1, "eval_interval": 0,
                  "dtype": "fp32"},
        "optim": {"lr": 1e-2, "min_lr": 0.0, "warmup": 0, "schedule": "constant", "weight_decay": 0.0},
        "checkpoint": {"interval": 0},
        "rl": {"algorithm": "grpo", "prompts": [setup["prompts"]], "prompts_per_step": 8, "n": 4, "max_prompt_len": 24,
               "max_new_tokens": 12, "reward": "helpers:low_ids_reward", "critic": {"lr": 1e-2}},
        "out_dir": str(out_dir),
    }
    return config_from_dict(raw, [f"{k}={v}" for k, v in overrides.items()])


def rl_fit(cfg):
    trainer = Trainer(cfg, build_stage)
    return trainer.fit(), trainer


def tensors(path, kind="model") -> dict:
    ck = LoadedCheckpoint(path)
    return {n: ck.tensor(kind, n) for n in ck.names(kind)}


def ppo_overrides(base, **extra):
    return {"rl.algorithm": "ppo", "rl.n": 2, "rl.kl_coef": 0.05, "rl.mini_batches": 2, "rl.epochs": 2,
            "checkpoint.load": str(base), "checkpoint.finetune": True, "train.iters": 4, "checkpoint.interval": 2,
            **extra}


def make_rl_setup(tokenizer, root: Path) -> dict:
    os.environ[TOKENIZER_ENV] = str(tokenizer)
    d = root
    words = "ka lo mi ne ru sa te vo an el"
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "problem": words[: 5 + i % 20], "gt_solution": None,
                                           "gt_answer": str(i)}) + "\n" for i in range(40)))
    return {"tokenizer": str(tokenizer), "prompts": str(prompts)}


