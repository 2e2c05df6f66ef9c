"""The engine with a stage plugged in: global loss normalisation, a custom stage end to end, the stage's
declared capabilities, per-token log-probabilities and entropy from the vocab-parallel head."""
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megaevo.parallel.layers import vocab_parallel_entropy, vocab_parallel_log_probs
from megaevo.parallel.state import ParallelState
from megaevo.stages.pretrain import GPTBatches, pretrain_stage
from megaevo.training.stage import Stage
from megaevo.training.trainer import Trainer
from dist_utils import run_distributed
from helpers import assert_close_runs, config, fit, logical_weights, make_data

ENTROPY_BONUS = 0.01


def sample_mask(sample: int, seq_len: int) -> torch.Tensor:
    """Sample ``g`` counts every ``1 + g % 3``-th token: micro-batches hold different numbers of loss tokens."""
    t = torch.arange(seq_len)
    return ((t + sample) % (1 + sample % 3) == 0).float()


class MaskedBatches(GPTBatches):
    """GPT samples with a per-sample loss mask that depends only on the global sample index."""

    def batches(self, consumed: int, count: int):
        out = super().batches(consumed, count)
        stride = self.micro_batch_size * self.state.dp_size
        for k, b in enumerate(out):
            first = consumed + k * stride + self.state.dp_rank * self.micro_batch_size
            mask = torch.stack([sample_mask(first + i, b["labels"].shape[1]) for i in range(b["labels"].shape[0])])
            b["loss_mask"] = mask.to(b["labels"].device)
        return out


class MaskedLossWithEntropy:
    """The masked next-token loss minus a small entropy bonus on the same tokens (uses both outputs
    of the head: log-probabilities and entropy)."""

    def count(self, batch):
        return batch["loss_mask"].sum()

    def __call__(self, chunk, x, batch):
        nll, entropy = chunk(x, batch["labels"], position_ids=batch.get("position_ids"),
                             doc_ids=batch.get("doc_ids"), with_entropy=True)
        mask = batch["loss_mask"]
        return ((nll - ENTROPY_BONUS * entropy) * mask).sum(), mask.sum()


def masked_stage(cfg, layout, state, device):
    """The pre-training stage with its batches masked and its loss replaced."""
    base = pretrain_stage(cfg, layout, state, device)
    t = cfg.train
    common = dict(micro_batch_size=t.micro_batch_size, micro_batches=layout.micro_batches_per_step, state=state,
                  device=device, vocab_size=cfg.model.vocab_size)
    return Stage("masked", MaskedBatches(base.train.dataset, **common), MaskedLossWithEntropy(),
                 tokens_per_sample=cfg.seq_len)


def masked_config(data, out, **overrides):
    base = {"train.iters": 4, "train.eval_interval": 0, "optim.schedule": "constant", "optim.warmup": 0,
            "optim.clip_grad": 0.0, "optim.lr": 3e-3, "optim.min_lr": 3e-3, "checkpoint.interval": 2}
    return config(data, out, **{**base, **overrides})


def fit_masked(cfg):
    """(loss and gradient norm of each step, the trainer)."""
    trainer = Trainer(cfg, build_stage=masked_stage)
    records = trainer.fit()
    return [(r["loss"], r["grad_norm"]) for r in records if "loss" in r], trainer


def assert_same_steps(steps, expected, what=""):
    assert len(steps) == len(expected), what
    for (loss, norm), (ref_loss, ref_norm) in zip(steps, expected):
        assert math.isclose(loss, ref_loss, rel_tol=1e-5), (what, steps, expected)
        assert math.isclose(norm, ref_norm, rel_tol=1e-4), (what, steps, expected)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def masked_reference(data, tmp_path_factory):
    """One process, micro-batch 1 x 8 accumulation steps."""
    out = tmp_path_factory.mktemp("masked")
    losses, _ = fit_masked(masked_config(data, out, **{"train.micro_batch_size": 1}))
    return {"out": out, "losses": losses, "w2": logical_weights(out / "checkpoints" / "iter_0000002"),
            "w4": logical_weights(out / "checkpoints" / "iter_0000004")}


def test_first_step_loss_is_the_global_token_mean(data, masked_reference, tmp_path):
    """The loss is sum over all loss tokens / their count, not a mean of micro-batch means."""
    trainer = Trainer(masked_config(data, tmp_path, **{"train.micro_batch_size": 1}), build_stage=masked_stage)
    batches = trainer.stage.train.batches(0, 8)
    with torch.no_grad():
        sums = [trainer.stage.loss(trainer.actor.module, b["tokens"], b) for b in batches]
    total, count = sum(s for s, _ in sums), sum(c for _, c in sums)
    mean_of_means = sum(s / c for s, c in sums) / len(sums)
    assert abs(mean_of_means - total / count) > 1e-3  # the micro-batches really are uneven
    assert math.isclose(masked_reference["losses"][0][0], float(total / count), rel_tol=1e-6)


def _first_step_grads(cfg) -> dict:
    trainer = Trainer(cfg, build_stage=masked_stage)
    trainer.actor.buffers.zero_grad()
    loss = trainer.actor.forward_backward(trainer.stage.train.next_step(), trainer.stage.loss)
    trainer.actor.buffers.finish_grad_sync()
    return {"loss": loss, **{n: p.main_grad.clone() for n, p in trainer.actor.params.items()}}


def test_accumulation_does_not_change_loss_or_gradients(data, masked_reference, tmp_path):
    """8 x 1 and 2 x 4 give the gradients of 1 x 8 (to float32 rounding) and the same run."""
    grads = {mb: _first_step_grads(masked_config(data, tmp_path / f"g{mb}", **{"train.micro_batch_size": mb}))
             for mb in (1, 2, 8)}
    for mb in (2, 8):
        assert math.isclose(grads[mb].pop("loss"), grads[1]["loss"], rel_tol=1e-6)
        for n, g in grads[mb].items():
            assert (g - grads[1][n]).norm() <= 1e-5 * grads[1][n].norm(), n
    steps, _ = fit_masked(masked_config(data, tmp_path, **{"train.micro_batch_size": 8}))
    assert_same_steps(steps, masked_reference["losses"])
    # Adam turns rounding-level gradients into whole steps, so weights agree less tightly than gradients.
    assert_close_runs(logical_weights(tmp_path / "checkpoints" / "iter_0000004"), masked_reference["w4"], rtol=1e-4)


def test_custom_stage_resumes_exactly(data, tmp_path):
    out = tmp_path / "run"
    first, _ = fit_masked(masked_config(data, out, **{"train.micro_batch_size": 2, "train.iters": 2}))
    second, trainer = fit_masked(masked_config(data, out, **{"train.micro_batch_size": 2,
                                                             "checkpoint.load": "auto"}))
    assert trainer.run.iteration == 4 and trainer.stage.train.consumed_samples == 32
    whole, _ = fit_masked(masked_config(data, tmp_path / "whole", **{"train.micro_batch_size": 2}))
    assert first + second == whole
    a = logical_weights(out / "checkpoints" / "iter_0000004")
    b = logical_weights(tmp_path / "whole" / "checkpoints" / "iter_0000004")
    assert all(torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------- the declared stage interface
@dataclass
class RecordingStage(Stage):
    """The pre-training stage, saying when the engine calls each capability it overrides."""

    calls: list = field(default_factory=list)
    actors: list = field(default_factory=list)

    def start(self, ctx, loaded):
        self.calls.append(("start", ctx.iteration, loaded))

    def run_iteration(self, ctx, lr):
        self.calls.append(("iteration", ctx.iteration))
        self.actors.append(ctx.actor)
        return super().run_iteration(ctx, lr)

    def load_checkpoint(self, ck, resume):
        self.calls.append(("load", ck.iteration, resume))


def recording_stage(cfg, layout, state, device):
    base = pretrain_stage(cfg, layout, state, device)
    return RecordingStage(base.name, base.train, base.loss, base.tokens_per_sample, base.valid)


def test_the_engine_calls_what_a_stage_declares_and_defaults_the_rest(data, tmp_path):
    """A stage's overrides of the Stage methods are called (start once, before the first iteration, and
    after a checkpoint's weights are loaded); a plain Stage runs their defaults: the same run."""
    overrides = {"train.iters": 2, "train.eval_interval": 0, "checkpoint.interval": 2}
    trainer = Trainer(config(data, tmp_path / "run", **overrides), recording_stage)
    recorded = [r["loss"] for r in trainer.fit() if "loss" in r]
    assert trainer.stage.calls == [("start", 0, False), ("iteration", 0), ("iteration", 1)]
    assert all(actor is trainer.actor for actor in trainer.stage.actors)
    plain, _ = fit(config(data, tmp_path / "plain", **overrides))
    assert recorded == plain and len(plain) == 2

    resumed = Trainer(config(data, tmp_path / "run", **{**overrides, "train.iters": 3}), recording_stage)
    resumed.fit()
    assert resumed.stage.calls == [("load", 2, True), ("start", 2, True), ("iteration", 2)]


# ---------------------------------------------------------------- the head's per-token outputs
def _reference_outputs(logits, target):
    logp = torch.log_softmax(logits.double(), dim=-1)
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_entropy_and_log_probs_match_the_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 37, (3, 5))
    state = ParallelState.single()
    entropy = vocab_parallel_entropy(logits, state, vocab_size=37)
    logp = vocab_parallel_log_probs(logits, target, state, vocab_size=37)
    ref_logp, ref_entropy = _reference_outputs(logits[..., :37], target)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-6)
    weights = torch.randn(3, 5, dtype=torch.float64)
    (grad,) = torch.autograd.grad((entropy.double() * weights).sum(), logits)
    (ref_grad,) = torch.autograd.grad((ref_entropy * weights).sum(), logits)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert torch.all(grad[..., 37:] == 0)


# ---------------------------------------------------------------- several processes
def _vocab_parallel_outputs(state: ParallelState) -> dict:
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 64, dtype=torch.float64)
    target = torch.randint(0, 60, (2, 6))
    local = logits.chunk(state.tp_size, dim=-1)[state.tp_rank].clone().requires_grad_()
    entropy = vocab_parallel_entropy(local, state, vocab_size=60)
    logp = vocab_parallel_log_probs(local, target, state, vocab_size=60)
    (entropy.sum() + logp.sum()).backward()
    full = logits.clone().requires_grad_()
    ref_logp, ref_entropy = _reference_outputs(full[..., :60], target)
    (ref_entropy.sum() + ref_logp.sum()).backward()
    width = 64 // state.tp_size
    ref_grad = full.grad[..., state.tp_rank * width:(state.tp_rank + 1) * width]
    return {"entropy": (entropy.double() - ref_entropy).abs().max().item(),
            "logp": (logp.double() - ref_logp).abs().max().item(),
            "grad": (local.grad - ref_grad).abs().max().item()}


LAYOUTS = {
    "tp2dp2": {"parallel.tp": 2, "train.micro_batch_size": 1},
    "tp2pp2": {"parallel.tp": 2, "parallel.pp": 2, "parallel.sequence_parallel": True, "train.micro_batch_size": 2},
}


def _engine_layouts(rank, world, data, root):
    results = {}
    for name, extra in LAYOUTS.items():
        results[name] = fit_masked(masked_config(data, Path(root) / name, **extra))[0]
    from megaevo.parallel.state import init_parallel_state

    results["head"] = _vocab_parallel_outputs(init_parallel_state(tp=2, dp=2, device_type="cpu"))
    dist.barrier()
    return results


@pytest.mark.slow
def test_custom_stage_matches_across_layouts(data, masked_reference, tmp_path):
    """DP 2 (with TP 2) and TP 2 x PP 2 give the single process's losses and weights."""
    results = run_distributed(_engine_layouts, 4, data, str(tmp_path))[0]
    for name in LAYOUTS:
        assert_same_steps(results[name], masked_reference["losses"], name)
        assert_close_runs(logical_weights(tmp_path / name / "checkpoints" / "iter_0000004"), masked_reference["w4"],
                          rtol=1e-4)
    assert max(results["head"].values()) < 1e-6, results["head"]
