"""The README's commands are real: each `megaevo` command line parses with the command's own parser,
and every example and benchmark it names is there."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from megaevo import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def bash_commands(text: str) -> list[str]:
    """The command lines of the ```bash blocks, backslash continuations joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pending = ""
        for line in block.splitlines():
            line = pending + line.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            if line and not line.startswith("#"):
                commands.extend(part.strip() for part in line.split("&&"))
    return commands


MEGAEVO_COMMANDS = [c for c in bash_commands(README) if c.startswith("megaevo ")]


def test_the_readme_has_megaevo_commands():
    assert {"demo", "train", "preprocess", "convert", "generate", "eval"} <= {c.split()[1] for c in MEGAEVO_COMMANDS}


@pytest.mark.parametrize("command", MEGAEVO_COMMANDS)
def test_readme_command_parses(command):
    words = shlex.split(command, comments=True)[1:]
    if words[0] in ("suite", "report"):
        pytest.skip("parsed by the suite's own parser")
    args = cli.build_parser().parse_args(words)
    assert args.command == words[0]


def test_files_the_readme_names_exist():
    named = set(re.findall(r"\b((?:examples|benchmarks)/[\w.-]+\.(?:yaml|py|sh))\b", README))
    assert named
    assert sorted(p for p in named if not (ROOT / p).is_file()) == []


@pytest.mark.parametrize("typed, meant", [("\\n", "\n"), ("a\\tb", "a\tb"), ("\\\\n", "\\n"), ("x", "x"),
                                          ("\\d", "\\d"), ("</s>", "</s>"), ("\\r\\n", "\r\n")])
def test_stop_strings_read_escapes(typed, meant):
    """`--stop "\\n"` (a shell passes a backslash and an n) stops at a line end."""
    assert cli.unescape(typed) == meant
