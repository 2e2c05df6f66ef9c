"""Every setting of a run: dataclasses, a YAML file, dotted overrides, and validation.

    cfg = load_config("run.yaml", ["parallel.tp=2", "optim.lr=3e-4"])
    layout = validate(cfg, world_size=8)      # Layout(tp=2, pp=1, dp=4, ...)

A YAML file holds the top-level `stage` (pretrain | sft | rl), the sections `model`, `parallel`,
`data`, `train`, `optim`, `checkpoint`, `kernels`, `sft`, `rl` and the top-level `out_dir`. Overrides
`key.sub=value` apply after the file, in order; their values are read as YAML (`parallel.tp=2`,
`optim.betas=[0.9,0.95]`, `checkpoint.load=null`).
Relative paths (the keys of PATH_KEYS: data prefixes, the tokenizer, checkpoints, prompt and task
files, out_dir) resolve once: those in the file against the file's folder, those in overrides against
the working directory. The Config then holds absolute paths, and a run records them.
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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from megaevo import configio
from megaevo.configio import ConfigError, errors_message
from megaevo.model.args import ModelArgs, layout_errors, shape_errors
from megaevo.model.presets import PRESETS, preset_values

ModelConfig = ModelArgs  # the `model` section: one class for the model's shape

__all__ = ["PATH_KEYS", "PRESETS", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "KernelsConfig",
           "Layout", "ModelConfig", "OptimConfig", "ParallelConfig", "RLConfig", "RLCriticConfig", "SFTConfig",
           "TrainConfig", "absolute_paths", "config_from_dict", "config_to_dict", "load_config", "preset_values",
           "resolve_dtype", "save_config", "validate", "with_iters", "with_rl_batch"]


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
class RLCriticConfig:
    """PPO's critic (`rl.critic`): the actor's architecture with a fresh scalar value head.

    `load`: the checkpoint its body starts from (null: the checkpoint the actor started from, i.e.
    `checkpoint.load`; without one, the actor's initial weights). Its AdamW takes `lr` and `min_lr`
    with the actor's `optim.schedule`, betas and eps; `warmup` / `warmup_fraction` / `weight_decay` /
    `clip_grad` left null take the actor's (`optim.*`). `value_clip`: the value loss's clip range
    around the rollout's values (null: no clip)."""

    load: Optional[str] = None
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup: Optional[int] = None
    warmup_fraction: Optional[float] = None
    weight_decay: Optional[float] = None
    clip_grad: Optional[float] = None
    value_clip: Optional[float] = 0.5


@dataclass
class RLConfig:
    """Reinforcement learning with verifiable rewards (`stage: rl`, megaevo.stages.rl).

    One iteration is one rollout batch: `prompts_per_step` prompts (from `prompts`: EvoLM-format jsonl
    sets, each record a `problem` with `gt_answer` or `gt_solution`, or `rg:NAME[:COUNT[:SEED]]`; a set's
    name is looked up in `prompts_data_dir`; shuffled by train.seed each pass over the set; prompts longer
    than `max_prompt_len` tokens are left out, null: what fits, model.max_seq_len - `max_new_tokens`)
    rendered with `template`, `n` samples each of at most
    `max_new_tokens` tokens at `temperature` / `top_p` (stopping at EOS or a `stop` string; null: the
    template's own, e.g. `Human:` for evolm, as in evaluation), scored by
    `reward` (`verifiable`: the evaluation graders, `grader_timeout` seconds per comparison; or a dotted
    path to `fn(prompt: dict, completion: str) -> float`; a truncated response gets `truncated_reward`
    when set), then `epochs` passes over `mini_batches` mini-batches, one optimizer update each.
    `train.global_batch_size` is derived: prompts_per_step x n samples; `train.micro_batch_size` is the
    samples per micro-batch of the training forward.

    `algorithm`: `grpo` (group-relative advantages; `normalize_std` false is Dr. GRPO) or `ppo` (GAE with
    `gamma`, `lam` over a critic, `rl.critic`; `whiten_advantages` over the global batch). The policy loss
    is PPO's clipped surrogate (`clip_low`, `clip_high`, `dual_clip` > 1 or null) aggregated by `loss_agg`
    (token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm), minus `entropy_coef`
    x entropy. `kl_coef` > 0 adds a KL to the frozen `reference` policy (null: the checkpoint the actor
    started from): in the loss, estimated by `kl_estimator` (k1, k2, k3), or with `kl_in_reward` (PPO)
    as a per-token penalty on the reward, estimated by `kl_reward_estimator` (default k1, so the shaped
    reward is -kl_coef x log(pi / pi_ref)); k3 is clamped to at most 10 per token. `tis_cap`: truncated
    importance sampling of the rollout engine's log-probabilities (the weight min(p_train / p_rollout,
    cap); null: off). `max_prob_error`: a step whose `token_mult_prob_error` (the mean exp|log p_rollout -
    log p_train| over the response tokens, 1 when the sampler and the training forward agree) exceeds
    1 + max_prob_error stops the run before its updates, since its rollouts were not sampled from the
    policy being trained (checked where the metric is logged, `temperature` 1; null: never). The
    default 0.1 sits above what rounding gives (fp32 stays within 1e-4 of 1, bf16 typically within a few
    percent) and below what sampling with out-of-date weights gave (1.13 to 170 in fp32 runs).
    `generation_batch`:
    prompts generated together (null: all of a data-parallel rank's prompts of the step); the samples
    are fixed by train.seed, the iteration and each generation batch's first prompt, so a value that
    divides every layout's prompts per rank gives the same rollouts on any layout."""

    algorithm: Literal["grpo", "ppo"] = "grpo"
    prompts: list[str] = field(default_factory=list)
    prompts_data_dir: Optional[str] = None
    template: str = "evolm"
    prompts_per_step: int = 64
    n: int = 8
    max_prompt_len: Optional[int] = None
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Optional[list[str]] = None
    generation_batch: Optional[int] = None
    epochs: int = 1
    mini_batches: int = 1
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                      "seq-mean-token-sum-norm"] = "token-mean"
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_in_reward: bool = False
    kl_reward_estimator: Literal["k1", "k2", "k3"] = "k1"
    reference: Optional[str] = None
    normalize_std: bool = True
    gamma: float = 1.0
    lam: float = 1.0
    whiten_advantages: bool = True
    reward: str = "verifiable"
    truncated_reward: Optional[float] = None
    grader_timeout: Optional[float] = 4.0
    grader_workers: Optional[int] = None
    tis_cap: Optional[float] = None
    max_prob_error: Optional[float] = 0.1
    critic: RLCriticConfig = field(default_factory=RLCriticConfig)

    def prompt_len(self, max_seq_len: int) -> int:
        """The longest prompt a run samples: `max_prompt_len`, or when null what `max_seq_len` (the
        model's) leaves beside `max_new_tokens`."""
        return self.max_prompt_len if self.max_prompt_len is not None else max_seq_len - self.max_new_tokens


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
    rl: RLConfig = field(default_factory=RLConfig)
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
    overrides applied in order; paths stay as given (a run makes them absolute against the working
    directory when it starts)."""
    return _checked_length(configio.from_dict(Config, raw, overrides, source), overrides)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                resolve_paths: bool = True) -> Config:
    """The Config of a YAML file (None: all defaults) with dotted overrides applied in order, its
    relative paths resolved against the file's folder (those of the overrides, and defaults such as
    out_dir, against the working directory). `resolve_paths=False` keeps them as written (the suite
    resolves them itself)."""
    if not resolve_paths:
        return _checked_length(configio.load(Config, path, overrides), overrides)
    cfg = configio.load(Config, path, overrides, paths=PATH_KEYS)
    return _checked_length(absolute_paths(cfg), overrides)


def absolute_paths(cfg, base: str | os.PathLike | None = None):
    """`cfg` (a Config, or its mapping as `config_to_dict` gives it) with every relative path of
    PATH_KEYS resolved against `base` (default: the working directory)."""
    return configio.with_absolute_paths(cfg, PATH_KEYS, base)


def _checked_length(cfg: Config, overrides) -> Config:
    """`cfg`, unless an override gives `train.iters` while `train.epochs` (from the file) sets the
    run's length: then a ConfigError naming both keys."""
    keys = {text.partition("=")[0].strip() for text in overrides}
    if "train.iters" in keys and "train.epochs" not in keys and cfg.train.epochs is not None:
        raise ConfigError(f"train.iters={cfg.train.iters} is given as an override, but train.epochs="
                          f"{cfg.train.epochs:g} sets the run's length and would win: add train.epochs=null to run "
                          f"train.iters iterations, or leave train.iters out")
    return cfg


def config_to_dict(cfg) -> dict:
    """Plain YAML-ready data: YAML key names, tuples as lists."""
    return configio.to_dict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write `cfg` as YAML that load_config reads back to an equal Config (atomically). Relative paths
    are written absolute (against the working directory, where they point now), so the file means
    the same from any folder: load_config(save_config(cfg, f)) == absolute_paths(cfg)."""
    return configio.save(absolute_paths(cfg), path)


# ---------------------------------------------------------------- paths


CHECKPOINT_KEYWORDS = ("auto", "none")  # values of checkpoint.load that are not paths
_SCHEME = re.compile(r"^[A-Za-z][\w.+-]*:")  # rg:gcd:200 and other task kinds named by a prefix


def _checkpoint_path(value, base: str):
    """A checkpoint to load: a path, `auto` (this run's latest) or `none` (start fresh)."""
    return value if value in CHECKPOINT_KEYWORDS else configio.absolute_path(value, base)


def _blend_paths(value, base: str):
    """A data blend (see DataConfig) with its prefixes resolved: `[w, prefix, ...]`, a list of prefixes,
    `{name: {prefix: ..., weight: ...}}` or `{name: prefix}`; a form it does not know stays as it is
    (validation says what is wrong with it)."""
    if isinstance(value, dict):
        return {name: ({**v, "prefix": configio.absolute_path(v["prefix"], base)}
                       if isinstance(v, dict) and isinstance(v.get("prefix"), str) else configio.absolute_path(v, base))
                for name, v in value.items()}
    if not isinstance(value, (list, tuple)):
        return value
    items = list(value)
    weighted = len(items) % 2 == 0 and all(_is_number(w) for w in items[0::2])
    if weighted:
        return [configio.absolute_path(x, base) if i % 2 else x for i, x in enumerate(items)]
    return [x if _is_number(x) else configio.absolute_path(x, base) for x in items]


def _is_number(x) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return True
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


def _prefix_map(value, base: str):
    """`{name: prefix}` (data.valid) with the prefixes resolved."""
    if not isinstance(value, dict):
        return value
    return {name: configio.absolute_path(v, base) for name, v in value.items()}


def _task_specs(value, base: str):
    """Task or prompt specs (train.eval_tasks, rl.prompts) with those that are paths resolved: a spec
    with a `/`, a `.jsonl` file, or a file or dataset prefix beside the config. A set's name
    (`gsm8k_platinum`, looked up in the data directory) and `rg:NAME...` stay as they are."""
    if not isinstance(value, (list, tuple)):
        return value
    return [_task_spec(spec, base) for spec in value]


def _task_spec(spec, base: str):
    if not isinstance(spec, str) or not spec or _SCHEME.match(spec):
        return spec
    path = os.path.join(base, os.path.expanduser(spec))
    if ("/" in spec or spec.endswith(".jsonl") or os.path.isfile(path) or os.path.isfile(path + ".idx")
            or spec.startswith("~")):
        return configio.absolute_path(spec, base)
    return spec


# Every path setting and how its value holds paths (configio resolves them; see load_config).
PATH_KEYS: dict[str, configio.Resolver] = {
    "data.train": _blend_paths,
    "data.valid": _prefix_map,
    "data.cache_dir": configio.absolute_path,
    "data.tokenizer": configio.absolute_path,
    "train.eval_tasks": _task_specs,
    "train.eval_tasks_data_dir": configio.absolute_path,
    "checkpoint.load": _checkpoint_path,
    "rl.prompts": _task_specs,
    "rl.prompts_data_dir": configio.absolute_path,
    "rl.reference": _checkpoint_path,
    "rl.critic.load": _checkpoint_path,
    "out_dir": configio.absolute_path,
}


# ---------------------------------------------------------------- validation


def validate(cfg: Config, world_size: int) -> Layout:
    """Check that `cfg` can run on `world_size` processes; return the layout.

    Raises ConfigError listing every problem found, each saying which setting to change. The
    model's shape and its split over TP and PP are checked by megaevo.model.args (shape_errors,
    layout_errors), as the model builder and the converters check them.
    """
    cfg = with_rl_batch(cfg)
    p = cfg.parallel
    errors = shape_errors(cfg.model) + layout_errors(cfg.model, p.tp, p.pp, p.virtual_pp, p.pp_layers)
    if cfg.seq_len > cfg.model.max_seq_len or cfg.seq_len < 1:
        errors.append(f"data.seq_len={cfg.seq_len} must be between 1 and model.max_seq_len={cfg.model.max_seq_len}: "
                      f"lower data.seq_len or raise model.max_seq_len")
    iters = cfg.train.iters if cfg.train.epochs is None else None  # with epochs: known once the data is read
    if iters is not None and cfg.optim.warmup_fraction is not None and 0 <= cfg.optim.warmup_fraction < 1:
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(
            cfg.optim, warmup=int(round(cfg.optim.warmup_fraction * iters))))
    errors += _optim_errors(cfg, iters) + _other_errors(cfg) + _stage_errors(cfg)
    world_errors, layout = _world_errors(cfg, world_size)
    errors += world_errors
    if errors:
        raise ConfigError(errors_message(errors))
    return layout


def with_iters(cfg: Config, iters: int) -> Config:
    """A copy of `cfg` running `iters` iterations (the count `train.epochs` comes to), with
    `optim.warmup` resolved from `optim.warmup_fraction` when that is set, its learning-rate schedule
    checked against that length."""
    out = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, iters=int(iters)))
    if cfg.optim.warmup_fraction is not None:
        out = dataclasses.replace(out, optim=dataclasses.replace(
            cfg.optim, warmup=int(round(cfg.optim.warmup_fraction * out.train.iters))))
    errors = _optim_errors(out, out.train.iters)
    if errors:
        raise ConfigError(errors_message(errors))
    return out


def with_rl_batch(cfg: Config) -> Config:
    """With `stage: rl`, a copy of `cfg` whose `train.global_batch_size` is the rollout batch of an
    iteration, `rl.prompts_per_step` x `rl.n` samples; other stages unchanged."""
    if cfg.stage != "rl" or not (cfg.rl.prompts_per_step >= 1 and cfg.rl.n >= 1):
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, global_batch_size=cfg.rl.prompts_per_step * cfg.rl.n))


def _optim_errors(cfg: Config, iters: int | None) -> list[str]:
    """The optimizer's settings; those about the run's length only when `iters` is known."""
    o, errors = cfg.optim, []
    if o.lr < 0 or o.min_lr < 0:
        errors.append(f"optim.lr={o.lr} and optim.min_lr={o.min_lr} must not be negative")
    if o.lr < o.min_lr:
        errors.append(f"optim.lr={o.lr} is below optim.min_lr={o.min_lr}: lower min_lr or raise lr")
    if o.warmup_fraction is not None and not 0 <= o.warmup_fraction < 1:
        errors.append(f"optim.warmup_fraction={o.warmup_fraction} must be at least 0 and below 1 (e.g. 0.1 for 10%)")
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
        errors += _rl_errors(cfg)
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


def _rl_errors(cfg: Config) -> list[str]:
    """The `rl` section, and what `stage: rl` asks of the others."""
    r, c, errors = cfg.rl, cfg.rl.critic, []
    if not r.prompts:
        errors.append("rl.prompts is empty: give the prompt sets, e.g. rl.prompts=[data/math_train.jsonl] or "
                      "rl.prompts=[rg:basic_arithmetic:1000]")
    if not cfg.data.tokenizer:
        errors.append("stage=rl needs data.tokenizer (prompts are rendered and responses graded as text)")
    if cfg.parallel.pp > 1 or cfg.parallel.virtual_pp > 1:
        errors.append(f"stage=rl generates with the training model, which pipeline parallelism cannot do yet: "
                      f"set parallel.pp=1 (got {cfg.parallel.pp}) and parallel.virtual_pp=1; use parallel.tp instead")
    if cfg.train.epochs is not None:
        errors.append("train.epochs: stage=rl counts train.iters rollout steps; set train.epochs=null")
    for name in ("prompts_per_step", "n", "max_prompt_len", "max_new_tokens", "epochs", "mini_batches"):
        if getattr(r, name) is not None and getattr(r, name) < 1:
            errors.append(f"rl.{name}={getattr(r, name)} must be at least 1")
    if r.algorithm == "grpo" and r.n < 2:
        errors.append(f"rl.n={r.n}: GRPO compares the samples of a prompt with each other and needs rl.n >= 2")
    if r.max_prompt_len is not None and r.max_prompt_len + r.max_new_tokens > cfg.model.max_seq_len:
        errors.append(f"rl.max_prompt_len + rl.max_new_tokens = {r.max_prompt_len} + {r.max_new_tokens} exceed "
                      f"model.max_seq_len={cfg.model.max_seq_len}")
    elif r.max_prompt_len is None and r.max_new_tokens >= cfg.model.max_seq_len:
        errors.append(f"rl.max_new_tokens={r.max_new_tokens} leaves no room for a prompt within model.max_seq_len="
                      f"{cfg.model.max_seq_len} (rl.max_prompt_len=null takes what is left): lower rl.max_new_tokens")
    if not r.temperature > 0 or not 0 < r.top_p <= 1:
        errors.append(f"rl.temperature={r.temperature} must be positive (rollouts are sampled) and rl.top_p="
                      f"{r.top_p} in (0, 1]")
    if r.generation_batch is not None and r.generation_batch < 1:
        errors.append(f"rl.generation_batch={r.generation_batch} must be at least 1 (or null)")
    if r.clip_low < 0 or r.clip_high < 0:
        errors.append(f"rl.clip_low={r.clip_low} and rl.clip_high={r.clip_high} must not be negative")
    if r.dual_clip is not None and not r.dual_clip > 1:
        errors.append(f"rl.dual_clip={r.dual_clip} must be greater than 1 (or null: off)")
    if r.kl_coef < 0 or r.entropy_coef < 0:
        errors.append(f"rl.kl_coef={r.kl_coef} and rl.entropy_coef={r.entropy_coef} must not be negative")
    if r.kl_in_reward and r.algorithm != "ppo":
        errors.append("rl.kl_in_reward puts the KL into PPO's per-token rewards; with rl.algorithm=grpo keep the KL "
                      "in the loss (rl.kl_in_reward=false)")
    if not (0 <= r.gamma <= 1 and 0 <= r.lam <= 1):
        errors.append(f"rl.gamma={r.gamma} and rl.lam={r.lam} must lie in [0, 1]")
    if r.max_prob_error is not None and not r.max_prob_error > 0:
        errors.append(f"rl.max_prob_error={r.max_prob_error} must be positive (or null: never stop)")
    if r.tis_cap is not None and not r.tis_cap > 0:
        errors.append(f"rl.tis_cap={r.tis_cap} must be positive (or null: off)")
    elif r.tis_cap is not None and r.temperature != 1.0:
        errors.append(f"rl.tis_cap needs rl.temperature=1 (got {r.temperature}): the sampler's log-probabilities are "
                      f"those of the untempered model")
    if r.grader_timeout is not None and not r.grader_timeout > 0:
        errors.append(f"rl.grader_timeout={r.grader_timeout} must be positive seconds (or null: none)")
    if c.lr < 0 or c.min_lr < 0 or c.lr < c.min_lr:
        errors.append(f"rl.critic.lr={c.lr} and rl.critic.min_lr={c.min_lr} must not be negative, lr >= min_lr")
    if c.warmup is not None and c.warmup < 0:
        errors.append(f"rl.critic.warmup={c.warmup} must not be negative")
    if c.warmup_fraction is not None and not 0 <= c.warmup_fraction < 1:
        errors.append(f"rl.critic.warmup_fraction={c.warmup_fraction} must be at least 0 and below 1")
    if (c.weight_decay is not None and c.weight_decay < 0) or (c.clip_grad is not None and c.clip_grad < 0):
        errors.append("rl.critic.weight_decay and rl.critic.clip_grad must not be negative")
    if c.value_clip is not None and not c.value_clip > 0:
        errors.append(f"rl.critic.value_clip={c.value_clip} must be positive (or null: no clip)")
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
    if cfg.stage == "rl" and cfg.rl.mini_batches >= 1 and cfg.rl.n >= 1:  # the rollout batch is derived
        r = cfg.rl
        if r.prompts_per_step % (dp * r.mini_batches):
            errors.append(f"rl.prompts_per_step={r.prompts_per_step} must be a multiple of the data-parallel size x "
                          f"rl.mini_batches = {dp} x {r.mini_batches}: each rank samples whole prompts, the same "
                          f"number for each mini-batch")
        elif (rows := r.prompts_per_step // (dp * r.mini_batches) * r.n) % t.micro_batch_size:
            errors.append(f"a mini-batch gives each data-parallel rank {rows} samples (rl.prompts_per_step / DP / "
                          f"rl.mini_batches x rl.n), not a multiple of train.micro_batch_size={t.micro_batch_size}")
        if errors:
            return errors, None
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
