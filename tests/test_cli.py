"""The `megaevo` command: version, help texts, and one-line errors for the user's mistakes only."""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

import megaevo
from megaevo import cli
from megaevo.config import Config
from megaevo.data import DataError


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megaevo.cli", *argv], capture_output=True, text=True, timeout=120)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"megaevo {megaevo.__version__}"
    assert megaevo.__version__ and megaevo.__version__[0].isdigit()


def _actions(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, path + (name,))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, action


def test_every_argument_has_help():
    missing = [(" ".join(path), action.option_strings or action.dest)
               for path, action in _actions(cli.build_parser())
               if not action.help and path[:1] != ("inspect",)]
    assert missing == []
    helps = {(path, tuple(a.option_strings)): a.help for path, a in _actions(cli.build_parser())}
    assert "directory" in helps[(("demo",), ("--dir",))]
    assert "seed" in helps[(("demo",), ("--seed",))]
    assert "vocabulary" in helps[(("tokenizer", "train"), ("--vocab-size",))]


def test_train_help_says_where_the_config_keys_are():
    assert list(cli.CONFIG_SECTIONS) == [f.name for f in dataclasses.fields(Config)]
    assert Config().out_dir in cli.CONFIG_SECTIONS["out_dir"]
    text = run_cli("train", "--help").stdout
    assert "megaevo/config/" in text and "--print-config" in text
    for section in cli.CONFIG_SECTIONS:
        assert f"\n  {section} " in text


def test_train_print_config_shows_the_file_with_its_overrides(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  iters: 3\n  seed: 11\n")
    assert cli.main(["train", "--config", str(path), "--print-config", "train.iters=5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["train"]["iters"], printed["train"]["seed"]) == (5, 11)


def _merge_raising(monkeypatch, error: BaseException):
    def boom(args):
        raise error

    monkeypatch.setattr(cli, "_merge", boom)
    return ["merge", "--input", "a", "--output-prefix", "b"]


@pytest.mark.parametrize("error, line", [
    (DataError("data/general: the test split is too small"), "data/general: the test split is too small"),
    (FileNotFoundError(2, "No such file or directory", "in.jsonl"), "in.jsonl: No such file or directory"),
    (PermissionError(13, "Permission denied", "/out"), "/out: Permission denied"),
    (ModuleNotFoundError("No module named 'tokenizers'", name="tokenizers"), "pip install 'megaevo[hf]'"),
    (ImportError("reading it needs the `tokenizers` package: pip install tokenizers"), "pip install tokenizers"),
])
def test_a_user_error_is_one_line(monkeypatch, capsys, error, line):
    monkeypatch.delenv("MEGAEVO_DEBUG", raising=False)
    assert cli.main(_merge_raising(monkeypatch, error)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: megaevo merge: ")
    assert line in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize("error", [
    RuntimeError("an internal bug"),
    ValueError("plain ValueError from deep inside torch"),
    ModuleNotFoundError("No module named 'megaevo.nowhere'", name="megaevo.nowhere"),
    OSError(28, "No space left on device"),
])
def test_an_internal_error_keeps_its_traceback(monkeypatch, error):
    monkeypatch.delenv("MEGAEVO_DEBUG", raising=False)
    with pytest.raises(type(error)):
        cli.main(_merge_raising(monkeypatch, error))


def test_megaevo_debug_shows_the_traceback_of_a_user_error(monkeypatch):
    monkeypatch.setenv("MEGAEVO_DEBUG", "1")
    with pytest.raises(DataError):
        cli.main(_merge_raising(monkeypatch, DataError("bad")))


def test_conflicting_convert_flags_are_a_user_error(capsys):
    assert cli.main(["convert", "--from-hf", "x", "--load", "y"]) == 2
    assert "give either --from-hf DIR or --load CKPT, not both" in capsys.readouterr().err


def test_end_to_end_one_line_and_traceback(tmp_path):
    # A malformed input line: one line on stderr naming the flag that skips it, exit code 2.
    from megaevo.data.tokenizers import train_sentencepiece

    texts = [f"document number {i} with some words in it" for i in range(300)]
    good = tmp_path / "in.jsonl"
    good.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + "{broken\n", encoding="utf-8")
    model = train_sentencepiece([str(good)], 300, str(tmp_path / "tok"))
    done = run_cli("preprocess", "--input", str(good), "--tokenizer", str(model), "--output-prefix",
                   str(tmp_path / "out"), "--quiet")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"{good}:301: invalid JSON" in done.stderr and "--on-error skip" in done.stderr
    # A missing input: the path, one line.
    done = run_cli("merge", "--input", str(tmp_path / "nope"), "--output-prefix", str(tmp_path / "m"))
    assert done.returncode == 2 and "nope" in done.stderr and "Traceback" not in done.stderr


def _one_error_line(captured, command: str) -> str:
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"error: megaevo {command}: ")
    assert "Traceback" not in captured.err and "Errno" not in captured.err
    return captured.err


def test_inspect_of_a_missing_path_is_a_user_error(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    assert cli.main(["inspect", str(missing)]) == 2
    err = _one_error_line(capsys.readouterr(), "inspect")
    assert str(missing) in err and "not a dataset prefix or checkpoint" in err
    assert cli.main(["inspect", "--verify", str(missing)]) == 2
    err = _one_error_line(capsys.readouterr(), "inspect")
    assert str(missing) in err and "not a megaevo checkpoint" in err


def test_suite_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert cli.main(["suite", str(missing)]) == 2
    err = _one_error_line(capsys.readouterr(), "suite")
    assert f"{missing}: suite spec not found" in err
    assert cli.main(["suite", str(tmp_path)]) == 2
    assert "not a file" in _one_error_line(capsys.readouterr(), "suite")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [{stage: sft}, {stage: pretrain}]\n")
    assert cli.main(["suite", str(bad), "--dry-run"]) == 2
    assert "bad.yaml" in _one_error_line(capsys.readouterr(), "suite")


def test_report_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: not a directory" in _one_error_line(capsys.readouterr(), "report")


def test_suite_and_inspect_from_the_command_line(tmp_path):
    done = run_cli("inspect", "/nonexistent")
    assert done.returncode == 2 and done.stderr.startswith("error: megaevo inspect: /nonexistent: ")
    done = run_cli("suite", str(tmp_path / "nope.yaml"))
    assert done.returncode == 2
    assert done.stderr == f"error: megaevo suite: {tmp_path / 'nope.yaml'}: suite spec not found\n"
