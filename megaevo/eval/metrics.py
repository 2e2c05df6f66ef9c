"""Metrics over graded completions: greedy accuracy, maj@K, pass@K and the unbiased pass@k."""
from __future__ import annotations

from math import comb
from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct:
    1 - C(n-c, k) / C(n, k), the chance that k samples drawn without replacement hold a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def summarize(correct: Sequence[Sequence[bool]], scores: Sequence[Sequence[float]] | None = None,
              majority: Sequence[bool | None] | None = None, sampled: bool = False) -> dict:
    """Task metrics from per-problem correct flags (one list per problem).

    Greedy (``sampled`` false, one completion each): ``accuracy``. Sampled with K completions each:
    ``pass@1`` (mean of c/K, the unbiased estimator), ``pass@K`` (any correct) and, given the majority
    votes, ``maj@K``. ``score`` (mean fractional score) is added when ``scores`` are given."""
    out: dict = {"n": len(correct)}
    if not sampled:
        out["accuracy"] = _mean([float(bool(c) and c[0]) for c in correct])
    else:
        k = min((len(c) for c in correct), default=0)
        if k:
            out["pass@1"] = _mean([pass_at_k(len(c), sum(c), 1) for c in correct])
            out[f"pass@{k}"] = _mean([float(any(c)) for c in correct])
            if majority is not None:
                out[f"maj@{k}"] = _mean([float(bool(m)) for m in majority])
    if scores is not None:
        out["score"] = _mean([_mean(s) for s in scores])
    return out
