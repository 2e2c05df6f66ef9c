"""Answer equivalence and the grading of completions.

Graders by kind:

- ``math``: equal normalised strings (see :func:`normalize_text`), else math-verify (``parse`` +
  ``verify``) in both directions, gold vs prediction and prediction vs gold, correct if either holds.
  math-verify sees only mathematics: words (``yes``, ``nonlinear``, ``make clear``) are compared as
  normalised strings alone (math-verify would read them as products of symbols, ``heart`` = ``earth``).
  A prediction in prose is read by its final number or expression (``it is 204, no, 205`` is 205); a gold
  in prose by its number when only units follow it (``118 dollars``), else as a string.
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

from megaevo.eval.answers import extract_answer, vote_answer

DEFAULT_TIMEOUT = 4.0


class _Timeout(BaseException):
    """Raised by the alarm inside a comparison (a BaseException, so that no `except Exception` in a
    library swallows it)."""


# Wrappers that only format their argument (math-verify sees the argument) and those that hold text.
FORMAT_WRAPPERS = ("textbf", "textit", "emph", "underline", "mathbf", "boxed", "fbox", "framebox")
TEXT_WRAPPERS = ("text", "textrm", "textnormal", "mathrm", "mbox")


def unwrap(answer: str, names: Sequence[str] = FORMAT_WRAPPERS + TEXT_WRAPPERS) -> str:
    """``answer`` with every ``\\NAME{...}`` (optional ``[...]`` arguments, nested braces) of ``names``
    replaced by its argument."""
    pattern = re.compile(r"\\(?:%s)(?![A-Za-z])\s*(?:\[[^\]]*\]\s*)*\{" % "|".join(names))
    while (m := pattern.search(answer)) is not None:
        depth, end = 0, None
        for i in range(m.end() - 1, len(answer)):
            depth += {"{": 1, "}": -1}.get(answer[i], 0)
            if depth == 0:
                end = i
                break
        if end is None:  # unclosed: drop the command, keep the rest
            answer = answer[:m.start()] + answer[m.end():]
        else:
            answer = answer[:m.start()] + answer[m.end():end] + answer[end + 1:]
    return answer


_LABEL = re.compile(r"\(([a-z0-9]+)\)")


def normalize_text(answer: str) -> str:
    """Lower case, ``\\text{}``, ``\\textbf{}``, ``\\framebox{}`` (and the other wrappers) and ``$`` removed,
    whitespace collapsed, no trailing period, a label in parentheses bare (``(073)`` is ``073``)."""
    s = unwrap(answer).replace("\\$", "").replace("$", "").strip().rstrip(".").strip()
    s = " ".join(s.lower().split())
    label = _LABEL.fullmatch(s)
    return label.group(1) if label else s


# Words that are mathematics where they stand alone (a function or constant), not prose.
MATH_NAMES = frozenset("sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln exp sqrt pi "
                       "infty inf max min gcd lcm mod det lim".split())
_PROSE = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")
_EDGE = "\"'.,;:!?()"
_ENDING = ".,;:!? "


def _is_word(token: str) -> bool:
    word = token.strip(_EDGE)
    return _PROSE.fullmatch(word) is not None and len(word) > 1 and word.lower() not in MATH_NAMES


@dataclass
class Reading:
    """An answer read as prose and mathematics: the maximal runs of mathematical tokens, in order
    (``and`` between two of them lists them in one run), whether it has prose words, and whether one
    comes before its first run."""

    runs: list[str]
    prose: bool
    prose_first: bool


def read_answer(answer: str) -> Reading:
    """The :class:`Reading` of ``answer``: its tokens (split at whitespace, wrappers and ``$`` removed) are
    words (two or more letters, not a :data:`MATH_NAMES` name) or mathematics."""
    tokens = unwrap(answer).replace("\\$", " ").replace("$", " ").split()
    prose = [_is_word(t) for t in tokens]
    if any(prose):  # "a" and "I" are words in a sentence, symbols on their own
        prose = [p or t.strip(_EDGE) in ("a", "A", "I") for t, p in zip(tokens, prose)]
    runs: list[list[str]] = []
    prose_first = False
    for i, token in enumerate(tokens):
        if prose[i]:
            prose_first = prose_first or not runs
        elif i > 0 and not prose[i - 1]:
            runs[-1].append(token)
        elif i > 1 and tokens[i - 1].lower() == "and" and not prose[i - 2]:  # "12 and 13": one list
            runs[-1][-1] = runs[-1][-1].rstrip(",") + ","
            runs[-1].append(token)
        else:
            runs.append([token])
    return Reading([" ".join(r).rstrip(_ENDING) for r in runs], any(prose), prose_first)


def final_value(pred: str) -> str | None:
    """The mathematics math-verify compares in a predicted answer: all of it when it has no prose, else its
    last run (the final answer it states); None for words."""
    r = read_answer(pred)
    if not r.prose:
        return unwrap(pred, FORMAT_WRAPPERS)
    return r.runs[-1] if r.runs else None


def gold_value(gold: str) -> str | None:
    """The mathematics math-verify compares in a gold answer: all of it when it has no prose, its number
    when only words (units) follow it, else None (words, or a phrase: compared as strings)."""
    r = read_answer(gold)
    if not r.prose:
        return unwrap(gold, FORMAT_WRAPPERS)
    return r.runs[0] if len(r.runs) == 1 and not r.prose_first else None


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


def math_equal(pred: str, gold: str, reference: bool = True) -> bool:
    """Normalised string equality, else math-verify in both directions on the mathematics of each answer
    (:func:`final_value` of the prediction, :func:`gold_value` of the gold, or its :func:`final_value`
    without ``reference``: two predictions); words only as strings."""
    if normalize_text(pred) == normalize_text(gold):
        return True
    pred_math, gold_math = final_value(pred), (gold_value if reference else final_value)(gold)
    if pred_math is None or gold_math is None:
        return False
    from math_verify import verify

    p, g = _parse(pred_math), _parse(gold_math)
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

    def same(self, a: str, b: str) -> bool:
        """Whether two predicted answers are the same answer (the clusters of a majority vote)."""
        return math_equal(a, b, reference=False) if self.kind == "math" else self.equal(a, b)

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
    """Extract and grade each completion of one problem; with ``majority``, also vote among the final answers
    stated in each completion's last 128 characters (:func:`~megaevo.eval.answers.vote_answer`; a
    completion stating none there abstains; clusters of equivalent answers, the largest wins, ties to the
    earliest) and grade the winner."""
    clock = _Clock(timeout)
    equal, same = equal_fn or grader.equal, equal_fn or grader.same
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
        for answer in (vote_answer(c, bare=grader.bare) for c in job.completions):
            if answer is None:
                continue
            for cluster in clusters:
                if clock.call(same, answer, cluster[0]):
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
