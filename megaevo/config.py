"""Every setting of a run: dataclasses, a YAML file, dotted overrides, and validation.

    cfg = load_config("run.yaml", ["parallel.tp=2", "optim.lr=3e-4"])
    layout = validate(cfg, world_size=8)      # Layout(tp=2, pp=1, dp=4, ...)

A YAML file holds the top-level `stage` (pretrain | sft | rl), the sections `model`, `parallel`,
`data`, `train`, `optim`, `checkpoint`, `kernels`, `sft` and the top-level `out_dir`. Overrides
`key.sub=value` apply after the file, in order; their values are read as YAML (`parallel.tp=2`,
`optim.betas=[0.9,0.95]`, `checkpoint.load=null`).
`model.preset: evolm-1b` fills the model's shape fields, and fields given beside it (or by a later
override) win. Unknown keys and wrongly typed values raise ConfigError naming the dotted key; a
layout the world size cannot run raises ConfigError from validate() saying what to change.

The `model` section is the model's shape itself, :class:`megaevo.model.args.ModelArgs` (named
ModelConfig here), with its presets in :mod:`megaevo.model.presets`; reading YAML into these
dataclasses is :mod:`megaevo.configio`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from megaevo import configio
from megaevo.configio import ConfigError, errors_message
from megaevo.model.args import ModelArgs, layout_errors, shape_errors
from megaevo.model.presets import PRESETS, preset_values

ModelConfig = ModelArgs  # the `model` section: one class for the model's shape

__all__ = ["PRESETS", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "KernelsConfig", "Layout",
           "ModelConfig", "OptimConfig", "ParallelConfig", "SFTConfig", "TrainConfig", "config_from_dict",
           "config_to_dict", "load_config", "preset_values", "resolve_dtype", "save_config", "validate",
           "with_iters"]


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
    """

    train: Union[list, dict] = field(default_factory=list)
    valid: dict[str, str] = field(default_factory=dict)
    seq_len: Optional[int] = None
    split: str = "969,30,1"
    cache_dir: Optional[str] = None
    tokenizer: Optional[str] = None


@dataclass
class TrainConfig:
    """Batch sizes (in samples), length of the run (in iterations), seeds and intervals.

    `epochs` (null: off), when set, replaces `iters`: the run lasts ceil(epochs × samples per epoch /
    global_batch_size) iterations, counted by the stage from its data (stage sft; fractions allowed).

    dtype "auto" means bf16 on CUDA and fp32 on the CPU (see resolve_dtype). An interval of 0
    turns that action off.

    `eval_tasks` are evaluation task specs (as `megaevo eval --tasks` takes them: an EvoLM set's name
    or jsonl, `rg:NAME[:COUNT[:SEED]]`, a multiple-choice jsonl, a dataset prefix), each run on its
    first `eval_tasks_limit` problems at every `eval_interval`, greedy with the `evolm` template and
    at most `eval_tasks_max_length` tokens; their metrics are logged as `eval/NAME/METRIC`. Generative
    tasks need `data.tokenizer` and PP = 1.
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


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (see megaevo.training.schedules).

    `warmup` and every `*_iters` count iterations; a `warmup` longer than the run is allowed (the
    learning rate then never reaches `lr`). cosine / linear decay to `min_lr` at
    `decay_iters` (None: the end of training). wsd holds `lr` and decays over the final
    `decay_fraction` of training with shape `decay_style`. inf-cos cools down from `lr` to
    `constant_lr` over `cooldown_iters` (cosine), holds it, and anneals to `min_lr` over the
    final `anneal_iters` (None: `anneal_fraction` of training) with shape `anneal_style`.
    """

    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 100
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
    (None: all). `load` is None (start fresh), "auto" (the latest checkpoint under out_dir, if
    any) or a path. `finetune`: take only the model weights from `load` and start at iteration 0
    with a fresh optimizer and data position (continued pre-training, SFT); once the run has saved
    checkpoints of its own, a restart resumes those instead. `async_save` is the YAML key `async`.
    `save_on_signal`: on SIGTERM, SIGINT or SIGUSR1 (a scheduler's preemption or time-limit warning),
    save a checkpoint at the next step boundary and exit cleanly."""

    interval: int = 1000
    keep_last: Optional[int] = None
    load: Optional[str] = None
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


@dataclass
class SFTConfig:
    """Supervised fine-tuning (`stage: sft`, megaevo.stages.sft).

    `packing`: several conversations per sequence of seq_len tokens, attention kept within each
    conversation; false: one conversation per sequence, padded to seq_len. `cutoff`: the most tokens
    of a conversation (null: seq_len; at most seq_len); longer ones are cut to it with `truncate`,
    else dropped. `loss_normalization`: `global_tokens` divides the loss summed over the step's loss
    tokens by their number (every micro-batch and DP rank); `micro_batch_mean` averages each
    micro-batch's mean over its own loss tokens (a micro-batch without loss tokens is left out).
    """

    packing: bool = True
    cutoff: Optional[int] = None
    truncate: bool = True
    loss_normalization: Literal["global_tokens", "micro_batch_mean"] = "global_tokens"


@dataclass
class Config:
    stage: Literal["pretrain", "sft", "rl"] = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    out_dir: str = "runs/megaevo"

    @property
    def seq_len(self) -> int:
        """Training sample length: data.seq_len, else the model's max_seq_len."""
        return self.data.seq_len if self.data.seq_len is not None else self.model.max_seq_len


@dataclass(frozen=True)
class Layout:
    """How a world of processes splits into tensor, pipeline and data parallel groups."""

    world_size: int
    tp: int
    pp: int
    dp: int
    virtual_pp: int
    micro_batches_per_step: int  # global batch / (micro batch × dp): gradient-accumulation steps


def resolve_dtype(dtype: str, device_type: str) -> str:
    """The compute dtype a run uses: "auto" is bf16 on CUDA and fp32 elsewhere."""
    if dtype == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return dtype


# ---------------------------------------------------------------- YAML (see megaevo.configio)


def config_from_dict(raw: dict | None, overrides: list[str] | tuple[str, ...] = (), source: str = "") -> Config:
    """A Config from a raw mapping (as read from YAML, `source` naming it in errors) and dotted
    overrides applied in order."""
    return configio.from_dict(Config, raw, overrides, source)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The Config of a YAML file (None: all defaults) with dotted overrides applied in order."""
    return configio.load(Config, path, overrides)


def config_to_dict(cfg) -> dict:
    """Plain YAML-ready data: YAML key names, tuples as lists."""
    return configio.to_dict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write `cfg` as YAML that load_config reads back to an equal Config (atomically)."""
    return configio.save(cfg, path)


# ---------------------------------------------------------------- validation


def validate(cfg: Config, world_size: int) -> Layout:
    """Check that `cfg` can run on `world_size` processes; return the layout.

    Raises ConfigError listing every problem found, each saying which setting to change. The
    model's shape and its split over TP and PP are checked by megaevo.model.args (shape_errors,
    layout_errors), as the model builder and the converters check them.
    """
    p = cfg.parallel
    errors = shape_errors(cfg.model) + layout_errors(cfg.model, p.tp, p.pp, p.virtual_pp, p.pp_layers)
    if cfg.seq_len > cfg.model.max_seq_len or cfg.seq_len < 1:
        errors.append(f"data.seq_len={cfg.seq_len} must be between 1 and model.max_seq_len={cfg.model.max_seq_len}: "
                      f"lower data.seq_len or raise model.max_seq_len")
    iters = cfg.train.iters if cfg.train.epochs is None else None  # with epochs: known once the data is read
    errors += _optim_errors(cfg, iters) + _other_errors(cfg) + _stage_errors(cfg)
    world_errors, layout = _world_errors(cfg, world_size)
    errors += world_errors
    if errors:
        raise ConfigError(errors_message(errors))
    return layout


def with_iters(cfg: Config, iters: int) -> Config:
    """A copy of `cfg` running `iters` iterations (the count `train.epochs` comes to), its learning-rate
    schedule checked against that length."""
    out = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, iters=int(iters)))
    errors = _optim_errors(out, out.train.iters)
    if errors:
        raise ConfigError(errors_message(errors))
    return out


def _optim_errors(cfg: Config, iters: int | None) -> list[str]:
    """The optimizer's settings; those about the run's length only when `iters` is known."""
    o, errors = cfg.optim, []
    if o.lr < 0 or o.min_lr < 0:
        errors.append(f"optim.lr={o.lr} and optim.min_lr={o.min_lr} must not be negative")
    if o.lr < o.min_lr:
        errors.append(f"optim.lr={o.lr} is below optim.min_lr={o.min_lr}: lower min_lr or raise lr")
    if o.warmup < 0:
        errors.append(f"optim.warmup={o.warmup} must not be negative")
    elif iters is not None and o.warmup > iters and os.environ.get("RANK", "0") in ("", "0"):  # said once per run
        # A shortened run: as in Megatron-LM, the warm-up simply does not end before the run does.
        from megaevo.log import get_logger

        peak = o.lr * max(iters - 1, 0) / o.warmup
        get_logger("megaevo.config").warning(
            "optim.warmup=%d is longer than train.iters=%d: the learning rate never reaches optim.lr=%g "
            "(it rises to %.3g at the last step)", o.warmup, iters, o.lr, peak)
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


def _other_errors(cfg: Config) -> list[str]:
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
        from megaevo.data.blended import parse_blend

        try:
            parse_blend(cfg.data.train)
        except ValueError as e:
            errors.append(f"data.train: {e}")
    return errors


def _stage_errors(cfg: Config) -> list[str]:
    """The stage and its settings: `stage`, `train.epochs`, the `sft` section."""
    errors, epochs = [], cfg.train.epochs
    if cfg.stage == "rl":
        errors.append("stage=rl: the RL stage is not available yet: use stage=pretrain or stage=sft")
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        errors.append(f"train.epochs={epochs} must be a positive number (or null to count train.iters)")
    elif epochs is not None and cfg.stage == "pretrain":
        errors.append("train.epochs counts epochs of SFT conversations (stage=sft): pre-training runs "
                      "train.iters iterations; set train.epochs=null")
    cutoff = cfg.sft.cutoff
    if cfg.stage == "sft" and cutoff is not None and not 2 <= cutoff <= cfg.seq_len:
        errors.append(f"sft.cutoff={cutoff} must be between 2 and data.seq_len={cfg.seq_len}: a conversation has to "
                      f"fit one sequence; lower sft.cutoff (null means data.seq_len) or raise data.seq_len")
    return errors


def _world_errors(cfg: Config, world_size: int) -> tuple[list[str], Layout | None]:
    """The checks of the layout that are not about the model's shape: world size, batch sizes."""
    p, t, errors = cfg.parallel, cfg.train, []
    if not all(isinstance(x, int) and x >= 1 for x in (p.tp, p.pp, p.virtual_pp)):
        return errors, None  # layout_errors says so
    if world_size < 1 or world_size % (p.tp * p.pp):
        errors.append(f"world size {world_size} is not a multiple of TP × PP = {p.tp} × {p.pp} = {p.tp * p.pp}: "
                      f"launch a multiple of {p.tp * p.pp} processes or change parallel.tp / parallel.pp")
    if p.sequence_parallel and cfg.seq_len % p.tp:
        errors.append(f"data.seq_len={cfg.seq_len} is not divisible by parallel.tp={p.tp}, "
                      f"which sequence_parallel needs: change data.seq_len or turn parallel.sequence_parallel off")
    if world_size < 1 or world_size % (p.tp * p.pp) or t.micro_batch_size < 1 or t.global_batch_size < 1:
        return errors, None
    dp = world_size // (p.tp * p.pp)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        lower = max(per_step, t.global_batch_size // per_step * per_step)
        errors.append(f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size × DP "
                      f"= {t.micro_batch_size} × {dp} = {per_step}: use a multiple of {per_step} "
                      f"(e.g. {lower} or {lower + per_step}) or change train.micro_batch_size")
        return errors, None
    micro_batches = t.global_batch_size // per_step
    if p.virtual_pp > 1 and micro_batches % p.pp:
        errors.append(f"the interleaved pipeline (parallel.virtual_pp={p.virtual_pp}) needs the micro-batches per step "
                      f"({micro_batches}) to be a multiple of parallel.pp={p.pp}: change train.global_batch_size")
    return errors, Layout(world_size, p.tp, p.pp, dp, p.virtual_pp, micro_batches)
