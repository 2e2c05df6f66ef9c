"""Config: presets, YAML and dotted overrides, type and unknown-key errors, layout validation."""
from __future__ import annotations

import logging
import os
import textwrap

import pytest

from dataclasses import dataclass, field
from typing import Optional

from megaevo import configio
from megaevo.config import (
    PATH_KEYS,
    PRESETS,
    Config,
    ConfigError,
    Layout,
    ModelConfig,
    RLCriticConfig,
    absolute_paths,
    config_from_dict,
    config_to_dict,
    load_config,
    resolve,
    resolve_dtype,
    save_config,
    validate,
    with_iters,
)
from megaevo.data.templates import TEMPLATE_NAMES
from megaevo.model.args import ModelArgs, layout_errors, shape_errors


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config(*overrides: str) -> Config:
    return load_config(None, list(overrides))


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("name, layers, hidden, ffn", [
    ("evolm-0.5b", 20, 1536, 3216),
    ("evolm-1b", 22, 2048, 4896),
    ("evolm-2b", 26, 2816, 6180),
    ("evolm-4b", 28, 4096, 7792),
])
def test_evolm_presets(name, layers, hidden, ffn):
    m = config(f"model.preset={name}").model
    assert (m.preset, m.num_layers, m.hidden_size, m.ffn_hidden_size) == (name, layers, hidden, ffn)
    assert (m.num_heads, m.num_kv_heads, m.vocab_size, m.max_seq_len) == (32, 4, 32000, 2048)
    assert m.head_dim == hidden // 32


def test_tiny_preset_is_small_and_the_default():
    tiny = ModelConfig.from_preset("tiny")
    assert tiny.num_layers <= 4 and tiny.hidden_size <= 128 and tiny.vocab_size == 4096
    assert (tiny.num_heads, tiny.num_kv_heads) == (4, 2)
    assert config().model == ModelConfig()
    assert {k: getattr(ModelConfig(), k) for k in PRESETS["tiny"]} == PRESETS["tiny"]


def test_explicit_fields_override_the_preset(tmp_path):
    path = write(tmp_path, """
        model:
          num_layers: 4        # before or after the preset key: explicit fields win
          preset: evolm-1b
          recompute: selective
    """)
    m = load_config(path, []).model
    assert (m.num_layers, m.hidden_size, m.recompute) == (4, 2048, "selective")
    # a later override of the preset replaces the architecture; later explicit overrides win again
    m = load_config(path, ["model.preset=evolm-4b", "model.hidden_size=1024"]).model
    assert (m.preset, m.num_layers, m.hidden_size, m.recompute) == ("evolm-4b", 28, 1024, "selective")
    assert ModelConfig.from_preset("evolm-1b", num_layers=2).num_layers == 2


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match=r"model\.preset.*'evolm-3b'.*did you mean 'evolm-4b'"):
        config("model.preset=evolm-3b")
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelConfig.from_preset("llama")


# ---------------------------------------------------------------- YAML and overrides


def test_yaml_and_overrides(tmp_path, monkeypatch):
    here = tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)  # the file's paths resolve against its folder, the overrides' against this one
    path = write(tmp_path, """
        model: {preset: tiny}
        parallel: {tp: 2, sequence_parallel: true}
        data:
          train: [0.95, data/math, 0.05, data/web]
          valid: {code: data/code}
          seq_len: 128
        optim: {lr: 3e-4, min_lr: 3e-5, schedule: wsd}   # 3e-4 is a string to YAML
        checkpoint: {async: true, load: auto}
        out_dir: runs/x
    """)
    cfg = load_config(path, [
        "parallel.tp=1",
        "optim.betas=[0.9,0.98]",
        "data.valid.web=data/web",
        "checkpoint.load=null",
        "train.iters=1e3",
    ])
    assert cfg.parallel.tp == 1 and cfg.parallel.sequence_parallel is True
    assert cfg.data.train == [0.95, f"{tmp_path}/data/math", 0.05, f"{tmp_path}/data/web"]
    assert cfg.data.valid == {"code": f"{tmp_path}/data/code", "web": f"{here}/data/web"}
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.98)
    assert cfg.checkpoint.async_save is True and cfg.checkpoint.load is None
    assert cfg.train.iters == 1000 and cfg.out_dir == f"{tmp_path}/runs/x" and cfg.seq_len == 128
    cfg = load_config(path, ["data.train={web: {prefix: d/web, weight: 1}}", "checkpoint.load=auto"])
    assert cfg.data.train == {"web": {"prefix": f"{here}/d/web", "weight": 1}}
    assert cfg.checkpoint.load == "auto"


def test_paths_in_a_file_resolve_against_its_folder_from_any_working_directory(tmp_path, monkeypatch):
    folder, elsewhere = tmp_path / "project" / "configs", tmp_path / "elsewhere"
    elsewhere.mkdir(parents=True)
    folder.mkdir(parents=True)
    (folder / "heldout.idx").write_text("")  # a bare name that is a dataset prefix beside the file: a path
    path = write(folder, """
        stage: rl
        data:
          train: {math: {prefix: ../data/math, weight: 0.9}, web: ../data/web}
          valid: {code: ../data/code, abs: /data/code}
          cache_dir: ../cache
          tokenizer: ../tok/spm.model
        train:
          eval_tasks: [gsm8k_platinum, rg:gcd:5, ../sets/mine.jsonl, heldout, /evals/x.jsonl]
          eval_tasks_data_dir: ../evals
        checkpoint: {load: ../runs/base}
        rl:
          prompts: [rg:gcd:200:7, prompts.jsonl, math_500]
          prompts_data_dir: ~/prompts
          reference: ../runs/ref
          critic: {load: ../runs/critic}
        out_dir: ../runs/rl
    """)
    monkeypatch.chdir(elsewhere)
    project = str(tmp_path / "project")
    for given in (path, "../project/configs/run.yaml"):
        cfg = load_config(given)
        assert cfg.data.train == {"math": {"prefix": f"{project}/data/math", "weight": 0.9},
                                  "web": f"{project}/data/web"}
        assert cfg.data.valid == {"code": f"{project}/data/code", "abs": "/data/code"}
        assert (cfg.data.cache_dir, cfg.data.tokenizer) == (f"{project}/cache", f"{project}/tok/spm.model")
        assert cfg.train.eval_tasks == ["gsm8k_platinum", "rg:gcd:5", f"{project}/sets/mine.jsonl",
                                        f"{project}/configs/heldout", "/evals/x.jsonl"]
        assert cfg.train.eval_tasks_data_dir == f"{project}/evals"
        assert cfg.checkpoint.load == f"{project}/runs/base"
        assert cfg.rl.prompts == ["rg:gcd:200:7", f"{project}/configs/prompts.jsonl", "math_500"]
        assert cfg.rl.prompts_data_dir == os.path.expanduser("~/prompts")
        assert (cfg.rl.reference, cfg.rl.critic.load) == (f"{project}/runs/ref", f"{project}/runs/critic")
        assert cfg.out_dir == f"{project}/runs/rl"
    # overrides: against the working directory; keywords and names stay what they are
    cfg = load_config(path, ["checkpoint.load=auto", "out_dir=out", "data.tokenizer=tok.model",
                             "rl.prompts=[more.jsonl, rg:gcd:3]", "data.train=[0.5, a, 0.5, /b]"])
    assert (cfg.checkpoint.load, cfg.out_dir, cfg.data.tokenizer) == ("auto", f"{elsewhere}/out",
                                                                      f"{elsewhere}/tok.model")
    assert cfg.rl.prompts == [f"{elsewhere}/more.jsonl", "rg:gcd:3"]
    assert cfg.data.train == [0.5, f"{elsewhere}/a", 0.5, "/b"]
    assert cfg.data.valid["code"] == f"{project}/data/code"  # the file's, untouched by the overrides
    # the suite keeps them as written, and resolves them against its spec's folder itself
    raw = load_config(path, ["out_dir=out"], resolve_paths=False)
    assert (raw.data.tokenizer, raw.out_dir, raw.checkpoint.load) == ("../tok/spm.model", "out", "../runs/base")
    assert absolute_paths(config_to_dict(raw), folder)["data"]["tokenizer"] == f"{project}/tok/spm.model"


def test_every_path_setting_is_resolved():
    known = set(configio._known_keys(Config))
    assert set(PATH_KEYS) <= known
    looks_like_a_path = {k for k in known if k.rpartition(".")[2] in ("load", "tokenizer", "reference", "prompts",
                                                                      "train", "valid", "eval_tasks", "out_dir")
                         or k.endswith("_dir")}
    assert looks_like_a_path - {"train"} <= set(PATH_KEYS)  # `train` the section, `data.train` the blend


def test_a_config_made_in_code_gets_absolute_paths_against_a_folder(tmp_path, monkeypatch):
    cfg = config_from_dict({"data": {"train": ["d/a", "d/b"], "tokenizer": "t.model"}, "out_dir": "o"})
    assert cfg.data.train == ["d/a", "d/b"] and cfg.out_dir == "o"  # as given, until a run starts
    monkeypatch.chdir(tmp_path)
    done = absolute_paths(cfg)
    assert done.data.train == [f"{tmp_path}/d/a", f"{tmp_path}/d/b"] and done.out_dir == f"{tmp_path}/o"
    assert done.data.tokenizer == f"{tmp_path}/t.model" and done.model == cfg.model
    assert absolute_paths(done, "/elsewhere") == done  # absolute paths stay


def test_iters_given_while_epochs_sets_the_length_is_an_error_naming_both(tmp_path):
    path = write(tmp_path, """
        stage: sft
        data: {train: [data/chat]}
        train: {epochs: 2, iters: 50}
    """)
    assert load_config(path).train.epochs == 2  # in one file, epochs wins (a saved config holds both)
    with pytest.raises(ConfigError, match=r"train\.iters=20 .*train\.epochs=2 .*train\.epochs=null"):
        load_config(path, ["train.iters=20"])
    with pytest.raises(ConfigError, match=r"train\.iters=20 .*train\.epochs=2"):
        config_from_dict({"stage": "sft", "train": {"epochs": 2}}, ["train.iters=20"])
    cfg = load_config(path, ["train.iters=20", "train.epochs=null"])
    assert (cfg.train.iters, cfg.train.epochs) == (20, None)
    assert load_config(path, ["train.epochs=1", "train.iters=20"]).train.epochs == 1  # both given: epochs


def test_round_trip(tmp_path):
    cfg = load_config(None, ["model.preset=evolm-0.5b", "optim.schedule=inf-cos", "optim.constant_lr=1e-4",
                             "data.train={a: {prefix: p/a, weight: 2}}", "parallel.pp_layers=[10,10]",
                             "parallel.pp=2", "checkpoint.async=true", "checkpoint.keep_last=3"])
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    text = path.read_text()
    assert "async: true" in text and "async_save" not in text
    assert load_config(path, []) == cfg  # its paths are absolute: the overrides' and the default out_dir
    assert config_to_dict(load_config(path, [])) == config_to_dict(cfg)
    # a relative path is written as the absolute path it names now, so the file means the same anywhere
    assert load_config(save_config(Config(), tmp_path / "d.yaml"), []) == absolute_paths(Config())


def test_empty_file_and_defaults(tmp_path):
    # the default out_dir is relative to the working directory
    assert load_config(write(tmp_path, ""), []) == absolute_paths(Config())
    assert absolute_paths(Config()).out_dir == os.path.abspath("runs/megaevo")
    assert config().seq_len == ModelConfig().max_seq_len


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("override, key, expected", [
    ("parallel.tp=two", "parallel.tp", "an integer"),
    ("train.iters=1.5", "train.iters", "an integer"),
    ("parallel.sequence_parallel=3", "parallel.sequence_parallel", "true or false"),
    ("optim.lr=fast", "optim.lr", "a number"),
    ("optim.betas=[0.9]", "optim.betas", "a list of 2 numbers"),
    ("parallel.pp_layers=[2, x]", r"parallel.pp_layers\[1\]", "an integer"),
    ("data.valid=[a, b]", "data.valid", "a mapping"),
    ("data.train=web", "data.train", "a list or a mapping"),
    ("model.recompute=ful", "model.recompute", "one of 'none', 'full', 'selective'.*did you mean 'full'"),
    ("kernels.backend=cuda", "kernels.backend", "one of 'auto', 'triton', 'torch', 'apex'"),
    ("train.dtype=fp16", "train.dtype", "one of"),
    ("checkpoint.load=[1]", "checkpoint.load", "a string or null"),
])
def test_type_errors_name_the_key(override, key, expected):
    with pytest.raises(ConfigError, match=rf"^{key}: expected {expected}"):
        config(override)


def test_type_error_from_a_file(tmp_path):
    path = write(tmp_path, "train:\n  micro_batch_size: four\n")
    with pytest.raises(ConfigError, match="train.micro_batch_size: expected an integer, got 'four'"):
        load_config(path, [])
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_config(write(tmp_path, "model: evolm-1b\n"), [])


@pytest.mark.parametrize("override, message", [
    ("optim.lr_min=1e-5", "unknown key 'optim.lr_min' (did you mean 'optim.min_lr'?)"),
    ("model.num_layer=3", "unknown key 'model.num_layer' (did you mean 'model.num_layers'?)"),
    ("train.lr=1e-3", "unknown key 'train.lr' (did you mean 'optim.lr'?)"),
    ("optimizer.lr=1e-3", "unknown key 'optimizer' (did you mean 'optim'?)"),
    ("checkpoint.async_save=true", "unknown key 'checkpoint.async_save' (did you mean 'checkpoint.async'?)"),
    ("model={preset: tiny, hidden: 64}", "unknown key 'model.hidden' (did you mean 'model.hidden_size'?)"),
])
def test_unknown_override_suggests(override, message):
    with pytest.raises(ConfigError) as e:
        config(override)
    assert str(e.value) == f"override {override!r}: {message}"


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = write(tmp_path, """
        parallel:
          tp: 2
          sequence_paralel: true
    """)
    with pytest.raises(ConfigError) as e:
        load_config(path, [])
    assert str(e.value) == f"{path}: unknown key 'parallel.sequence_paralel' (did you mean 'parallel.sequence_parallel'?)"
    with pytest.raises(ConfigError, match=r"unknown key 'out_dri' \(did you mean 'out_dir'\?\)"):
        load_config(write(tmp_path, "out_dri: x\n"), [])


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        config("parallel.tp")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [\n"), [])
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(write(tmp_path, "- 1\n"), [])


# ---------------------------------------------------------------- validate


def test_validate_returns_layout():
    cfg = config("parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=2", "train.global_batch_size=16")
    assert validate(cfg, 8) == Layout(world_size=8, tp=2, pp=2, dp=2, virtual_pp=1, micro_batches_per_step=4)
    assert validate(config(), 1).dp == 1
    # sequence parallelism with tp=1 is allowed (it does nothing)
    assert validate(config("parallel.sequence_parallel=true"), 1).tp == 1


@pytest.mark.parametrize("overrides, world, pattern", [
    (["model.preset=evolm-1b", "parallel.tp=3"], 3,
     r"parallel\.tp=3 does not divide the model's 32 attention heads \(model\.num_heads=32\): "
     r".*set parallel\.tp to one of 1, 2, 4"),
    (["model.preset=evolm-1b", "parallel.tp=8"], 8,
     r"parallel\.tp=8 does not divide the model's 4 KV heads \(model\.num_kv_heads=4\): "
     r".*set parallel\.tp to one of 1, 2, 4"),
    (["model.num_layers=22", "parallel.pp=4"], 4,
     r"parallel\.pp=4 does not divide the model's 22 layers \(model\.num_layers=22\): "
     r"choose .* 1, 2, 11, 22 .*parallel\.pp_layers"),
    (["parallel.pp=2", "parallel.pp_layers=[3, 2]"], 2,
     r"parallel\.pp_layers=\[3, 2\] must list 2 positive layer counts .* summing to model\.num_layers=4"),
    (["train.micro_batch_size=2", "train.global_batch_size=12"], 4,
     r"train\.global_batch_size=12 is not divisible by train\.micro_batch_size × DP = 2 × 4 = 8: "
     r"use a multiple of 8 \(e\.g\. 8 or 16\)"),
    (["parallel.tp=2"], 3, r"world size 3 is not a multiple of TP × PP = 2 × 1 = 2: launch a multiple of 2"),
    (["model.num_kv_heads=3"], 1, r"model\.num_heads=4 is not divisible by model\.num_kv_heads=3"),
    (["model.hidden_size=130"], 1, r"model\.hidden_size=130 is not divisible by model\.num_heads=4"),
    (["data.seq_len=512"], 1, r"data\.seq_len=512 must be between 1 and model\.max_seq_len=256"),
    (["optim.lr=1e-5", "optim.min_lr=1e-4"], 1, r"optim\.lr=1e-05 is below optim\.min_lr=0\.0001"),
    (["optim.schedule=inf-cos"], 1, r"needs optim\.constant_lr"),
    (["optim.warmup=-1"], 1, r"optim\.warmup=-1 must not be negative"),
    (["parallel.pp=2", "parallel.virtual_pp=2", "train.global_batch_size=3"], 2,
     r"micro-batches per step \(3\) to be a multiple of parallel\.pp=2"),
    (["model.ffn_hidden_size=351", "parallel.tp=2"], 2,
     r"parallel\.tp=2 does not divide the model's 351 FFN columns \(model\.ffn_hidden_size=351\)"),
    (["data.train=[1, a, x, b]"], 1, r"data\.train: cannot read data blend"),
])
def test_validate_messages(overrides, world, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(config(*overrides), world)


def test_warmup_longer_than_the_run_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="megaevo.config"):
        validate(config("optim.warmup=100", "train.iters=50", "optim.lr=1e-3"), 1)
    records = [r for r in caplog.records if r.name == "megaevo.config"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert records[0].getMessage().startswith(
        "optim.warmup=100 is longer than train.iters=50: the learning rate never reaches optim.lr=0.001")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megaevo.config"):
        validate(config("optim.warmup=50", "train.iters=50"), 1)  # ends the warmup with the run: no notice
        validate(config("optim.warmup=100", "train.iters=50"), 1, rank=3)  # said once, by rank 0, not by every rank
        resolve(config("optim.warmup=100", "train.iters=50"), 1, rank=3)
    assert not [r for r in caplog.records if r.name == "megaevo.config"]


@pytest.mark.parametrize("rank_env", [None, "0", "3"])
def test_validation_reads_no_environment(caplog, monkeypatch, rank_env):
    """The same config gives the same layout, values and messages whatever RANK the environment holds."""
    if rank_env is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank_env)
    cfg = config("optim.warmup=100", "train.iters=50", "train.global_batch_size=4")
    with caplog.at_level(logging.WARNING, logger="megaevo.config"):
        resolved, layout = resolve(cfg, 2)
        assert validate(cfg, 2) == layout == Layout(2, 1, 1, 2, 1, 2)
    said = [r.getMessage() for r in caplog.records if r.name == "megaevo.config"]
    assert len(said) == 2 and said[0] == said[1] and said[0].startswith("optim.warmup=100 is longer than train.iters=50")
    assert resolved == absolute_paths(cfg)
    with pytest.raises(ConfigError, match=r"world size 3 is not a multiple"):
        resolve(config("parallel.tp=2"), 3)


def test_validate_lists_every_problem():
    cfg = config("parallel.tp=3", "model.num_layers=3", "parallel.pp=2")
    with pytest.raises(ConfigError) as e:
        validate(cfg, 5)
    text = str(e.value)
    assert text.startswith("invalid configuration:")
    for part in ("world size 5", "model.num_heads=4", "model.num_kv_heads=2", "model.num_layers=3"):
        assert part in text


def test_valid_uneven_and_interleaved_pipeline():
    cfg = config("model.num_layers=5", "parallel.pp=2", "parallel.pp_layers=[3, 2]")
    assert validate(cfg, 2).pp == 2
    cfg = config("parallel.pp=2", "parallel.virtual_pp=2", "train.global_batch_size=4")
    assert validate(cfg, 2).micro_batches_per_step == 4


# ---------------------------------------------------------------- derived values


@pytest.mark.parametrize("vocab, tp, padded", [
    (32000, 1, 32000), (32000, 2, 32000), (32000, 3, 32256), (50257, 1, 50304), (4096, 8, 4096), (1, 4, 512),
])
def test_padded_vocab(vocab, tp, padded):
    assert ModelConfig(vocab_size=vocab).padded_vocab_size(tp) == padded


def test_resolve_dtype():
    assert resolve_dtype("auto", "cuda") == "bf16"
    assert resolve_dtype("auto", "cpu") == "fp32"
    assert resolve_dtype("fp32", "cuda") == "fp32"


# ---------------------------------------------------------------- one model shape


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def test_the_model_section_is_the_model_shape(tmp_path):
    assert ModelConfig is ModelArgs
    cfg = config("model.preset=evolm-1b", "model.rope_scaling=" + str(LLAMA3).replace("'", ""))
    assert type(cfg.model) is ModelArgs and ModelArgs.from_config(cfg.model) is cfg.model
    assert cfg.model.rope_scaling == LLAMA3 and cfg.model.vocab_pad_multiple == 128
    # rope_scaling is a mapping in YAML and in Python, and the shape still hashes (by its sorted items)
    back = load_config(save_config(cfg, tmp_path / "c.yaml"), [])
    assert back == cfg and config_to_dict(back) == config_to_dict(cfg)
    assert hash(back.model) == hash(cfg.model.replace(rope_scaling=dict(reversed(list(LLAMA3.items())))))
    assert ModelArgs(rope_scaling=tuple(sorted(LLAMA3.items()))).rope_scaling == LLAMA3  # the items also do
    with pytest.raises(ConfigError, match="unknown model preset 'tinyy'.*did you mean 'tiny'"):
        ModelArgs(preset="tinyy")


@pytest.mark.parametrize("changes, pattern", [
    (dict(num_kv_heads=0), r"model\.num_kv_heads=0 must be a positive integer"),
    (dict(recompute="some"), r"model\.recompute='some' must be one of 'none', 'full', 'selective'"),
    (dict(norm_eps=0.0), r"model\.norm_eps=0\.0 must be a positive number"),
    (dict(hidden_size=132, num_heads=12, num_kv_heads=4), r"model\.hidden_size / model\.num_heads = 11 must be even"),
    (dict(rope_scaling={**LLAMA3, "beta": 1}), r"unknown key\(s\) beta for rope_type llama3"),
])
def test_shape_errors(changes, pattern):
    errors = shape_errors(ModelArgs(**changes))
    assert len(errors) == 1 and __import__("re").search(pattern, errors[0]), errors
    with pytest.raises(ConfigError, match=pattern):
        validate(Config(model=ModelArgs(**changes)), 1)
    with pytest.raises(ValueError, match=pattern):
        ModelArgs(**changes).validate()


def test_layout_errors_one_message_per_problem_named_by_key_or_flag():
    tiny = ModelArgs()
    assert layout_errors(tiny, 2, 2) == [] and layout_errors(tiny, 1, 2, 2, [1, 1, 1, 1]) == []
    errors = layout_errors(tiny, 4, 3)
    assert [e.split(" does not divide")[0] for e in errors] == ["parallel.tp=4", "parallel.pp=3"]
    assert "the model's 2 KV heads (model.num_kv_heads=2)" in errors[0] and "one of 1, 2" in errors[0]
    flags = {"tp": "--tp", "pp": "--pp", "virtual_pp": "--virtual-pp", "pp_layers": "--pp-layers"}
    assert layout_errors(tiny, 4, 3, names=flags)[1].startswith("--pp 3 does not divide the model's 4 layers")
    assert layout_errors(tiny.replace(num_layers=3), 1, 1, 2, names=flags) == [
        "--virtual-pp 2 needs --pp of at least 2",
        "--pp × --virtual-pp = 1 × 2 = 2 does not divide the model's 3 layers (model.num_layers=3): choose a number "
        "of pipeline stages among 1, 3 or list the layers per stage in --pp-layers"]
    assert layout_errors(tiny, 1, 2, 1, [1, 2]) == [
        "parallel.pp_layers=[1, 2] must list 2 positive layer counts (one per pipeline stage, parallel.pp=2) "
        "summing to model.num_layers=4"]
    assert layout_errors(tiny, 0, 1) == ["parallel.tp, parallel.pp and parallel.virtual_pp must be positive "
                                         "integers (got 0, 1, 1)"]
    with pytest.raises(ValueError, match=r"invalid|parallel\.tp=4"):
        tiny.validate(4)


# ---------------------------------------------------------------- the stage and its settings


def test_stage_and_sft_settings(tmp_path):
    assert config().stage == "pretrain" and config().train.epochs is None
    s = config().sft
    assert (s.packing, s.cutoff, s.truncate, s.loss_normalization) == (True, None, True, "global_tokens")
    path = write(tmp_path, """
        stage: sft
        data: {train: [data/chat], seq_len: 128}
        train: {epochs: 2.5}
        sft: {packing: false, cutoff: 100, truncate: false, loss_normalization: micro_batch_mean}
    """)
    cfg = load_config(path, [])
    assert cfg.stage == "sft" and cfg.train.epochs == 2.5 and isinstance(cfg.train.epochs, float)
    assert (cfg.sft.packing, cfg.sft.cutoff, cfg.sft.truncate) == (False, 100, False)
    assert cfg.sft.loss_normalization == "micro_batch_mean"
    assert load_config(save_config(cfg, tmp_path / "saved.yaml"), []) == cfg
    assert validate(cfg, 1).dp == 1
    assert validate(config("stage=sft", "sft.cutoff=256"), 1).dp == 1  # cutoff = seq_len is allowed


@pytest.mark.parametrize("overrides, pattern", [
    (["stage=finetune"], r"^stage: expected one of 'pretrain', 'sft', 'rl', got 'finetune'"),
    (["stage=rl"], r"rl\.prompts is empty"),
    (["sft.loss_normalization=token_mean"], r"^sft\.loss_normalization: expected one of 'global_tokens', "
                                            r"'micro_batch_mean', got 'token_mean'"),
    (["stage=sft", "data.seq_len=128", "sft.cutoff=129"], r"^sft\.cutoff=129 must be between 2 and data\.seq_len=128"),
    (["stage=sft", "sft.cutoff=1"], r"^sft\.cutoff=1 must be between 2"),
    (["stage=sft", "train.epochs=-1"], r"^train\.epochs=-1\.0 must be a positive number"),
    (["train.epochs=1"], r"^train\.epochs counts epochs of SFT conversations \(stage=sft\)"),
    (["sft.truncate=often"], r"^sft\.truncate: expected true or false"),
])
def test_stage_errors(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(config(*overrides), 1)


def test_epochs_check_the_schedule_once_the_iterations_are_known(caplog, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    cfg = config("stage=sft", "train.epochs=2", "optim.schedule=inf-cos", "optim.constant_lr=1e-4",
                 "optim.warmup=100", "optim.cooldown_iters=100")
    with caplog.at_level(logging.WARNING, logger="megaevo.config"):
        validate(cfg, 1)  # train.iters is not the run's length: nothing said about it yet
    assert not [r for r in caplog.records if r.name == "megaevo.config"]
    resolved = with_iters(cfg, 500)
    assert resolved.train.iters == 500 and cfg.train.iters == 1000 and resolved.optim == cfg.optim
    with pytest.raises(ConfigError, match=r"exceed train\.iters=150"):
        with_iters(cfg, 150)



def test_warmup_fraction_is_a_share_of_the_run(caplog, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    cfg = config("optim.warmup_fraction=0.1", "optim.warmup=5000", "train.iters=300")
    with caplog.at_level(logging.WARNING, logger="megaevo.config"):
        validate(cfg, 1)  # 5000 is replaced by 30: no warning about a warmup longer than the run
    assert not [r for r in caplog.records if r.name == "megaevo.config"]
    assert with_iters(cfg, 300).optim.warmup == 30
    assert with_iters(config("stage=sft", "train.epochs=1", "optim.warmup_fraction=0.25"), 10).optim.warmup == 2
    with pytest.raises(ConfigError, match=r"optim\.warmup_fraction=1\.5 must be at least 0 and below 1"):
        validate(config("optim.warmup_fraction=1.5"), 1)


# ---------------------------------------------------------------- the resolve step


def rl(*overrides: str) -> Config:
    return config("stage=rl", "rl.prompts=[rg:gcd:20]", "data.tokenizer=tok.model", "rl.max_new_tokens=64",
                  "rl.prompts_per_step=4", "rl.n=2", "train.global_batch_size=3", *overrides)


def test_resolve_computes_every_derived_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = rl("out_dir=out", "train.iters=40", "optim.warmup_fraction=0.1", "optim.warmup=7",
             "rl.algorithm=ppo", "rl.critic.warmup_fraction=0.25")
    resolved, layout = resolve(cfg, 2)
    assert resolved.out_dir == f"{tmp_path}/out" and resolved.data.tokenizer == f"{tmp_path}/tok.model"
    assert resolved.train.global_batch_size == 8  # the rollout batch: rl.prompts_per_step x rl.n
    assert (resolved.optim.warmup, resolved.rl.critic.warmup) == (4, 10)
    assert layout == validate(cfg, 2) == Layout(2, 1, 1, 2, 1, 4)
    # the fractions stay beside the counts, as a run's saved config.yaml holds them
    assert (resolved.optim.warmup_fraction, resolved.rl.critic.warmup_fraction) == (0.1, 0.25)
    # a critic without its own warmup reads the actor's; runs without a critic leave rl.critic as it is
    assert resolve(rl("train.iters=40", "optim.warmup_fraction=0.1", "rl.algorithm=ppo"), 2)[0].rl.critic.warmup is None
    for other in (rl("rl.critic.warmup_fraction=0.5"), config("rl.critic.warmup_fraction=0.5")):
        assert resolve(other, 1)[0].rl.critic == RLCriticConfig(warmup_fraction=0.5)


def test_resolve_computes_the_warmup_once():
    """A resolved config resolves to itself: the warmup is a count of iterations, computed from the fraction
    and the run's length once; resolving again (as every caller may) changes nothing."""
    cfg = rl("train.iters=30", "optim.warmup_fraction=0.1", "rl.algorithm=ppo", "rl.critic.warmup_fraction=0.2")
    once = resolve(cfg, 1)
    assert (once[0].optim.warmup, once[0].rl.critic.warmup) == (3, 6)
    assert resolve(once[0], 1) == once
    assert validate(once[0], 1) == once[1]
    assert with_iters(once[0], 30) == once[0]
    # a stage that counts epochs: the length (and so the warmup) is known once it has read its data
    sft = config("stage=sft", "train.epochs=2", "optim.warmup_fraction=0.25")
    first, _ = resolve(sft, 1)
    assert (first.train.iters, first.optim.warmup) == (1000, 100)  # as given: not the run's length yet
    counted, layout = resolve(first, 1, iters=10)
    assert (counted.train.iters, counted.train.epochs, counted.optim.warmup) == (10, 2, 2)
    assert counted == with_iters(first, 10)
    assert resolve(counted, 1) == (counted, layout)


def test_resolve_checks_the_length_a_stage_counted():
    cfg = config("stage=sft", "train.epochs=2", "optim.schedule=inf-cos", "optim.constant_lr=1e-4",
                 "optim.warmup=100", "optim.cooldown_iters=100")
    assert resolve(cfg, 1)[0].train.iters == 1000
    with pytest.raises(ConfigError, match=r"exceed train\.iters=150"):
        resolve(cfg, 1, iters=150)


def test_rl_template_names_come_from_the_template_registry():
    for name in TEMPLATE_NAMES:
        assert validate(rl(f"rl.template={name}"), 1).dp == 1
    with pytest.raises(ConfigError, match=r"rl\.template='chatml' is not a chat template: use one of "
                                          + ", ".join(TEMPLATE_NAMES)):
        validate(rl("rl.template=chatml"), 1)

# ---------------------------------------------------------------- the YAML machinery on its own


@dataclass
class _Inner:
    size: int = 1
    kind: Optional[str] = field(default=None, metadata={"fills": lambda v, key: {"size": len(v)}})


@dataclass
class _Root:
    inner: _Inner = field(default_factory=_Inner)
    name_of: str = field(default="x", metadata={"yaml": "name"})


def test_configio_is_generic_over_the_root(tmp_path):
    root = configio.load(_Root, None, ["inner.kind=abc", "name=y"])
    assert root == _Root(_Inner(3, "abc"), "y")
    assert configio.from_dict(_Root, {"inner": {"size": 7, "kind": "abc"}}).inner.size == 7  # explicit fields win
    assert configio.load(_Root, configio.save(root, tmp_path / "r.yaml")) == root
    with pytest.raises(ConfigError, match=r"^override 'inner.sise=2': unknown key 'inner.sise' \(did you mean 'inner.size'\?\)"):
        configio.load(_Root, None, ["inner.sise=2"])
    with pytest.raises(ConfigError, match=r"^src: unknown key 'nam' \(did you mean 'name'\?\)"):
        configio.from_dict(_Root, {"nam": "z"}, source="src")
    with pytest.raises(ConfigError, match=r"^inner.size: expected an integer, got 'many'"):
        configio.from_dict(_Root, {"inner": {"size": "many"}})
    assert config_from_dict({"model": {"preset": "evolm-2b"}}).model.num_layers == 26
