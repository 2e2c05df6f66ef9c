"""Weighted mixtures of datasets, and the train / per-corpus validation sets of a run.

A blend of 95% domain data and 5% replay holds that mix in every window: blended sample n comes
from the corpus furthest behind its share (megaevo.data.indices.build_blending_indices), so after
any n samples each corpus has supplied its share of n to within one sample.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from megaevo.data.cache import cached_arrays
from megaevo.data.gpt_dataset import GPTDataset, split_ranges
from megaevo.data.indexed import IndexedDataset
from megaevo.data.indices import build_blending_indices, normalize_weights

# Each corpus of a blend builds a few more samples than its share, as Megatron-LM does.
SAMPLE_MARGIN = 1.005


class BlendedDataset:
    """`size` samples drawn from `datasets` in proportion to `weights` (normalised)."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int,
                 cache_dir: str | os.PathLike, impl: str = "cpp"):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights)
        self.size = int(size)
        description = {
            "components": [getattr(d, "description", repr(d)) for d in self.datasets],
            "weights": self.weights.tolist(),
            "size": self.size,
        }

        def build() -> dict[str, np.ndarray]:
            di, dsi = build_blending_indices(self.weights, self.size, impl=impl)
            return {"dataset_index": di, "dataset_sample_index": dsi}

        arrays = cached_arrays(cache_dir, "BlendedDataset", description, ["dataset_index", "dataset_sample_index"], build)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        for d, ds in enumerate(self.datasets):
            need = int(np.count_nonzero(self.dataset_index == d))
            if need > len(ds):
                raise ValueError(f"blend needs {need} samples from {getattr(ds, 'name', d)}, which has only {len(ds)}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.size:
            raise IndexError(f"blended sample {i} out of range ({self.size} samples)")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]

    def source(self, i: int) -> int:
        """Which component dataset sample i comes from."""
        return int(self.dataset_index[i])


@dataclass
class Corpus:
    """One tokenized corpus of a run: an indexed dataset prefix, its blend weight and a name."""

    prefix: str
    weight: float = 1.0
    name: str = ""

    def __post_init__(self):
        if not self.name:
            self.name = Path(self.prefix).name


def parse_blend(spec: Sequence) -> list[Corpus]:
    """Corpora from Megatron's `[w1, prefix1, w2, prefix2, ...]`, bare prefixes (equal weights),
    `{name: {prefix:, weight:}}` / `{name: prefix}` mappings, or Corpus objects."""
    if isinstance(spec, dict):
        out = []
        for name, v in spec.items():
            if isinstance(v, dict):
                unknown = set(v) - {"prefix", "weight"}
                if unknown or "prefix" not in v:
                    raise ValueError(f"data source {name!r}: expected keys 'prefix' and optional 'weight', got {sorted(v)}")
                out.append(Corpus(str(v["prefix"]), float(v.get("weight", 1.0)), name))
            else:
                out.append(Corpus(str(v), 1.0, name))
        return out
    items = list(spec)
    if all(isinstance(x, Corpus) for x in items):
        return items
    if len(items) % 2 == 0 and all(_is_number(x) for x in items[0::2]):
        return [Corpus(str(p), float(w)) for w, p in zip(items[0::2], items[1::2])]
    if not any(_is_number(x) for x in items):
        return [Corpus(str(p)) for p in items]
    raise ValueError(f"cannot read data blend {items!r}: use [weight, prefix, weight, prefix, ...] or a list of prefixes")


def _is_number(x) -> bool:
    try:
        float(x)
        return not isinstance(x, bool)
    except (TypeError, ValueError):
        return False


@dataclass
class DataSplits:
    train: GPTDataset | BlendedDataset | None
    valid: dict[str, GPTDataset] = field(default_factory=dict)
    test: dict[str, GPTDataset] = field(default_factory=dict)


def build_datasets(
    corpora: Sequence,
    seq_len: int,
    seed: int,
    train_samples: int | None,
    valid_samples: int | None = None,
    test_samples: int | None = None,
    split: str | Sequence[float] = "969,30,1",
    extra_valid: dict[str, str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    impl: str = "cpp",
) -> DataSplits:
    """The train blend and, per corpus, separate validation and test sets.

    Every corpus is split by document ranges (`split`). The train set blends the corpora's train
    ranges by weight; validation and test sets stay per corpus (named by corpus) so that a run can
    report a loss per domain. `extra_valid` adds whole datasets as further named validation sets.
    Sample counts of None mean one epoch.
    """
    corpora = parse_blend(corpora)
    names = [c.name for c in corpora]
    if len(set(names)) != len(names):
        raise ValueError(f"corpus names must be unique, got {names} (name them, e.g. {{general: {{prefix: ...}}}})")
    weights = normalize_weights([c.weight for c in corpora])
    splits = DataSplits(train=None)
    train_parts = []
    for corpus, weight in zip(corpora, weights):
        indexed = IndexedDataset(corpus.prefix)
        cache = cache_dir if cache_dir is not None else Path(indexed.prefix).parent / "cache"
        ranges = split_ranges(len(indexed), split)

        def make(which: str, samples: int | None) -> GPTDataset:
            return GPTDataset(indexed, seq_len, samples, seed, ranges[which], which, cache, impl, corpus.name)

        beg, end = ranges["train"]
        if end > beg and weight > 0:
            if train_samples is None or len(corpora) == 1:
                n = train_samples
            else:
                n = math.ceil(math.ceil(train_samples * weight) * SAMPLE_MARGIN)
            train_parts.append((make("train", n), weight))
        for which, samples, target in (("valid", valid_samples, splits.valid), ("test", test_samples, splits.test)):
            beg, end = ranges[which]
            if end > beg:
                target[corpus.name] = make(which, samples)
    for name, prefix in (extra_valid or {}).items():
        if name in splits.valid:
            raise ValueError(f"validation set name {name!r} is already used by a corpus")
        splits.valid[name] = GPTDataset(prefix, seq_len, valid_samples, seed, None, "valid",
                                        cache_dir, impl, name)
    if not train_parts:
        raise ValueError("no corpus has documents in its train split (check `split` and the weights)")
    if len(train_parts) == 1:
        splits.train = train_parts[0][0]
    else:
        datasets, part_weights = zip(*train_parts)
        part_weights = normalize_weights(part_weights)
        if train_samples is None:  # as many as the blend can draw before a corpus runs out
            train_samples = int(min(len(d) / w for d, w in zip(datasets, part_weights)))
        cache = cache_dir if cache_dir is not None else datasets[0].cache_dir
        splits.train = BlendedDataset(datasets, part_weights, train_samples, cache, impl)
    return splits
