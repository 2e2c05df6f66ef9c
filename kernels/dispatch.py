"""Choosing a kernel backend.

Each fused op exists as a Triton kernel and as a plain-torch reference (and, for the norm and
the optimizer, as an apex kernel when apex is importable). The backend for one call is, first
found wins:

1. the ``backend=`` argument of the call;
2. the environment variable ``MEGAEVO_KERNEL_BACKEND``;
3. the process default set by :func:`set_backend` (the config's ``kernels.backend``), ``auto``.

A configured (not per-call) ``apex`` means apex for the ops that have it and ``auto`` for the rest.
``auto`` runs Triton when the tensors are on a CUDA device and Triton imports, else the
reference. ``triton`` forced on CPU tensors works only under ``TRITON_INTERPRET=1`` (Triton's
interpreter, slow, for tests). Triton is an optional import: without it only the references run.

Kernels with tile choices (attention) autotune on a GPU by default: each process times a few
tiles per shape and keeps the fastest. Timing noise can pick another tile in another run, and
another tile sums in another order, so a resumed run is then not bit-identical. With autotuning
off (:func:`set_autotune`, the config's ``kernels.autotune``, or ``MEGAEVO_KERNEL_AUTOTUNE=0``,
which wins) every kernel launches with a fixed tile per head dim: the same on every run.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from functools import lru_cache

import torch

BACKENDS = ("auto", "triton", "torch", "apex")
APEX_OPS = ("rms_norm", "adamw")
ENV_VAR = "MEGAEVO_KERNEL_BACKEND"
AUTOTUNE_ENV_VAR = "MEGAEVO_KERNEL_AUTOTUNE"

_default_backend = "auto"
_default_autotune = True


def _check_name(name: str, where: str) -> str:
    value = str(name).strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{where}: unknown kernel backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return value


def set_backend(name: str) -> None:
    """Set the process-wide default backend (what the config's ``kernels.backend`` says)."""
    global _default_backend
    _default_backend = _check_name(name, "kernels.backend")


def get_backend() -> str:
    """The backend asked for when a call names none: the environment variable, else the default."""
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, ENV_VAR)
    return _default_backend


def set_autotune(enabled: bool) -> None:
    """Set the process-wide default for autotuning (what the config's ``kernels.autotune`` says)."""
    global _default_autotune
    _default_autotune = bool(enabled)


@contextlib.contextmanager
def settings(backend: str, autotune: bool):
    """The default backend and autotuning set to ``backend`` / ``autotune`` inside the block, and the
    previous defaults back after it (a run's ``kernels`` section holds only while it trains)."""
    global _default_backend, _default_autotune
    previous = _default_backend, _default_autotune
    set_backend(backend)
    set_autotune(autotune)
    try:
        yield
    finally:
        _default_backend, _default_autotune = previous


def autotune_enabled() -> bool:
    """Whether kernels with tile choices time them (``MEGAEVO_KERNEL_AUTOTUNE``, else the default)."""
    env = os.environ.get(AUTOTUNE_ENV_VAR)
    if env is None or not env.strip():
        return _default_autotune
    value = env.strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{AUTOTUNE_ENV_VAR}: expected 1/0 (or true/false, on/off, yes/no), got {env!r}")


@lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton can be imported."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    if triton_available():
        import triton

        knobs = getattr(triton, "knobs", None)
        if knobs is not None:
            return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@lru_cache(maxsize=None)
def apex_available() -> bool:
    """Whether apex with its fused CUDA extensions can be imported."""
    try:
        importlib.import_module("apex")
        importlib.import_module("amp_C")
        importlib.import_module("apex.normalization.fused_layer_norm")
    except Exception:
        return False
    return True


def resolve(op: str, device: torch.device, backend: str | None = None) -> str:
    """The backend that runs ``op`` on tensors on ``device``: ``'triton'``, ``'torch'`` or ``'apex'``.

    Raises a clear error when a forced backend cannot run here.
    """
    name = _check_name(backend, f"{op}(backend=...)") if backend is not None else get_backend()
    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: kernel backend 'triton' was asked for but triton is not installed")
        if not on_cuda and not interpreting():
            raise RuntimeError(
                f"{op}: kernel backend 'triton' on {torch.device(device).type} tensors needs a CUDA device, "
                "or TRITON_INTERPRET=1 (set before the first Triton kernel is used) to run Triton's interpreter"
            )
        return "triton"
    if name == "apex" and op not in APEX_OPS:
        if backend is not None:
            raise RuntimeError(f"{op}: kernel backend 'apex' exists only for {', '.join(APEX_OPS)}")
        return resolve(op, device, "auto")  # a configured 'apex' means: apex where it exists, else auto
    if name == "apex":
        if not apex_available():
            raise RuntimeError(f"{op}: kernel backend 'apex' was asked for but apex (with amp_C) is not importable")
        if not on_cuda:
            raise RuntimeError(f"{op}: kernel backend 'apex' needs CUDA tensors")
        return "apex"
    return "torch"


def triton_module(name: str):
    """The Triton implementation ``megaevo.kernels.jit.<name>``, imported on its first use.

    Triton decides at ``@triton.jit`` time whether a kernel is compiled or interpreted, so the
    kernels are defined only when first needed: ``TRITON_INTERPRET`` set before then takes effect.
    """
    return importlib.import_module(f"{__package__}.jit.{name}")
