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

from megaevo.data import DataError
from megaevo.data.cache import cached_arrays
from megaevo.data.gpt_dataset import SPLIT_NAMES, GPTDataset, format_split, parse_split, split_ranges, split_share
from megaevo.data.indexed import IndexedDataset
from megaevo.data.indices import TooFewTokensError, build_blending_indices, normalize_weights

# Each corpus of a blend builds a few more samples than its share, as Megatron-LM does.
SAMPLE_MARGIN = 1.005


class BlendedDataset:
    """`size` samples drawn from `datasets` in proportion to `weights` (normalised)."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int,
                 cache_dir: str | os.PathLike, impl: str = "cpp"):
        if len(datasets) != len(weights):
            raise DataError(f"{len(datasets)} datasets but {len(weights)} weights")
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
                raise DataError(f"blend needs {need} samples from {getattr(ds, 'name', d)}, which has only {len(ds)}")

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
                    raise DataError(f"data source {name!r}: expected keys 'prefix' and optional 'weight', got {sorted(v)}")
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
    raise DataError(f"cannot read data blend {items!r}: use [weight, prefix, weight, prefix, ...] or a list of prefixes")


def _too_few_message(e: TooFewTokensError, which: str, split, doc_range: tuple[int, int], seq_len: int,
                     corpus: str) -> str:
    """Why split `which` of a corpus cannot give a sample, and which settings change that."""
    docs = doc_range[1] - doc_range[0]
    where = (f"the {which} split ({split_share(split, which)} of data.split={format_split(split)}) of {corpus} "
             f"holds {docs:,} document{'s' if docs != 1 else ''} of {e.tokens:,} tokens, too few for a single "
             f"sample of {e.sample_tokens:,} tokens (data.seq_len={seq_len} + 1)")
    if which == "train":
        fix = "give the train split a larger share in data.split, shorten data.seq_len, or add data to the corpus"
    else:
        parts = [p for p in format_split(split).split(",")] + ["0"] * 3
        parts[SPLIT_NAMES.index(which)] = "0"
        fix = (f"give the {which} split a larger share in data.split, or set its part to 0 to skip it "
               f"(data.split={','.join(parts[:3])}); or shorten data.seq_len; or add data to the corpus")
    return f"{where}: {fix}"


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
    Sample counts of None mean one epoch; a split whose share in `split` is 0, or that is asked for
    0 samples, is not built. Errors speak of the run's settings (`data.split`, `data.seq_len`) and
    name the corpus and the split.
    """
    corpora = parse_blend(corpora)
    names = [c.name for c in corpora]
    if len(set(names)) != len(names):
        raise DataError(f"corpus names must be unique, got {names} (name them, e.g. {{general: {{prefix: ...}}}})")
    weights = normalize_weights([c.weight for c in corpora])
    shares = dict(zip(SPLIT_NAMES, parse_split(split)))
    splits = DataSplits(train=None)
    train_parts = []
    for corpus, weight in zip(corpora, weights):
        indexed = IndexedDataset(corpus.prefix)
        cache = cache_dir if cache_dir is not None else Path(indexed.prefix).parent / "cache"
        ranges = split_ranges(len(indexed), split)

        def make(which: str, samples: int | None) -> GPTDataset:
            try:
                return GPTDataset(indexed, seq_len, samples, seed, ranges[which], which, cache, impl, corpus.name)
            except TooFewTokensError as e:
                raise DataError(_too_few_message(e, which, split, ranges[which], seq_len,
                                                 f"corpus {corpus.name!r} ({corpus.prefix})")) from None

        beg, end = ranges["train"]
        if end > beg and weight > 0 and shares["train"] > 0:
            if train_samples is None or len(corpora) == 1:
                n = train_samples
            else:
                n = math.ceil(math.ceil(train_samples * weight) * SAMPLE_MARGIN)
            train_parts.append((make("train", n), weight))
        for which, samples, target in (("valid", valid_samples, splits.valid), ("test", test_samples, splits.test)):
            beg, end = ranges[which]
            if end > beg and shares[which] > 0 and samples != 0:
                target[corpus.name] = make(which, samples)
    for name, prefix in (extra_valid or {}).items():
        if name in splits.valid:
            raise DataError(f"validation set name {name!r} is already used by a corpus")
        if valid_samples == 0:
            continue
        try:
            splits.valid[name] = GPTDataset(prefix, seq_len, valid_samples, seed, None, "valid",
                                            cache_dir, impl, name)
        except TooFewTokensError as e:
            raise DataError(f"validation set {name!r} ({prefix}) holds {e.tokens:,} tokens, too few for a single "
                            f"sample of {e.sample_tokens:,} tokens (data.seq_len + 1): shorten data.seq_len, "
                            f"give it more data, or leave it out of data.valid") from None
    if not train_parts:
        raise DataError(f"no corpus has documents in its train split (check data.split={format_split(split)} "
                        f"and the weights of data.train)")
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
