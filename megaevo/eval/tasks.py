"""Evaluation tasks and how a task spec on the command line becomes one.

A task has a ``name`` and ``run(model, batch_size=8, progress=True) -> {"metrics": {...}, "samples": [...]}``.
:func:`resolve_task` understands:

- an EvoLM generative set: a jsonl file with ``problem`` and ``gt_answer`` or ``gt_solution`` (``id``
  optional: the line number) (a path, or a set's name looked up as ``NAME.jsonl`` in ``data_dir`` or
  ``$MEGAEVO_EVAL_DIR``);
- ``rg:NAME[:COUNT[:SEED]]``: a reasoning-gym task generated offline (COUNT 100 and SEED 0 by default);
- a multiple-choice jsonl (``context``, ``choices``, ``gold``), loaded by ``megaevo.eval.multiple_choice``;
- an indexed dataset prefix (``PREFIX.idx`` exists), whose loss ``megaevo.eval.lm_loss`` measures.

Other kinds join through :func:`register` (a matcher and a loader, tried before the built-in kinds).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Callable

from megaevo.eval.answers import extract_answer
from megaevo.eval.base import EvalError, Problem, read_jsonl
from megaevo.eval.generative import GenerativeTask
from megaevo.eval.grading import Grader

__all__ = ["ENV_DATA_DIR", "EVOLM_SETS", "EvalError", "GenerativeTask", "Problem", "data_dir", "known_tasks",
           "load_generative", "load_reasoning_gym", "read_jsonl", "register", "resolve_task"]

ENV_DATA_DIR = "MEGAEVO_EVAL_DIR"
RG_DEFAULT_COUNT, RG_DEFAULT_SEED = 100, 0


_MATH = Grader("math")
# EvoLM's downstream sets: domain (in-domain math or out-of-domain) and grader.
EVOLM_SETS: dict[str, tuple[str, Grader]] = {
    "GSM8KPlatinum": ("id", _MATH),
    "MATHLevel1": ("id", _MATH),
    "MATHLevel2": ("id", _MATH),
    "MATHLevel3": ("id", _MATH),
    "MATHLevel4": ("id", _MATH),
    "MATHHard": ("id", _MATH),
    "CRUXEval": ("ood", Grader("literal", bare=True)),
    "BoardgameQA500": ("ood", Grader("choice", ("True", "False", "Uncertain"), bare=True)),
    "TabMWP": ("ood", Grader("math", bare=True)),
    "StrategyQA500": ("ood", Grader("choice", ("True", "False"), bare=True)),
}


# ---- the registry ---------------------------------------------------------------------------------------

_REGISTRY: list[tuple[Callable[[str], bool], Callable[..., Any]]] = []


def register(matches: Callable[[str], bool], load: Callable[..., Any]) -> None:
    """Add a task kind: ``load(spec, limit=...)`` builds the task for a spec ``matches(spec)`` accepts."""
    _REGISTRY.append((matches, load))


def _defer(module: str, what: str, spec, limit):
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise EvalError(f"{spec}: looks like a {what} task, but {module} is not part of this installation") from None
    return mod.load_task(spec, limit=limit)


def data_dir(given: str | os.PathLike | None = None) -> Path | None:
    d = given or os.environ.get(ENV_DATA_DIR)
    return Path(d) if d else None


def known_tasks(directory: str | os.PathLike | None = None) -> list[str]:
    """The task names a spec may use: the jsonl files in the data directory (EvoLM's names first)."""
    d = data_dir(directory)
    names = sorted(p.stem for p in d.glob("*.jsonl")) if d and d.is_dir() else []
    return [n for n in EVOLM_SETS if n in names] + [n for n in names if n not in EVOLM_SETS]


def resolve_task(spec: str, data_dir_: str | os.PathLike | None = None, limit: int | None = None):
    """The task a spec names (see the module's doc); an :class:`EvalError` that lists the known tasks if
    none matches."""
    for matches, load in _REGISTRY:
        if matches(spec):
            return load(spec, limit=limit)
    if spec.startswith("rg:"):
        return load_reasoning_gym(spec, limit=limit)
    path = Path(spec)
    if not path.is_file() and path.suffix != ".jsonl":
        if Path(spec + ".idx").is_file():
            return _defer("megaevo.eval.lm_loss", "loss (indexed dataset)", spec, limit)
        d = data_dir(data_dir_)
        if d is not None and (d / f"{spec}.jsonl").is_file():
            path = d / f"{spec}.jsonl"
    if not path.is_file():
        d = data_dir(data_dir_)
        known = known_tasks(d)
        where = (f"in {d}" if d else f"(no data directory: give --data-dir or set ${ENV_DATA_DIR})")
        listing = f"known {where}: {', '.join(known)}" if known else f"no task files {where}"
        raise EvalError(f"unknown task {spec!r}: not a file, an indexed dataset prefix or an rg:NAME spec; {listing}")
    first = _first_row(path)
    if {"context", "choices", "gold"} <= first.keys():
        return _defer("megaevo.eval.multiple_choice", "multiple-choice", str(path), limit)
    return load_generative(path, limit=limit)


# ---- loaders --------------------------------------------------------------------------------------------

def _first_row(path: Path) -> dict:
    for _, row in read_jsonl(path):
        return row
    raise EvalError(f"{path}: no tasks in the file (it is empty)")


def load_generative(path: str | os.PathLike, limit: int | None = None) -> GenerativeTask:
    """An EvoLM-format jsonl set (the first ``limit`` problems). The gold answer is ``gt_answer``, or when
    that is null or absent the answer in ``gt_solution`` (GSM8K's ``####``, MATH's last ``\\boxed{}``)."""
    path = Path(path)
    name = path.stem
    domain, grader = EVOLM_SETS.get(name, (None, None))
    problems: list[Problem] = []
    bare_gold = True
    for line_no, row in read_jsonl(path):
        if limit is not None and len(problems) >= limit:
            break
        missing = [] if "problem" in row else ["problem"]
        if "gt_answer" not in row and "gt_solution" not in row:
            missing.append("gt_answer or gt_solution")
        if missing:
            raise EvalError(f"{path}:{line_no}: missing field(s) {', '.join(missing)} (a generative set has "
                            f"problem and gt_answer or gt_solution; id is optional)")
        if not isinstance(row["problem"], str):
            raise EvalError(f"{path}:{line_no}: field problem must be a string")
        gold = row.get("gt_answer")
        if gold is None:
            bare_gold = False
            gold = extract_answer(row.get("gt_solution") or "")
            if gold is None:
                raise EvalError(f"{path}:{line_no}: gt_answer is missing or null and gt_solution states no answer "
                                f"(no \\boxed{{}}, 'answer is' or ####)")
        problems.append(Problem(row.get("id", line_no), row["problem"], str(gold), row.get("gt_solution")))
    if not problems:
        raise EvalError(f"{path}: no problems in the file")
    if grader is None:
        grader = Grader("math", bare=bare_gold)
    return GenerativeTask(name, problems, grader, domain, source=str(path))


def load_reasoning_gym(spec: str, limit: int | None = None) -> GenerativeTask:
    """``rg:NAME[:COUNT[:SEED]]``: COUNT problems of the reasoning-gym dataset NAME generated with SEED,
    scored by the dataset's own ``score_answer``."""
    parts = spec.split(":")
    if len(parts) < 2 or len(parts) > 4 or not parts[1]:
        raise EvalError(f"task {spec!r}: expected rg:NAME[:COUNT[:SEED]]")
    try:
        count = int(parts[2]) if len(parts) > 2 else RG_DEFAULT_COUNT
        seed = int(parts[3]) if len(parts) > 3 else RG_DEFAULT_SEED
    except ValueError:
        raise EvalError(f"task {spec!r}: COUNT and SEED must be integers") from None
    if count < 1:
        raise EvalError(f"task {spec!r}: COUNT must be at least 1")
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    name = parts[1]
    if name not in DATASETS:
        raise EvalError(f"unknown reasoning-gym task {name!r}; known: {', '.join(sorted(DATASETS))}")
    if limit is not None:
        count = min(count, limit)
    dataset = reasoning_gym.create_dataset(name, size=count, seed=seed)
    problems = [Problem(f"{name}-{i}", entry["question"], entry) for i, entry in enumerate(dataset)]

    def score(answer, entry) -> float:
        return float(dataset.score_answer(answer=answer, entry=entry))

    return GenerativeTask(f"rg_{name}", problems, Grader("score", bare=True, score_fn=score), None, source=spec)
