"""Mixture-law fits of a suite's CPT runs: ``megaevo report --fit SUITE_DIR [--out OUT]``.

The runs: every row of stage ``cpt`` whose ``train.yaml`` trains on a blend of a *domain* corpus and a
*general* one. The domain is the corpus with the largest mean weight over the CPT runs, the general
corpus the next one (``--domain`` / ``--general`` name them); a run's domain share is
``r = w_domain / (sum of weights)`` and its replay share ``1 - r``. The mixture axis is the CPT stage's
axis whose values change that share; CPT runs that also differ in other axes (a pre-training budget) form
groups, and the group with the most shares is fitted. Without two CPT runs of different domain shares
the command stops with one line saying so.

Each run's ``metrics.jsonl`` gives the points: ``val/DOMAIN`` and ``val/GENERAL`` at every evaluation,
against ``D``, the run's own CPT tokens (the record's ``tokens``), in units of ``TOKENS_UNIT`` (10^6)
tokens. The loss before CPT is the parent run's final validation loss.

**D-CPT law** (Que et al. 2024, "D-CPT Law: Domain-specific Continual Pre-Training Scaling Law for
Large Language Models", the parameterisation it prefers)::

    L(N, D, r) = E + A / N^alpha + B * r^eta / D^beta + C / (r + eps)^gamma

for the domain loss with ``r = r_d`` (the domain share) and for the general loss with ``r = r_g = 1 - r_d``
(the general share), each with its own parameters. A suite's CPT runs share one model size N, so the
``A / N^alpha`` term is a constant and folds into E; fitted here, per loss::

    L(D, r) = E + B * r^eta / D^beta + C / (r + eps)^gamma,   eps = EPS (fixed), B, C >= 0

**CMR** (Gu et al. 2024, "CMR Scaling Law: Predicting Critical Mixture Ratios for Continual Pre-training
of Language Models"): per mixture ratio, each loss follows a power law in the training tokens::

    L_r(T) = c + a * T^(-b)          (a < 0: a loss that rises towards c, the general loss of forgetting)

A ratio is *feasible* when the general loss at the end of CPT stays within the tolerance,
``L_g,r(T_max) <= L_g(before CPT) + tolerance``, while the domain loss falls, ``L_d,r(T_max) < L_d(before
CPT)``; the **critical mixture ratio** is the largest feasible domain share. It is read from the fitted
curves at the largest ``T`` of the runs: the largest feasible measured share, refined by linear
interpolation of the general loss's excess over the threshold up to the next (infeasible) share. The
tolerance defaults to 1% of the general loss before CPT (``--tolerance`` sets it, in nats).

Fits: ``scipy.optimize.least_squares`` (trust-region reflective, several starts, the best kept);
standard errors from the Jacobian at the solution, ``sqrt(diag((J^T J)^-1) * SSR / (n - p))``; R² =
1 - SSR / SST. The held-out check fits the D-CPT law on all ratios but one (the middle share unless
``--holdout`` names one) and predicts that run's final losses.

Writes ``OUT/fit.json`` (``params``, ``stderr`` in it, ``r2``, ``heldout``, ``critical_ratio``, ``cmr``,
``points``) and ``OUT/fit.png`` (the data and both fits against tokens).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from megaevo.errors import UserError
from megaevo.log import get_logger
from megaevo.suite.figures import fit_figure
from megaevo.suite.laws import DCPT_PARAMS, EPS, POWER_PARAMS, TOKENS_UNIT, dcpt, power
from megaevo.suite.study import Suite, SuiteRun, label, load_suite

logger = get_logger(__name__)

DEFAULT_TOLERANCE = 0.01  # a fraction of the general loss before CPT


class FitError(UserError):
    """A suite the mixture laws cannot be fitted to."""


# -- the laws -------------------------------------------------------------------------------------

@dataclass
class LawFit:
    names: tuple
    values: list
    stderr: list
    r2: float
    n: int

    def param(self) -> dict:
        return {k: {"value": v, "stderr": s} for k, v, s in zip(self.names, self.values, self.stderr)}


def _least_squares(model: Callable, y: np.ndarray, starts: list, bounds: tuple, names: tuple) -> LawFit:
    try:
        from scipy.optimize import least_squares  # optional: scipy (pip install 'megaevo[report]')
    except ImportError:
        raise UserError("megaevo report --fit needs the optional package 'scipy', which is not installed: "
                        "pip install 'megaevo[report]'") from None

    best = None
    for x0 in starts:
        try:
            res = least_squares(lambda p: model(p) - y, x0, bounds=bounds, method="trf", max_nfev=5000)
        except ValueError:
            continue
        if np.all(np.isfinite(res.fun)) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        raise FitError("the least-squares fit did not converge from any start")
    ssr = float(np.sum(best.fun ** 2))
    sst = float(np.sum((y - y.mean()) ** 2))
    n, k = len(y), len(best.x)
    dof = max(n - k, 1)
    jtj = best.jac.T @ best.jac
    cov = np.linalg.pinv(jtj) * (ssr / dof)
    err = [float(math.sqrt(v)) if v >= 0 and n > k else float("nan") for v in np.diag(cov)]
    r2 = 1.0 - ssr / sst if sst > 0 else float("nan")
    return LawFit(names, [float(v) for v in best.x], err, r2, n)


def fit_dcpt(d: Sequence[float], r: Sequence[float], loss: Sequence[float], eps: float = EPS) -> LawFit:
    """The D-CPT law's parameters (DCPT_PARAMS) fitted to losses at CPT tokens ``d`` (in TOKENS_UNIT) and
    shares ``r`` (the domain share for the domain loss, the general share for the general one)."""
    d, r, y = (np.asarray(v, dtype=float) for v in (d, r, loss))
    if len(y) < len(DCPT_PARAMS):
        raise FitError(f"the D-CPT law has {len(DCPT_PARAMS)} parameters and the CPT runs give {len(y)} points to fit "
                       f"them: evaluate them more often (train.eval_interval) or add values to the mixture axis")
    lo, hi = float(y.min()), float(y.max())
    spread = max(hi - lo, 1e-3)
    starts = [[lo - spread * f, spread * g, beta, eta, spread * h, gamma]
              for f, g, h, beta, eta, gamma in ((0.5, 1.0, 0.1, 0.5, 0.5, 0.3), (0.1, 0.3, 0.02, 0.3, 1.0, 0.5),
                                                (1.0, 2.0, 0.3, 1.0, 0.2, 0.2), (0.2, 0.5, 0.05, 0.2, 0.5, 1.0))]
    bounds = ([-np.inf, 0.0, 0.0, 0.0, 0.0, 0.0], [np.inf, np.inf, 3.0, 3.0, np.inf, 3.0])
    return _least_squares(lambda p: dcpt(p, d, r, eps), y, starts, bounds, DCPT_PARAMS)


def fit_power(t: Sequence[float], loss: Sequence[float]) -> LawFit:
    """CMR's power law ``c + a * T^(-b)`` fitted to one ratio's losses at tokens ``t`` (3 points or more)."""
    t, y = np.asarray(t, dtype=float), np.asarray(loss, dtype=float)
    if len(y) < len(POWER_PARAMS):
        raise FitError(f"a power law has {len(POWER_PARAMS)} parameters and there are {len(y)} points")
    last, first = float(y[-1]), float(y[0])
    starts = [[last, (first - last) * float(t[0]) ** b, b] for b in (0.3, 0.7, 1.5)]
    bounds = ([-np.inf, -np.inf, 0.0], [np.inf, np.inf, 5.0])
    return _least_squares(lambda p: power(p, t), y, starts, bounds, POWER_PARAMS)


# -- the critical mixture ratio ------------------------------------------------------------------

@dataclass
class RatioEnd:
    """One ratio's losses at the end of CPT (fitted where a fit exists) and its feasibility."""

    share: float                 # domain share
    general: float
    domain: float
    feasible: bool = False


def critical_ratio(ends: list[RatioEnd], general_start: float, domain_start: float | None,
                   tolerance: float) -> dict:
    """The largest domain share whose general loss stays within ``general_start + tolerance`` while the
    domain loss falls below ``domain_start``; between the largest feasible measured share and the next
    larger (infeasible) one, the crossing of the threshold by linear interpolation."""
    threshold = general_start + tolerance
    ends = sorted(ends, key=lambda e: e.share)
    for e in ends:
        e.feasible = e.general <= threshold and (domain_start is None or e.domain < domain_start)
    feasible = [e for e in ends if e.feasible]
    out = {"tolerance": tolerance, "threshold": threshold, "general_before": general_start,
           "domain_before": domain_start, "ratios": [asdict(e) for e in ends]}
    if not feasible:
        return {**out, "value": None, "note": "no measured domain share keeps the general loss within the tolerance"}
    top = feasible[-1]
    above = [e for e in ends if e.share > top.share]
    if not above:
        return {**out, "value": top.share, "note": "every share up to the largest measured one is feasible: "
                "the critical ratio is at least this"}
    nxt = above[0]
    value = top.share
    if nxt.general > threshold and nxt.general != top.general:
        value = top.share + (threshold - top.general) * (nxt.share - top.share) / (nxt.general - top.general)
        value = min(max(value, top.share), nxt.share)
    return {**out, "value": value, "note": f"interpolated between the domain shares {top.share:g} (feasible) "
            f"and {nxt.share:g} (not)"}


# -- the suite's CPT runs -------------------------------------------------------------------------

@dataclass
class Curve:
    """One CPT run's validation losses against its tokens."""

    run: str
    axis_value: object
    share: float                      # domain share
    tokens: list                      # in TOKENS_UNIT
    domain: list
    general: list
    domain_before: float | None = None
    general_before: float | None = None


@dataclass
class Mixture:
    domain: str
    general: str
    axis: str | None
    group: dict
    curves: list = field(default_factory=list)


def _corpora(runs: list[SuiteRun], domain: str | None, general: str | None) -> tuple[str, str]:
    mean: dict[str, float] = {}
    for r in runs:
        for k, w in r.mixture.items():
            mean[k] = mean.get(k, 0.0) + w / len(runs)
    ranked = sorted(mean, key=lambda k: -mean[k])
    for name, what in ((domain, "--domain"), (general, "--general")):
        if name is not None and name not in mean:
            raise FitError(f"{what} {name}: not a corpus of the CPT runs' data.train ({', '.join(ranked)})")
    domain = domain or ranked[0]
    general = general or next((k for k in ranked if k != domain), None)
    if general is None:
        raise FitError(f"the CPT runs train on {domain} only: no general corpus to replay (a mixture needs two)")
    return domain, general


def find_mixture(suite: Suite, domain: str | None = None, general: str | None = None) -> Mixture:
    """The CPT runs of the suite's mixture axis (see the module docstring), as curves."""
    cpt = [r for r in suite.stage("cpt") if r.mixture]
    where = f"{suite.dir}"
    if len(cpt) < 2:
        raise FitError(f"{where}: no mixture axis: the suite has {len(cpt)} CPT run(s) with a data blend; a fit needs "
                       "CPT runs that differ in their domain share (a cpt axis setting data.train weights)")
    domain, general = _corpora(cpt, domain, general)
    share = {r.name: r.mixture.get(domain, 0.0) / max(r.mixture.get(domain, 0.0) + r.mixture.get(general, 0.0), 1e-12)
             for r in cpt}
    axes = suite.stage_axes("cpt")
    axis = next((a for a in axes if len({label(r.axes.get(a)) for r in cpt}) > 1 and all(
        share[x.name] == share[y.name] for x in cpt for y in cpt if label(x.axes.get(a)) == label(y.axes.get(a)))), None)
    groups: dict[str, list[SuiteRun]] = {}
    for r in cpt:
        key = json.dumps({k: v for k, v in r.axes.items() if k != axis}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(r)
    key, runs = max(groups.items(), key=lambda kv: len({round(share[r.name], 9) for r in kv[1]}))
    if len({round(share[r.name], 9) for r in runs}) < 2:
        raise FitError(f"{where}: no mixture axis: every CPT run trains on the same domain share "
                       f"({share[runs[0].name]:g} {domain}); a fit needs a cpt axis setting data.train weights")
    mix = Mixture(domain, general, axis, json.loads(key))
    for r in sorted(runs, key=lambda r: share[r.name]):
        td, ld = r.val_curve(domain)
        tg, lg = r.val_curve(general)
        common = sorted(set(td) & set(tg))
        dmap, gmap = dict(zip(td, ld)), dict(zip(tg, lg))
        pts = [t for t in common if t > 0]
        if not pts:
            logger.info("fit: %s has no val/%s and val/%s at tokens > 0; left out", r.name, domain, general)
            continue
        parent = suite.parent(r)
        mix.curves.append(Curve(r.name, r.axes.get(axis) if axis else None, share[r.name],
                                [t / TOKENS_UNIT for t in pts], [dmap[t] for t in pts], [gmap[t] for t in pts],
                                parent.last_val(domain) if parent else None,
                                parent.last_val(general) if parent else None))
    if len({c.share for c in mix.curves}) < 2:
        raise FitError(f"{where}: fewer than two domain shares with val/{domain} and val/{general} records "
                       "(train.eval_interval > 0 in the CPT runs)")
    return mix


# -- the whole fit --------------------------------------------------------------------------------

def _points(curves: list[Curve]) -> tuple[np.ndarray, ...]:
    d = np.array([t for c in curves for t in c.tokens])
    r = np.array([c.share for c in curves for _ in c.tokens])
    return d, r, np.array([v for c in curves for v in c.domain]), np.array([v for c in curves for v in c.general])


def _rel(pred: float, meas: float) -> float:
    return abs(pred - meas) / abs(meas) if meas else float("nan")


def heldout_check(curves: list[Curve], share: float | None = None) -> dict:
    """Fit the D-CPT law on every ratio but one (``share``, default the middle one) and predict that run's
    final losses."""
    shares = sorted({c.share for c in curves})
    if len(shares) < 3:
        raise FitError(f"the held-out check fits the law on every domain share but one and predicts that one: it "
                       f"needs 3 shares or more, and the CPT runs have {len(shares)} "
                       f"({', '.join(f'{s:g}' for s in shares)}); add values to the mixture axis")
    if share is None:
        inner = shares[1:-1] or shares
        share = inner[len(inner) // 2]
    match = [c for c in curves if abs(c.share - share) < 1e-9]
    if not match:
        raise FitError(f"--holdout {share:g}: no CPT run with that domain share ({', '.join(f'{s:g}' for s in shares)})")
    held, rest = match[0], [c for c in curves if abs(c.share - share) >= 1e-9]
    d, r, ld, lg = _points(rest)
    fd, fg = fit_dcpt(d, r, ld), fit_dcpt(d, 1 - r, lg)
    t = np.array([held.tokens[-1]])
    predicted = {"domain": float(dcpt(fd.values, t, np.array([held.share]))[0]),
                 "general": float(dcpt(fg.values, t, np.array([1 - held.share]))[0])}
    measured = {"domain": held.domain[-1], "general": held.general[-1]}
    return {"ratio": held.share, "replay": 1 - held.share, "axis_value": held.axis_value, "run": held.run,
            "tokens": held.tokens[-1] * TOKENS_UNIT, "predicted": predicted, "measured": measured,
            "rel_error": {k: _rel(predicted[k], measured[k]) for k in predicted}}


def cmr_fits(curves: list[Curve]) -> tuple[dict, list[RatioEnd]]:
    """CMR's per-ratio power laws and each ratio's losses at the largest T (fitted; measured where a
    ratio has too few points to fit)."""
    t_max = max(c.tokens[-1] for c in curves)
    fits, ends = {}, []
    for c in curves:
        entry, end = {"run": c.run, "axis_value": c.axis_value}, {}
        for name, ys in (("domain", c.domain), ("general", c.general)):
            try:
                f = fit_power(c.tokens, ys)
                entry[name] = {"params": f.param(), "r2": f.r2}
                end[name] = float(power(f.values, np.array([t_max]))[0])
            except FitError as e:
                entry[name] = {"error": str(e)}
                end[name] = ys[-1]
        fits[f"{c.share:g}"] = entry
        ends.append(RatioEnd(c.share, end["general"], end["domain"]))
    return fits, ends


def fit_suite(suite_dir: str | Path, tolerance: float | None = None, holdout: float | None = None,
              domain: str | None = None, general: str | None = None) -> dict:
    """Everything ``fit.json`` holds (see the module docstring)."""
    mix = find_mixture(load_suite(suite_dir), domain, general)
    curves = mix.curves
    d, r, ld, lg = _points(curves)
    fd, fg = fit_dcpt(d, r, ld), fit_dcpt(d, 1 - r, lg)
    befores = [c.general_before for c in curves if c.general_before is not None]
    dbefores = [c.domain_before for c in curves if c.domain_before is not None]
    general_start = befores[0] if befores else min(c.general[0] for c in curves)
    domain_start = dbefores[0] if dbefores else None
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE * general_start
    cmr, ends = cmr_fits(curves)
    return {
        "domain": mix.domain, "general": mix.general, "axis": mix.axis, "group": mix.group,
        "tokens_unit": TOKENS_UNIT, "eps": EPS,
        "law": {"dcpt": "L(D, r) = E + B * r^eta / D^beta + C / (r + eps)^gamma (D in tokens_unit; r: domain "
                        "share for the domain loss, general share 1 - r for the general loss)",
                "cmr": "L_r(T) = c + a * T^(-b) per domain share r (T in tokens_unit)"},
        "params": {"domain": fd.param(), "general": fg.param()},
        "r2": {"domain": fd.r2, "general": fg.r2},
        "heldout": heldout_check(curves, holdout),
        "critical_ratio": critical_ratio(ends, general_start, domain_start, tol),
        "cmr": cmr,
        "points": [asdict(c) for c in curves],
    }


def write_fit(suite_dir: str | Path, out: str | Path, **options) -> tuple[dict, list[Path]]:
    """Fit, write OUT/fit.json and OUT/fit.png; returns the result and the files."""
    result = fit_suite(suite_dir, **options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fit.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result, [path, fit_figure(result, out / "fit.png")]


def summary(result: dict) -> list[str]:
    """The lines ``megaevo report --fit`` prints."""
    lines = [f"mixture: domain {result['domain']}, general {result['general']} (axis {result['axis']})"]
    for which in ("domain", "general"):
        ps = ", ".join(f"{k}={v['value']:.4g}±{v['stderr']:.2g}" for k, v in result["params"][which].items())
        lines.append(f"D-CPT law, {which} loss: {ps}; R²={result['r2'][which]:.4f}")
    h = result["heldout"]
    lines.append(f"held out domain share {h['ratio']:g}: " + ", ".join(
        f"{k} predicted {h['predicted'][k]:.4f} measured {h['measured'][k]:.4f} (error {h['rel_error'][k]:.2%})"
        for k in ("domain", "general")))
    c = result["critical_ratio"]
    value = "none" if c["value"] is None else f"{c['value']:.3g}"
    lines.append(f"critical mixture ratio (domain share): {value} (general loss within {c['tolerance']:.4g} of "
                 f"{c['general_before']:.4f}: threshold {c['threshold']:.4f}); {c.get('note', '')}")
    return lines
