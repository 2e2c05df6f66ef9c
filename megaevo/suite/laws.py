"""The mixture laws fitted by :mod:`megaevo.suite.fit` (see there for their sources and the fit).

* D-CPT law at a fixed model size: ``L(D, r) = E + B * r^eta / D^beta + C / (r + eps)^gamma``;
* CMR's loss-vs-tokens law of one mixture ratio: ``L_r(T) = c + a * T^(-b)``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

TOKENS_UNIT = 1e6  # D and T are in millions of tokens
EPS = 0.01         # the D-CPT law's eps: keeps C / (r + eps)^gamma finite at r = 0
DCPT_PARAMS = ("E", "B", "beta", "eta", "C", "gamma")
POWER_PARAMS = ("c", "a", "b")


def dcpt(p: Sequence[float], d: np.ndarray, r: np.ndarray, eps: float = EPS) -> np.ndarray:
    """The D-CPT law at fixed model size: ``E + B * r^eta / D^beta + C / (r + eps)^gamma``."""
    e, b, beta, eta, c, gamma = p
    return e + b * np.power(r, eta) / np.power(d, beta) + c / np.power(r + eps, gamma)


def power(p: Sequence[float], t: np.ndarray) -> np.ndarray:
    """CMR's loss-vs-tokens law of one ratio: ``c + a * T^(-b)``."""
    c, a, b = p
    return c + a * np.power(t, -b)
