"""Zero-shot multiple choice scored by log-likelihood, with lm-evaluation-harness semantics.

A task file is jsonl, one question a line: ``{"context": str, "choices": [str, ...], "gold": int}``
(``id`` optional). Choice ``c`` is scored as the continuation ``" " + c`` of the context: its tokens
are those of ``encode(context + continuation)`` after the first ``len(encode(context))`` tokens,
trailing spaces of the context moving to the continuation; no BOS is added, and an empty context is
replaced by EOS. A request longer than the model's ``max_seq_len`` is cut on the left. ``acc`` picks
the choice with the largest summed log-probability, ``acc_norm`` the largest sum divided by the
choice's length in characters (the choice string, as lm-evaluation-harness divides).

:func:`score_requests` is the one batched scorer: the lm-eval adapter uses it too, so megaevo's own
numbers and lm-eval's agree.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from megaevo.common import IGNORE_INDEX
from megaevo.data.tokenizer_files import require_tokenizer
from megaevo.errors import UserError
from megaevo.eval.base import read_jsonl

TARGET_DELIMITER = " "


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The context's tokens and the continuation's, split as lm-evaluation-harness splits them."""
    if context == "":
        return [tokenizer.eos_id], list(tokenizer.encode(continuation))
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(tokenizer.encode(context + continuation))
    context_enc = list(tokenizer.encode(context))
    return context_enc, whole[len(context_enc):]


def _row(context: Sequence[int], continuation: Sequence[int], max_len: int) -> tuple[list[int], list[int], int]:
    """Input tokens, labels (-100 outside the continuation) and the number of scored tokens."""
    full = (list(context) + list(continuation))[-(max_len + 1):]
    n = min(len(continuation), len(full) - 1)
    inputs = full[:-1]
    labels = [IGNORE_INDEX] * (len(inputs) - n) + full[len(full) - n:]
    return inputs, labels, n


def score_requests(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 8,
                   greedy: bool = False, progress: bool = False, desc: str = "scoring") -> list[tuple[float, bool]]:
    """``(sum of log p(continuation | context), is_greedy)`` for each ``(context, continuation)`` token pair.

    Rows are batched longest first with right padding. With ``greedy`` the full logits are read (through
    ``model.forward``) to tell whether every continuation token is the argmax; otherwise only
    ``model.logprobs`` is called and ``is_greedy`` is False.
    """
    max_len = int(model.args.max_seq_len)
    rows = [_row(c, t, max_len) for c, t in requests]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    bar = _progress(batches, progress, desc)
    device = _device(model)
    for batch in bar:
        batch = [i for i in batch if rows[i][0]]  # nothing to score when the pair has no continuation
        if not batch:
            continue
        width = max(len(rows[i][0]) for i in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for r, i in enumerate(batch):
            inputs, labs, _ = rows[i]
            tokens[r, :len(inputs)] = torch.tensor(inputs)
            labels[r, :len(labs)] = torch.tensor(labs)
        tokens, labels = tokens.to(device), labels.to(device)
        mask = labels != IGNORE_INDEX
        with torch.no_grad():
            if greedy:
                logits = model.forward(tokens).float()
                logp = torch.log_softmax(logits, dim=-1)
                safe = labels.clamp(min=0)
                lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask
                hit = (logits.argmax(-1) == safe) | ~mask
                is_greedy = hit.all(-1).tolist()
            else:
                lp = model.logprobs(tokens, labels).float() * mask
                is_greedy = [False] * len(batch)
        sums = lp.double().sum(-1).tolist()
        for r, i in enumerate(batch):
            results[i] = (float(sums[r]), bool(is_greedy[r]))
    return results


@dataclass
class Question:
    context: str
    choices: list[str]
    gold: int
    id: Any = None


@dataclass
class MultipleChoiceTask:
    """Questions of one jsonl file; :meth:`run` scores them on a model."""

    name: str
    questions: list[Question] = field(default_factory=list)

    def run(self, model, batch_size: int = 8, progress: bool = True) -> dict:
        tokenizer = require_tokenizer(model, f"multiple-choice task {self.name}")
        requests, owners = [], []
        for q_idx, q in enumerate(self.questions):
            for c_idx, choice in enumerate(q.choices):
                requests.append(encode_pair(tokenizer, q.context, TARGET_DELIMITER + choice))
                owners.append((q_idx, c_idx))
        scores = score_requests(model, requests, batch_size=batch_size, progress=progress, desc=self.name)
        lls: list[list[float]] = [[0.0] * len(q.choices) for q in self.questions]
        for (q_idx, c_idx), (ll, _) in zip(owners, scores):
            lls[q_idx][c_idx] = ll
        samples, acc, acc_norm = [], 0, 0
        for q_idx, (q, ll) in enumerate(zip(self.questions, lls)):
            pred = _argmax(ll)
            pred_norm = _argmax([x / len(c) if len(c) else x for x, c in zip(ll, q.choices)])
            acc += pred == q.gold
            acc_norm += pred_norm == q.gold
            samples.append({"id": q.id if q.id is not None else q_idx, "index": q_idx, "loglikelihoods": ll,
                            "pred": pred, "pred_norm": pred_norm, "gold": q.gold,
                            "acc": float(pred == q.gold), "acc_norm": float(pred_norm == q.gold)})
        n = len(self.questions)
        metrics = {"n": n, "acc": acc / n if n else math.nan, "acc_norm": acc_norm / n if n else math.nan}
        return {"metrics": metrics, "samples": samples}


def load_task(path: str | os.PathLike, limit: int | None = None) -> MultipleChoiceTask:
    """The questions of a jsonl file (the first ``limit`` of them); a malformed line is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: multiple-choice file not found")
    questions = []
    for line_no, doc in read_jsonl(path):
        if limit is not None and len(questions) >= limit:
            break
        questions.append(_parse(doc, f"{path}:{line_no}"))
    if not questions:
        raise UserError(f"{path}: no questions (expected jsonl lines with context, choices and gold)")
    return MultipleChoiceTask(name=path.stem, questions=questions)


def _parse(doc: dict, where: str) -> Question:
    missing = [k for k in ("context", "choices", "gold") if k not in doc]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)} (a question needs context, choices and gold)")
    context, choices, gold = doc["context"], doc["choices"], doc["gold"]
    if not isinstance(context, str):
        raise UserError(f"{where}: context must be a string, got {type(context).__name__}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise UserError(f"{where}: choices must be a list of at least two strings")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise UserError(f"{where}: gold must be an index into choices (0..{len(choices) - 1}), got {gold!r}")
    return Question(context=context, choices=choices, gold=gold, id=doc.get("id"))


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _progress(items: Iterable, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, leave=False)
