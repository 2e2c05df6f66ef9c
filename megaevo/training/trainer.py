"""The training engine: one loop for every stage, one code path for a CPU process, one GPU or torchrun.

    megaevo train --config FILE [key=value ...]
    torchrun --nproc_per_node N -m megaevo.train --config FILE [key=value ...]

:class:`Trainer` runs a stage (megaevo.training.stage; the stages are registered in megaevo.stages,
and whoever launches a run passes their builder) on the actor, a :class:`~megaevo.training.unit.TrainUnit`:
this rank's pipeline chunks on tensor-parallel layers, fp32 gradient buffers and the distributed AdamW.
A step takes `global_batch_size` samples: each DP rank runs its micro-batches through the pipeline
schedule (1F1B, or interleaved with `parallel.virtual_pp` chunks per stage; with PP = 1 simply
forward and backward in turn). Before any backward the step's loss count (its loss tokens, by
default) is summed over every micro-batch and DP rank, and each micro-batch's loss sum is divided by
that global count, so accumulation and data parallelism never change the loss. Gradients accumulate
in the fp32 buffers, and each model chunk's DP reduction starts during its last backward; tied
embeddings first sum their gradients across the first and last stage. Then the optimizer clips on
the global norm and updates. The stage's data position is saved with each checkpoint, so stopping
and resuming (also on another layout with the same global batch) continues the same run.

The components: :mod:`~megaevo.training.restore` (where a run starts), :mod:`~megaevo.training.evaluation`
(validation sets and eval tasks), :mod:`~megaevo.training.signals` (stopping on a signal),
:mod:`~megaevo.training.memory` (the memory check) and :mod:`~megaevo.training.metrics` (the records).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megaevo import kernels
from megaevo.common import resolve_dtype, torch_dtype
from megaevo.config import Config, ConfigError, Layout, config_to_dict, resolve, save_config
from megaevo.data.tokenizer_files import keep_tokenizer
from megaevo.errors import TrainingStopped
from megaevo.log import get_logger
from megaevo.parallel import compat
from megaevo.parallel.distributed import init_distributed
from megaevo.parallel.state import ParallelState, init_parallel_state
from megaevo.checkpoint import (Checkpointer, CheckpointMeta, LoadedCheckpoint, SavedLayout, build_save_plan,
                                         iteration_name, last_verified_checkpoint, set_rng_state)
from megaevo.training.evaluation import Evaluation
from megaevo.training.memory import check_memory
from megaevo.model.flops import flops_per_token
from megaevo.training.metrics import MetricsWriter, memory_gb, peak_flops
from megaevo.training.restore import FINETUNE, RESUME, finished, naming_intact, start_point, warn_on_model_changes
from megaevo.training.schedules import lr_at
from megaevo.training.signals import StopRequest, StopSignals
from megaevo.training.stage import Stage, StageContext
from megaevo.training.unit import TrainUnit, build_model

log = get_logger(__name__)

MAX_BAD_STEPS = 5

StageBuilder = Callable[[Config, Layout, ParallelState, torch.device], Stage]


@dataclass
class RunState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    bad_in_a_row: int = 0


class Trainer:
    """Runs a stage on the actor, optimizer and checkpoints of ``cfg``.

    ``build_stage(cfg, layout, state, device)`` makes the stage once the parallel layout is known
    (:func:`megaevo.stages.build_stage`: the stage the config describes).
    """

    def __init__(self, cfg: Config, build_stage: StageBuilder):
        self.rank, self.world_size, self.device = init_distributed()
        # paths made absolute (a run records them so), stage rl: the global batch is the rollout batch, warmups
        # in iterations (once the run's length is known)
        cfg, self.layout = resolve(cfg, self.world_size, rank=self.rank)
        self.cfg = cfg
        self.state = init_parallel_state(tp=self.layout.tp, dp=self.layout.dp, pp=self.layout.pp,
                                         device_type=self.device.type, sequence_parallel=cfg.parallel.sequence_parallel)
        self.dtype = torch_dtype(resolve_dtype(cfg.train.dtype, self.device.type), what="train.dtype")
        if cfg.train.memory_check:
            with self.kernel_settings():
                check_memory(cfg, self.layout, self.device, self.dtype)
        torch.manual_seed(cfg.train.seed)
        self.actor = TrainUnit(build_model(cfg, self.layout, self.state, self.device, self.dtype), self.state,
                               self.device, self.dtype, parallel=cfg.parallel, optim=cfg.optim,
                               micro_shape=(cfg.train.micro_batch_size, cfg.seq_len, cfg.model.hidden_size))
        self.out_dir = Path(cfg.out_dir)
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", self.rank, self.world_size,
                                         cfg.checkpoint.keep_last, cfg.checkpoint.async_save)
        self.run = RunState()
        self.stage = build_stage(cfg, self.layout, self.state, self.device)
        if cfg.train.epochs is not None:
            self.cfg = cfg = self._epochs_to_iters(cfg)
        self.evaluate = Evaluation(cfg)
        self.stop = StopRequest()  # a signal received by any rank, agreed on through the units' count all-reduce
        for unit in (self.actor, *self.stage.units()):
            unit.join(self.stop, f"stage {self.stage.name!r}")
        self.loaded = False  # whether the run's starting weights came from a checkpoint
        self._flops_per_token = flops_per_token(cfg.model, cfg.seq_len)
        self._peak = peak_flops(self.device)

    @property
    def stop_requested(self) -> bool:
        return self.stop.requested

    def _epochs_to_iters(self, cfg: Config) -> Config:
        """`cfg` running the iterations that `train.epochs` comes to, as the stage counted them."""
        if self.stage.iters is None:
            raise ConfigError(f"train.epochs={cfg.train.epochs:g}: stage {self.stage.name!r} does not count epochs; "
                              f"give the run's length as train.iters (and train.epochs=null)")
        if self.rank == 0:
            log.info(f"train.epochs={cfg.train.epochs:g}: {self.stage.iters:,} iterations of "
                     f"{cfg.train.global_batch_size} samples")
        return resolve(cfg, self.world_size, iters=self.stage.iters, rank=self.rank)[0]

    def context(self) -> StageContext:
        return StageContext(self.actor, self.state, self.device, self.run.iteration)

    def train_step(self) -> dict:
        lr = lr_at(self.run.iteration, self.cfg.optim, self.cfg.train.iters)
        stats = {"lr": lr, **self.stage.run_iteration(self.context(), lr)}
        skipped = bool(stats["skipped"])
        self.run.consumed_samples += self.cfg.train.global_batch_size
        self.run.iteration += 1
        self.run.skipped_steps += skipped
        self.run.bad_in_a_row = self.run.bad_in_a_row + 1 if skipped else 0
        return stats

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self) -> None:
        s, run, optimizer = self.state, self.run, self.actor.optimizer
        meta = CheckpointMeta(
            iteration=run.iteration, consumed_samples=run.consumed_samples,
            tokens=run.consumed_samples * self.stage.tokens_per_sample, optimizer_step=optimizer.step_count,
            skipped_steps=run.skipped_steps,
            scheduler={"iteration": run.iteration, "schedule": self.cfg.optim.schedule},
            layout=SavedLayout(tp=s.tp_size, pp=s.pp_size, dp=s.dp_size, virtual_pp=len(self.actor.chunks),
                               distributed_optimizer=self.actor.buffers.distributed, dtype=str(self.dtype)),
            config=config_to_dict(self.cfg), extra={"stage": self.stage.name, "data": self.stage.train.state_dict()})
        optimizer_state = optimizer.local_state()  # collective over DP with the distributed optimizer
        bad = [f"{name} ({kind})" for name, p in self.actor.params.items()
               for kind, t in (("model", p), *optimizer_state[name].items()) if not bool(torch.isfinite(t).all())]
        if self._any_rank(bool(bad)):
            where = ", ".join(bad[:4]) + (" ..." if len(bad) > 4 else "") if bad else "on another rank"
            raise TrainingStopped(f"not saving iteration {run.iteration}: the model or optimizer state is not finite "
                                  f"({where}). {self._last_good()}")
        plan = build_save_plan(meta, self.actor.params, self.actor.metas, optimizer_state, s, self.rank,
                               self.world_size)
        for kind, named in self.stage.checkpoint_tensors().items():  # under kinds of their own
            if kind in plan.tensors:
                raise ValueError(f"stage {self.stage.name!r}: checkpoint kind {kind!r} is the engine's")
            plan.tensors[kind] = {n: (t, frags) for n, (t, frags, _) in named.items()}
            plan.logical_shapes.update({n: tuple(shape) for n, (_, _, shape) in named.items()})
        self.checkpointer.save(plan)

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank of the job (one all-reduce)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        compat.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _last_good(self) -> str:
        """Where to continue from: the newest checkpoint of this run that verifies (finite, intact)."""
        self.checkpointer.wait()
        if self.rank != 0:  # rank 0 reports the stop; the others need not read every checkpoint too
            return "See rank 0 for the last good checkpoint."
        good = last_verified_checkpoint(self.checkpointer.root)
        if good is None:
            return "This run has no verified checkpoint to resume from."
        return f"The last good checkpoint is {good}; resume from it with checkpoint.load={good}."

    def restore(self) -> bool:
        """Apply `checkpoint.load` (see :func:`megaevo.training.restore.start_point`); False when the run is
        already finished."""
        start = start_point(self.cfg, self.checkpointer, self.rank)
        if start.action == FINETUNE:
            self.load_weights(start.path)
            log.info(f"loaded the weights of {start.path}")
        elif start.action == RESUME:
            if finished(start.path, self.cfg.train.iters, self.out_dir, self.rank):
                return False
            self.resume(start.path)
            log.info(f"resuming from {start.path} ({start.which}) at iteration {self.run.iteration} of "
                     f"{self.cfg.train.iters}")
        return True

    def load_weights(self, path: Path) -> LoadedCheckpoint:
        """Take the weights (and master weights) of checkpoint ``path``, saved in any layout; the
        optimizer starts fresh and the run stays at iteration 0 (fine-tuning, CPT)."""
        with naming_intact(path, "load it with", self.rank):
            return self._load(path, with_optimizer=False)

    def resume(self, path: Path) -> None:
        """Continue the run saved in ``path`` (any layout): weights, optimizer, iteration, data position,
        and the random states when the layout is the same."""
        with naming_intact(path, "resume with", self.rank):
            ck = self._load(path, with_optimizer=True)
            rec = ck.record
            self.run = RunState(rec.iteration, rec.consumed_samples, rec.skipped_steps)
            self.stage.train.load_state_dict(rec.extra.get("data") or {"consumed_samples": rec.consumed_samples})
            s = self.state
            rng = ck.rng(self.rank) if rec.saved_with(self.world_size, s.tp_size, s.pp_size, len(self.actor.chunks)) \
                else None
        if rng is not None:
            set_rng_state(rng)

    def _load(self, path: Path, with_optimizer: bool) -> LoadedCheckpoint:
        ck = LoadedCheckpoint(path)
        warn_on_model_changes(ck, self.cfg, self.rank)
        step = ck.record.optimizer_step if ck.record.optimizer_step is not None else ck.iteration
        self.actor.load(ck, with_optimizer, step)
        self.stage.load_checkpoint(ck, with_optimizer)
        self.loaded = True
        return ck

    # -- the loop ----------------------------------------------------------------------------------
    def kernel_settings(self):
        """The run's `kernels` section as the kernels' defaults, inside the block only (other models in the
        process, before and after the run, keep theirs)."""
        return kernels.settings(self.cfg.kernels.backend, self.cfg.kernels.autotune)

    def fit(self) -> list[dict]:
        """Train to `train.iters` (resuming or starting as `checkpoint.load` says); the logged records."""
        with self.kernel_settings():
            return self._fit()

    def _fit(self) -> list[dict]:
        cfg, t = self.cfg, self.cfg.train
        if not self.restore():
            return []
        self.stage.start(self.context(), self.loaded)
        if self.rank == 0:
            save_config(cfg, self.out_dir / "config.yaml")
            keep_tokenizer(cfg.data.tokenizer, self.out_dir)  # OUT_DIR/tokenizer: the run's own copy
        writer = MetricsWriter(self.out_dir, t.iters, enabled=self.rank == 0, start=self.run.iteration)
        records, clock = [], _Throughput(self.run.consumed_samples * self.stage.tokens_per_sample)
        with StopSignals(cfg.checkpoint.save_on_signal, cfg.checkpoint.save, self.rank) as signals:
            self.stop.signals = signals
            try:
                while self.run.iteration < t.iters:
                    stats = self.train_step()
                    it, bad = self.run.iteration, self.run.bad_in_a_row >= MAX_BAD_STEPS
                    record = self._record(stats, clock) if it % t.log_interval == 0 or it == t.iters or bad else None
                    if t.eval_interval and (it % t.eval_interval == 0 or it == t.iters):
                        record = {**(record or self._position()), **self.evaluate(self.actor, self.stage)}
                    if record is not None:
                        records.append(record)
                        writer.write(record)
                    if bad:
                        raise TrainingStopped(f"{MAX_BAD_STEPS} steps in a row had a non-finite loss or gradient norm "
                                              f"(last at iteration {it}); stopping. {self._last_good()} Lower "
                                              f"optim.lr or check the data.")
                    stop = self._stop_now()
                    if self._should_save(it) or (stop and cfg.checkpoint.save):
                        self.save()
                    if stop:
                        self.checkpointer.wait()  # committed before the run says it stopped
                        saved = f"saved {self.checkpointer.root / iteration_name(it)}" if cfg.checkpoint.save \
                            else "checkpoint.save is off, nothing saved"
                        by = signals.name if signals.received is not None else "a signal to another rank"
                        log.info(f"stopped by {by} at iteration {it}: {saved}; launch the same command again to continue")
                        break
                self.checkpointer.wait()
                if self.run.bad_in_a_row:
                    raise TrainingStopped(f"the run ended on {self.run.bad_in_a_row} step(s) with a non-finite loss or "
                                          f"gradient norm, so their state was not saved. {self._last_good()}")
            except BaseException:
                self._finish_background_save()
                raise
            finally:
                writer.close()
                self.stop.signals = None
        return records

    def _stop_now(self) -> bool:
        """Whether the run stops at this step boundary. A single process stops at the end of the step in
        which its signal arrived; the ranks of a job agree on the step through the loss-count all-reduce
        (:meth:`megaevo.training.unit.TrainUnit.forward_backward`), which may be the next one."""
        if self.world_size == 1 and self.stop.local():
            self.stop.agree(True)
        return self.stop.requested

    def _finish_background_save(self) -> None:
        """On the way out of a run that failed or was interrupted: a checkpoint being written in the
        background is committed first (the daemon thread writing it would die with the process); a
        failure of that save is logged and the run's own error goes on."""
        try:
            self.checkpointer.wait()
        except Exception as e:  # noqa: BLE001
            log.warning(f"the checkpoint being saved in the background failed as well: {e}")

    def _should_save(self, it: int) -> bool:
        c = self.cfg.checkpoint
        if not c.save or not ((c.interval and it % c.interval == 0) or it == self.cfg.train.iters):
            return False
        if self.run.bad_in_a_row:  # the last step was skipped as non-finite: keep `latest` on good state
            if self.rank == 0:
                log.warning(f"not saving iteration {it}: its step had a non-finite loss or gradient norm")
            return False
        return True

    def _position(self) -> dict:
        return {"step": self.run.iteration, "consumed_samples": self.run.consumed_samples,
                "tokens": self.run.consumed_samples * self.stage.tokens_per_sample}

    def _record(self, stats: dict, clock: "_Throughput") -> dict:
        tps = clock.tokens_per_s(self.run.consumed_samples * self.stage.tokens_per_sample)
        metrics = stats.get("metrics") or {}  # a stage's own (run_iteration)
        tps = metrics.get("tokens_per_s", tps)
        return {**self._position(), "loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"], "tokens_per_s": tps,
                "mfu": tps * self._flops_per_token / (self._peak * self.world_size) if self._peak else None,
                "mem_gb": memory_gb(self.device), "skipped_steps": self.run.skipped_steps, **metrics}


class _Throughput:
    """Tokens per second since the previous call."""

    def __init__(self, tokens: int):
        self.time, self.tokens = time.perf_counter(), tokens

    def tokens_per_s(self, tokens: int) -> float:
        now = time.perf_counter()
        rate = (tokens - self.tokens) / max(now - self.time, 1e-9)
        self.time, self.tokens = now, tokens
        return rate
