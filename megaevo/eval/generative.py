"""Generative evaluation: prompt a model with each problem, extract and grade the answers.

EvoLM's protocol: zero-shot, the ``evolm`` template, maximum length 2048 (prompt and completion, capped by
the model's ``max_seq_len``), stop strings ``Human``/``Assistant`` (with and without the colon); greedy is
temperature 0, sampled (``samples=K``) is K completions at temperature 1.0 and top-p 1; both with a
repetition penalty of 1.1. Under torchrun every rank generates (the model may be tensor-parallel); rank 0
grades.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

from megaevo.data.templates import TOKENIZER_TEMPLATES, get_template
from megaevo.eval.base import EvalError, Problem
from megaevo.eval.grading import Grader, GradingPool, Job
from megaevo.eval.metrics import summarize
from megaevo.eval.templates import STOP_STRINGS, TEMPLATES

MAX_LENGTH = 2048
REPETITION_PENALTY = 1.1


@dataclass
class GenerativeTask:
    """Problems answered by generation, graded by ``grader``; ``domain`` is "id", "ood" or None."""

    name: str
    problems: list[Problem]
    grader: Grader
    domain: str | None = None
    source: str = ""

    def run(self, model, batch_size: int = 8, progress: bool = True, **options) -> dict:
        return run_generative(self, model, batch_size=batch_size, progress=progress, **options)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def prompt_template(template: str, tokenizer=None):
    """The chat template ``template`` renders evaluation prompts with (``hf`` needs the model's tokenizer)."""
    if template in TOKENIZER_TEMPLATES and tokenizer is None:
        *others, last = TEMPLATES
        raise EvalError(f"--template {template} renders prompts with the tokenizer's own chat_template, so it "
                        f"needs the model's tokenizer: use {', '.join(others)} or {last} here")
    return get_template(template, tokenizer if template in TOKENIZER_TEMPLATES else None)


def render_problem(problem: str, chat) -> str:
    """``problem`` as the one user turn of ``chat``'s prompt."""
    return chat.render_prompt([{"role": "user", "content": problem}])


def sampling_params(samples: int = 0, template: str = "evolm", max_length: int = MAX_LENGTH, seed: int | None = 0,
                    stop: tuple[str, ...] | None = None):
    """The protocol's sampling settings: greedy when ``samples`` is 0, else ``samples`` completions at
    temperature 1; ``stop`` (default: ``template``'s stop strings) ends a completion."""
    try:  # optional: grading needs neither megaevo.inference nor torch, only generating does
        from megaevo.inference.sampling import SamplingParams
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("megaevo.inference"):
            raise
        raise EvalError("generation needs megaevo.inference, which is not part of this installation") from None
    common = dict(max_new_tokens=max_length, max_length=max_length, repetition_penalty=REPETITION_PENALTY,
                  stop=STOP_STRINGS[template] if stop is None else stop, add_bos=False)
    if samples:
        return SamplingParams(temperature=1.0, top_p=1.0, n=samples, seed=seed, **common)
    return SamplingParams(temperature=0.0, n=1, seed=seed, **common)


def _progress(total: int, enabled: bool, desc: str, unit: str = "problem"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or rank() != 0, dynamic_ncols=True)


def run_generative(task: GenerativeTask, model, batch_size: int = 8, progress: bool = True, samples: int = 0,
                   template: str = "evolm", max_length: int = MAX_LENGTH, seed: int | None = 0,
                   workers: int | None = None) -> dict:
    """Generate for every problem of ``task`` and grade: ``{"metrics": ..., "samples": [...]}`` (on ranks
    other than 0, the metrics and samples are empty)."""
    if batch_size < 1:
        raise EvalError(f"batch size must be at least 1, got {batch_size}")
    cap = max_length
    max_seq_len = getattr(getattr(model, "args", None), "max_seq_len", None)
    if max_seq_len:
        cap = min(cap, int(max_seq_len))
    chat = prompt_template(template, getattr(model, "tokenizer", None))
    params = sampling_params(samples, template, cap, seed, stop=chat.stop_strings)
    prompts = [render_problem(p.problem, chat) for p in task.problems]
    texts: list[list[str]] = []
    finish: list[list[str | None]] = []
    tokens, start = 0, time.perf_counter()
    with _progress(len(prompts), progress, task.name) as bar:
        for i in range(0, len(prompts), batch_size):
            out = model.generate(prompts[i:i + batch_size], params)
            for completions in out:
                texts.append([c.text for c in completions])
                finish.append([getattr(c, "finish_reason", None) for c in completions])
                tokens += sum(len(c.token_ids) for c in completions)
            bar.update(len(out))
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):.0f} tok/s", refresh=False)
    if rank() != 0:
        return {"metrics": {}, "samples": []}
    result = grade_completions(task, texts, sampled=bool(samples), prompts=prompts, workers=workers,
                               progress=progress)
    for row, reasons in zip(result["samples"], finish):
        row["finish_reasons"] = reasons
    result["metrics"]["generated_tokens"] = tokens
    return result


def gold_text(gold: Any):
    """The gold answer as samples files show it (a reasoning-gym entry shows its answer)."""
    return gold.get("answer") if isinstance(gold, dict) else gold


def grade_completions(task: GenerativeTask, completions: Sequence[Sequence[str]], sampled: bool,
                      prompts: Sequence[str] | None = None, problems: Sequence | None = None,
                      workers: int | None = None, progress: bool = False, pool: GradingPool | None = None) -> dict:
    """Grade ``completions`` (a list per problem, in the order of ``problems``, by default the task's):
    metrics (see :func:`megaevo.eval.metrics.summarize`, plus ``timeouts`` and ``no_answer``) and one
    sample row per problem."""
    problems = list(task.problems if problems is None else problems)
    jobs = [Job(p.gold, list(c)) for p, c in zip(problems, completions)]
    own = pool is None
    pool = pool or GradingPool(workers)
    try:
        with _progress(len(jobs), progress, f"grading {task.name}") as bar:
            graded = pool.grade(task.grader, jobs, majority=sampled, on_done=bar.update)
    finally:
        if own:
            pool.close()
    metrics = summarize([g.correct for g in graded], [g.scores for g in graded] if task.grader.score_fn else None,
                        [g.majority_correct for g in graded] if sampled else None, sampled=sampled)
    metrics["timeouts"] = sum(g.timeouts for g in graded)
    answers = [a for g in graded for a in g.answers]
    metrics["no_answer"] = sum(a is None for a in answers) / len(answers) if answers else 0.0
    rows = []
    for i, (p, g, c) in enumerate(zip(problems, graded, completions)):
        row = {"id": p.id, "prompt": prompts[i] if prompts is not None else None, "gold": gold_text(p.gold),
               "completions": list(c), "answers": g.answers, "correct": g.correct}
        if task.grader.score_fn:
            row["scores"] = g.scores
        if sampled:
            row["majority_answer"], row["majority_correct"] = g.majority_answer, g.majority_correct
        rows.append(row)
    return {"metrics": metrics, "samples": rows}
