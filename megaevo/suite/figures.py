"""The figures of ``megaevo report --findings`` and ``--fit`` (matplotlib, an optional package).

:func:`axis_figure` draws one finding: a metric against an axis, one line per branch, the mean over seeds
with error bars (the seeds' standard deviation) where seeds repeat. :func:`fit_figure` draws the mixture
fits: each CPT run's domain and general validation loss against its tokens (points), the D-CPT law's
curves (dashed) and the threshold of the critical mixture ratio.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megaevo.errors import UserError
from megaevo.suite.laws import dcpt


@dataclass
class Branch:
    """One line: its points' x (positions), means, standard deviations (0 without repeats) and counts."""

    label: str
    xs: list
    means: list
    stds: list
    counts: list = field(default_factory=list)


def _figure():
    try:
        from matplotlib.figure import Figure  # optional: matplotlib (pip install 'megaevo[report]')
    except ImportError:
        raise UserError("megaevo report needs the optional package 'matplotlib', which is not installed: "
                        "pip install matplotlib") from None
    return Figure


def axis_figure(path: Path, title: str, xlabel: str, ylabel: str, branches: list[Branch],
                ticks: list[str] | None = None) -> Path:
    """One panel: each branch a line with error bars; ``ticks`` labels the x positions 0..n-1."""
    Figure = _figure()
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    for b in branches:
        ax.errorbar(b.xs, b.means, yerr=b.stds if any(s > 0 for s in b.stds) else None, marker="o", capsize=4,
                    label=b.label)
    if ticks is not None:
        ax.set_xticks(range(len(ticks)), ticks)
    if any(b.label for b in branches):
        ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path


def fit_figure(result: dict, path: Path) -> Path:
    """The mixture fits of ``result`` (megaevo.suite.fit.fit_suite) into the PNG ``path``."""
    Figure = _figure()
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    fig.suptitle(f"mixture laws: domain {result['domain']}, general {result['general']}")
    axes = fig.subplots(1, 2)
    unit = result["tokens_unit"]
    for ax, which in zip(axes, ("domain", "general")):
        params = [v["value"] for v in result["params"][which].values()]
        ax.set_title(f"{which} loss (val/{result[which]}); D-CPT fit R²={result['r2'][which]:.3f}", fontsize="medium")
        ax.set_xlabel(f"CPT tokens (x{unit:.0e})")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        for i, c in enumerate(result["points"]):
            color = f"C{i % 10}"
            r = c["share"] if which == "domain" else 1 - c["share"]
            ax.plot(c["tokens"], c[which], "o", color=color, label=f"domain share {c['share']:g}")
            t = np.linspace(min(c["tokens"]), max(c["tokens"]), 50)
            ax.plot(t, dcpt(params, t, np.full_like(t, r), result["eps"]), "--", color=color)
        if which == "general" and result["critical_ratio"].get("threshold") is not None:
            ax.axhline(result["critical_ratio"]["threshold"], color="gray", linestyle=":",
                       label="before CPT + tolerance")
        ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path
