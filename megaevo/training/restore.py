"""Where a run starts: fresh, resuming a checkpoint (its own, or the one `checkpoint.load` names), or
from another run's weights (`checkpoint.finetune`). The decision is :func:`start_point`; the trainer
carries it out."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from megaevo.config import Config, ConfigError, config_to_dict
from megaevo.log import get_logger
from megaevo.checkpoint import Checkpointer, CheckpointError, LoadedCheckpoint, with_intact_alternative

log = get_logger(__name__)

# Model settings that change the function but not the shape of any weight.
NUMERIC_MODEL_FIELDS = ("rope_theta", "rope_scaling", "norm_eps")

FRESH, RESUME, FINETUNE = "fresh", "resume", "finetune"


@dataclass(frozen=True)
class StartPoint:
    """What a run does first: ``FRESH`` (nothing to load), ``RESUME`` ``path`` (``which`` says why that
    one) or ``FINETUNE`` (take the weights of ``path``)."""

    action: str
    path: Path | None = None
    which: str = ""


def start_point(cfg: Config, checkpointer: Checkpointer, rank: int) -> StartPoint:
    """Apply `checkpoint.load` (see CheckpointConfig).

    The run's own latest checkpoint (out_dir/checkpoints) wins over a path to start from, so a
    relaunch with the same command continues where the run stopped; a path to one of its own
    checkpoints resumes exactly that one; ``none`` starts fresh over whatever is there."""
    c = cfg.checkpoint
    load = c.load or "auto"
    own = checkpointer.resolve("auto")
    if load == "none":
        if own is not None and rank == 0:
            log.warning(f"checkpoint.load=none: starting fresh at iteration 0, although "
                        f"{checkpointer.root} holds checkpoints (the latest {own.name}); they are replaced "
                        f"as the run saves")
        return StartPoint(FRESH)
    target = None if load == "auto" else _named(load, checkpointer)
    if target is not None and target.resolve().parent == checkpointer.root.resolve():
        return StartPoint(RESUME, target, "the checkpoint that checkpoint.load names")
    if own is not None:
        return StartPoint(RESUME, own, "the latest checkpoint in out_dir")
    if target is not None and c.finetune:
        return StartPoint(FINETUNE, target)
    if target is not None:
        return StartPoint(RESUME, target, "checkpoint.load")
    return StartPoint(FRESH)


def _named(load: str, checkpointer: Checkpointer) -> Path | None:
    """The checkpoint `checkpoint.load` names (None when it names an empty run)."""
    if not Path(load).exists():
        raise ConfigError(f"checkpoint.load: {load} does not exist")
    return checkpointer.resolve(load)


@contextlib.contextmanager
def naming_intact(path: Path, how: str, rank: int):
    """A CheckpointError of damaged or incomplete checkpoint ``path`` names the newest intact one beside
    it (rank 0 looks, and reports the error for the job)."""
    try:
        yield
    except CheckpointError as e:
        if rank != 0:
            raise
        raise with_intact_alternative(e, path, how) from None


def finished(path: Path, iters: int, out_dir: Path, rank: int) -> bool:
    """Whether checkpoint ``path`` is at (or past) iteration ``iters``: then its run is finished (said in
    one line), once its files are checked to be whole."""
    with naming_intact(path, "resume with", rank):
        ck = LoadedCheckpoint(path)
        done = ck.iteration
        if done >= iters:  # a finished run's last checkpoint is its result: not one with a file cut short
            ck.check_sizes()
    if done >= iters:
        log.info(f"the run in {out_dir} is finished: {path.name} is at iteration {done} of {iters}; nothing "
                 f"to train (raise train.iters to train on, or checkpoint.load=none to start again)")
    return done >= iters


def warn_on_model_changes(ck: LoadedCheckpoint, cfg: Config, rank: int) -> None:
    """Say which settings the checkpoint's model had differently that the tensor shapes cannot show
    (e.g. rope_theta), in case the change is not meant (it may be: longer-context CPT)."""
    saved = (ck.record.config or {}).get("model") or {}
    ours = config_to_dict(cfg)["model"]
    changed = [f"model.{k}: {saved[k]!r} in the checkpoint, {ours[k]!r} here" for k in NUMERIC_MODEL_FIELDS
               if k in saved and saved[k] != ours.get(k)]
    if changed and rank == 0:
        log.warning(f"{ck.path} was saved with other model settings: " + "; ".join(changed))
