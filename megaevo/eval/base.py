"""What every kind of evaluation task shares: the error for a task that cannot be used, a problem, and the
reader of task files."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megaevo.data.readers import iter_records
from megaevo.errors import UserError


class EvalError(UserError):
    """A task spec, task file or predictions file that evaluation cannot use."""


@dataclass
class Problem:
    id: Any
    problem: str
    gold: Any  # the gold answer (a string), or the entry a task's own score function reads
    solution: str | None = None


def read_jsonl(path: Path):
    """(line number, object) for each non-blank line of a jsonl file (also .jsonl.gz, .jsonl.zst, or
    parquet/arrow rows, located as ``row group G, row R``; see :mod:`megaevo.data.readers`); an
    :class:`EvalError` naming ``file:line`` for a line that is not a JSON object."""
    for line_no, line in iter_records(path):
        if isinstance(line, bytes):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise EvalError(f"{path}:{line_no}: not valid UTF-8") from None
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
        else:
            row = line
        if not isinstance(row, dict):
            raise EvalError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        yield line_no, row
