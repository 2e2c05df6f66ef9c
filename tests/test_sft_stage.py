"""The SFT stage: packed conversations (attention, positions and labels kept within each), the two loss
normalisations, packing, cutoff and epochs, and the engine running it across layouts and resumes."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megaevo.common import IGNORE_INDEX
from megaevo.config import ConfigError, config_from_dict, validate
from megaevo.data.indexed import IndexedDatasetWriter
from megaevo.model.args import ModelArgs
from megaevo.model.llama import LlamaStage
from megaevo.stages import build_stage
from megaevo.stages.sft import SFTSamples, best_fit_decreasing, collate_rows, epoch_shares, pack, select_conversations
from megaevo.training.stage import MicroBatchMeanLoss, TokenLoss
from megaevo.training.trainer import Trainer
from dist_utils import assert_check_passed, run_checks, run_distributed
from helpers import assert_close_runs, logical_weights

VOCAB, SEQ, EOS = 300, 64, 2
SHAPE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_heads=4, num_kv_heads=2, vocab_size=VOCAB,
             max_seq_len=SEQ)


# ---------------------------------------------------------------- data
def make_conversations(n: int, seed: int, longest: int = 40) -> list[tuple[np.ndarray, np.ndarray]]:
    """One or two turns: a random prompt (mask 0), then a counting reply and EOS (mask 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens, mask = [], []
        for _ in range(int(rng.integers(1, 3))):
            prompt = rng.integers(3, 150, int(rng.integers(2, 10)))
            start, size = int(rng.integers(0, 140)), int(rng.lognormal(1.8, 0.6))
            reply = 150 + (start + np.arange(size)) % 140
            tokens += [*prompt, *reply, EOS]
            mask += [0] * len(prompt) + [1] * (size + 1)
        out.append((np.array(tokens[:longest], np.int64), np.array(mask[:longest], np.uint8)))
    return out


class MemoryConversations:
    """An in-memory SFT dataset: lengths, len, [i] -> (tokens, mask)."""

    def __init__(self, conversations, name="mem"):
        self.conversations, self.name = conversations, name
        self.lengths = np.array([len(t) for t, _ in conversations], dtype=np.int64)

    def __len__(self):
        return len(self.conversations)

    def __getitem__(self, i):
        return self.conversations[int(i)]


def write_sft(prefix: Path, conversations) -> str:
    """PREFIX.bin/.idx (one document per conversation) and PREFIX.loss_mask.bin (a byte per token)."""
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for tokens, _ in conversations:
            w.add_document(tokens)
    np.concatenate([m for _, m in conversations]).astype(np.uint8).tofile(f"{prefix}.loss_mask.bin")
    return str(prefix)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    return {"chat": write_sft(root / "chat", make_conversations(96, 0)),
            "math": write_sft(root / "math", make_conversations(40, 1))}


def sft_config(data, out, **overrides):
    raw = {
        "stage": "sft",
        "model": SHAPE,
        "data": {"train": [data["chat"]], "seq_len": SEQ, "split": "90,10,0"},
        "train": {"micro_batch_size": 1, "global_batch_size": 8, "iters": 4, "seed": 7, "log_interval": 1,
                  "eval_interval": 0, "eval_iters": 2, "dtype": "fp32"},
        "optim": {"lr": 3e-3, "min_lr": 3e-3, "warmup": 0, "schedule": "constant", "clip_grad": 0.0},
        "checkpoint": {"interval": 2},
        "out_dir": str(out),
    }
    return config_from_dict(raw, [f"{k}={v}" for k, v in overrides.items()])


def fit(cfg):
    trainer = Trainer(cfg, build_stage)
    records = trainer.fit()
    return [(r["loss"], r["grad_norm"]) for r in records if "loss" in r], trainer


def assert_same_steps(steps, expected, what=""):
    assert len(steps) == len(expected), what
    for (loss, norm), (ref_loss, ref_norm) in zip(steps, expected):
        assert math.isclose(loss, ref_loss, rel_tol=1e-5), (what, steps, expected)
        assert math.isclose(norm, ref_norm, rel_tol=1e-4), (what, steps, expected)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One process, micro-batch 1 x 8 accumulation steps; 4 steps, which cross into the second epoch."""
    out = tmp_path_factory.mktemp("reference")
    steps, trainer = fit(sft_config(data, out))
    return {"out": out, "steps": steps, "samples": trainer.stage.train.samples,
            "w4": logical_weights(out / "checkpoints" / "iter_0000004")}


def model(seed=0) -> LlamaStage:
    torch.manual_seed(seed)
    return LlamaStage(ModelArgs(**SHAPE), seed=seed, dtype=torch.float32)


def samples(conversations, packing=True, seed=3, seq_len=SEQ, **kw) -> SFTSamples:
    ds = MemoryConversations(conversations)
    part = select_conversations(ds, "mem", (0, len(ds)), seq_len, True)
    return SFTSamples([part], seq_len, seed, packing, **kw)


def epoch_batch(stream: SFTSamples, epoch: int = 0):
    start = stream.epoch_start(epoch)
    return collate_rows([stream[k] for k in range(start, start + stream.sequences(epoch))])


# ---------------------------------------------------------------- packed sequences
def test_packed_rows_keep_positions_labels_and_masks_within_each_conversation():
    convs = make_conversations(30, 5)
    stream = samples(convs)
    plan = stream.plan(0)
    assert sorted(plan.index.tolist()) == list(range(30))  # each conversation once in an epoch
    seen = 0
    for k in range(plan.sequences):
        row, members = stream[k], stream.conversations(k)
        assert len(members) >= 1
        doc, pos, tokens, labels, weight = (row[n] for n in ("doc_ids", "position_ids", "tokens", "labels",
                                                             "loss_mask"))
        at = 0
        for d, (_, i) in enumerate(members):
            t, m = convs[i]
            n = len(t)
            assert (doc[at:at + n] == d).all() and (pos[at:at + n] == np.arange(n)).all()
            assert (tokens[at:at + n] == t).all()
            expect = np.where(m[1:] == 1, t[1:], IGNORE_INDEX)
            assert (labels[at:at + n - 1] == expect).all() and labels[at + n - 1] == IGNORE_INDEX
            assert (weight[at:at + n - 1] == m[1:]).all() and weight[at + n - 1] == 0
            at += n
        seen += at
        # padding: its own doc id, positions from 0, no labels
        assert (doc[at:] == len(members)).all() and (pos[at:] == np.arange(SEQ - at)).all()
        assert (labels[at:] == IGNORE_INDEX).all() and (weight[at:] == 0).all()
        # no label crosses a boundary, and the weights are exactly the labels that count
        has = labels[:-1] != IGNORE_INDEX
        assert (doc[:-1][has] == doc[1:][has]).all() and (labels[:-1][has] == tokens[1:][has]).all()
        assert labels[-1] == IGNORE_INDEX and ((labels != IGNORE_INDEX) == (weight == 1)).all()
    assert seen == sum(len(t) for t, _ in convs) == plan.tokens
    assert plan.sequences < 30 / 2  # really packed


def _loss_and_grads(net, batch):
    net.zero_grad()
    loss_sum, count = TokenLoss()(net, batch["tokens"], batch)
    (loss_sum / count).backward()
    return float(loss_sum.detach() / count), {n: p.grad.clone() for n, p in net.named_parameters()}


def test_packed_and_padded_batches_give_the_same_loss_and_gradients():
    convs = make_conversations(12, 6)
    net = model()
    packed, padded = epoch_batch(samples(convs)), epoch_batch(samples(convs, packing=False))
    assert packed["tokens"].shape[0] < padded["tokens"].shape[0] == 12 and "doc_ids" not in padded
    loss_p, grads_p = _loss_and_grads(net, packed)
    loss_u, grads_u = _loss_and_grads(net, padded)
    assert math.isclose(loss_p, loss_u, rel_tol=1e-6)
    for n, g in grads_u.items():
        assert (grads_p[n] - g).norm() <= 1e-5 * g.norm(), n


def test_a_conversation_in_a_pack_does_not_see_its_neighbours():
    stream = samples(make_conversations(30, 7))
    k = next(k for k in range(stream.sequences(0)) if len(stream.conversations(k)) >= 3)
    batch = collate_rows([stream[k]])
    net = model()
    with torch.no_grad():
        logits = net(batch["tokens"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])
        changed = batch["tokens"].clone()
        inside = batch["doc_ids"] == 1
        changed[inside] = (changed[inside] * 7 + 11) % VOCAB
        other = net(changed, position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])
    keep = ~inside[0]
    torch.testing.assert_close(other[0, keep], logits[0, keep], rtol=0, atol=1e-6)
    assert (other[0, inside[0]] - logits[0, inside[0]]).abs().max() > 1e-3


# ---------------------------------------------------------------- losses
def _batch(labels_from, mask_all=False):
    tokens = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(labels_from))
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    keep = torch.rand(2, SEQ, generator=torch.Generator().manual_seed(labels_from + 1)) < 0.2 + labels_from / 10
    if mask_all:
        keep[:] = False
    labels[~keep] = IGNORE_INDEX
    return {"tokens": tokens, "labels": labels, "loss_mask": keep.float()}


def test_micro_batch_mean_is_the_mean_of_micro_batch_means():
    net, loss = model(), MicroBatchMeanLoss()
    batches = [_batch(1), _batch(3), _batch(5, mask_all=True)]
    with torch.no_grad():
        parts = [TokenLoss()(net, b["tokens"], b) for b in batches]
        got = [loss(net, b["tokens"], b) for b in batches]
    means = [float(s / c) for s, c in parts[:2]]
    assert abs(means[0] - means[1]) > 1e-3 and parts[0][1] != parts[1][1]  # uneven micro-batches
    total = sum(float(s) for s, _ in got) / sum(float(c) for _, c in got)
    assert math.isclose(total, sum(means) / 2, rel_tol=1e-6)
    assert [float(loss.count(b)) for b in batches] == [float(c) for _, c in got] == [1.0, 1.0, 0.0]
    assert float(got[2][0]) == 0.0


@pytest.mark.parametrize("normalization", ["global_tokens", "micro_batch_mean"])
def test_an_all_masked_micro_batch_contributes_zero(data, tmp_path, normalization):
    """Adding a micro-batch without loss tokens changes neither the step's loss nor its gradients."""
    trainer = Trainer(sft_config(data, tmp_path, **{"sft.loss_normalization": normalization}), build_stage)
    batches = [_batch(1), _batch(3)]

    def step(bs):
        trainer.actor.buffers.zero_grad()
        loss = trainer.actor.forward_backward(bs, trainer.stage.loss)
        trainer.actor.buffers.finish_grad_sync()
        return loss, {n: p.main_grad.clone() for n, p in trainer.actor.params.items()}

    loss, grads = step(batches)
    loss_e, grads_e = step([batches[0], _batch(5, mask_all=True), batches[1]])
    assert math.isfinite(loss_e) and math.isclose(loss, loss_e, rel_tol=1e-6)
    for n, g in grads.items():
        assert torch.isfinite(grads_e[n]).all() and torch.allclose(grads_e[n], g, rtol=1e-5, atol=1e-9), n
    with torch.no_grad():  # and alone: zero, not NaN
        alone = trainer.stage.loss(trainer.actor.module, batches[0]["tokens"], _batch(5, mask_all=True))
    assert [float(x) for x in alone] == [0.0, 0.0]
    if normalization == "micro_batch_mean":
        with torch.no_grad():
            means = [float(s / c) for s, c in (TokenLoss()(trainer.actor.module, b["tokens"], b) for b in batches)]
        assert math.isclose(loss, sum(means) / 2, rel_tol=1e-6)


# ---------------------------------------------------------------- packing, cutoff, weights, epochs
def test_packing_is_deterministic_and_efficient():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(300), 0.9, 20_000).astype(np.int64), 2, 2048)
    items, bounds = pack(lengths, 2048)
    assert sorted(items.tolist()) == list(range(len(lengths)))
    sums = np.add.reduceat(lengths[items], bounds[:-1])
    assert sums.max() <= 2048 and lengths.sum() / (len(sums) * 2048) >= 0.95
    again = pack(lengths, 2048)
    assert np.array_equal(items, again[0]) and np.array_equal(bounds, again[1])
    assert [sorted(b) for b in _bins(*best_fit_decreasing(np.array([5, 3, 4, 2, 6]), 8))] == [[3, 4], [0, 1], [2]]

    convs = make_conversations(200, 2)
    a, b = samples(convs, seed=11), samples(convs, seed=11)
    assert _packs(a, 0) == _packs(b, 0) and _packs(a, 1) == _packs(b, 1)  # same seed and epoch: same packs
    assert _packs(a, 1) != _packs(a, 0) and _packs(samples(convs, seed=12), 0) != _packs(a, 0)
    plan = a.plan(0)
    assert plan.tokens / (plan.sequences * SEQ) >= 0.95


def _bins(items, bounds):
    return [items[bounds[i]:bounds[i + 1]].tolist() for i in range(len(bounds) - 1)]


def _packs(stream, epoch):
    plan = stream.plan(epoch)
    return [sorted(zip(plan.part[lo:hi].tolist(), plan.index[lo:hi].tolist()))
            for lo, hi in zip(plan.bounds[:-1], plan.bounds[1:])]


def test_cutoff_truncates_or_drops_and_counts():
    convs = [(np.arange(n) % 50 + 3, np.ones(n, np.uint8)) for n in (10, 30, 31, 70, 1, 0)]
    ds = MemoryConversations(convs)
    cut = select_conversations(ds, "mem", (0, 6), 30, truncate=True)
    assert (cut.truncated, cut.dropped, cut.empty, cut.total) == (2, 0, 2, 6)
    assert cut.ids.tolist() == [0, 1, 2, 3] and cut.lengths.tolist() == [10, 30, 30, 30]
    drop = select_conversations(ds, "mem", (1, 6), 30, truncate=False)
    assert (drop.truncated, drop.dropped, drop.empty, drop.total) == (0, 2, 2, 5)
    assert drop.ids.tolist() == [1]
    stream = SFTSamples([cut], 32, 0, packing=False)
    row = stream[int(np.flatnonzero(stream.plan(0).index == 3)[0])]  # the truncated 70-token conversation
    assert (row["tokens"][:30] == convs[3][0][:30]).all() and (row["tokens"][30:] == 0).all()
    assert row["labels"][28] == convs[3][0][29] and (row["labels"][29:] == IGNORE_INDEX).all()


def test_weights_share_an_epoch_and_epochs_count_iterations():
    assert epoch_shares([100], [0.3]) == [100]
    assert epoch_shares([90, 10], [0.5, 0.5]) == [50, 50] and epoch_shares([90, 10], [9, 1]) == [90, 10]
    assert epoch_shares([5, 5, 5], [1, 1, 1]) == [5, 5, 5] and sum(epoch_shares([7, 3, 4], [0.2, 0.3, 0.5])) == 14
    big, small = (MemoryConversations(make_conversations(n, s)) for n, s in ((60, 1), (10, 2)))
    parts = [select_conversations(d, n, (0, len(d)), SEQ, True) for d, n in ((big, "big"), (small, "small"))]
    stream = SFTSamples(parts, SEQ, 0, per_epoch=epoch_shares([60, 10], [0.5, 0.5]))
    drawn = [stream.plan(e) for e in range(3)]
    for plan in drawn:
        assert (plan.part == 0).sum() == (plan.part == 1).sum() == 35
    seen_big = np.concatenate([p.index[p.part == 0] for p in drawn[:2]])
    assert len(np.unique(seen_big)) == 60  # down-sampled: every conversation before any repeats
    counts = np.bincount(drawn[0].index[drawn[0].part == 1], minlength=10)
    assert counts.min() >= 3 and counts.max() <= 4  # up-sampled evenly
    # the stream runs on from epoch to epoch; a fraction of an epoch counts its first sequences, rounded up
    s0, s1 = stream.sequences(0), stream.sequences(1)
    assert stream.samples(1) == s0 and stream.samples(2) == s0 + s1
    assert stream.samples(1.5) == s0 + math.ceil(s1 / 2)
    assert stream.locate(s0) == (1, 0) and stream.locate(s0 - 1) == (0, s0 - 1)
    assert stream.conversations(s0) == list(zip(drawn[1].part[:drawn[1].bounds[1]].tolist(),
                                                drawn[1].index[:drawn[1].bounds[1]].tolist()))


def test_validation_covers_each_set_once_padding_the_last_batch():
    stream = samples(make_conversations(10, 4), finite=True)
    n = stream.sequences(0)
    rows = [stream[k] for k in range(n + 3)]
    assert sum(int(r["loss_mask"].sum()) for r in rows[:n]) > 0
    assert all(r["loss_mask"].sum() == 0 and (r["labels"] == IGNORE_INDEX).all() for r in rows[n:])


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, pattern", [
    ({"stage": "sftt"}, r"^stage: expected one of 'pretrain', 'sft', 'rl', got 'sftt' \(did you mean 'sft'\?\)$"),
    ({"stage": "rl"}, r"rl\.prompts is empty"),
    ({"sft.loss_normalization": "mean"}, r"^sft\.loss_normalization: expected one of 'global_tokens', "
                                         r"'micro_batch_mean', got 'mean'"),
    ({"sft.cutoff": SEQ + 1}, rf"^sft\.cutoff={SEQ + 1} must be between 2 and data\.seq_len={SEQ}"),
    ({"train.epochs": 0}, r"^train\.epochs=0\.0 must be a positive number"),
    ({"stage": "pretrain", "train.epochs": 2}, r"^train\.epochs counts epochs of SFT conversations"),
    ({"sft.packing": "maybe"}, r"^sft\.packing: expected true or false"),
])
def test_config_errors(data, tmp_path, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate(sft_config(data, tmp_path, **overrides), 1)


# ---------------------------------------------------------------- the engine
def test_sft_run_learns_logs_validation_and_counts_epochs(data, reference, tmp_path):
    lines = [json.loads(l) for l in (reference["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4] and lines[-1]["tokens"] == 32 * SEQ
    assert reference["samples"].epoch_start(1) < 32  # the run went on into epoch 1
    out = tmp_path / "epochs"
    cfg = sft_config({"chat": data["chat"], "math": data["math"]}, out,
                     **{"data.train": f"[0.7,{data['chat']},0.3,{data['math']}]", "train.epochs": 1.5,
                        "train.eval_interval": 2, "optim.lr": 1e-2, "optim.min_lr": 1e-2,
                        "data.valid": f"{{extra: {data['math']}}}"})
    trainer = Trainer(cfg, build_stage)
    stream = trainer.stage.train.samples
    assert trainer.cfg.train.iters == math.ceil(stream.samples(1.5) / 8) and cfg.train.iters == 4
    records = trainer.fit()
    steps = [r for r in records if "loss" in r]
    assert len(steps) == trainer.cfg.train.iters and steps[-1]["loss"] < steps[0]["loss"]
    assert {"val/chat", "val/math", "val/extra"} <= records[1].keys()
    assert all(math.isfinite(records[1][k]) for k in ("val/chat", "val/math", "val/extra"))


def test_accumulation_does_not_change_loss_or_weights(data, reference, tmp_path):
    """micro-batch 8 x 1 accumulation step = the reference's 1 x 8, on conversations of varying length."""
    steps, _ = fit(sft_config(data, tmp_path, **{"train.micro_batch_size": 8}))
    assert_same_steps(steps, reference["steps"])
    assert_close_runs(logical_weights(tmp_path / "checkpoints" / "iter_0000004"), reference["w4"], rtol=1e-4)


def test_resume_mid_epoch_is_exact_and_finetune_starts_from_a_checkpoint(data, reference, tmp_path):
    out = tmp_path / "run"
    first, _ = fit(sft_config(data, out, **{"train.iters": 2}))
    second, trainer = fit(sft_config(data, out, **{"checkpoint.load": "auto"}))
    assert trainer.run.iteration == 4 and trainer.stage.train.consumed_samples == 32
    assert first + second == reference["steps"]
    weights = logical_weights(out / "checkpoints" / "iter_0000004")
    assert all(torch.equal(weights[n], t) for n, t in reference["w4"].items())
    # fine-tuning from a checkpoint: its weights, iteration 0, the data from the start
    tuned, trainer = fit(sft_config(data, tmp_path / "tuned", **{
        "checkpoint.load": str(reference["out"] / "checkpoints" / "iter_0000004"), "checkpoint.finetune": True,
        "train.iters": 1}))
    assert trainer.run.iteration == 1 and tuned[0][0] < reference["steps"][0][0] - 0.3


# ---------------------------------------------------------------- several processes
TP2PP2DP2 = {"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True}
MEAN = {"sft.loss_normalization": "micro_batch_mean"}
LAYOUTS = {"tp2pp2dp2": TP2PP2DP2, "dp8": {}, "tp2pp2dp2_mean": {**TP2PP2DP2, **MEAN}}


@pytest.fixture(scope="module")
def mean_reference(data, tmp_path_factory):
    """The reference run with micro_batch_mean: the same micro-batches (of 1), so every layout must agree."""
    out = tmp_path_factory.mktemp("mean")
    return {"out": out, "steps": fit(sft_config(data, out, **MEAN))[0],
            "w4": logical_weights(out / "checkpoints" / "iter_0000004")}


def _layouts(rank, world, data, root):
    results = {}

    def layouts(rank, world):
        for name, extra in LAYOUTS.items():
            results[name] = fit(sft_config(data, Path(root) / name, **extra))[0]

    def resume(rank, world):
        out = Path(root) / "resume"
        first = fit(sft_config(data, out, **{**TP2PP2DP2, "train.iters": 2}))[0]
        second = fit(sft_config(data, out, **{**TP2PP2DP2, "checkpoint.load": "auto"}))[0]
        results["resumed"] = first + second
        dist.barrier()

    return {"checks": run_checks(rank, world, {"layouts": layouts, "resume": resume}), "results": results}


@pytest.mark.slow
def test_layouts_and_resume_across_processes(data, reference, mean_reference, tmp_path):
    """TP 2 x PP 2 x DP 2 and DP 8 give the single process's run (also with micro_batch_mean); resuming
    mid-epoch at TP 2 x PP 2 x DP 2 continues it bit for bit."""
    outs = run_distributed(_layouts, 8, data, str(tmp_path))
    for name in ("layouts", "resume"):
        assert_check_passed([o["checks"] for o in outs], name)
    results = outs[0]["results"]
    assert mean_reference["steps"][0][0] != reference["steps"][0][0]
    for name in LAYOUTS:
        ref = mean_reference if name.endswith("_mean") else reference
        assert_same_steps(results[name], ref["steps"], name)
        assert_close_runs(logical_weights(tmp_path / name / "checkpoints" / "iter_0000004"), ref["w4"], rtol=1e-4)
    assert results["resumed"] == results["tp2pp2dp2"]
    a = logical_weights(tmp_path / "resume" / "checkpoints" / "iter_0000004")
    b = logical_weights(tmp_path / "tp2pp2dp2" / "checkpoints" / "iter_0000004")
    assert all(torch.equal(a[n], b[n]) for n in a)
