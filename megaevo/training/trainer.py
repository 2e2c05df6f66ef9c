"""The training engine: one loop for every stage, one code path for a CPU process, one GPU or torchrun.

    megaevo train --config FILE [key=value ...]
    torchrun --nproc_per_node N -m megaevo.train --config FILE [key=value ...]

The pieces are built by plain functions — :func:`build_model` (this rank's pipeline chunks on
tensor-parallel layers), :func:`build_optimizer` (fp32 gradient buffers and the distributed AdamW)
and :func:`build_data` (the stage: a batch source and a loss function, see megaevo.stages) — and
:class:`Trainer` runs them. A step takes `global_batch_size` samples: each DP rank runs its
micro-batches through the pipeline schedule (1F1B, or interleaved with `parallel.virtual_pp` chunks
per stage; with PP = 1 simply forward and backward in turn). Before any backward the step's loss
count (its loss tokens, by default) is summed over every micro-batch and DP rank, and each
micro-batch's loss sum is divided by that global count, so accumulation and data parallelism never
change the loss. Gradients accumulate in the fp32 buffers, and each model chunk's DP reduction starts
during its last backward; tied embeddings first sum their gradients across the first and last stage.
Then the optimizer clips on the global norm and updates. The stage's data position is saved with
each checkpoint, so stopping and resuming (also on another layout with the same global batch)
continues the same run.

A stage may take over more of an iteration through optional methods of its Stage object (the RL
stage, megaevo.stages.rl.stage, uses all three; pre-training and SFT have none):

* ``run_iteration(trainer, lr) -> stats``: runs the whole iteration in place of one forward/backward
  and update (RL: a rollout batch, then several updates through :meth:`Trainer.update`); ``stats`` holds
  ``loss``, ``grad_norm`` and ``skipped`` as a default step's do, and ``metrics``, a dict merged into the
  logged record (it may replace ``tokens`` and ``tokens_per_s``);
* ``checkpoint_tensors() -> {kind: {name: (local tensor, fragments, logical shape)}}``: further tensors
  saved with each checkpoint under kinds of their own (e.g. a critic and its optimizer state; never
  ``model``, so exports see only the model), collective over the job like the optimizer's state;
* ``load_checkpoint(ck, resume)``: called once a checkpoint's weights are loaded, ``resume`` false when
  only the weights are taken (``checkpoint.finetune``).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megaevo import kernels
from megaevo.config import (Config, ConfigError, Layout, absolute_paths, config_to_dict,
                            resolve_dtype, save_config, validate, with_iters, with_rl_batch)
from megaevo.data.tokenizer_files import keep_tokenizer
from megaevo.errors import TrainingStopped, UserError
from megaevo.log import get_logger, setup_logging
from megaevo.model.llama import LlamaStage, build_chunks
from megaevo.model.weights import weights_changed
from megaevo.parallel import compat
from megaevo.parallel.data_parallel import GradBuffers
from megaevo.parallel.distributed import init_distributed, report_once
from megaevo.parallel.layers import allreduce_sequence_parallel_grads
from megaevo.parallel.layout import ParamMeta
from megaevo.parallel.pipeline import PipelineEngine, StepStats
from megaevo.parallel.state import ParallelState, init_parallel_state
from megaevo.stages import Batch, LossFunction, Stage
from megaevo.training.checkpoint import (Checkpointer, CheckpointError, CheckpointMeta, LoadedCheckpoint, SavedLayout,
                                         build_save_plan, last_verified_checkpoint, load_local_weights,
                                         read_local_state, set_rng_state, with_intact_alternative)
from megaevo.training.metrics import MetricsWriter, flops_per_token, memory_gb, peak_flops
from megaevo.training.optimizer import STATE_KINDS, DistributedAdamW, StepResult
from megaevo.training.schedules import lr_at

log = get_logger(__name__)

MAX_BAD_STEPS = 5
# Model settings that change the function but not the shape of any weight.
_NUMERIC_MODEL_FIELDS = ("rope_theta", "rope_scaling", "norm_eps")
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# -- builders ------------------------------------------------------------------------------------------
@dataclass
class Model:
    """This rank's model chunks and their parameters by logical name."""

    chunks: list[LlamaStage]
    params: dict[str, torch.nn.Parameter]
    metas: dict[str, ParamMeta]
    chunk_of: dict[str, int]  # logical name -> index of the chunk holding it
    tied: list[torch.nn.Parameter]  # embedding copies on the first and last stage, whose gradients sum

    @property
    def module(self) -> torch.nn.Module:
        return self.chunks[0] if len(self.chunks) == 1 else torch.nn.ModuleList(self.chunks)


def build_model(cfg: Config, layout: Layout, state: ParallelState, device: torch.device,
                dtype: torch.dtype) -> Model:
    chunks = build_chunks(cfg.model, state, virtual_pp=layout.virtual_pp, layers_per_stage=cfg.parallel.pp_layers,
                          seed=cfg.train.seed, device=device, dtype=dtype)
    named = [(c, item) for c, chunk in enumerate(chunks) for item in chunk.named_parameters_with_meta()]
    params = {n: p for _, (n, p, _) in named}
    tied = [params["embedding.weight"]] if cfg.model.tie_embeddings and state.pp_size > 1 \
        and "embedding.weight" in params else []
    return Model(chunks, params, {n: m for _, (n, _, m) in named}, {n: c for c, (n, _, _) in named}, tied)


def build_optimizer(cfg: Config, model: Model, state: ParallelState,
                    dtype: torch.dtype) -> tuple[GradBuffers, DistributedAdamW]:
    """fp32 gradient buffers (each chunk's buckets reduce during its last backward; tied copies wait
    for the sum across stages) and AdamW over them."""
    p, o = cfg.parallel, cfg.optim
    buffers = GradBuffers(model.params, state, dtype, bucket_size=int(p.bucket_size_mb * 2**20 / 4),
                          distributed=p.distributed_optimizer, overlap=p.overlap_grad_reduce, groups=model.chunk_of,
                          deferred={"embedding.weight"} if model.tied else set())
    optimizer = DistributedAdamW(buffers, model.metas, state, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                 weight_decay=o.weight_decay, clip_grad=o.clip_grad)
    return buffers, optimizer


def build_data(cfg: Config, layout: Layout, state: ParallelState, device: torch.device) -> Stage:
    """The stage the config describes (`stage`): pre-training / CPT, supervised fine-tuning or RL."""
    if cfg.stage == "sft":
        from megaevo.stages.sft import sft_stage

        return sft_stage(cfg, layout, state, device)
    if cfg.stage == "rl":
        from megaevo.stages.rl.stage import rl_stage

        return rl_stage(cfg, layout, state, device)
    if cfg.stage != "pretrain":
        raise ConfigError(f"stage={cfg.stage}: unknown stage: use stage=pretrain, stage=sft or stage=rl")
    from megaevo.stages.pretrain import pretrain_stage

    return pretrain_stage(cfg, layout, state, device)


def device_memory(device: torch.device) -> float | None:
    """Bytes of memory per device the run may use: MEGAEVO_DEVICE_MEMORY_GB when set (also on the CPU,
    where it is how a test fakes a small device), else the GPU's total, else None (no check)."""
    fake = os.environ.get("MEGAEVO_DEVICE_MEMORY_GB")
    if fake:
        return float(fake) * 2**30
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return None


def check_memory(cfg: Config, layout: Layout, device: torch.device, dtype: torch.dtype,
                 memory: float | None = None) -> None:
    """Stop before allocating when the planner's estimate of this layout (megaevo.plan) exceeds the
    device's memory (``memory`` bytes; default :func:`device_memory`): UserError naming the biggest term
    and the best layout of this world size that fits."""
    memory = device_memory(device) if memory is None else memory
    if memory is None:
        return
    from megaevo.plan import check_fits, of_config

    backend = kernels.resolve("rms_norm", device, None)
    w, c = of_config(cfg, layout.dp, dtype_bytes=torch.finfo(dtype).bits // 8,
                     kernels="triton" if backend == "triton" else "torch")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or min(layout.world_size, 8)
    fit = check_fits(w, c, memory, per_node)
    if not fit.estimate.fits:
        raise UserError(f"{fit.message()} (train.memory_check=false runs it anyway)")


@dataclass
class RunState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    bad_in_a_row: int = 0


# -- the engine ----------------------------------------------------------------------------------------
class Trainer:
    """Runs a stage on the model, optimizer and checkpoints of ``cfg``.

    ``build_stage(cfg, layout, state, device)`` makes the stage once the parallel layout is known;
    by default :func:`build_data` (the stage the config describes).
    """

    def __init__(self, cfg: Config, build_stage: Callable[[Config, Layout, ParallelState, torch.device], Stage]
                 | None = None):
        # paths made absolute (a run records them so); stage rl: the global batch is the rollout batch
        self.cfg = cfg = with_rl_batch(absolute_paths(cfg))
        self.rank, self.world_size, self.device = init_distributed()
        self.layout = validate(cfg, self.world_size)
        kernels.set_backend(cfg.kernels.backend)
        kernels.set_autotune(cfg.kernels.autotune)
        self.state = init_parallel_state(tp=self.layout.tp, dp=self.layout.dp, pp=self.layout.pp,
                                         device_type=self.device.type, sequence_parallel=cfg.parallel.sequence_parallel)
        self.dtype = _DTYPES[resolve_dtype(cfg.train.dtype, self.device.type)]
        if cfg.train.memory_check:
            check_memory(cfg, self.layout, self.device, self.dtype)
        torch.manual_seed(cfg.train.seed)
        self.net = build_model(cfg, self.layout, self.state, self.device, self.dtype)
        self.chunks, self.params, self.metas = self.net.chunks, self.net.params, self.net.metas
        self.model = self.net.module
        self.buffers, self.optimizer = build_optimizer(cfg, self.net, self.state, self.dtype)
        sp = self.state.tp_size if self.state.sequence_parallel_active else 1
        self.pipeline = PipelineEngine(self.chunks, self.state,
                                       (cfg.train.micro_batch_size, cfg.seq_len // sp, cfg.model.hidden_size),
                                       self.dtype, self.device)
        self.last_step_stats: StepStats | None = None
        self.out_dir = Path(cfg.out_dir)
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", self.rank, self.world_size,
                                         cfg.checkpoint.keep_last, cfg.checkpoint.async_save)
        self.run = RunState()
        self.stage = (build_stage or build_data)(cfg, self.layout, self.state, self.device)
        if cfg.train.epochs is not None:
            self.cfg = cfg = self._epochs_to_iters(cfg)
        elif cfg.optim.warmup_fraction is not None:
            self.cfg = cfg = with_iters(cfg, cfg.train.iters)
        self.eval_tasks = _eval_tasks(cfg)
        self._signals: _StopSignals | None = None  # set while fit() runs
        self.stop_requested = False  # a rank received a stop signal (agreed on by every rank)
        self._flops_per_token = flops_per_token(cfg.model, cfg.seq_len)
        self._peak = peak_flops(self.device)

    def _epochs_to_iters(self, cfg: Config) -> Config:
        """`cfg` running the iterations that `train.epochs` comes to, as the stage counted them."""
        if self.stage.iters is None:
            raise ConfigError(f"train.epochs={cfg.train.epochs:g}: stage {self.stage.name!r} does not count epochs; "
                              f"give the run's length as train.iters (and train.epochs=null)")
        if self.rank == 0:
            log.info(f"train.epochs={cfg.train.epochs:g}: {self.stage.iters:,} iterations of "
                     f"{cfg.train.global_batch_size} samples")
        return with_iters(cfg, self.stage.iters)

    # -- one step ----------------------------------------------------------------------------------
    def _global_count(self, batches: list[Batch], loss: LossFunction) -> float:
        """The loss count of a whole step: every micro-batch of every DP rank (one all-reduce).

        The same all-reduce carries this rank's stop request (a signal received), summed over the
        whole job, so that every rank sets ``stop_requested`` at the same step. It spans the world:
        the TP and PP ranks of a DP rank hold the same batches, so the sum counts each DP rank's
        count TP × PP times."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for b in batches:
            total[0] += torch.as_tensor(loss.count(b), dtype=torch.float64, device=self.device)
        total[1] = float(self._signals is not None and self._signals.received is not None)
        if self.world_size > 1:
            compat.all_reduce(total)
        count, stop = total.tolist()
        self.stop_requested = self.stop_requested or stop > 0
        return count / (self.state.tp_size * self.state.pp_size)

    def _step_loss(self, stats: StepStats, count: float) -> float:
        """The step's loss: the sum over every micro-batch and DP rank divided by ``count``. Also checks
        that the loss function counted what it said it would."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for loss_sum, n in stats.losses:  # only the last stage has losses; the others add zero
            total += torch.stack([loss_sum.double(), torch.as_tensor(n, dtype=torch.float64, device=self.device)])
        for group in (self.state.pp_group, self.state.dp_group):
            if group is not None:
                compat.all_reduce(total, group=group)
        loss_sum, counted = total.tolist()
        if abs(counted - count) > 1e-6 * max(count, 1.0):
            raise RuntimeError(f"stage {self.stage.name!r}: the loss function summed over {counted:g} but its "
                               f"count() promised {count:g} for this step")
        return loss_sum / count if count else float("nan")

    def forward_backward(self, batches: list[Batch], loss: LossFunction, forward_only: bool = False, *,
                         pipeline: PipelineEngine | None = None, buffers: GradBuffers | None = None) -> float:
        """Run ``batches`` through the pipeline (with backward unless ``forward_only``); the global mean loss.

        The gradient buffers average over DP, so each rank's loss sum is scaled by DP / global count:
        the averaged gradient is that of (sum over all ranks) / (global count). ``pipeline`` and
        ``buffers`` default to the model's; a stage passes its own to train a second model (a critic)."""
        own = pipeline is None
        pipeline, buffers = pipeline or self.pipeline, buffers or self.buffers
        count = self._global_count(batches, loss)
        scale = self.state.dp_size / count if count else 0.0
        stats = pipeline.run(batches, loss_fn=loss, loss_scale=scale, forward_only=forward_only,
                             no_sync=None if forward_only else buffers.no_sync)
        if not forward_only and own:
            self.last_step_stats = stats
        return self._step_loss(stats, count)

    def update(self, batches: list[Batch], loss: LossFunction, lr: float) -> tuple[float, StepResult | None]:
        """One optimizer update of the model on ``batches`` (this DP rank's micro-batches): forward and
        backward, gradient reduction, clipping and AdamW at ``lr``. Returns the global mean loss and the
        optimizer's result (None when the loss was not finite and no update was made)."""
        self.buffers.zero_grad()
        self.model.train()
        value = self.forward_backward(batches, loss)
        for p in self.net.tied:
            compat.all_reduce(p.main_grad, group=self.state.embedding_group)
        self.buffers.finish_grad_sync()
        allreduce_sequence_parallel_grads(self.params.values(), self.state, grad_attr="main_grad")
        result = self.optimizer.step(lr) if math.isfinite(value) else None
        weights_changed(*self.chunks)  # cached inference copies of the weights are out of date
        return value, result

    def train_step(self) -> dict:
        lr = lr_at(self.run.iteration, self.cfg.optim, self.cfg.train.iters)
        run_iteration = getattr(self.stage, "run_iteration", None)
        if run_iteration is not None:  # the stage runs the iteration itself (see the module's doc)
            stats = {"lr": lr, **run_iteration(self, lr)}
        else:
            loss, result = self.update(self.stage.train.next_step(), self.stage.loss, lr)
            stats = {"loss": loss, "lr": lr, "grad_norm": result.grad_norm if result else float("nan"),
                     "skipped": result is None or result.skipped}
        skipped = bool(stats["skipped"])
        self.run.consumed_samples += self.cfg.train.global_batch_size
        self.run.iteration += 1
        self.run.skipped_steps += skipped
        self.run.bad_in_a_row = self.run.bad_in_a_row + 1 if skipped else 0
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``val/NAME`` (the stage's loss on each validation set) and ``eval/TASK/METRIC`` (train.eval_tasks)."""
        self.model.eval()
        out = {f"val/{name}": self.forward_backward(batches(), self.stage.loss, forward_only=True)
               for name, batches in self.stage.valid.items()}
        if self.eval_tasks:
            out.update(self._run_eval_tasks())
        self.model.train()
        return out

    def _run_eval_tasks(self) -> dict[str, float]:
        """The eval tasks on the live model (TP shards as they are; DP splits the problems)."""
        from megaevo.eval.tasks import GenerativeTask
        from megaevo.inference.model import Model

        t = self.cfg.train
        tokenizer = self.eval_tasks[0]
        model = Model(self.chunks[0], self.cfg.model, self.state, self.device, self.dtype, tokenizer=tokenizer,
                      eos_ids=(tokenizer.eos_id,) if tokenizer is not None and tokenizer.eos_id is not None else ())
        out = {}
        for task in self.eval_tasks[1]:
            if isinstance(task, GenerativeTask):
                result = task.run(model, batch_size=t.eval_tasks_limit, progress=False,
                                  max_length=t.eval_tasks_max_length, seed=t.seed)
            else:
                result = task.run(model, batch_size=8, progress=False)
            out.update({f"eval/{task.name}/{k}": float(v) for k, v in result["metrics"].items()
                        if isinstance(v, (int, float)) and k != "n"})
        return out

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self) -> None:
        s, run = self.state, self.run
        meta = CheckpointMeta(
            iteration=run.iteration, consumed_samples=run.consumed_samples,
            tokens=run.consumed_samples * self.stage.tokens_per_sample, optimizer_step=self.optimizer.step_count,
            skipped_steps=run.skipped_steps,
            scheduler={"iteration": run.iteration, "schedule": self.cfg.optim.schedule},
            layout=SavedLayout(tp=s.tp_size, pp=s.pp_size, dp=s.dp_size, virtual_pp=len(self.chunks),
                               distributed_optimizer=self.buffers.distributed, dtype=str(self.dtype)),
            config=config_to_dict(self.cfg), extra={"stage": self.stage.name, "data": self.stage.train.state_dict()})
        optimizer_state = self.optimizer.local_state()  # collective over DP with the distributed optimizer
        bad = [f"{name} ({kind})" for name, p in self.params.items()
               for kind, t in (("model", p), *optimizer_state[name].items()) if not bool(torch.isfinite(t).all())]
        if self._any_rank(bool(bad)):
            where = ", ".join(bad[:4]) + (" ..." if len(bad) > 4 else "") if bad else "on another rank"
            raise TrainingStopped(f"not saving iteration {run.iteration}: the model or optimizer state is not finite "
                                  f"({where}). {self._last_good()}")
        plan = build_save_plan(meta, self.params, self.metas, optimizer_state, s, self.rank, self.world_size)
        extra_tensors = getattr(self.stage, "checkpoint_tensors", None)
        if extra_tensors is not None:  # the stage's own tensors, under kinds of their own (see the module's doc)
            for kind, named in extra_tensors().items():
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

    def load_weights(self, path: Path) -> LoadedCheckpoint:
        """Take the weights (and master weights) of checkpoint ``path``, saved in any layout; the
        optimizer starts fresh and the run stays at iteration 0 (fine-tuning, CPT)."""
        with self._naming_intact(path, "load it with"):
            return self._load(path, with_optimizer=False)

    def resume(self, path: Path) -> None:
        """Continue the run saved in ``path`` (any layout): weights, optimizer, iteration, data position,
        and the random states when the layout is the same."""
        with self._naming_intact(path, "resume with"):
            ck = self._load(path, with_optimizer=True)
            rec = ck.record
            self.run = RunState(rec.iteration, rec.consumed_samples, rec.skipped_steps)
            self.stage.train.load_state_dict(rec.extra.get("data") or {"consumed_samples": rec.consumed_samples})
            s = self.state
            rng = ck.rng(self.rank) if rec.saved_with(self.world_size, s.tp_size, s.pp_size, len(self.chunks)) \
                else None
        if rng is not None:
            set_rng_state(rng)

    @contextlib.contextmanager
    def _naming_intact(self, path: Path, how: str):
        """A CheckpointError of damaged or incomplete checkpoint ``path`` names the newest intact one beside
        it (rank 0 looks, and reports the error for the job)."""
        try:
            yield
        except CheckpointError as e:
            if self.rank != 0:
                raise
            raise with_intact_alternative(e, path, how) from None

    def _load(self, path: Path, with_optimizer: bool) -> LoadedCheckpoint:
        ck = LoadedCheckpoint(path)
        self._warn_on_model_changes(ck)
        load_local_weights(ck, self.params, self.metas)
        weights_changed(*self.chunks)
        if not ck.has("master"):  # e.g. an imported model: master weights start from the weights
            self.optimizer.reset_master()
        else:
            kinds = STATE_KINDS if with_optimizer else ("master",)
            step = ck.record.optimizer_step if ck.record.optimizer_step is not None else ck.iteration
            self.optimizer.load_local_state(read_local_state(ck, self.params, self.metas, kinds),
                                            step if with_optimizer else 0)
        load_stage_tensors = getattr(self.stage, "load_checkpoint", None)
        if load_stage_tensors is not None:
            load_stage_tensors(ck, with_optimizer)
        return ck

    def _warn_on_model_changes(self, ck: LoadedCheckpoint) -> None:
        """Say which settings the checkpoint's model had differently that the tensor shapes cannot show
        (e.g. rope_theta), in case the change is not meant (it may be: longer-context CPT)."""
        saved = (ck.record.config or {}).get("model") or {}
        ours = config_to_dict(self.cfg)["model"]
        changed = [f"model.{k}: {saved[k]!r} in the checkpoint, {ours[k]!r} here" for k in _NUMERIC_MODEL_FIELDS
                   if k in saved and saved[k] != ours.get(k)]
        if changed and self.rank == 0:
            log.warning(f"{ck.path} was saved with other model settings: " + "; ".join(changed))

    def restore(self) -> bool:
        """Apply `checkpoint.load` (see CheckpointConfig); False when the run is already finished.

        The run's own latest checkpoint (out_dir/checkpoints) wins over a path to start from, so a
        relaunch with the same command continues where the run stopped; a path to one of its own
        checkpoints resumes exactly that one; ``none`` starts fresh over whatever is there."""
        c = self.cfg.checkpoint
        load = c.load or "auto"
        own = self.checkpointer.resolve("auto")
        if load == "none":
            if own is not None and self.rank == 0:
                log.warning(f"checkpoint.load=none: starting fresh at iteration 0, although "
                            f"{self.checkpointer.root} holds checkpoints (the latest {own.name}); they are replaced "
                            f"as the run saves")
            return True
        target = None if load == "auto" else self._start_point(load)
        if target is not None and self._is_own(target):
            return self._continue(target, "the checkpoint that checkpoint.load names")
        if own is not None:
            return self._continue(own, "the latest checkpoint in out_dir")
        if target is not None and c.finetune:
            self.load_weights(target)
            log.info(f"loaded the weights of {target}")
        elif target is not None:
            return self._continue(target, "checkpoint.load")
        return True

    def _start_point(self, load: str) -> Path | None:
        """The checkpoint `checkpoint.load` names (None when it names an empty run)."""
        if not Path(load).exists():
            raise ConfigError(f"checkpoint.load: {load} does not exist")
        return self.checkpointer.resolve(load)

    def _is_own(self, path: Path) -> bool:
        return path.resolve().parent == self.checkpointer.root.resolve()

    def _continue(self, path: Path, which: str) -> bool:
        """Resume ``path`` (one line saying so), or say the run is finished and return False."""
        iters = self.cfg.train.iters
        with self._naming_intact(path, "resume with"):
            ck = LoadedCheckpoint(path)
            done = ck.iteration
            if done >= iters:  # a finished run's last checkpoint is its result: not one with a file cut short
                ck.check_sizes()
        if done >= iters:
            log.info(f"the run in {self.out_dir} is finished: {path.name} is at iteration {done} of {iters}; nothing "
                     f"to train (raise train.iters to train on, or checkpoint.load=none to start again)")
            return False
        self.resume(path)
        log.info(f"resuming from {path} ({which}) at iteration {self.run.iteration} of {iters}")
        return True

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        cfg, t = self.cfg, self.cfg.train
        if not self.restore():
            return []
        if self.rank == 0:
            save_config(cfg, self.out_dir / "config.yaml")
            keep_tokenizer(cfg.data.tokenizer, self.out_dir)  # OUT_DIR/tokenizer: the run's own copy
        writer = MetricsWriter(self.out_dir, t.iters, enabled=self.rank == 0, start=self.run.iteration)
        records, clock = [], _Throughput(self.run.consumed_samples * self.stage.tokens_per_sample)
        with _StopSignals(cfg.checkpoint.save_on_signal, cfg.checkpoint.save, self.rank) as self._signals:
            signals = self._signals
            try:
                while self.run.iteration < t.iters:
                    stats = self.train_step()
                    it, bad = self.run.iteration, self.run.bad_in_a_row >= MAX_BAD_STEPS
                    record = self._record(stats, clock) if it % t.log_interval == 0 or it == t.iters or bad else None
                    if t.eval_interval and (it % t.eval_interval == 0 or it == t.iters):
                        record = {**(record or self._position()), **self.evaluate()}
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
                        saved = f"saved {self.checkpointer.root / f'iter_{it:07d}'}" if cfg.checkpoint.save \
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
                self._signals = None
        return records

    def _stop_now(self) -> bool:
        """Whether the run stops at this step boundary. A single process stops at the end of the step in
        which its signal arrived; the ranks of a job agree on the step through the loss-count all-reduce
        (:meth:`_global_count`), which may be the next one."""
        if self.world_size == 1 and self._signals is not None and self._signals.received is not None:
            self.stop_requested = True
        return self.stop_requested

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
        return {"step": self.run.iteration, "consumed_samples": self.run.consumed_samples}

    def _record(self, stats: dict, clock: "_Throughput") -> dict:
        tps = clock.tokens_per_s(self.run.consumed_samples * self.stage.tokens_per_sample)
        metrics = stats.get("metrics") or {}  # a stage's own (run_iteration)
        tps = metrics.get("tokens_per_s", tps)
        return {**self._position(), "tokens": self.run.consumed_samples * self.stage.tokens_per_sample,
                "loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"], "tokens_per_s": tps,
                "mfu": tps * self._flops_per_token / (self._peak * self.world_size) if self._peak else None,
                "mem_gb": memory_gb(self.device), "skipped_steps": self.run.skipped_steps, **metrics}


def _eval_tasks(cfg: Config) -> tuple | None:
    """(tokenizer, tasks) for train.eval_tasks, resolved at start so that a bad spec fails at once."""
    t = cfg.train
    if not t.eval_tasks:
        return None
    from megaevo.data.tokenizers import load_tokenizer
    from megaevo.eval.lm_loss import LossTask
    from megaevo.eval.tasks import resolve_task

    tasks = [resolve_task(spec, t.eval_tasks_data_dir, limit=t.eval_tasks_limit) for spec in t.eval_tasks]
    if not cfg.data.tokenizer:
        texts = [spec for spec, task in zip(t.eval_tasks, tasks) if not isinstance(task, LossTask)]
        if texts:
            raise ConfigError(f"train.eval_tasks: {', '.join(texts)} need the tokenizer: set data.tokenizer")
        return None, tasks
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data.tokenizer {cfg.data.tokenizer} has {tokenizer.vocab_size} tokens, more than "
                          f"model.vocab_size={cfg.model.vocab_size}")
    return tokenizer, tasks


class _StopSignals:
    """Turns SIGTERM, SIGINT and SIGUSR1 into a request to save and stop at the end of the current step
    (when ``active``; ``saving``: checkpoint.save). The first signal is acknowledged at once with one
    line. Later ones never interrupt: the run still commits its checkpoint (a background save
    included) and stops, and each says so; only SIGKILL ends it sooner, which leaves the checkpoints
    already committed as they are. Rank 0 speaks at WARNING, the other ranks at INFO. Handlers are
    only installed in the main thread, and the previous ones come back on exit."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self, active: bool, saving: bool = True, rank: int = 0):
        self.active = active and threading.current_thread() is threading.main_thread()
        self.saving, self.rank = saving, rank
        self.received: int | None = None
        self._previous: dict = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "nothing"

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            self._say(f"{name} received: saving a checkpoint at the end of this step, then stopping (a second "
                      f"Ctrl-C waits for the save)" if self.saving else
                      f"{name} received: stopping at the end of this step (checkpoint.save is off: nothing is saved)")
        else:
            self._say(f"{name} received: already stopping; waiting for the checkpoint to be committed (kill -9 "
                      f"{os.getpid()} ends the run now, without it)" if self.saving else
                      f"{name} received: already stopping at the end of this step")

    def _say(self, message: str) -> None:
        (log.warning if self.rank == 0 else log.info)(message)

    def __enter__(self) -> "_StopSignals":
        if self.active:
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    sig = getattr(signal, name)
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Throughput:
    """Tokens per second since the previous call."""

    def __init__(self, tokens: int):
        self.time, self.tokens = time.perf_counter(), tokens

    def tokens_per_s(self, tokens: int) -> float:
        now = time.perf_counter()
        rate = (tokens - self.tokens) / max(now - self.time, 1e-9)
        self.time, self.tokens = now, tokens
        return rate


_EPILOG = """Settings are the dataclasses of megaevo/config.py: stage (pretrain, sft or rl), then one section
each: model (megaevo/model/args.py; model.preset fills it), parallel, data, train, optim, checkpoint, kernels,
sft, rl, and out_dir. Give them in the YAML file and/or as dotted overrides (optim.lr=3e-4 parallel.tp=2);
--print-config shows every key with its resolved value."""


def main(argv: list[str] | None = None) -> int:
    """`megaevo train` and `python -m megaevo.train` (also under torchrun). A mistake in the config,
    the data or a checkpoint is one line on rank 0 and exit code 2 on every rank; a run stopped by
    non-finite steps exits with 3; a stop by signal after saving exits with 0 (however many signals came:
    the checkpoint is committed first). An interrupt before training starts, or with
    checkpoint.save_on_signal off, exits with 130 without saving."""
    import argparse

    import yaml

    from megaevo.config import load_config

    p = argparse.ArgumentParser(prog="megaevo train", description="train (single process, or under torchrun)",
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key, defaults included) as YAML and exit")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 optim.lr=3e-4")
    args = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)
    setup_logging(rank)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.print_config:
            init_distributed()  # first, so that a mistake in the config is reported once for the job
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            if rank == 0:
                print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False), end="")
            return 0
        Trainer(cfg).fit()
        return 0
    except UserError as e:
        report_once(str(e), rank)
        return 2
    except TrainingStopped as e:  # decided together by all ranks: rank 0 says it
        if rank == 0:
            log.error(str(e))
        return 3
    except KeyboardInterrupt:
        report_once("interrupted, without saving (the checkpoints already committed are intact)", rank)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
