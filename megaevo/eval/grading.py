"""Answer equivalence and the grading of completions.

Graders by kind:

- ``math``: math-verify (``parse`` + ``verify``) in both directions, gold vs prediction and prediction vs
  gold, correct if either holds; answers math-verify cannot parse (words such as "yes" or "nonlinear")
  are compared as normalised strings.
- ``choice``: a closed label set (True/False/Uncertain): the last label word named in the answer, with
  yes/no, proved/disproved and unknown read as True/False/Uncertain.
- ``literal``: Python literals (``ast.literal_eval`` of both, compared), else stripped string equality.
- ``score``: a task's own scoring function ``score(answer, entry) -> float`` (reasoning-gym); correct at 1.0.

math-verify bounds its work with ``signal.alarm``, which only works in a process's main thread, so math
grading runs in a :class:`GradingPool` of spawned worker processes, each comparison under a per-item
timeout (4 s by default). A comparison that times out counts as wrong and is counted.
"""
from __future__ import annotations

import ast
import concurrent.futures as cf
import multiprocessing
import os
import re
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from megaevo.eval.answers import extract_answer, tail

DEFAULT_TIMEOUT = 4.0


class _Timeout(BaseException):
    """Raised by the alarm inside a comparison (a BaseException, so that no `except Exception` in a
    library swallows it)."""


def normalize_text(answer: str) -> str:
    """Lower case, ``\\text{}`` and ``$`` removed, whitespace collapsed, no trailing period."""
    s = answer.strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.replace("$", "").strip().rstrip(".").strip()
    return " ".join(s.lower().split())


def _quiet_math_verify() -> None:
    """math-verify warns once per process that its own timeouts are off: ours (`_Clock`) replace them."""
    import math_verify.grader
    import math_verify.parser

    math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = True


def _parse(answer: str):
    from math_verify import parse

    _quiet_math_verify()

    text = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
    parsed = parse(text, parsing_timeout=None)
    return parsed or parse(answer, parsing_timeout=None)


def math_equal(pred: str, gold: str) -> bool:
    """Equivalence by math-verify in both directions; normalised string equality where it cannot parse."""
    if normalize_text(pred) == normalize_text(gold):
        return True
    from math_verify import verify

    p, g = _parse(pred), _parse(gold)
    if not p or not g:
        return False
    return bool(verify(g, p, timeout_seconds=None) or verify(p, g, timeout_seconds=None))


CHOICE_SYNONYMS = {"true": "true", "yes": "true", "proved": "true", "false": "false", "no": "false",
                   "disproved": "false", "uncertain": "uncertain", "unknown": "uncertain"}
_WORD = re.compile(r"[a-z]+")


def choice_label(answer: str, labels: Sequence[str]) -> str | None:
    """The label (one of ``labels``, as spelled there) that ``answer`` names last, or None."""
    by_key = {CHOICE_SYNONYMS.get(lab.lower(), lab.lower()): lab for lab in labels}
    for word in reversed(_WORD.findall(normalize_text(answer))):
        key = CHOICE_SYNONYMS.get(word, word)
        if key in by_key:
            return by_key[key]
    return None


def _literal(s: str):
    s = s.strip().strip("`").strip()
    return ast.literal_eval(s)


def literal_equal(pred: str, gold: str) -> bool:
    """Python-literal equality (same type at the top, equal values), else stripped string equality."""
    try:
        a, b = _literal(pred), _literal(gold)
        return type(a) is type(b) and a == b
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return pred.strip() == gold.strip()


@dataclass
class Grader:
    """How one task compares answers: ``kind`` is math, choice, literal or score (see the module's doc)."""

    kind: str = "math"
    labels: tuple[str, ...] = ()
    bare: bool = False  # a bare final line counts as the answer (sets whose references are bare answers)
    score_fn: Callable[[str | None, Any], float] | None = field(default=None, repr=False)

    @property
    def parallel(self) -> bool:
        return self.kind == "math"

    def equal(self, pred: str, gold: str) -> bool:
        if self.kind == "math":
            return math_equal(pred, gold)
        if self.kind == "choice":
            p = choice_label(pred, self.labels)
            return p is not None and p == choice_label(gold, self.labels)
        if self.kind == "literal":
            return literal_equal(pred, gold)
        return normalize_text(pred) == normalize_text(gold)

    def describe(self) -> dict:
        return {"kind": self.kind, **({"labels": list(self.labels)} if self.labels else {})}


@dataclass
class Job:
    """One problem to grade: its gold answer (or the entry a score function reads) and its completions."""

    gold: Any
    completions: list[str]


@dataclass
class Graded:
    answers: list[str | None]
    scores: list[float]
    correct: list[bool]
    majority_answer: str | None = None
    majority_correct: bool | None = None
    timeouts: int = 0


def _on_alarm(signum, frame):
    raise _Timeout()


class _Clock:
    """Runs calls under a per-call wall-clock limit where a signal can deliver it (a main thread)."""

    def __init__(self, timeout: float | None):
        usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
        self.timeout = timeout if usable and timeout else None
        self.timeouts = 0

    def call(self, fn, *args) -> bool:
        if self.timeout is None:
            return bool(fn(*args))
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        try:
            return bool(fn(*args))
        except _Timeout:
            self.timeouts += 1
            return False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def grade_job(grader: Grader, job: Job, majority: bool = False, timeout: float | None = DEFAULT_TIMEOUT,
              equal_fn: Callable[[str, str], bool] | None = None) -> Graded:
    """Extract and grade each completion of one problem; with ``majority``, also vote among the answers
    extracted from each completion's last 128 characters (clusters of equivalent answers; the largest
    wins, ties to the earliest) and grade the winner."""
    clock = _Clock(timeout)
    equal = equal_fn or grader.equal
    gold = job.gold

    def score(answer: str | None) -> float:
        if grader.score_fn is not None:
            return float(grader.score_fn(answer, gold))
        if answer is None or gold is None:
            return 0.0
        return 1.0 if clock.call(equal, answer, str(gold)) else 0.0

    answers = [extract_answer(c, bare=grader.bare) for c in job.completions]
    scores = [score(a) for a in answers]
    out = Graded(answers, scores, [s >= 1.0 for s in scores])
    if majority:
        clusters: list[list[str]] = []
        for answer in (extract_answer(tail(c), bare=grader.bare) for c in job.completions):
            if answer is None:
                continue
            for cluster in clusters:
                if clock.call(equal, answer, cluster[0]):
                    cluster.append(answer)
                    break
            else:
                clusters.append([answer])
        if clusters:
            best = max(clusters, key=len)  # max keeps the earliest of equal sizes
            out.majority_answer = best[0]
            out.majority_correct = score(best[0]) >= 1.0
        else:
            out.majority_correct = False
    out.timeouts = clock.timeouts
    return out


def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C
    try:
        _quiet_math_verify()  # imports math-verify once per worker, before the first timed comparison
    except ImportError:
        pass


class GradingPool:
    """Grades jobs in spawned worker processes (math kinds) or in this process (the others).

    Use as a context manager; ``workers=0`` grades in this process (timeouts then only apply in the main
    thread). ``equal_fn`` (a picklable top-level function) replaces the grader's equivalence, for tests."""

    def __init__(self, workers: int | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                 equal_fn: Callable[[str, str], bool] | None = None, context: str = "spawn"):
        self.workers = min(8, os.cpu_count() or 1) if workers is None else workers
        self.timeout, self.equal_fn, self.context = timeout, equal_fn, context
        self._executor: cf.ProcessPoolExecutor | None = None

    def __enter__(self) -> "GradingPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _pool(self) -> cf.ProcessPoolExecutor:
        if self._executor is None:
            self._executor = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(self.context),
                                                    initializer=_worker_init)
        return self._executor

    def grade(self, grader: Grader, jobs: Iterable[Job], majority: bool = False,
              on_done: Callable[[int], None] | None = None) -> list[Graded]:
        """The grades of ``jobs`` in order; ``on_done(k)`` after each k finished (for progress bars)."""
        jobs = list(jobs)
        if not grader.parallel or self.workers == 0 or len(jobs) == 0:
            out = []
            for job in jobs:
                out.append(grade_job(grader, job, majority, self.timeout, self.equal_fn))
                if on_done:
                    on_done(1)
            return out
        pool = self._pool()
        futures = {pool.submit(grade_job, grader, job, majority, self.timeout, self.equal_fn): i
                   for i, job in enumerate(jobs)}
        out: list[Graded | None] = [None] * len(jobs)
        for fut in cf.as_completed(futures):
            out[futures[fut]] = fut.result()
            if on_done:
                on_done(1)
        return out  # type: ignore[return-value]
