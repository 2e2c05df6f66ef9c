"""Every setting of a run: dataclasses, a YAML file, dotted overrides, validation and the resolve step.

    cfg = load_config("run.yaml", ["parallel.tp=2", "optim.lr=3e-4"])
    cfg, layout = resolve(cfg, world_size=8)  # Layout(tp=2, pp=1, dp=4, ...)

A YAML file holds the top-level `stage` (pretrain | sft | rl), the sections `model`, `parallel`,
`data`, `train`, `optim`, `checkpoint`, `kernels`, `sft`, `rl` and the top-level `out_dir`. Overrides
`key.sub=value` apply after the file, in order; their values are read as YAML (`parallel.tp=2`,
`optim.betas=[0.9,0.95]`, `checkpoint.load=null`).
Relative paths (the keys of PATH_KEYS: data prefixes, the tokenizer, checkpoints, prompt and task
files, out_dir) resolve once: those in the file against the file's folder, those in overrides against
the working directory. The Config then holds absolute paths, and a run records them.
`model.preset: evolm-1b` fills the model's shape fields, and fields given beside it (or by a later
override) win. Unknown keys and wrongly typed values raise ConfigError naming the dotted key; a
layout the world size cannot run raises ConfigError from resolve() (or validate(), which returns the
layout alone) saying what to change.

`resolve(cfg, world_size, iters=...)` is the one step that computes what a run derives from its config:
absolute paths, the rollout batch of `stage: rl` as `train.global_batch_size`, `train.iters` from the
count `train.epochs` came to, `optim.warmup` from `optim.warmup_fraction` (and `rl.critic.warmup` from
its own fraction), and the layout; it reads no environment. with_rl_batch, with_iters, absolute_paths
and validate are its parts.

The modules: `root` (Config, Layout), `sections` (the sections every stage shares and their checks),
`sft` and `rl` (each stage's own section and checks), `io` (YAML, overrides, paths), `resolution`
(validation and the resolve step). The `model` section is the model's shape itself,
:class:`megaevo.model.args.ModelArgs` (named ModelConfig here), with its presets in
:mod:`megaevo.model.presets`; reading YAML into these dataclasses is :mod:`megaevo.configio`.
"""
from __future__ import annotations

from megaevo.common import resolve_dtype
from megaevo.config.io import (CHECKPOINT_KEYWORDS, PATH_KEYS, absolute_paths, config_from_dict, config_to_dict,
                               load_config, save_config)
from megaevo.config.resolution import resolve, validate, with_iters
from megaevo.config.rl import RLConfig, RLCriticConfig, with_rl_batch
from megaevo.config.root import Config, Layout, ModelConfig
from megaevo.config.sections import (CheckpointConfig, DataConfig, KernelsConfig, OptimConfig, ParallelConfig,
                                     TrainConfig)
from megaevo.config.sft import SFTConfig
from megaevo.configio import ConfigError, errors_message
from megaevo.model.args import ModelArgs, layout_errors, shape_errors
from megaevo.model.presets import PRESETS, preset_values

__all__ = ["CHECKPOINT_KEYWORDS", "PATH_KEYS", "PRESETS", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
           "KernelsConfig", "Layout", "ModelArgs", "ModelConfig", "OptimConfig", "ParallelConfig", "RLConfig",
           "RLCriticConfig", "SFTConfig", "TrainConfig", "absolute_paths", "config_from_dict", "config_to_dict",
           "errors_message", "layout_errors", "load_config", "preset_values", "resolve", "resolve_dtype",
           "save_config", "shape_errors", "validate", "with_iters", "with_rl_batch"]
