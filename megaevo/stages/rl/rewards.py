"""Verifiable rewards for RL: the prompts (``rl.prompts``) and the functions that score completions.

A prompt record is a plain dict made by :func:`load_prompts` from the evaluation task loaders
(:mod:`megaevo.eval.tasks`):

* from an EvoLM-format jsonl set (``problem`` with ``gt_answer`` or ``gt_solution``, ``id`` optional; a path
  or a set's name in ``rl.prompts_data_dir``): ``{"id", "problem", "answer", "grader", "source"}``, where
  ``answer`` is the gold answer (``gt_answer``, or the answer stated in ``gt_solution`` when there is no
  ``gt_answer``) and ``grader`` is ``{"kind", "labels", "bare"}``, the set's grader as evaluation uses it;
* from ``rg:NAME[:COUNT[:SEED]]``: ``{"id", "problem", "entry", "task", "source"}``, where ``entry`` is the
  reasoning-gym entry (``question``, ``answer``, ``metadata``) and ``task`` its dataset's name.

A :class:`RewardFunction` scores a batch of completions, ``prompts[i]`` being the record that
``completions[i]`` answers. :class:`VerifiableReward` grades as evaluation does (:mod:`megaevo.eval.grading`):
the final answer is extracted from the completion and compared with the gold answer by the set's grader,
math-verify in spawned worker processes under a per-comparison timeout (a comparison that times out is
wrong, scores 0 and is counted); reasoning-gym entries are scored by their dataset's ``score_answer``.
:class:`CustomReward` calls a user's function ``fn(prompt: dict, completion: str) -> float``, named by a
dotted path. Both give a truncated completion (one that hit the length limit) ``truncated_reward``
instead of grading it, when that is set.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from megaevo.errors import UserError
from megaevo.eval.grading import DEFAULT_TIMEOUT, Grader, GradingPool, Job
from megaevo.eval.tasks import ENV_DATA_DIR, EvalError, GenerativeTask, known_tasks, resolve_task
from megaevo.eval.tasks import data_dir as eval_data_dir

VERIFIABLE = "verifiable"


@dataclass
class RewardResult:
    """Per-sample ``scores`` and ``correct`` (score ≥ 1), the extracted ``answers`` (None where none was
    found or the sample was not graded) and the number of grading ``timeouts`` in the batch."""

    scores: list[float]
    correct: list[bool]
    answers: list[str | None] = field(default_factory=list)
    timeouts: int = 0


class RewardFunction(Protocol):
    def __call__(self, prompts: list[dict], completions: list[str], truncated: list[bool]) -> RewardResult:
        """Score ``completions[i]``, an answer to ``prompts[i]``; ``truncated[i]`` says it hit the length limit."""


def _check_lengths(prompts, completions, truncated) -> None:
    if not len(prompts) == len(completions) == len(truncated):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions and {len(truncated)} truncated "
                         f"flags: one of each per sample")


def _truncated_result(n: int, truncated: Sequence[bool], truncated_reward: float | None):
    """The result with the truncated samples filled in, and the indices left to grade."""
    result = RewardResult([0.0] * n, [False] * n, [None] * n)
    todo = []
    for i in range(n):
        if truncated_reward is not None and truncated[i]:
            result.scores[i] = float(truncated_reward)
        else:
            todo.append(i)
    return result, todo


# ---- verifiable rewards ----------------------------------------------------------------------------------

def _grader_key(prompt: dict) -> tuple:
    if "entry" in prompt:
        return ("score", prompt.get("task") or prompt["entry"]["metadata"]["source_dataset"])
    if "answer" not in prompt:
        raise ValueError(f"prompt record {prompt.get('id')!r} has neither 'answer' nor 'entry'")
    g = prompt.get("grader") or {}
    return (g.get("kind", "math"), tuple(g.get("labels", ())), bool(g.get("bare", False)))


class VerifiableReward:
    """Scores completions against the records' gold answers (see the module's doc): 1.0 right, 0.0 wrong,
    a reasoning-gym task's own score (maybe partial) for ``entry`` records.

    ``workers`` and ``timeout`` size the :class:`GradingPool` (spawned lazily at the first math grade;
    ``workers=0`` grades in this process); ``equal_fn`` replaces the answer equivalence (tests). Use as a
    context manager, or :meth:`close` it, to stop the workers."""

    def __init__(self, truncated_reward: float | None = None, workers: int | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, equal_fn: Callable[[str, str], bool] | None = None,
                 pool: GradingPool | None = None):
        self.truncated_reward = truncated_reward
        self._own_pool = pool is None
        self.pool = pool if pool is not None else GradingPool(workers=workers, timeout=timeout, equal_fn=equal_fn)
        self._graders: dict[tuple, Grader] = {}

    def __enter__(self) -> "VerifiableReward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._own_pool:
            self.pool.close()

    def _grader(self, key: tuple) -> Grader:
        if key not in self._graders:
            if key[0] == "score":
                from reasoning_gym import get_score_answer_fn

                # The scorer of a dataset built with the default config, as evaluation builds it.
                score_answer = get_score_answer_fn(key[1])

                def score(answer, entry, score_answer=score_answer) -> float:
                    return float(score_answer(answer=answer, entry=entry))

                self._graders[key] = Grader("score", bare=True, score_fn=score)
            else:
                kind, labels, bare = key
                self._graders[key] = Grader(kind, labels, bare=bare)
        return self._graders[key]

    def __call__(self, prompts: list[dict], completions: list[str], truncated: list[bool]) -> RewardResult:
        _check_lengths(prompts, completions, truncated)
        result, todo = _truncated_result(len(completions), truncated, self.truncated_reward)
        by_grader: dict[tuple, list[int]] = {}
        for i in todo:
            by_grader.setdefault(_grader_key(prompts[i]), []).append(i)
        for key, indices in by_grader.items():
            gold = "entry" if key[0] == "score" else "answer"
            jobs = [Job(prompts[i][gold], [completions[i]]) for i in indices]
            for i, graded in zip(indices, self.pool.grade(self._grader(key), jobs)):
                result.scores[i] = float(graded.scores[0])
                result.correct[i] = bool(graded.correct[0])
                result.answers[i] = graded.answers[0]
                result.timeouts += graded.timeouts
        return result


# ---- custom rewards --------------------------------------------------------------------------------------

def load_callable(path: str, what: str = "reward function") -> Callable:
    """The callable at ``package.module:function`` (attributes after the colon may be dotted) or
    ``package.module.function``; a one-line :class:`UserError` when it does not import or is not callable."""
    if not isinstance(path, str) or not path.strip():
        raise UserError(f"{what} {path!r}: expected a dotted path such as package.module:function")
    path = path.strip()
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr or ":" in attr:
        raise UserError(f"{what} {path!r}: expected package.module:function or package.module.function")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any failure to import is the user's module's
        message = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{what} {path!r}: cannot import module {module_name!r} "
                        f"({type(e).__name__}: {message})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise UserError(f"{what} {path!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


class CustomReward:
    """A user's reward ``fn(prompt: dict, completion: str) -> float`` (a bool counts as 1.0/0.0), given as
    a callable or a dotted path (:func:`load_callable`); correct where the score is at least 1. It runs in
    this process, one call per sample, without a timeout."""

    def __init__(self, fn: Callable[[dict, str], float] | str, truncated_reward: float | None = None):
        self.name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        self.fn = load_callable(fn) if isinstance(fn, str) else fn
        self.truncated_reward = truncated_reward

    def __enter__(self) -> "CustomReward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def __call__(self, prompts: list[dict], completions: list[str], truncated: list[bool]) -> RewardResult:
        _check_lengths(prompts, completions, truncated)
        result, todo = _truncated_result(len(completions), truncated, self.truncated_reward)
        for i in todo:
            score = self.fn(prompts[i], completions[i])
            try:
                score = float(score)
            except (TypeError, ValueError):
                raise UserError(f"reward function {self.name}: returned {type(score).__name__} {score!r} for "
                                f"prompt {prompts[i].get('id')!r}; it must return a number") from None
            result.scores[i] = score
            result.correct[i] = score >= 1.0
        return result


def build_reward(reward: str | Callable | None = None, truncated_reward: float | None = None,
                 workers: int | None = None, timeout: float | None = DEFAULT_TIMEOUT):
    """The reward function a run asks for: ``None`` or ``"verifiable"`` is :class:`VerifiableReward`,
    anything else a :class:`CustomReward` (a callable or its dotted path)."""
    if reward is None or reward == VERIFIABLE:
        return VerifiableReward(truncated_reward, workers=workers, timeout=timeout)
    return CustomReward(reward, truncated_reward)


# ---- prompts ---------------------------------------------------------------------------------------------

def load_prompts(specs: str | Sequence[str], data_dir: str | None = None, limit: int | None = None) -> list[dict]:
    """The prompt records (see the module's doc) of each spec in ``specs``, in order: an EvoLM-format jsonl
    set (a path, or a set's name in ``data_dir`` / ``$MEGAEVO_EVAL_DIR``) or ``rg:NAME[:COUNT[:SEED]]``;
    ``limit`` caps the problems taken from each. A :class:`UserError` for a spec that names no
    problem/answer set (e.g. a multiple-choice set)."""
    if isinstance(specs, str):
        specs = [specs]
    records: list[dict] = []
    for spec in specs:
        try:
            task = resolve_task(str(spec), data_dir, limit=limit)
        except EvalError:
            missing = _missing_set(str(spec), data_dir)
            if missing:
                raise UserError(missing) from None
            raise
        if not isinstance(task, GenerativeTask):
            raise UserError(f"rl.prompts: {spec!r} is not a set of problems with answers (an EvoLM-format jsonl "
                            f"with problem and gt_answer/gt_solution, or rg:NAME[:COUNT[:SEED]])")
        if task.grader.kind == "score":
            if not str(spec).startswith("rg:"):
                raise UserError(f"rl.prompts: {spec!r} is scored by its own function, which RL rewards cannot "
                                f"use; give an EvoLM-format jsonl or rg:NAME[:COUNT[:SEED]]")
            name = str(spec).split(":")[1]
            for p in task.problems:
                records.append({"id": p.id, "problem": p.problem, "entry": p.gold, "task": name,
                                "source": task.name})
        else:
            grader = {"kind": task.grader.kind, "labels": list(task.grader.labels), "bare": task.grader.bare}
            for p in task.problems:
                records.append({"id": p.id, "problem": p.problem, "answer": p.gold, "grader": dict(grader),
                                "source": task.name})
    return records


def _missing_set(spec: str, data_dir: str | None) -> str | None:
    """What is wrong when ``spec`` names no prompt file: the message in the terms of the run's settings
    (``rl.prompts``, ``rl.prompts_data_dir``); None when the spec names something that exists."""
    if spec.startswith("rg:") or Path(spec).is_file():
        return None
    if Path(spec).suffix == ".jsonl":
        return f"rl.prompts: {spec}: no such file"
    d = eval_data_dir(data_dir)
    if d is not None and (d / f"{spec}.jsonl").is_file():
        return None
    head = f"rl.prompts: {spec!r} is not a file"
    if d is None:
        return (f"{head} (a set's name is looked up as NAME.jsonl in rl.prompts_data_dir or ${ENV_DATA_DIR}, and "
                f"neither is set)")
    where = f"rl.prompts_data_dir={d}" if data_dir else f"${ENV_DATA_DIR}={d}"
    known = known_tasks(d)
    return f"{head}, and {where} has no {spec}.jsonl" + (f" (it has {', '.join(known)})" if known else "")


__all__ = ["CustomReward", "RewardFunction", "RewardResult", "VerifiableReward", "build_reward", "load_callable",
           "load_prompts"]
