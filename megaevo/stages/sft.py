"""Supervised fine-tuning: conversations with loss masks, packed into sequences, the masked next-token loss.

`data.train` names SFT datasets (megaevo.data.sft: one conversation per document and a loss mask
per token) as it names pre-training corpora: one prefix, or `[weight, prefix, ...]`, or a mapping.

* **Splits.** Each dataset's conversations are split into train / valid / test ranges by
  `data.split`, with the rounding of pre-training (megaevo.data.gpt_dataset.split_ranges). Each
  dataset's valid range is reported as `val/NAME`, as are the whole datasets of `data.valid`.
* **Cutoff.** A conversation longer than `sft.cutoff` tokens (default: seq_len) is cut to its
  first `cutoff` tokens (`sft.truncate`, the default) or dropped; empty and one-token conversations
  (nothing to predict) are dropped. The counts are logged once at start.
* **Weights.** An epoch holds as many conversations as the datasets' train ranges together, N;
  dataset i supplies round(w_i × N) of them (weights normalised, largest-remainder rounding), so a
  single dataset, or weights proportional to the datasets' sizes, gives each conversation once per
  epoch, and other weights up- or down-sample. Each dataset's draws walk through seeded shuffles of
  it one pass after the other: a down-sampled dataset shows every conversation before repeating one.
* **Epochs.** Epoch e shuffles its conversations (seed train.seed, epoch e) and, with `sft.packing`
  (the default), packs them into sequences of seq_len tokens by best-fit decreasing over windows of
  PACK_WINDOW conversations of that order, then shuffles the sequences. Without packing each
  conversation is one sequence, padded to seq_len (fixed shapes, as pipeline parallelism needs).
* **The sample stream** is epoch 0's sequences, then epoch 1's, and so on; the position in it is the
  count of consumed samples, so a resumed run (also on another layout with the same global batch)
  reads exactly what an uninterrupted run reads. With `train.epochs` the run lasts
  ceil(samples of `epochs` epochs / global_batch_size) iterations, a fraction of an epoch counting
  its first sequences (rounded up); the last global batch is filled from the next epoch's order.
* **A packed sequence** holds conversations back to back: `doc_ids` numbers them (attention stays
  within each), `position_ids` restart at 0 for each, `labels` are the next token of the same
  conversation where that token is a target in the loss mask, else -100 (the last token of a
  conversation always -100: no label crosses a boundary), and `loss_mask` is 1 where the label
  counts. Padding at the end is token 0 with a doc id of its own and label -100.
* **Loss.** `sft.loss_normalization: global_tokens` is the engine's normalisation (the step's loss
  summed over its loss tokens / their number, over every micro-batch and DP rank);
  `micro_batch_mean` averages each micro-batch's mean (megaevo.training.stage.MicroBatchMeanLoss).
* **Validation** covers each validation set once (at most `train.eval_iters` global batches); a
  last, partial global batch is filled with padding rows that have no loss tokens.
"""
from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from megaevo.common import IGNORE_INDEX
from megaevo.config import Config, ConfigError, Layout
from megaevo.data import DataError
from megaevo.data.blended import parse_blend
from megaevo.data.gpt_dataset import split_ranges
from megaevo.data.sft import SFTDataset
from megaevo.log import get_logger
from megaevo.parallel.state import ParallelState
from megaevo.training.stage import Batch, MicroBatchMeanLoss, SampleBatches, Stage, TokenLoss

log = get_logger(__name__)

PACK_WINDOW = 8192  # conversations of an epoch's order packed together
_DRAW, _SHUFFLE, _SEQUENCES = 1, 2, 3  # salts of the seeded random streams
_EPOCHS_KEPT = 4  # epoch plans kept in memory


# -- conversations -----------------------------------------------------------------------------------
@dataclass
class Conversations:
    """The conversations of one split of one dataset that a run uses, and what the cutoff did.

    ``ids`` index the dataset; ``lengths`` are the tokens used of each (at most the cutoff)."""

    name: str
    dataset: Any  # SFTDataset: lengths, __getitem__(i) -> (tokens, loss mask)
    ids: np.ndarray
    lengths: np.ndarray
    total: int = 0
    truncated: int = 0
    dropped: int = 0
    empty: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def select_conversations(dataset, name: str, doc_range: tuple[int, int], cutoff: int,
                         truncate: bool) -> Conversations:
    """The conversations of ``dataset[begin:end]`` a run uses: those longer than ``cutoff`` cut to it
    (``truncate``) or dropped; those under two tokens dropped as empty."""
    begin, end = doc_range
    lengths = np.asarray(dataset.lengths[begin:end], dtype=np.int64)
    ids = np.arange(begin, end, dtype=np.int64)
    long, empty = lengths > cutoff, lengths < 2
    keep = ~empty if truncate else ~empty & ~long
    return Conversations(name, dataset, ids[keep], np.minimum(lengths[keep], cutoff), total=end - begin,
                         truncated=int(long.sum()) if truncate else 0, dropped=0 if truncate else int(long.sum()),
                         empty=int(empty.sum()))


def epoch_shares(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Conversations each dataset gives an epoch: round(w_i × N) of N = the datasets' sizes summed
    (weights normalised; largest remainders round up, so the shares sum to N)."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) != len(sizes) or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise DataError(f"SFT dataset weights {list(weights)} must be non-negative and not all zero")
    total = int(sum(n for n, x in zip(sizes, w) if x > 0))
    exact = w / w.sum() * total
    shares = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - shares), kind="stable")[: total - int(shares.sum())]:
        shares[i] += 1
    return shares.tolist()


# -- packing -----------------------------------------------------------------------------------------
def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Bins of at most ``capacity`` tokens: each item, longest first (ties in the given order), goes
    to the open bin it fills best, or to a new bin. Returns ``(items, bounds)``: bin b holds
    ``items[bounds[b]:bounds[b + 1]]`` (indices into ``lengths``)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"items of {lengths.min()}..{lengths.max()} tokens do not fit bins of {capacity}")
    spaces: list[int] = []  # the distinct free spaces of open bins, ascending
    open_bins: dict[int, list[int]] = {}  # free space -> bins with it
    bins: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        j = bisect.bisect_left(spaces, n)
        if j < len(spaces):
            space = spaces[j]
            same = open_bins[space]
            b = same.pop()
            if not same:
                del open_bins[space], spaces[j]
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        left = space - n
        if left:
            if left not in open_bins:
                bisect.insort(spaces, left)
                open_bins[left] = []
            open_bins[left].append(b)
    bounds = np.zeros(len(bins) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in bins], out=bounds[1:])
    items = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))
    return items, bounds


def pack(lengths: np.ndarray, capacity: int, window: int = PACK_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """:func:`best_fit_decreasing` over consecutive windows of about ``window`` items of the given
    order (so packs mix the order's neighbours, and memory and time stay linear)."""
    n = len(lengths)
    pieces = np.array_split(np.arange(n), max(1, round(n / window))) if n else []
    items, bounds, done = [], [np.zeros(1, dtype=np.int64)], 0
    for piece in pieces:
        got, b = best_fit_decreasing(lengths[piece], capacity)
        items.append(piece[got])
        bounds.append(b[1:] + done)
        done += len(piece)
    return (np.concatenate(items) if items else np.zeros(0, dtype=np.int64)), np.concatenate(bounds)


def _reorder(items: np.ndarray, bounds: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bins of ``(items, bounds)`` taken in ``order``."""
    sizes = np.diff(bounds)[order]
    new_bounds = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(sizes, out=new_bounds[1:])
    source = np.repeat(bounds[:-1][order] - new_bounds[:-1], sizes) + np.arange(new_bounds[-1])
    return items[source], new_bounds


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**63, *keys])


# -- the sample stream -------------------------------------------------------------------------------
@dataclass
class EpochPlan:
    """One epoch's sequences: sequence s holds the conversations ``slots[bounds[s]:bounds[s + 1]]``,
    each slot ``(part[slot], index[slot])``: the index-th conversation of part ``part``."""

    part: np.ndarray
    index: np.ndarray
    bounds: np.ndarray
    tokens: int  # conversation tokens of the epoch

    @property
    def sequences(self) -> int:
        return len(self.bounds) - 1


class SFTSamples:
    """The sample stream of one split: epoch 0's sequences of ``seq_len`` tokens, then epoch 1's, ...

    ``parts`` are the conversations of each dataset and ``per_epoch`` how many each gives an epoch
    (default: all of them). ``finite``: a validation set, epoch 0 alone; samples past it are padding
    rows without loss tokens. Item k is one row: numpy ``tokens``, ``labels``, ``loss_mask`` and,
    packed, ``position_ids`` and ``doc_ids`` (see the module's docstring)."""

    def __init__(self, parts: Sequence[Conversations], seq_len: int, seed: int, packing: bool = True,
                 per_epoch: Sequence[int] | None = None, finite: bool = False):
        self.parts, self.seq_len, self.seed, self.packing, self.finite = list(parts), seq_len, seed, packing, finite
        self.per_epoch = [len(p) for p in self.parts] if per_epoch is None else [int(n) for n in per_epoch]
        for p, n in zip(self.parts, self.per_epoch):
            if n and not len(p):
                raise DataError(f"SFT dataset {p.name!r} has no conversations to train on (of {p.total:,} in its "
                                f"split, {p.dropped:,} were longer than the cutoff and {p.empty:,} empty)")
        if not sum(self.per_epoch):
            raise DataError("the SFT data has no conversations to train on: check data.train and data.split")
        self._lengths = np.concatenate([p.lengths for p in self.parts]).astype(np.int64)
        self._first = np.cumsum([0] + [len(p) for p in self.parts[:-1]]).astype(np.int64)  # of each part
        self._plans: OrderedDict[int, EpochPlan] = OrderedDict()
        self._starts = [0]  # first sample of each epoch counted so far

    # -- epochs
    def _draws(self, p: int, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s conversations of part ``p``: its draws k = epoch × n ... (epoch + 1) × n - 1
        walk through one seeded shuffle of the part after the other."""
        m, n = len(self.parts[p]), self.per_epoch[p]
        k = np.arange(epoch * n, (epoch + 1) * n, dtype=np.int64)
        out = np.empty(n, dtype=np.int64)
        passes = k // m
        for q in np.unique(passes).tolist():
            at = passes == q
            out[at] = _rng(self.seed, _DRAW, p, q).permutation(m)[k[at] % m]
        return out

    def plan(self, epoch: int) -> EpochPlan:
        """Epoch ``epoch``'s sequences (computed once, the last few kept)."""
        if epoch in self._plans:
            self._plans.move_to_end(epoch)
            return self._plans[epoch]
        draws = [self._draws(p, epoch) for p in range(len(self.parts))]
        part = np.concatenate([np.full(len(d), p, dtype=np.int64) for p, d in enumerate(draws)])
        index = np.concatenate(draws)
        order = _rng(self.seed, _SHUFFLE, epoch).permutation(len(index))
        part, index = part[order], index[order]
        lengths = self._lengths[self._first[part] + index]
        if self.packing:
            items, bounds = pack(lengths, self.seq_len)
            items, bounds = _reorder(items, bounds, _rng(self.seed, _SEQUENCES, epoch).permutation(len(bounds) - 1))
            part, index = part[items], index[items]
        else:
            bounds = np.arange(len(index) + 1, dtype=np.int64)
        plan = EpochPlan(part, index, bounds, int(lengths.sum()))
        self._plans[epoch] = plan
        while len(self._plans) > _EPOCHS_KEPT:
            self._plans.popitem(last=False)
        return plan

    def sequences(self, epoch: int) -> int:
        """Samples (sequences) of epoch ``epoch``."""
        while len(self._starts) <= epoch + 1:
            self._starts.append(self._starts[-1] + self.plan(len(self._starts) - 1).sequences)
        return self._starts[epoch + 1] - self._starts[epoch]

    def epoch_start(self, epoch: int) -> int:
        self.sequences(epoch)
        return self._starts[epoch]

    def samples(self, epochs: float) -> int:
        """Samples of the first ``epochs`` epochs; of a fraction of an epoch, its first sequences
        (rounded up)."""
        whole = math.floor(epochs)
        fraction = epochs - whole
        return self.epoch_start(whole) + (math.ceil(fraction * self.sequences(whole)) if fraction > 0 else 0)

    def locate(self, k: int) -> tuple[int, int]:
        """(epoch, sequence within it) of sample ``k``."""
        if k < 0:
            raise IndexError(f"sample {k} is negative")
        epoch = max(bisect.bisect_right(self._starts, k) - 1, 0)
        while self.epoch_start(epoch) + self.sequences(epoch) <= k:
            epoch += 1
        return epoch, k - self._starts[epoch]

    # -- rows
    def conversations(self, k: int) -> list[tuple[int, int]]:
        """``(part, index)`` of each conversation of sample ``k`` (none for a padding row)."""
        if self.finite and k >= self.sequences(0):
            return []
        epoch, s = self.locate(k)
        plan = self.plan(epoch)
        lo, hi = plan.bounds[s], plan.bounds[s + 1]
        return list(zip(plan.part[lo:hi].tolist(), plan.index[lo:hi].tolist()))

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        n = self.seq_len
        row = {"tokens": np.zeros(n, dtype=np.int64), "labels": np.full(n, IGNORE_INDEX, dtype=np.int64),
               "loss_mask": np.zeros(n, dtype=np.float32)}
        if self.packing:
            row["position_ids"] = np.zeros(n, dtype=np.int64)
            row["doc_ids"] = np.zeros(n, dtype=np.int64)
        convs = self.conversations(k)
        at = 0
        for d, (p, i) in enumerate(convs):
            part = self.parts[p]
            length = int(part.lengths[i])
            tokens, mask = part.dataset[int(part.ids[i])]
            tokens, target = np.asarray(tokens[:length], dtype=np.int64), np.asarray(mask[1:length]) != 0
            row["tokens"][at:at + length] = tokens
            row["labels"][at:at + length - 1] = np.where(target, tokens[1:], IGNORE_INDEX)
            row["loss_mask"][at:at + length - 1] = target
            if self.packing:
                row["position_ids"][at:at + length] = np.arange(length)
                row["doc_ids"][at:at + length] = d
            at += length
        if self.packing:
            row["position_ids"][at:] = np.arange(n - at)
            row["doc_ids"][at:] = len(convs)
        return row


def collate_rows(rows: Sequence[dict[str, np.ndarray]]) -> Batch:
    """Stack rows of :class:`SFTSamples` into a micro-batch of torch tensors."""
    return {key: torch.from_numpy(np.stack([r[key] for r in rows])) for key in rows[0]}


def sft_batches(samples: SFTSamples, **kwargs) -> SampleBatches:
    """This DP rank's micro-batches of an :class:`SFTSamples` stream, positioned by consumed samples."""
    return SampleBatches(samples, collate=collate_rows, what="SFT data", **kwargs)


# -- the stage ---------------------------------------------------------------------------------------
def open_sft_dataset(prefix: str):
    """The SFT dataset at ``prefix`` (``.bin``/``.idx`` and ``.loss_mask.bin``)."""
    return SFTDataset(prefix)


@dataclass
class SFTData:
    """The train stream and the validation streams (by name) of a run's SFT data."""

    train: SFTSamples
    valid: dict[str, SFTSamples]


def build_sft_data(cfg: Config, open_dataset: Callable[[str], Any] = open_sft_dataset) -> SFTData:
    """The SFT data of ``cfg``: the weighted train epochs of `data.train`'s train splits, and a
    validation stream per dataset (its valid split) and per `data.valid` entry (the whole dataset)."""
    s, seq_len = cfg.sft, cfg.seq_len
    cutoff = s.cutoff if s.cutoff is not None else seq_len
    try:
        corpora = parse_blend(cfg.data.train)
    except ValueError as e:
        raise ConfigError(f"data.train: {e}") from None
    names = [c.name for c in corpora]
    if len(set(names)) != len(names):
        raise DataError(f"SFT dataset names must be unique, got {names} (name them, e.g. {{chat: {{prefix: ...}}}})")
    parts, weights, valid = [], [], {}
    for corpus in corpora:
        dataset = open_dataset(corpus.prefix)
        ranges = split_ranges(len(dataset), cfg.data.split)
        parts.append(select_conversations(dataset, corpus.name, ranges["train"], cutoff, s.truncate))
        weights.append(corpus.weight)
        held_out = select_conversations(dataset, corpus.name, ranges["valid"], cutoff, s.truncate)
        if len(held_out):
            valid[corpus.name] = SFTSamples([held_out], seq_len, cfg.train.seed, s.packing, finite=True)
    for name, prefix in (cfg.data.valid or {}).items():
        if name in valid or name in names:
            raise DataError(f"validation set name {name!r} is already used by an SFT dataset of data.train")
        dataset = open_dataset(prefix)
        whole = select_conversations(dataset, name, (0, len(dataset)), cutoff, s.truncate)
        if len(whole):
            valid[name] = SFTSamples([whole], seq_len, cfg.train.seed, s.packing, finite=True)
    shares = epoch_shares([len(p) for p in parts], weights)
    train = SFTSamples(parts, seq_len, cfg.train.seed, s.packing, per_epoch=shares)
    return SFTData(train, valid)


def describe(data: SFTData, cutoff: int) -> str:
    """One line on what the run trains on: conversations, the cutoff's effect, an epoch's sequences."""
    train = data.train
    total = sum(p.total for p in train.parts)
    valid = sum(len(v.parts[0]) for v in data.valid.values())
    truncated, dropped = sum(p.truncated for p in train.parts), sum(p.dropped for p in train.parts)
    empty = sum(p.empty for p in train.parts)
    plan = train.plan(0)
    line = (f"SFT data: {total:,} train conversations in {len(train.parts)} dataset(s), {valid:,} for validation; "
            f"longer than sft.cutoff={cutoff}: {truncated:,} truncated, {dropped:,} dropped"
            + (f"; {empty:,} empty dropped" if empty else "")
            + f"; an epoch: {sum(train.per_epoch):,} conversations in {plan.sequences:,} sequences of "
            f"{train.seq_len} tokens ({'packed' if train.packing else 'padded'}), "
            f"{plan.tokens / max(plan.sequences * train.seq_len, 1):.1%} of their tokens not padding")
    if len(train.parts) > 1:
        line += "; per epoch " + ", ".join(f"{p.name} {n:,} of {len(p):,}" for p, n in zip(train.parts,
                                                                                       train.per_epoch))
    return line


def sft_stage(cfg: Config, layout: Layout, state: ParallelState, device: torch.device, *,
              open_dataset: Callable[[str], Any] = open_sft_dataset) -> Stage:
    """The SFT stage of ``cfg``: packed (or padded) conversations, the masked next-token loss normalised
    by `sft.loss_normalization`, per-dataset validation, and with `train.epochs` the run's length."""
    t = cfg.train
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give the SFT data, e.g. data.train=[path/to/prefix]")
    data = build_sft_data(cfg, open_dataset)
    if state.tp_rank == state.dp_rank == state.pp_rank == 0:
        log.info(describe(data, cfg.sft.cutoff or cfg.seq_len))
    common = dict(micro_batch_size=t.micro_batch_size, micro_batches=layout.micro_batches_per_step, state=state,
                  device=device, vocab_size=cfg.model.vocab_size)
    valid = {}
    for name, samples in data.valid.items():
        steps = min(t.eval_iters, math.ceil(samples.sequences(0) / t.global_batch_size))
        if steps:
            source = sft_batches(samples, **common)
            valid[name] = lambda source=source, steps=steps: source.batches(0, steps * source.micro_batches)
    loss = MicroBatchMeanLoss() if cfg.sft.loss_normalization == "micro_batch_mean" else TokenLoss()
    iters = None
    if t.epochs is not None:
        iters = max(1, math.ceil(data.train.samples(t.epochs) / t.global_batch_size))
    return Stage("sft", sft_batches(data.train, **common), loss, tokens_per_sample=cfg.seq_len, valid=valid,
                 iters=iters)
