"""A Config from YAML and dotted overrides, back to YAML, and the path settings (PATH_KEYS) resolved against
a folder. The typed reading itself is :mod:`megaevo.configio`, generic over the root dataclass."""
from __future__ import annotations

import os
import re
from pathlib import Path

from megaevo import configio
from megaevo.config.root import Config
from megaevo.configio import ConfigError


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

