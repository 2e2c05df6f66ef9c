"""Every example config loads, and validates for each launch line written in its comments; the demo's
examples are the demo's settings, with paths relative to the examples' folder."""
import shlex
from pathlib import Path

import pytest
import yaml

from megaevo import demo
from megaevo.config import config_from_dict, load_config, validate

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
CONFIGS = sorted(p for p in EXAMPLES.glob("*.yaml") if not p.name.startswith(("suite-", "study-")))  # suites: below
SUITES = sorted(EXAMPLES.glob("suite-*.yaml")) + sorted(EXAMPLES.glob("study-*.yaml"))


def launch_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(world size, overrides) of each `megaevo train` / `torchrun ... -m megaevo.train` line in the
    comments of `path` that names this file; backslash continuations are joined."""
    lines, pending = [], ""
    for raw in path.read_text().splitlines():
        if not raw.startswith("#"):
            continue
        text = pending + raw.lstrip("#").strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        if not text.startswith(("megaevo train ", "torchrun ")):
            continue
        words = shlex.split(text, comments=True)
        if f"examples/{path.name}" not in words:
            continue
        if words[:2] == ["megaevo", "train"]:
            world = 1
        elif words[:1] == ["torchrun"]:
            option = dict(zip(words, words[1:]))
            world = int(option.get("--nproc_per_node", 1)) * int(option.get("--nnodes", 1))
        else:
            continue
        after = words[words.index(f"examples/{path.name}") + 1:]
        lines.append((world, [w for w in after if "=" in w]))
    return lines


def test_the_examples_are_there():
    names = {p.name for p in CONFIGS}
    assert {"tiny-cpu.yaml", "evolm-0.5b.yaml", "evolm-1b.yaml", "evolm-4b.yaml", "cpt-replay.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_validates_for_its_launch_lines(path):
    cfg = load_config(path)
    launches = launch_lines(path)
    assert launches, f"{path.name}: no launch line (`torchrun ... --config examples/{path.name}`) in its comments"
    for world, overrides in launches:
        validate(load_config(path, overrides), world)
    assert cfg.rl.prompts if cfg.stage == "rl" else cfg.data.train


@pytest.mark.parametrize("name", ["evolm-0.5b", "evolm-1b", "evolm-4b"])
def test_pretraining_examples(name):
    cfg = load_config(EXAMPLES / f"{name}.yaml")
    assert cfg.model.preset == name and cfg.seq_len == 2048 and cfg.train.dtype == "auto"
    assert cfg.train.global_batch_size * cfg.seq_len == 2**20  # about a million tokens per step
    assert cfg.parallel.distributed_optimizer and cfg.optim.schedule == "cosine"
    assert cfg.optim.min_lr < cfg.optim.lr and 0 < cfg.optim.warmup < cfg.train.iters
    assert validate(cfg, 8).dp * cfg.parallel.tp == 8


def test_cpt_example_replays_pretraining_data():
    cfg = load_config(EXAMPLES / "cpt-replay.yaml")
    weights = {name: corpus["weight"] for name, corpus in cfg.data.train.items()}
    assert sorted(weights.values()) == [0.05, 0.95]
    assert cfg.checkpoint.load not in (None, "auto")
    assert cfg.optim.schedule in ("constant", "wsd")
    assert cfg.optim.lr < load_config(EXAMPLES / "evolm-1b.yaml").optim.lr


def as_written(name: str):
    """An example's Config with its paths as the file writes them (relative to the file's folder)."""
    return config_from_dict(yaml.safe_load((EXAMPLES / name).read_text()))


@pytest.mark.parametrize("name, settings", [("tiny-cpu.yaml", demo.train_settings),
                                            ("demo-sft.yaml", demo.sft_settings),
                                            ("demo-grpo.yaml", demo.grpo_settings)])
def test_demo_examples_are_the_demo_settings_from_any_folder(name, settings, tmp_path, monkeypatch):
    assert as_written(name) == config_from_dict(settings("../megaevo-demo"))
    monkeypatch.chdir(tmp_path)  # the paths name the demo directory in the repository's root, from anywhere
    assert load_config(EXAMPLES / name) == config_from_dict(settings(REPO / "megaevo-demo"))


def test_demo_sft_example_names_what_makes_its_starting_checkpoint():
    text = (EXAMPLES / "demo-sft.yaml").read_text()
    assert load_config(EXAMPLES / "demo-sft.yaml").checkpoint.load == str(REPO / "megaevo-demo" / "run")
    assert "megaevo demo --single-run" in text and "megaevo-demo/suite/runs/" in text
    assert "megaevo demo --single-run" in (EXAMPLES / "tiny-cpu.yaml").read_text()
    assert "writes megaevo-demo/config.yaml" not in (EXAMPLES / "tiny-cpu.yaml").read_text()


def test_sft_example_has_evolm_recipe():
    cfg = load_config(EXAMPLES / "evolm-1b-sft.yaml")
    assert cfg.stage == "sft" and cfg.model.preset == "evolm-1b"
    assert cfg.train.epochs == 1 and cfg.train.global_batch_size == 128
    assert cfg.optim.lr == 1e-5 and cfg.optim.schedule == "cosine" and cfg.optim.warmup_fraction == 0.1
    assert not cfg.sft.packing and cfg.sft.cutoff == 2048 and cfg.sft.loss_normalization == "micro_batch_mean"
    assert cfg.checkpoint.finetune and cfg.checkpoint.load not in (None, "auto")


def test_ppo_example_has_evolm_recipe():
    cfg = load_config(EXAMPLES / "evolm-1b-ppo.yaml")
    r = cfg.rl
    assert cfg.stage == "rl" and r.algorithm == "ppo" and r.n == 1 and r.prompts_per_step == 1024
    assert r.mini_batches == 1 and r.epochs == 1 and r.temperature == 1.0 and r.top_p == 1.0
    assert r.max_prompt_len == r.max_new_tokens == 1024 and r.gamma == r.lam == 1.0 and r.whiten_advantages
    assert r.clip_low == r.clip_high == 0.2 and r.critic.value_clip == 0.5 and r.entropy_coef == 0.001
    assert r.loss_agg == "token-mean" and r.kl_coef == 0.0
    assert cfg.optim.lr == 2e-6 and r.critic.lr == 2e-5 and cfg.optim.schedule == "constant"
    assert cfg.optim.warmup_fraction == 0.1 and cfg.optim.weight_decay == 0.01 and cfg.optim.clip_grad == 1.0
    assert cfg.checkpoint.finetune


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_suite_example_loads(path):
    from megaevo.suite import expand, load_spec

    assert expand(load_spec(path))


def test_evolm_suite_example_expands_to_the_grid_of_the_study():
    from megaevo.suite import expand, load_spec

    runs = expand(load_spec(EXAMPLES / "suite-evolm-1b.yaml"))
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.stage, []).append(run)
    assert {k: len(v) for k, v in by_stage.items()} == {"pretrain": 5, "cpt": 5, "sft": 30, "rl": 150}
    for run in runs:  # every later stage starts from a run of the stage before it
        if run.stage != "pretrain":
            assert run.parent.stage == {"cpt": "pretrain", "sft": "cpt", "rl": "sft"}[run.stage]
    tokens = sorted(r.config["train"]["iters"] * r.config["train"]["global_batch_size"] * r.config["data"]["seq_len"]
                    for r in by_stage["pretrain"])
    assert [round(t / 1e9) for t in tokens] == [20, 40, 80, 160, 320]
