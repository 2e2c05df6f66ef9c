"""Runs that work from anywhere: a config file's relative paths resolve against its folder, a run
records absolute paths and keeps a copy of its tokenizer, and its checkpoints generate, evaluate and
export from any folder; when the tokenizer is truly gone, each command says where it looked."""
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

import megaevo
from megaevo import cli
from megaevo.checkpoint import LoadedCheckpoint
from megaevo.data.tokenizer_files import TokenizerNotFound, keep_tokenizer, tokenizer_files
from megaevo.inference import SamplingParams
from helpers import make_data

# A project: PROJECT/configs/run.yaml names PROJECT/data, PROJECT/tok and PROJECT/runs relative to itself.
CONFIG = """
model: {num_layers: 2, hidden_size: 64, ffn_hidden_size: 128, num_heads: 4, num_kv_heads: 2, vocab_size: 640,
        max_seq_len: 32}
data:
  train: [0.7, ../data/web, 0.3, ../data/math]
  seq_len: 32
  split: "90,10,0"
  tokenizer: ../tok/tok.model
train: {micro_batch_size: 2, global_batch_size: 4, iters: 2, log_interval: 1, eval_interval: 0, dtype: fp32}
optim: {lr: 1.0e-2, min_lr: 1.0e-3, warmup: 1}
checkpoint: {interval: 0}
out_dir: ../runs/base
"""


def train_project(project: Path, spm_model, monkeypatch) -> Path:
    """`megaevo train --config configs/run.yaml` started in a folder beside the project; the run directory."""
    make_data(project / "data")
    (project / "tok").mkdir(parents=True)
    shutil.copyfile(spm_model, project / "tok" / "tok.model")
    (project / "configs").mkdir()
    (project / "configs" / "run.yaml").write_text(CONFIG)
    launch = project.parent / "launch"
    launch.mkdir()
    monkeypatch.chdir(launch)
    assert cli.main(["train", "--config", "../project/configs/run.yaml"]) == 0
    return project / "runs" / "base"


def elsewhere(tmp_path: Path, monkeypatch) -> Path:
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def test_a_run_records_absolute_paths_and_a_copy_of_its_tokenizer(tmp_path, spm_model, monkeypatch):
    project = tmp_path / "project"
    run = train_project(project, spm_model, monkeypatch)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["train"] == [0.7, str(project / "data" / "web"), 0.3, str(project / "data" / "math")]
    assert saved["data"]["tokenizer"] == str(project / "tok" / "tok.model")
    assert saved["out_dir"] == str(run)
    recorded = LoadedCheckpoint(run / "checkpoints" / "iter_0000002").record.config
    assert recorded["data"]["tokenizer"] == str(project / "tok" / "tok.model")
    copy = run / "tokenizer" / "tokenizer.model"
    assert copy.read_bytes() == Path(spm_model).read_bytes()
    assert sorted(p.name for p in (run / "tokenizer").iterdir()) == ["tokenizer.model"]


def test_a_run_trained_in_one_folder_generates_evaluates_and_exports_from_another(tmp_path, spm_model,
                                                                                  monkeypatch, capsys):
    run = train_project(tmp_path / "project", spm_model, monkeypatch)
    shutil.rmtree(tmp_path / "project" / "tok")  # the run is self-contained: its own copy is enough
    here = elsewhere(tmp_path, monkeypatch)
    load = os.path.relpath(run, here)  # a path relative to this folder, as a user types it
    capsys.readouterr()

    assert cli.main(["generate", "--load", load, "--prompt", "def f", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("[0] def f")
    model = megaevo.load(load)
    assert model.tokenizer is not None and model.tokenizer_error is None
    assert len(model.generate(["def"], SamplingParams(max_new_tokens=2))[0][0].token_ids) == 2

    (here / "sums.jsonl").write_text("".join(json.dumps({"id": str(i), "problem": f"{i}+1", "gt_solution": None,
                                                         "gt_answer": str(i + 1)}) + "\n" for i in range(2)))
    assert cli.main(["eval", "--load", load, "--tasks", "sums.jsonl", "--out", "ev", "--max-length", "24",
                     "--quiet", "--workers", "1"]) == 0
    assert json.loads((here / "ev" / "results.json").read_text())["tasks"]["sums"]["n"] == 2

    assert cli.main(["convert", "--load", load, "--to-hf", "hf", "--quiet"]) == 0
    assert (here / "hf" / "tokenizer.model").read_bytes() == Path(spm_model).read_bytes()
    assert "copied tokenizer.model" in capsys.readouterr().out


def test_a_missing_tokenizer_is_one_line_naming_where_it_was_looked_for(tmp_path, spm_model, monkeypatch, capsys):
    project = tmp_path / "project"
    run = train_project(project, spm_model, monkeypatch)
    shutil.rmtree(project / "tok")
    shutil.rmtree(run / "tokenizer")
    elsewhere(tmp_path, monkeypatch)
    tried = [str(run / "checkpoints" / "iter_0000002"), str(run / "tokenizer"), str(project / "tok" / "tok.model")]
    capsys.readouterr()

    for argv in (["generate", "--load", str(run), "--prompt", "def f"],
                 ["eval", "--load", str(run), "--tasks", "rg:gcd:2", "--out", "ev", "--quiet"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: megaevo {argv[0]}: "), err
        assert all(path in err[0] for path in tried), err

    with pytest.raises(TokenizerNotFound, match="no tokenizer found"):
        megaevo.load(run, require_tokenizer=True)
    capsys.readouterr()
    model = megaevo.load(run)  # token ids still work; the warning says where the tokenizer was looked for
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and all(path in warnings[0] for path in tried)
    assert len(model.generate([[5, 6, 7]], SamplingParams(max_new_tokens=2))[0][0].token_ids) == 2
    with pytest.raises(TokenizerNotFound, match=r"a text prompt .*needs the model's tokenizer: no tokenizer found"):
        model.generate(["def f"])

    assert cli.main(["convert", "--load", str(run), "--to-hf", "hf", "--quiet"]) == 0
    out, err = capsys.readouterr()
    warnings = err.strip().splitlines()
    assert len(warnings) == 1 and "--tokenizer" in warnings[0] and all(path in warnings[0] for path in tried)
    assert "copied no tokenizer files" in out
    assert not tokenizer_files("hf")


def test_a_missing_checkpoint_load_says_the_path_is_missing(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    make_data(project / "data")
    (project / "configs").mkdir()
    text = CONFIG.replace("  tokenizer: ../tok/tok.model\n", "").replace(
        "checkpoint: {interval: 0}", "checkpoint: {interval: 0, load: ../runs/pretrained, finetune: true}")
    (project / "configs" / "run.yaml").write_text(text)
    elsewhere(tmp_path, monkeypatch)
    capsys.readouterr()
    assert cli.main(["train", "--config", str(project / "configs" / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: checkpoint.load: {project / 'runs' / 'pretrained'} does not exist"]


def test_the_tokenizer_copy_follows_the_tokenizer(tmp_path, spm_model, caplog):
    tok = tmp_path / "hf-tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": {}}')
    (tok / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    (tok / "README.md").write_text("not a tokenizer file")
    out = tmp_path / "run"
    copy = keep_tokenizer(tok / "tokenizer.json", out)  # a tokenizer.json takes the files beside it along
    assert sorted(p.name for p in copy.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    caplog.clear()
    assert keep_tokenizer(tok, out) == copy and not caplog.records  # the same files: left as they are
    keep_tokenizer(spm_model, out)  # another tokenizer: the copy is replaced, with a warning
    assert sorted(p.name for p in copy.iterdir()) == ["tokenizer.model"]
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert keep_tokenizer(tmp_path / "nowhere.model", tmp_path / "other") is None
    assert not (tmp_path / "other" / "tokenizer").exists()
