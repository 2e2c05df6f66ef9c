"""Document, sample, shuffle and blending indices, as Megatron-LM defines them.

Each index has a C++ builder (megaevo._C, the default) and a plain NumPy reference here; both give
identical arrays, which the tests check. The procedure for a GPT dataset over `documents` (ids of
sequences in an indexed dataset) with `num_samples` samples of `seq_len + 1` tokens:

1. epochs: as many passes over the documents as the requested samples need;
2. document index: the documents repeated once per epoch and shuffled with
   `numpy.random.RandomState(seed)`; when the last epoch is needed for less than 80% of its
   samples it is shuffled separately, so that the partial epoch is a uniform sample of the corpus;
3. sample index: where each sample starts (position in the document index, token offset); samples
   are cut across document boundaries and overlap by one token (the last label);
4. shuffle index: a permutation of the samples (the separate final epoch again shuffled apart),
   drawn from the same random stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megaevo.data import DataError

FINAL_EPOCH_THRESHOLD = 0.80


class TooFewTokensError(DataError):
    """Documents too short for one sample (or, when one epoch is asked for, for one sample without
    repeating them). `tokens` is what the documents hold, `sample_tokens` what one sample needs."""

    def __init__(self, message: str, tokens: int = 0, sample_tokens: int = 0):
        super().__init__(message)
        self.tokens, self.sample_tokens = tokens, sample_tokens


def _cpp():
    from megaevo import _C

    return _C


@dataclass(frozen=True)
class EpochPlan:
    tokens_per_epoch: int
    num_epochs: int
    separate_final_epoch: bool
    samples_before_final_epoch: int  # samples shuffled as one block when the final epoch is separate


def plan_epochs(tokens_per_epoch: int, seq_len: int, num_samples: int | None, add_extra_token: int = 1) -> EpochPlan:
    """How many epochs `num_samples` samples need, and whether the last is shuffled on its own."""
    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}")
    sample = seq_len + add_extra_token
    too_few = f"the documents hold {tokens_per_epoch:,} tokens, too few for a single sample of {sample:,}"
    if tokens_per_epoch <= add_extra_token:
        raise TooFewTokensError(too_few, tokens_per_epoch, sample)
    if num_samples is None:
        if tokens_per_epoch - add_extra_token < seq_len:
            raise TooFewTokensError(too_few + " (ask for a number of samples to go over them more than once)",
                                    tokens_per_epoch, sample)
        return EpochPlan(tokens_per_epoch, 1, False, 0)
    requested = num_samples * seq_len + add_extra_token
    num_epochs = max(1, -(-requested // tokens_per_epoch))
    if num_epochs == 1:
        return EpochPlan(tokens_per_epoch, 1, False, 0)
    before_final = ((num_epochs - 1) * tokens_per_epoch - add_extra_token) // seq_len
    from_final = num_samples - before_final
    per_epoch = (tokens_per_epoch - add_extra_token) // seq_len
    separate = from_final < int(FINAL_EPOCH_THRESHOLD * per_epoch)
    return EpochPlan(tokens_per_epoch, num_epochs, separate, before_final)


@dataclass
class GPTIndices:
    document_index: np.ndarray  # int32 [epochs * documents]
    sample_index: np.ndarray  # int32/int64 [samples + 1, 2]
    shuffle_index: np.ndarray  # uint32/int64 [samples]
    plan: EpochPlan


def build_gpt_indices(
    sizes: np.ndarray,
    documents: np.ndarray,
    seq_len: int,
    num_samples: int | None,
    seed: int,
    impl: str = "cpp",
    add_extra_token: int = 1,
) -> GPTIndices:
    """All three indices for one dataset split. `sizes[d]` is the token count of document d."""
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    documents = np.ascontiguousarray(documents, dtype=np.int32)
    if impl == "cpp":
        tokens = _cpp().count_tokens(sizes, documents)
    else:
        tokens = int(sizes[documents].sum(dtype=np.int64))
    plan = plan_epochs(tokens, seq_len, num_samples, add_extra_token)
    if impl == "cpp":
        doc_index, sample_index, shuffle_index, _ = _cpp().build_gpt_indices(
            sizes, documents, seq_len, plan.num_epochs, plan.separate_final_epoch,
            plan.samples_before_final_epoch, seed, add_extra_token,
        )
    elif impl == "numpy":
        rng = np.random.RandomState(seed)
        doc_index = document_index_reference(documents, plan.num_epochs, plan.separate_final_epoch, rng)
        sample_index = sample_index_reference(sizes, doc_index, seq_len, plan.num_epochs, tokens, add_extra_token)
        total = sample_index.shape[0] - 1
        first = plan.samples_before_final_epoch if plan.separate_final_epoch else total
        shuffle_index = shuffle_index_reference(first, total, rng)
    else:
        raise ValueError(f"unknown index implementation {impl!r} (use 'cpp' or 'numpy')")
    return GPTIndices(doc_index, sample_index, shuffle_index, plan)


def build_blending_indices(weights, size: int, impl: str = "cpp") -> tuple[np.ndarray, np.ndarray]:
    """(dataset id, sample id within that dataset) for each of `size` blended samples.

    Weights are normalised. Every prefix of n samples holds each dataset's share `weight * n` to
    within one sample (at most 1 - 1/(2k - 2) off for k datasets): the scheme is a largest-error
    greedy in which, among the datasets behind their share, the one that would soonest fall a whole
    sample behind goes next (an earliest-deadline rule; Megatron-LM's plain greedy can drift past
    one sample with three or more datasets).
    """
    weights = normalize_weights(weights)
    if impl == "cpp":
        return _cpp().build_blending_indices(weights, int(size))
    if impl == "numpy":
        return blending_indices_reference(weights, int(size))
    raise ValueError(f"unknown index implementation {impl!r} (use 'cpp' or 'numpy')")


def normalize_weights(weights) -> np.ndarray:
    w = np.ascontiguousarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise DataError("blending needs a non-empty list of weights")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise DataError(f"blend weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return w / w.sum()


# -- NumPy references --------------------------------------------------------------------------


def document_index_reference(documents, num_epochs: int, separate_final_epoch: bool, rng) -> np.ndarray:
    if separate_final_epoch and num_epochs > 1:
        first = document_index_reference(documents, num_epochs - 1, False, rng)
        last = document_index_reference(documents, 1, False, rng)
        return np.concatenate([first, last])
    index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    rng.shuffle(index)
    return index


def sample_index_reference(sizes, document_index, seq_len: int, num_epochs: int, tokens_per_epoch: int,
                           add_extra_token: int = 1) -> np.ndarray:
    """Sample s starts at token s * seq_len of the concatenated document stream."""
    num_samples = (num_epochs * tokens_per_epoch - add_extra_token) // seq_len
    ends = np.cumsum(np.asarray(sizes, dtype=np.int64)[document_index])
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    # First document whose end lies beyond the start position (skips empty documents).
    pos = np.searchsorted(ends, starts, side="right")
    begins = ends[pos] - np.asarray(sizes, dtype=np.int64)[document_index[pos]]
    dtype = np.int64 if len(document_index) >= np.iinfo(np.int32).max else np.int32
    out = np.stack([pos, starts - begins], axis=1).astype(dtype)
    out[0] = 0  # the first sample starts at the first entry, even when that document is empty
    return out


def shuffle_index_reference(num_samples: int, total_size: int, rng) -> np.ndarray:
    dtype = np.int64 if total_size >= np.iinfo(np.uint32).max - 1 else np.uint32
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def blending_indices_reference(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    k = len(weights)
    slack = 1.0 / (2 * (k - 1)) if k > 1 else 0.0
    sigma = 1.0 - slack
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    taken = np.zeros(k, dtype=np.int64)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        for i in range(size):
            eligible = (weights > 0) & (weights * (i + 1) - taken >= slack - 1e-9)
            deadlines = np.where(eligible, (taken + sigma) / weights, np.inf)
            d = int(np.argmin(deadlines))  # ties go to the lowest index
            dataset_index[i] = d
            sample_index[i] = taken[d]
            taken[d] += 1
    return dataset_index, sample_index
