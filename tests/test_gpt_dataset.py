"""GPT samples, splits, the index cache, blending and the resumable sampler."""
import os
import random

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from megaevo.data import DataError
from megaevo.data import gpt_dataset as gpt_module
from megaevo.data.blended import BlendedDataset, Corpus, build_datasets, parse_blend
from megaevo.data.gpt_dataset import GPTDataset, format_split, split_ranges, split_share
from megaevo.errors import UserError
from megaevo.data.indexed import IndexedDatasetWriter
from megaevo.data.sampler import MicroBatchSampler, collate


def make_corpus(prefix, n_docs, seed, base=0, vocab=30000):
    """Documents whose tokens encode (document, position) so that every token is traceable."""
    rng = np.random.default_rng(seed)
    docs = []
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for d in range(n_docs):
            tokens = base + (d * 1000 + np.arange(int(rng.integers(1, 60)))) % vocab
            w.add_document(tokens)
            docs.append(tokens)
    return docs


@pytest.fixture
def corpus(tmp_path):
    prefix = tmp_path / "web"
    return prefix, make_corpus(prefix, 300, seed=0)


def test_samples_are_cut_from_the_shuffled_document_stream(corpus, tmp_path):
    prefix, docs = corpus
    ds = GPTDataset(prefix, seq_len=32, num_samples=None, seed=5, cache_dir=tmp_path / "cache")
    stream = np.concatenate([docs[d] for d in ds.document_index])
    assert len(ds) == (len(stream) - 1) // 32
    for i in [0, 1, len(ds) // 2, len(ds) - 1]:
        j = int(ds.shuffle_index[i])
        assert np.array_equal(ds[i], stream[j * 32 : j * 32 + 33])
        assert ds[i].dtype == np.int64
    # One epoch: the shuffled order visits every document once.
    assert sorted(ds.document_index.tolist()) == list(range(len(docs)))
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]


def test_more_samples_than_an_epoch_take_several_epochs(corpus, tmp_path):
    prefix, docs = corpus
    one = GPTDataset(prefix, 32, None, seed=5, cache_dir=tmp_path / "cache")
    ds = GPTDataset(prefix, 32, 3 * len(one) + 5, seed=5, cache_dir=tmp_path / "cache")
    assert len(ds) == 3 * len(one) + 5 and len(ds.shuffle_index) >= len(ds)
    counts = np.bincount(ds.document_index, minlength=len(docs))
    assert set(counts.tolist()) == {4}


def test_split_ranges_follow_megatron_rounding():
    assert split_ranges(3773, "98,1,1") == {"train": (0, 3698), "valid": (3698, 3735), "test": (3735, 3773)}
    assert split_ranges(3773, "1,1,1")["train"] == (0, 1258)
    assert split_ranges(1000, "98,1,1") == {"train": (0, 980), "valid": (980, 990), "test": (990, 1000)}
    assert split_ranges(10, "969,30,1") == {"train": (0, 10), "valid": (10, 10), "test": (10, 10)}
    # Each bound is rounded on its own, ties to even: 3.5 -> 4 and 2.5 -> 2.
    assert split_ranges(7, [1, 1]) == {"train": (0, 4), "valid": (4, 7), "test": (7, 7)}
    assert split_ranges(5, [1, 1]) == {"train": (0, 2), "valid": (2, 5), "test": (5, 5)}
    assert split_ranges(100, "100")["train"] == (0, 100)
    with pytest.raises(ValueError, match="split"):
        split_ranges(10, "a,b")
    with pytest.raises(ValueError, match="split"):
        split_ranges(10, "0,0,0")
    with pytest.raises(ValueError, match="rounding"):
        split_ranges(10, "1,1,1", rounding="nearest")


def test_split_ranges_legacy_rounding():
    # Older Megatron-LM: part sizes rounded, the overshoot taken off every bound but the first.
    legacy = {"rounding": "megatron-legacy"}
    assert split_ranges(7, [1, 1], **legacy) == {"train": (0, 3), "valid": (3, 7), "test": (7, 7)}
    assert split_ranges(3773, "98,1,1", **legacy) == {"train": (0, 3697), "valid": (3697, 3735),
                                                     "test": (3735, 3773)}


def _megatron_bounds(n: int, split: str) -> list[int]:
    """Megatron-LM core's rule, written out on its own: normalise, cumulative sums, round each."""
    parts = [float(p) for p in split.split(",")]
    parts += [0.0] * (3 - len(parts))
    parts = [p / sum(parts) for p in parts]
    cumulative = [0.0]
    for p in parts:
        cumulative.append(cumulative[-1] + p)
    return [int(round(c * float(n))) for c in cumulative]


def test_split_ranges_match_megatron_for_many_sizes():
    rng = random.Random(0)
    sizes = sorted({*range(100, 400), *rng.sample(range(400, 100_001), 3000), 3773, 100_000})
    for split in ("98,1,1", "969,30,1", "1,1,1", "90,5,5", "100,0,0", "1,1", "80,10,10"):
        for n in sizes:
            b = _megatron_bounds(n, split)
            got = split_ranges(n, split)
            assert [got["train"], got["valid"], got["test"]] == [(b[0], b[1]), (b[1], b[2]), (b[2], b[3])], (n, split)
            assert got["test"][1] == n


def test_splits_use_disjoint_document_ranges(corpus, tmp_path):
    prefix, docs = corpus
    ranges = split_ranges(len(docs), "80,10,10")
    seen = {}
    for name, rng in ranges.items():
        ds = GPTDataset(prefix, 16, None, 1, rng, name, tmp_path / "cache")
        seen[name] = set(ds.document_index.tolist())
        assert seen[name] == set(range(*rng))
    assert not (seen["train"] & seen["valid"]) and not (seen["valid"] & seen["test"])


def test_cache_is_reused_and_keyed_by_every_input(corpus, tmp_path, monkeypatch):
    prefix, _ = corpus
    calls = []
    real = gpt_module.build_gpt_indices
    monkeypatch.setattr(gpt_module, "build_gpt_indices", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "cache"
    a = GPTDataset(prefix, 16, 100, seed=1, cache_dir=cache)
    b = GPTDataset(prefix, 16, 100, seed=1, cache_dir=cache)
    assert len(calls) == 1 and np.array_equal(a.shuffle_index, b.shuffle_index)
    assert isinstance(b.shuffle_index, np.memmap)
    GPTDataset(prefix, 16, 100, seed=2, cache_dir=cache)
    GPTDataset(prefix, 17, 100, seed=1, cache_dir=cache)
    GPTDataset(prefix, 16, 101, seed=1, cache_dir=cache)
    assert len(calls) == 4
    # The numpy reference builds the very same arrays.
    c = GPTDataset(prefix, 16, 100, seed=1, cache_dir=tmp_path / "other", impl="numpy")
    assert np.array_equal(a.sample_index, c.sample_index) and np.array_equal(a.shuffle_index, c.shuffle_index)
    assert len(calls) == 5
    # Rewriting the data under the same name invalidates the cache.
    make_corpus(prefix, 200, seed=9)
    d = GPTDataset(prefix, 16, 100, seed=1, cache_dir=cache)
    assert len(calls) == 6 and len(d.document_index) == 200


def test_bad_arguments_are_refused(corpus, tmp_path):
    prefix, docs = corpus
    with pytest.raises(ValueError, match="document range"):
        GPTDataset(prefix, 16, None, 1, (10, 10), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="document range"):
        GPTDataset(prefix, 16, None, 1, (0, len(docs) + 1), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="num_samples"):
        GPTDataset(prefix, 16, 0, 1, cache_dir=tmp_path)


def _build_in_ranks(rank, world, prefix, cache, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls = []
    real = gpt_module.build_gpt_indices
    gpt_module.build_gpt_indices = lambda *a, **k: calls.append(1) or real(*a, **k)
    ds = GPTDataset(prefix, 16, 500, seed=3, cache_dir=cache)
    np.save(os.path.join(out_dir, f"rank{rank}.npy"), np.array([len(calls), *ds.shuffle_index[:50]]))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_one_rank_builds_the_others_wait_and_map(corpus, tmp_path):
    prefix, _ = corpus
    world = 3
    mp.spawn(_build_in_ranks, args=(world, str(prefix), str(tmp_path / "cache"), str(tmp_path / "init"),
                                    str(tmp_path)), nprocs=world, join=True)
    results = [np.load(tmp_path / f"rank{r}.npy") for r in range(world)]
    assert [int(r[0]) for r in results] == [1, 0, 0]
    assert all(np.array_equal(results[0][1:], r[1:]) for r in results)


def test_blend_draws_each_corpus_by_weight(tmp_path):
    make_corpus(tmp_path / "domain", 400, seed=1, base=0, vocab=20000)
    make_corpus(tmp_path / "replay", 400, seed=2, base=20000, vocab=10000)
    splits = build_datasets([0.95, str(tmp_path / "domain"), 0.05, str(tmp_path / "replay")], seq_len=16,
                            seed=1, train_samples=2000, valid_samples=20, split="90,10,0")
    train = splits.train
    assert isinstance(train, BlendedDataset) and len(train) == 2000
    sources = np.array([train.source(i) for i in range(len(train))])
    assert abs(np.count_nonzero(sources == 1) - 100) <= 1
    for lo in range(0, 2000, 100):  # 5% in every window of 100 samples
        assert 3 <= np.count_nonzero(sources[lo : lo + 100] == 1) <= 7
    for i in range(0, 2000, 97):  # the tokens really come from the corpus named
        tokens = train[i]
        assert (tokens >= 20000).all() if sources[i] == 1 else (tokens < 20000).all()
    # Validation and test stay separate per corpus, from each corpus's own held-out documents.
    assert set(splits.valid) == {"domain", "replay"} and splits.test == {}
    assert all(len(v) == 20 for v in splits.valid.values())
    assert set(splits.valid["replay"].document_index.tolist()) == set(range(360, 400))
    assert (splits.valid["replay"][0] >= 20000).all()


def test_single_corpus_and_extra_validation_sets(tmp_path):
    make_corpus(tmp_path / "a", 100, seed=1)
    make_corpus(tmp_path / "held", 50, seed=3)
    splits = build_datasets([str(tmp_path / "a")], 16, 1, train_samples=50, valid_samples=10,
                            split="100,0,0", extra_valid={"held-out": str(tmp_path / "held")})
    assert isinstance(splits.train, GPTDataset) and len(splits.train) == 50
    assert list(splits.valid) == ["held-out"]
    with pytest.raises(ValueError, match="already used"):
        build_datasets([str(tmp_path / "a")], 16, 1, 50, 10, "90,10,0", extra_valid={"a": str(tmp_path / "held")})


def test_too_few_tokens_names_the_corpus_the_split_and_the_settings(tmp_path):
    # 1,000 documents of 1-59 tokens split 998,1,1: the test split is one short document, too short for
    # one sample of 128 + 1 tokens when a single pass over it is asked for (test_samples None).
    make_corpus(tmp_path / "general", 1000, seed=1)
    with pytest.raises(DataError) as e:
        build_datasets({"general": {"prefix": str(tmp_path / "general")}}, 128, 1, train_samples=100,
                       valid_samples=10, test_samples=None, split="998,1,1")
    message = str(e.value)
    assert isinstance(e.value, UserError)
    assert message.startswith(f"the test split (1/1000 of data.split=998,1,1) of corpus 'general' "
                              f"({tmp_path / 'general'}) holds 1 document of ")
    assert "too few for a single sample of 129 tokens (data.seq_len=128 + 1)" in message
    assert "set its part to 0 to skip it (data.split=998,1,0)" in message
    assert "shorten data.seq_len" in message and "add data" in message
    assert "ask for a number of samples" not in message  # not something a config can do
    # Skipping that split (share 0) builds no test set at all; a split asked for 0 samples is not built either.
    splits = build_datasets({"general": {"prefix": str(tmp_path / "general")}}, 128, 1, train_samples=100,
                            valid_samples=0, test_samples=None, split="998,1,0")
    assert splits.test == {} and splits.valid == {} and len(splits.train) == 100
    # Another corpus name, the valid split, and a split given as a list.
    make_corpus(tmp_path / "tiny", 10, seed=2)
    with pytest.raises(DataError, match=r"the valid split \(1/2 of data\.split=1,1\) of corpus 'web' \(.*tiny\)"):
        build_datasets({"web": str(tmp_path / "tiny")}, 1000, 1, train_samples=10, valid_samples=None, split=[1, 1])


def test_too_few_tokens_of_a_dataset_alone_names_it(corpus, tmp_path):
    prefix, _ = corpus
    with pytest.raises(DataError, match=r"web \(.*web\), valid split of 1 document \[5, 6\): the documents hold"):
        GPTDataset(prefix, 64, None, 1, (5, 6), "valid", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before any index is built


def test_split_share_and_format():
    assert split_share("998,1,1", "test") == "1/1000" and split_share("969,30,1", "valid") == "3/100"
    assert split_share([0.98, 0.01, 0.01], "valid") == "1/100" and split_share("100", "train") == "all"
    assert split_share("1,0,0", "test") == "none"
    assert format_split("98/1/1") == "98,1,1" and format_split([98, 1, 1]) == "98,1,1"
    with pytest.raises(DataError, match="expected numbers"):
        split_share("a,b", "train")


def test_parse_blend_forms(tmp_path):
    assert parse_blend(["0.9", "x/a", "0.1", "y/b"]) == [Corpus("x/a", 0.9, "a"), Corpus("y/b", 0.1, "b")]
    assert parse_blend(["x/a", "y/b"]) == [Corpus("x/a", 1.0, "a"), Corpus("y/b", 1.0, "b")]
    assert parse_blend({"dom": {"prefix": "x/a", "weight": 3}, "rep": "y/b"}) == [
        Corpus("x/a", 3.0, "dom"), Corpus("y/b", 1.0, "rep")]
    with pytest.raises(ValueError, match="blend"):
        parse_blend([0.5, "a", "b"])
    with pytest.raises(ValueError, match="prefix"):
        parse_blend({"dom": {"path": "x"}})
    with pytest.raises(ValueError, match="unique"):
        build_datasets(["x/a", "y/a"], 16, 1, 10)


def test_sampler_resumes_exactly(corpus, tmp_path):
    prefix, _ = corpus
    ds = GPTDataset(prefix, 16, 600, seed=1, cache_dir=tmp_path / "cache")
    mbs, dp, global_batch = 2, 3, 12
    full = {r: list(MicroBatchSampler(len(ds), 0, mbs, r, dp)) for r in range(dp)}
    # Every sample is used once, by one rank, in order.
    flat = sorted(i for r in range(dp) for b in full[r] for i in b)
    assert flat == list(range(len(full[0]) * mbs * dp))
    for consumed in [global_batch, 5 * global_batch, 7 * mbs * dp]:
        for r in range(dp):
            resumed = list(MicroBatchSampler(len(ds), consumed, mbs, r, dp))
            skip = consumed // (mbs * dp)
            assert resumed == full[r][skip:]
            batch = collate([ds[i] for i in resumed[0]])
            assert batch["tokens"].shape == (mbs, 16) and np.array_equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    with pytest.raises(ValueError, match="boundary"):
        MicroBatchSampler(len(ds), 5, mbs, 0, dp)
    with pytest.raises(ValueError, match="dp_rank"):
        MicroBatchSampler(len(ds), 0, mbs, 3, dp)
