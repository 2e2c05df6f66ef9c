"""C++ index builders against the NumPy references, and the properties the indices promise."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megaevo import _C
from megaevo.data.indices import (
    build_blending_indices,
    build_gpt_indices,
    plan_epochs,
    sample_index_reference,
)


@pytest.mark.parametrize("seed", [0, 1, 1234, 2**32 - 1])
@pytest.mark.parametrize("dtype", [np.int32, np.uint32, np.int64])
def test_rng_shuffles_exactly_like_numpy_randomstate(seed, dtype):
    for n in [0, 1, 2, 3, 100, 4099, 10007]:
        a = np.arange(n, dtype=dtype)
        b = a.copy()
        rs = np.random.RandomState(seed)
        rs.shuffle(a)
        rs.shuffle(a)  # the stream continues across calls
        rng = _C.Rng(seed)
        rng.shuffle(b)
        rng.shuffle(b)
        assert np.array_equal(a, b), n


def test_rng_rejects_bad_input():
    with pytest.raises(ValueError):
        _C.Rng(-1)
    with pytest.raises(ValueError):
        _C.Rng(2**32)
    with pytest.raises(ValueError):
        _C.Rng(0).shuffle(np.arange(4, dtype=np.float32))


corpus = st.lists(st.integers(0, 40), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(
    sizes=corpus,
    seq_len=st.integers(1, 24),
    num_samples=st.one_of(st.none(), st.integers(1, 400)),
    seed=st.integers(0, 2**32 - 1),
    begin_frac=st.floats(0, 0.9),
)
def test_cpp_matches_numpy_reference(sizes, seq_len, num_samples, seed, begin_frac):
    sizes = np.array(sizes, dtype=np.int32)
    begin = int(begin_frac * len(sizes))
    documents = np.arange(begin, len(sizes), dtype=np.int32)
    tokens = sizes[documents].sum()
    if tokens <= 1 or (num_samples is None and tokens < seq_len + 1):
        with pytest.raises(ValueError, match="too few"):
            build_gpt_indices(sizes, documents, seq_len, num_samples, seed, impl="cpp")
        return
    a = build_gpt_indices(sizes, documents, seq_len, num_samples, seed, impl="cpp")
    b = build_gpt_indices(sizes, documents, seq_len, num_samples, seed, impl="numpy")
    assert a.plan == b.plan
    for name in ("document_index", "sample_index", "shuffle_index"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert np.array_equal(x, y), name
    if num_samples is not None:
        assert len(a.shuffle_index) >= num_samples


def _loop_sample_index(sizes, doc_index, seq_len, num_samples):
    """Megatron-LM's sample-index loop written out in Python, as an independent check."""
    out = [(0, 0)]
    d, offset = 0, 0
    for _ in range(num_samples):
        remaining = seq_len + 1
        while remaining:
            available = sizes[doc_index[d]] - offset
            remaining -= available
            if remaining <= 0:
                offset += remaining + available - 1
                remaining = 0
            else:
                d, offset = d + 1, 0
        out.append((d, offset))
    return np.array(out)


def test_sample_index_reference_matches_the_loop_definition():
    rng = np.random.default_rng(3)
    for _ in range(50):
        sizes = rng.integers(0, 12, size=int(rng.integers(2, 30))).astype(np.int32)
        sizes[0] = max(sizes[0], 1)
        doc_index = rng.permutation(len(sizes)).astype(np.int32)
        seq_len = int(rng.integers(1, 9))
        tokens = int(sizes.sum())
        if tokens < seq_len + 1:
            continue
        n = (tokens - 1) // seq_len
        ref = sample_index_reference(sizes, doc_index, seq_len, 1, tokens)
        assert np.array_equal(ref, _loop_sample_index(sizes, doc_index, seq_len, n))


def test_samples_tile_the_shuffled_document_stream():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 50, size=200).astype(np.int32)
    seq_len = 16
    idx = build_gpt_indices(sizes, np.arange(200, dtype=np.int32), seq_len, 500, seed=7)
    starts = np.concatenate([[0], np.cumsum(sizes[idx.document_index], dtype=np.int64)])
    positions = starts[idx.sample_index[:, 0]] + idx.sample_index[:, 1]
    assert np.array_equal(positions, np.arange(len(positions)) * seq_len)
    assert sorted(idx.shuffle_index.tolist()) == list(range(len(idx.shuffle_index)))


def test_epochs_and_separate_final_epoch():
    # 1000 tokens per epoch, 10-token samples: 99 samples fit in one epoch (one token is the label).
    plan = plan_epochs(1000, 10, 99)
    assert (plan.num_epochs, plan.separate_final_epoch) == (1, False)
    plan = plan_epochs(1000, 10, 100)
    assert plan.num_epochs == 2 and plan.separate_final_epoch  # 1 sample of 99 from epoch 2 (< 80%)
    plan = plan_epochs(1000, 10, 190)
    assert plan.num_epochs == 2 and not plan.separate_final_epoch  # 91 of 99 from epoch 2
    assert plan_epochs(1000, 10, None).num_epochs == 1
    assert plan_epochs(5, 10, 1).num_epochs == 3  # a tiny corpus is repeated as often as needed
    with pytest.raises(ValueError, match="too few"):
        plan_epochs(5, 10, None)
    with pytest.raises(ValueError, match="too few"):
        plan_epochs(1, 10, 1)


def test_separate_final_epoch_keeps_whole_epochs_together():
    sizes = np.full(100, 10, dtype=np.int32)  # 1000 tokens
    idx = build_gpt_indices(sizes, np.arange(100, dtype=np.int32), 10, 210, seed=3)
    assert idx.plan.num_epochs == 3 and idx.plan.separate_final_epoch
    # Each full epoch and the final epoch are permutations of the documents on their own.
    doc = idx.document_index
    assert sorted(doc[200:].tolist()) == list(range(100))
    first = idx.plan.samples_before_final_epoch
    assert sorted(idx.shuffle_index[:first].tolist()) == list(range(first))
    assert idx.shuffle_index[first:].min() >= first


@pytest.mark.parametrize("weights", [[0.95, 0.05], [1, 1, 1], [0.5, 0.3, 0.15, 0.05], [3, 0, 1],
                                     [0.01, 0.02, 0.03, 0.04, 0.1, 0.2, 0.6]])
def test_blend_holds_every_prefix_within_one_sample(weights):
    size = 5000
    di, dsi = build_blending_indices(weights, size)
    w = np.asarray(weights, float) / sum(weights)
    onehot = np.zeros((size, len(w)))
    onehot[np.arange(size), di] = 1
    counts = np.cumsum(onehot, axis=0)
    deviation = np.abs(counts - np.arange(1, size + 1)[:, None] * w)
    assert deviation.max() < 1.0
    # So every window of consecutive samples is within two samples of its share.
    rng = np.random.default_rng(0)
    for a, b in np.sort(rng.integers(0, size + 1, size=(200, 2)), axis=1):
        window = np.bincount(di[a:b], minlength=len(w))
        assert np.all(np.abs(window - (b - a) * w) < 2.0)
    for d in range(len(w)):  # each corpus is read in order, from its sample 0
        assert np.array_equal(dsi[di == d], np.arange(np.count_nonzero(di == d)))
        if w[d] == 0:
            assert not np.any(di == d)


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8).filter(lambda w: sum(w) > 1e-3),
       size=st.integers(0, 600))
def test_blending_cpp_matches_numpy(weights, size):
    a = build_blending_indices(weights, size, impl="cpp")
    b = build_blending_indices(weights, size, impl="numpy")
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_blending_rejects_bad_weights():
    for bad in ([], [0, 0], [1, -1], [float("nan")]):
        with pytest.raises(ValueError, match="weights"):
            build_blending_indices(bad, 10)
