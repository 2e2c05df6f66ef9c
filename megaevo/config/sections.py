"""The sections every stage shares: `parallel`, `data`, `train`, `optim`, `checkpoint`, `kernels`, and their
checks (each returns a list of messages, one per problem, naming the setting to change).

The optimizer's `warmup_fraction` becomes `warmup` iterations here (:func:`resolve_warmup`), once the run's
length is known; megaevo.config.resolution calls it from the one resolve step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional, Union

from megaevo.data.blended import parse_blend
from megaevo.model.args import layout_errors, shape_errors

if TYPE_CHECKING:  # annotations only: the root imports this module
    from megaevo.config.root import Config


@dataclass
class ParallelConfig:
    """Tensor (tp), pipeline (pp, virtual_pp stages per rank) and data parallelism.

    The data-parallel size is what the world size leaves: world_size / (tp * pp).
    `pp_layers` gives an uneven split: layers per (virtual) stage, pp * virtual_pp entries.
    Sequence parallelism with tp=1 is allowed and does nothing.
    """

    tp: int = 1
    pp: int = 1
    virtual_pp: int = 1
    pp_layers: Optional[list[int]] = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    bucket_size_mb: float = 25.0
    overlap_grad_reduce: bool = True


@dataclass
class DataConfig:
    """Training blend, extra validation sets, and sample length.

    `train` takes any blend `megaevo.data.blended.parse_blend` reads: `[0.95, data/math, 0.05,
    data/web]`, a list of prefixes, or `{name: {prefix: ..., weight: ...}}`. `valid` names further
    whole datasets to report a validation loss on: `{name: prefix}`. `seq_len` None means the
    model's max_seq_len. With `stage: sft` the prefixes are SFT datasets (conversations with loss
    masks) and `split` divides each dataset's conversations; see megaevo.stages.sft.
    `train_samples` (pre-training; None: train.iters × global_batch_size) is the number of training
    samples the sample order is built for: runs of different lengths that share it (and the seed and
    blend) read the same samples in the same order. It must be at least the run's samples. The suite
    sets it for the budgets of a WSD / Inf-Cos stage that branch from one stable run.
    `tokenizer` (a SentencePiece .model, a tokenizer.json or a directory holding one): a run copies it
    into OUT_DIR/tokenizer/ when it starts, so its checkpoints keep it (megaevo.data.tokenizer_files).
    """

    train: Union[list, dict] = field(default_factory=list)
    valid: dict[str, str] = field(default_factory=dict)
    seq_len: Optional[int] = None
    split: str = "969,30,1"
    train_samples: Optional[int] = None
    cache_dir: Optional[str] = None
    tokenizer: Optional[str] = None


@dataclass
class TrainConfig:
    """Batch sizes (in samples), length of the run (in iterations), seeds and intervals.

    `epochs` (null: off), when set, replaces `iters`: the run lasts ceil(epochs × samples per epoch /
    global_batch_size) iterations, counted by the stage from its data (stage sft; fractions allowed).
    `epochs` wins over an `iters` in the same file (a run's saved config.yaml holds both: `iters` is
    the count `epochs` came to); `train.iters` given as an override while the file sets `epochs` is
    an error naming both keys (add `train.epochs=null` to count iterations), as Megatron-LM refuses
    two lengths for one run.

    dtype "auto" means bf16 on CUDA and fp32 on the CPU (see resolve_dtype). An interval of 0
    turns that action off.

    `eval_tasks` are evaluation task specs (as `megaevo eval --tasks` takes them: an EvoLM set's name
    or jsonl, `rg:NAME[:COUNT[:SEED]]`, a multiple-choice jsonl, a dataset prefix), each run on its
    first `eval_tasks_limit` problems at every `eval_interval`, greedy with the `evolm` template and
    at most `eval_tasks_max_length` tokens; their metrics are logged as `eval/NAME/METRIC`. Generative
    tasks need `data.tokenizer` and PP = 1.

    `memory_check`: on a GPU, the run first estimates its memory per GPU (megaevo.plan) and stops before
    allocating when the estimate exceeds the device's memory; false skips the check (an estimate is a
    model, not a measurement).
    """

    micro_batch_size: int = 1
    global_batch_size: int = 8
    iters: int = 1000
    epochs: Optional[float] = None
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 10
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    eval_tasks: list[str] = field(default_factory=list)
    eval_tasks_limit: int = 32
    eval_tasks_max_length: int = 512
    eval_tasks_data_dir: Optional[str] = None
    memory_check: bool = True


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (see megaevo.training.schedules).

    `warmup` and every `*_iters` count iterations; a `warmup` longer than the run is allowed (the
    learning rate then never reaches `lr`). `warmup_fraction`, when set, replaces `warmup` by that
    share of the run's iterations (rounded; also when `train.epochs` gives the length). cosine / linear decay to `min_lr` at
    `decay_iters` (None: the end of training). wsd holds `lr` and decays over the final
    `decay_fraction` of training with shape `decay_style`. inf-cos cools down from `lr` to
    `constant_lr` over `cooldown_iters` (cosine), holds it, and anneals to `min_lr` over the
    final `anneal_iters` (None: `anneal_fraction` of training) with shape `anneal_style`.
    """

    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 100
    warmup_fraction: Optional[float] = None
    schedule: Literal["cosine", "linear", "wsd", "inf-cos", "constant"] = "cosine"
    decay_iters: Optional[int] = None
    decay_fraction: float = 0.2
    decay_style: Literal["linear", "cosine", "sqrt", "exp"] = "linear"
    cooldown_iters: int = 0
    constant_lr: Optional[float] = None
    anneal_iters: Optional[int] = None
    anneal_fraction: float = 0.1
    anneal_style: Literal["linear", "cosine", "sqrt", "exp"] = "exp"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class CheckpointConfig:
    """Saving every `interval` iterations (0: only at the end), keeping the last `keep_last`
    (None: all). `load`: "auto" (the default; null means the same) resumes the latest checkpoint
    under out_dir when there is one, so launching the same command again continues the run (a
    finished run says so and trains nothing); "none" starts fresh at iteration 0 even over existing
    checkpoints; a path (one that does not exist stops the run, naming it) is where the run starts
    from until it has checkpoints of its own, which a relaunch then resumes instead (a path to one of
    the run's own checkpoints resumes exactly that one). `finetune`: take only the model weights from
    `load` and start at iteration 0 with a fresh optimizer and data position (continued pre-training,
    SFT). `async_save` is the YAML key `async`.
    `save_on_signal`: on SIGTERM, SIGINT or SIGUSR1 (a scheduler's preemption or time-limit warning),
    save a checkpoint at the next step boundary and exit cleanly."""

    interval: int = 1000
    keep_last: Optional[int] = None
    load: Optional[str] = "auto"
    finetune: bool = False
    async_save: bool = field(default=False, metadata={"yaml": "async"})
    save: bool = True
    save_on_signal: bool = True


@dataclass
class KernelsConfig:
    """Which implementation runs the fused ops: auto (Triton on CUDA, torch on the CPU).

    ``autotune``: time a few tiles per shape and keep the fastest (kernels with tile choices, on a
    GPU). Off, every launch uses a fixed tile per head dim, so reruns and resumes sum in the same
    order on the same hardware; the environment variable MEGAEVO_KERNEL_AUTOTUNE=0/1 wins.
    """

    backend: Literal["auto", "triton", "torch", "apex"] = "auto"
    autotune: bool = True



# ---------------------------------------------------------------- derived values


def resolve_warmup(o: OptimConfig, iters: int) -> OptimConfig:
    """`o` with `warmup` the iterations `warmup_fraction` (when set and valid) comes to in a run of `iters`."""
    if o.warmup_fraction is None or not 0 <= o.warmup_fraction < 1:
        return o
    return dataclasses.replace(o, warmup=int(round(o.warmup_fraction * iters)))


# ---------------------------------------------------------------- checks


def model_errors(cfg: "Config") -> list[str]:
    """The model's shape, its split over TP and PP (megaevo.model.args, as the model builder and the
    converters check them) and the sample length it can take."""
    p = cfg.parallel
    errors = shape_errors(cfg.model) + layout_errors(cfg.model, p.tp, p.pp, p.virtual_pp, p.pp_layers)
    if cfg.seq_len > cfg.model.max_seq_len or cfg.seq_len < 1:
        errors.append(f"data.seq_len={cfg.seq_len} must be between 1 and model.max_seq_len={cfg.model.max_seq_len}: "
                      f"lower data.seq_len or raise model.max_seq_len")
    return errors


def optim_errors(o: OptimConfig, iters: int | None) -> list[str]:
    """The optimizer's settings; those about the run's length only when `iters` is known."""
    errors = []
    if o.lr < 0 or o.min_lr < 0:
        errors.append(f"optim.lr={o.lr} and optim.min_lr={o.min_lr} must not be negative")
    if o.lr < o.min_lr:
        errors.append(f"optim.lr={o.lr} is below optim.min_lr={o.min_lr}: lower min_lr or raise lr")
    if o.warmup_fraction is not None and not 0 <= o.warmup_fraction < 1:
        errors.append(f"optim.warmup_fraction={o.warmup_fraction} must be at least 0 and below 1 (e.g. 0.1 for 10%)")
    if o.warmup < 0:
        errors.append(f"optim.warmup={o.warmup} must not be negative")
    if o.decay_iters is not None and o.decay_iters < o.warmup:
        errors.append(f"optim.decay_iters={o.decay_iters} is shorter than optim.warmup={o.warmup}")
    if not 0 <= o.decay_fraction <= 1 or not 0 <= o.anneal_fraction <= 1:
        errors.append("optim.decay_fraction and optim.anneal_fraction must be between 0 and 1")
    if o.schedule == "wsd" and o.decay_style == "exp" and o.min_lr <= 0:
        errors.append("optim.decay_style=exp needs optim.min_lr > 0 (or choose linear, cosine or sqrt)")
    if o.schedule == "inf-cos":
        if o.constant_lr is None:
            errors.append("optim.schedule=inf-cos needs optim.constant_lr (the learning rate after cool-down)")
        elif not o.min_lr <= o.constant_lr <= o.lr:
            errors.append(f"optim.constant_lr={o.constant_lr} must lie between optim.min_lr={o.min_lr} "
                          f"and optim.lr={o.lr}")
        if o.anneal_style == "exp" and o.min_lr <= 0:
            errors.append("optim.anneal_style=exp needs optim.min_lr > 0 (or choose linear, cosine or sqrt)")
        anneal = o.anneal_iters if o.anneal_iters is not None or iters is None else round(o.anneal_fraction * iters)
        if iters is not None and (o.cooldown_iters < 0 or anneal < 0 or o.warmup + o.cooldown_iters + anneal > iters):
            errors.append(f"optim.warmup + optim.cooldown_iters + anneal iterations = "
                          f"{o.warmup} + {o.cooldown_iters} + {anneal} exceed train.iters={iters}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        errors.append(f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    if o.eps <= 0 or o.weight_decay < 0 or o.clip_grad < 0:
        errors.append("optim.eps must be positive; optim.weight_decay and optim.clip_grad must not be negative")
    return errors


def optim_warnings(o: OptimConfig, iters: int | None) -> list[str]:
    """What is allowed but worth saying about the optimizer in a run of `iters` (None: not known yet)."""
    if iters is None or o.warmup < 0 or o.warmup <= iters:
        return []
    # A shortened run: as in Megatron-LM, the warm-up simply does not end before the run does.
    peak = o.lr * max(iters - 1, 0) / o.warmup
    return ["optim.warmup=%d is longer than train.iters=%d: the learning rate never reaches optim.lr=%g "
            "(it rises to %.3g at the last step)" % (o.warmup, iters, o.lr, peak)]


def train_errors(cfg: "Config") -> list[str]:
    """The `train` and `checkpoint` sections and the training blend `data.train`."""
    t, c, errors = cfg.train, cfg.checkpoint, []
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        errors.append("train.micro_batch_size and train.global_batch_size must be at least 1")
    for name in ("iters", "log_interval", "eval_interval", "eval_iters"):
        if getattr(t, name) < 0:
            errors.append(f"train.{name} must not be negative")
    if c.interval < 0 or (c.keep_last is not None and c.keep_last < 1):
        errors.append("checkpoint.interval must not be negative and checkpoint.keep_last must be at least 1 (or null)")
    if t.eval_tasks:
        if t.eval_tasks_limit < 1 or t.eval_tasks_max_length < 2:
            errors.append("train.eval_tasks_limit must be at least 1 and train.eval_tasks_max_length at least 2")
        if cfg.parallel.pp > 1:
            errors.append(f"train.eval_tasks runs on the training model, which cannot generate with parallel.pp="
                          f"{cfg.parallel.pp} yet: evaluate the checkpoints with `megaevo eval` instead")
    if cfg.data.train:
        try:
            parse_blend(cfg.data.train)
        except ValueError as e:
            errors.append(f"data.train: {e}")
    return errors
