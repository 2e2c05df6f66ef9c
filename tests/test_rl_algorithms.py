"""The RL arithmetic (megaevo.stages.rl.algorithms) against its formulas, brute-force loops and hand cases;
global whitening on 2 gloo ranks."""
from __future__ import annotations

import math

import pytest
import torch

from megaevo.stages.rl.algorithms import (
    AGGREGATION_MODES,
    SumCount,
    aggregate,
    aggregation,
    explained_variance,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_whiten,
    policy_loss,
    token_level_rewards,
    token_mult_prob_error,
    truncated_importance_weights,
    value_loss,
)
from dist_utils import assert_check_passed, run_checks, run_distributed


def span_mask(starts, ends, seq):
    """A (batch, seq) bool mask with row i true on [starts[i], ends[i])."""
    pos = torch.arange(seq)
    return torch.stack([(pos >= s) & (pos < e) for s, e in zip(starts, ends)])


# ---- GRPO ------------------------------------------------------------------------------------------------

def test_grpo_advantages_formula_and_zero_variance_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,   0.1, 0.1, 0.1, 0.1,   0.0, 0.0, 0.0, 1.0,   1.0, 1.0, 1.0, 1.0])
    adv = grpo_advantages(rewards, 4)
    g = rewards.view(4, 4).double()
    expected = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)  # unbiased std
    expected[1] = 0.0
    expected[3] = 0.0
    torch.testing.assert_close(adv, expected.view(-1).float())
    assert torch.equal(adv[4:8], torch.zeros(4)) and torch.equal(adv[12:], torch.zeros(4))  # exactly 0
    dr = grpo_advantages(rewards, 4, normalize_std=False)
    torch.testing.assert_close(dr[8:12], torch.tensor([-0.25, -0.25, -0.25, 0.75]))
    assert torch.equal(dr[4:8], torch.zeros(4))
    assert torch.equal(grpo_advantages(torch.tensor([3.0, -1.0]), 1), torch.zeros(2))  # a group of one
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(rewards, 3)


# ---- GAE -------------------------------------------------------------------------------------------------

def gae_brute_force(rewards, values, mask, gamma, lam):
    """Each row's response positions in order, the textbook recursion over them in plain Python."""
    adv = torch.zeros(rewards.shape, dtype=torch.float64)
    ret = torch.zeros(rewards.shape, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        pos = [t for t in range(rewards.shape[1]) if mask[b, t]]
        last = 0.0
        for k in reversed(range(len(pos))):
            t = pos[k]
            next_v = float(values[b, pos[k + 1]]) if k + 1 < len(pos) else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + float(values[b, t])
    return adv, ret


def gae_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = 12
    # left-padded prompt + right padding, a response at the very end, one without response, one holed mask
    mask = span_mask([3, 0, 5, 7, 4], [9, 12, 12, 7, 10], seq)
    mask[4, 6] = False  # not contiguous: the scan must skip it
    rewards = torch.randn(5, seq, generator=g)
    values = torch.randn(5, seq, generator=g)
    return rewards, values, mask


def test_gae_gamma_lambda_one_is_return_minus_value():
    rewards, values, mask = gae_batch()
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    m = mask.float()
    suffix = torch.flip(torch.cumsum(torch.flip(rewards * m, [1]), 1), [1]) * m  # suffix sums over the response
    torch.testing.assert_close(ret, suffix)
    torch.testing.assert_close(adv, (suffix - values) * m)
    assert torch.equal(adv[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(ret[3], torch.zeros(12))  # no response tokens


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 0.0), (1.0, 0.5), (0.5, 1.0)])
def test_gae_matches_brute_force(gamma, lam):
    rewards, values, mask = gae_batch(seed=1)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = gae_brute_force(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, adv_ref.float())
    torch.testing.assert_close(ret, ret_ref.float())


def test_gae_is_independent_of_padding_offset():
    """The same response placed at another offset (left vs right padding) gets the same advantages."""
    r, v = torch.randn(1, 5), torch.randn(1, 5)
    left = torch.zeros(1, 9), torch.zeros(1, 9)
    right = torch.zeros(1, 9), torch.zeros(1, 9)
    left[0][:, 4:], left[1][:, 4:] = r, v
    right[0][:, 1:6], right[1][:, 1:6] = r, v
    a1, _ = gae(*left, span_mask([4], [9], 9), 0.9, 0.8)
    a2, _ = gae(*right, span_mask([1], [6], 9), 0.9, 0.8)
    torch.testing.assert_close(a1[:, 4:], a2[:, 1:6])


# ---- whitening, explained variance -----------------------------------------------------------------------

def whiten_reference(x, mask, shift_mean=True, eps=1e-8):
    sel = x[mask].double()
    mean, var = sel.mean(), sel.var(unbiased=True)
    out = (x.double() - mean) / torch.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros_like(out)).float()


def test_masked_whiten_local():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 10, generator=g) * 3 + 5
    mask = span_mask([0, 2, 5, 9], [4, 10, 8, 10], 10)
    for shift in (True, False):
        torch.testing.assert_close(masked_whiten(x, mask, shift_mean=shift), whiten_reference(x, mask, shift))
    w = masked_whiten(x, mask)
    assert abs(float(w[mask].mean())) < 1e-5 and abs(float(w[mask].std()) - 1) < 1e-5


def test_explained_variance():
    g = torch.Generator().manual_seed(3)
    returns = torch.randn(3, 8, generator=g)
    mask = span_mask([0, 2, 4], [8, 6, 8], 8)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    mean_pred = torch.full_like(returns, float(returns[mask].mean()))
    assert explained_variance(mean_pred, returns, mask) == pytest.approx(0.0, abs=1e-6)
    noisy = returns + 0.5 * torch.randn(3, 8, generator=g)
    expected = 1 - float((returns - noisy)[mask].var()) / float(returns[mask].var())
    assert explained_variance(noisy, returns, mask) == pytest.approx(expected, rel=1e-5)
    assert math.isnan(explained_variance(returns, torch.ones(3, 8), mask))


# ---- distributed (one spawn) -----------------------------------------------------------------------------

def _global_batch():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 7, generator=g) * 2 + 1
    mask = span_mask([0, 3, 1, 6, 2, 0], [7, 7, 4, 7, 7, 0], 7)  # the last row has no tokens
    return x, mask


def _rank_rows(rank):
    return slice(0, 2) if rank == 0 else slice(2, 6)  # uneven split


def _check_whiten_global(rank, world_size):
    import torch.distributed as dist

    x, mask = _global_batch()
    rows = _rank_rows(rank)
    for shift in (True, False):
        mine = masked_whiten(x[rows], mask[rows], shift_mean=shift, group=dist.group.WORLD)
        torch.testing.assert_close(mine, whiten_reference(x, mask, shift)[rows])


def _check_explained_variance_global(rank, world_size):
    import torch.distributed as dist

    x, mask = _global_batch()
    values = x + 0.3 * torch.cos(torch.arange(42.0)).view(6, 7)
    rows = _rank_rows(rank)
    got = explained_variance(values[rows], x[rows], mask[rows], group=dist.group.WORLD)
    assert got == pytest.approx(explained_variance(values, x, mask), rel=1e-9)


def _distributed_checks(rank, world_size):
    return run_checks(rank, world_size, {"whiten": _check_whiten_global,
                                         "explained_variance": _check_explained_variance_global})


@pytest.fixture(scope="module")
def distributed_results():
    return run_distributed(_distributed_checks, 2)


@pytest.mark.parametrize("name", ["whiten", "explained_variance"])
def test_distributed(distributed_results, name):
    assert_check_passed(distributed_results, name)


# ---- KL --------------------------------------------------------------------------------------------------

def test_kl_estimators():
    logp = torch.log(torch.tensor([0.5, 0.2, 0.9]))
    ref = torch.log(torch.tensor([0.25, 0.4, 0.9]))
    d = logp - ref
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), d)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * d * d)
    # k3 = r - log r - 1 with r = ref/policy: 0.5 - ln 0.5 - 1 and 2 - ln 2 - 1
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"),
                               torch.tensor([0.5 + math.log(2) - 1, 2 - math.log(2) - 1, 0.0]))
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(1000, generator=g) * 5, torch.randn(1000, generator=g) * 5
    assert bool((kl_penalty(a, b, "k3") >= 0).all()) and bool((kl_penalty(a, b, "k2") >= 0).all())
    assert torch.isfinite(kl_penalty(torch.tensor([-100.0]), torch.tensor([0.0]), "k3")).all()
    for est in ("k1", "k2", "k3"):
        assert torch.equal(kl_penalty(a, a, est), torch.zeros(1000))
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(a, b, "k4")


def test_k3_is_clamped_at_ten():
    """Unclamped, k3 at log-ratios (logp − ref_logp) of −8 and −30 is e^8 − 9 ≈ 2972 and about 4.85e8."""
    logp, ref = torch.tensor([-8.0, -30.0, -2.0, 3.0]), torch.zeros(4)
    k3 = kl_penalty(logp, ref, "k3")
    assert k3[0] == k3[1] == 10.0
    torch.testing.assert_close(k3[2:], torch.tensor([math.exp(2) - 3, math.exp(-3) + 2]))  # below the clamp


# ---- policy and value losses -----------------------------------------------------------------------------

def test_policy_loss_on_policy_is_minus_advantage():
    g = torch.Generator().manual_seed(6)
    logp = torch.randn(3, 6, generator=g) - 2
    adv = torch.randn(3, 6, generator=g)
    mask = span_mask([1, 0, 3], [6, 4, 6], 6)
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, 0.2, 0.28, dual_clip=3.0)
    assert torch.equal(loss, torch.where(mask, -adv, torch.zeros_like(adv)))
    assert stats["clipfrac"].mean() == 0.0 and stats["dual_clipfrac"].mean() == 0.0
    assert stats["approx_kl"].mean() == 0.0 and float(stats["clipfrac"].count) == int(mask.sum())


def test_policy_loss_gradient_is_minus_advantage_on_policy():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 0.5]])
    loss, _ = policy_loss(logp, logp.detach(), adv, torch.ones(1, 3, dtype=torch.bool), 0.2, 0.2)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -adv)


def test_policy_loss_clipping_hand_cases():
    # ratios 1.5, 0.5, 1.5, 0.5, 1.1 with advantages +1, +1, -1, -1, +1; clip to [0.8, 1.2]
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1]])
    logp, old = torch.log(ratio), torch.zeros(1, 5)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, 0.2)
    # A>0, r>1+ε: clipped (−1.2); A>0, r<1−ε: unclipped (−0.5); A<0, r>1+ε: unclipped (1.5);
    # A<0, r<1−ε: clipped (0.8); inside the range: −1.1
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.5, 1.5, 0.8, -1.1]]))
    assert stats["clipfrac"].mean() == pytest.approx(2 / 5)
    expected_kl = float((0.5 * torch.log(ratio) ** 2).mean())
    assert stats["approx_kl"].mean() == pytest.approx(expected_kl, rel=1e-6)
    # separate low/high: [0.9, 1.3] turns the first into −1.3
    loss2, _ = policy_loss(logp, old, adv, mask, 0.1, 0.3)
    torch.testing.assert_close(loss2, torch.tensor([[-1.3, -0.5, 1.5, 0.9, -1.1]]))


def test_policy_loss_dual_clip():
    # A = −2, ratio 5: the plain loss is 10, dual clip c = 3 caps it at 6; ratio 2 (loss 4) stays
    logp = torch.log(torch.tensor([[5.0, 2.0, 5.0]]))
    adv = torch.tensor([[-2.0, -2.0, 2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = policy_loss(logp, torch.zeros(1, 3), adv, mask, 0.2, 0.2, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor([[6.0, 4.0, -2.4]]))
    assert stats["dual_clipfrac"].mean() == pytest.approx(1 / 3)
    assert stats["clipfrac"].mean() == pytest.approx(1 / 3)  # the positive-advantage token
    with pytest.raises(ValueError, match="greater than 1"):
        policy_loss(logp, logp, adv, mask, 0.2, 0.2, dual_clip=1.0)


def test_value_loss_hand_cases():
    values = torch.tensor([[1.0, 3.0, 0.0, 2.0]])
    old = torch.tensor([[0.0, 2.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    # clip 0.5: v_clip = 0.5, 2.5, 0 -> max(1, 2.25)/2, max(1, .25)/2, max(1, 1)/2; masked last
    torch.testing.assert_close(value_loss(values, old, returns, mask, 0.5),
                               torch.tensor([[1.125, 0.5, 0.5, 0.0]]))
    torch.testing.assert_close(value_loss(values, old, returns, mask, None), torch.tensor([[0.5, 0.5, 0.5, 0.0]]))


# ---- aggregation -----------------------------------------------------------------------------------------

def aggregation_reference(loss, mask, mode, max_len):
    m = mask.double()
    per_seq_sum = (loss.double() * m).sum(1)
    per_seq_tokens = m.sum(1)
    seqs = per_seq_tokens > 0
    if mode == "token-mean":
        return float(per_seq_sum.sum() / m.sum())
    if mode == "seq-mean-token-sum":
        return float(per_seq_sum[seqs].mean())
    if mode == "seq-mean-token-mean":
        return float((per_seq_sum[seqs] / per_seq_tokens[seqs]).mean())
    return float(per_seq_sum.sum() / (int(seqs.sum()) * max_len))


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregation_across_micro_batches_and_ranks(mode):
    g = torch.Generator().manual_seed(7)
    seq, max_len = 10, 8
    starts = torch.randint(0, 4, (11,), generator=g)
    lengths = torch.randint(1, 7, (11,), generator=g)
    mask = span_mask(starts.tolist(), (starts + lengths).clamp(max=seq).tolist(), seq)
    mask[5] = False  # a padding row
    loss = torch.randn(11, seq, generator=g) + 1.0
    loss[~mask] = float("nan")  # garbage outside the mask must not leak in
    expected = aggregation_reference(torch.nan_to_num(loss), mask, mode, max_len)
    # 2 DP ranks: rank 0 has rows 0-3 in micro-batches [0:1], [1:4]; rank 1 rows 4-10 in [4:6], [6:7], [7:11]
    splits = [[(0, 1), (1, 4)], [(4, 6), (6, 7), (7, 11)]]
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for rank_splits in splits:
        for a, b in rank_splits:
            weights, c = aggregation(mask[a:b], mode, max_len)
            s, c2 = aggregate(loss[a:b], mask[a:b], mode, max_len)
            assert torch.equal(c, c2)
            total, count = total + s.double(), count + c
    assert float(total / count) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_aggregation_errors():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="max_response_len"):
        aggregation(mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="token-mean"):
        aggregation(mask, "mean")


# ---- off-policy corrections, rewards on tokens -----------------------------------------------------------

def test_token_mult_prob_error_and_importance_weights():
    g = torch.Generator().manual_seed(8)
    logp = torch.randn(3, 5, generator=g) - 1
    mask = span_mask([0, 2, 1], [5, 4, 3], 5)
    err = token_mult_prob_error(logp, logp.clone(), mask)
    assert isinstance(err, SumCount) and err.mean() == 1.0 and float(err.count) == int(mask.sum())
    other = logp + 0.1 * torch.randn(3, 5, generator=g)
    expected = float(torch.exp((logp - other).abs())[mask].mean())
    assert token_mult_prob_error(logp, other, mask).mean() == pytest.approx(expected, rel=1e-6)
    halves = token_mult_prob_error(logp[:1], other[:1], mask[:1]) + token_mult_prob_error(logp[1:], other[1:], mask[1:])
    assert halves.mean() == pytest.approx(expected, rel=1e-6)

    train = torch.tensor([0.0, math.log(3.0), -50.0, 100.0], requires_grad=True)
    w = truncated_importance_weights(train, torch.zeros(4), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, math.exp(-50.0), 2.0]))
    assert not w.requires_grad


def test_token_level_rewards_on_last_valid_token():
    mask = span_mask([2, 0, 4, 0], [5, 6, 6, 0], 6)
    mask[1, 4:] = False  # a response ending early: right padding
    out = token_level_rewards(torch.tensor([1.0, 0.5, -1.0, 7.0]), mask)
    expected = torch.zeros(4, 6)
    expected[0, 4], expected[1, 3], expected[2, 5] = 1.0, 0.5, -1.0  # the last row has no response: nothing
    assert torch.equal(out, expected)
