"""Learning-rate schedules: the shape of each, at its key points."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megaevo.config import OptimConfig
from megaevo.training.schedules import decay, lr_at

LR, MIN = 1.0, 0.1
TOTAL = 1000


def optim(schedule: str, **kw) -> OptimConfig:
    kw = {"lr": LR, "min_lr": MIN, "warmup": 100, **kw}
    return OptimConfig(schedule=schedule, **kw)


def curve(o: OptimConfig, total: int = TOTAL) -> list[float]:
    return [lr_at(s, o, total) for s in range(total + 1)]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant", "inf-cos"])
def test_linear_warmup(schedule):
    o = optim(schedule, constant_lr=0.5, cooldown_iters=100)
    assert lr_at(0, o, TOTAL) == 0.0
    assert lr_at(50, o, TOTAL) == pytest.approx(0.5)
    assert lr_at(100, o, TOTAL) == pytest.approx(LR)
    warm = curve(o)[:101]
    assert all(a < b for a, b in zip(warm, warm[1:]))


def test_no_warmup_starts_at_lr():
    assert lr_at(0, optim("cosine", warmup=0), TOTAL) == LR


def test_cosine():
    o = optim("cosine")
    assert lr_at(550, o, TOTAL) == pytest.approx((LR + MIN) / 2)  # halfway through the decay
    assert lr_at(325, o, TOTAL) == pytest.approx(MIN + (LR - MIN) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(TOTAL, o, TOTAL) == MIN and lr_at(5 * TOTAL, o, TOTAL) == MIN
    tail = curve(o)[100:]
    assert all(a > b for a, b in zip(tail, tail[1:]))
    assert min(tail) >= MIN


def test_cosine_decay_iters_then_flat():
    o = optim("cosine", decay_iters=600)
    assert lr_at(350, o, TOTAL) == pytest.approx((LR + MIN) / 2)
    assert all(lr == MIN for lr in curve(o)[600:])


def test_linear():
    o = optim("linear")
    assert lr_at(550, o, TOTAL) == pytest.approx((LR + MIN) / 2)
    assert lr_at(100 + 900 // 3, o, TOTAL) == pytest.approx(LR - (LR - MIN) / 3)
    assert lr_at(TOTAL, o, TOTAL) == MIN
    steps = [b - a for a, b in zip(curve(o)[100:], curve(o)[101:])]
    assert max(steps) == pytest.approx(min(steps)) and max(steps) < 0


def test_constant():
    assert set(curve(optim("constant"))[100:]) == {LR}
    assert lr_at(10 * TOTAL, optim("constant"), TOTAL) == LR


def test_wsd():
    o = optim("wsd", decay_fraction=0.2)
    values = curve(o)
    assert all(v == LR for v in values[100:801])  # stable region: exactly lr
    assert values[900] == pytest.approx((LR + MIN) / 2)  # linear decay over the final 200
    assert values[TOTAL] == MIN
    decay_part = values[800:]
    assert all(a > b for a, b in zip(decay_part, decay_part[1:]))
    assert lr_at(TOTAL + 10, o, TOTAL) == MIN


@pytest.mark.parametrize("style", ["linear", "cosine", "sqrt", "exp"])
def test_wsd_decay_styles(style):
    o = optim("wsd", decay_fraction=0.1, decay_style=style)
    values = curve(o)[900:]
    assert values[0] == LR and values[-1] == pytest.approx(MIN)
    assert all(a > b for a, b in zip(values, values[1:]))
    assert min(values) >= MIN - 1e-12


def test_wsd_without_decay_stays_at_lr():
    assert lr_at(TOTAL, optim("wsd", decay_fraction=0.0), TOTAL) == LR


def test_inf_cos_phases():
    o = optim("inf-cos", cooldown_iters=200, constant_lr=0.5, anneal_iters=100)
    values = curve(o)
    cool = values[100:301]
    assert cool[0] == LR and cool[100] == pytest.approx(0.75) and cool[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(cool, cool[1:]))
    assert all(v == 0.5 for v in values[300:901])  # constant phase
    anneal = values[900:]
    assert anneal[50] == pytest.approx(0.5 * (MIN / 0.5) ** 0.5)  # exponential by default
    assert all(a > b for a, b in zip(anneal, anneal[1:]))
    assert anneal[-1] == MIN and lr_at(2 * TOTAL, o, TOTAL) == MIN


def test_inf_cos_anneal_fraction_and_linear_style():
    o = optim("inf-cos", cooldown_iters=100, constant_lr=0.5, anneal_fraction=0.2, anneal_style="linear")
    assert lr_at(800, o, TOTAL) == 0.5
    assert lr_at(900, o, TOTAL) == pytest.approx((0.5 + MIN) / 2)
    # without an anneal the constant phase never ends
    o = optim("inf-cos", cooldown_iters=100, constant_lr=0.5, anneal_iters=0)
    assert lr_at(10 * TOTAL, o, TOTAL) == 0.5


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant", "inf-cos"])
@pytest.mark.parametrize("warmup, total", [(100, 50), (100, 1), (51, 50), (50, 50), (100, 0)])
def test_warmup_longer_than_a_shortened_run_keeps_rising(schedule, warmup, total):
    # As in Megatron-LM: the rate rises until the run ends and never reaches lr; the phases after
    # the warmup (decays, a cool-down, an anneal) never start, and nothing divides by zero.
    o = optim(schedule, warmup=warmup, constant_lr=0.5, cooldown_iters=20, anneal_fraction=0.5)
    run = [lr_at(s, o, total) for s in range(total)]
    assert all(math.isfinite(v) and 0.0 <= v < LR for v in run)
    assert run == [LR * s / warmup for s in range(total)]
    assert all(a < b for a, b in zip(run, run[1:]))
    after = [lr_at(s, o, total) for s in range(total, warmup + 30)]  # past the end: still defined
    assert all(math.isfinite(v) and 0.0 <= v <= LR for v in after)
    assert lr_at(-3, o, total) == 0.0


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'cosin'"):
        lr_at(0, optim("cosin"), TOTAL)
    with pytest.raises(ValueError, match="constant_lr"):
        lr_at(500, optim("inf-cos"), TOTAL)
    with pytest.raises(ValueError, match="decay shape"):
        lr_at(950, optim("wsd", decay_style="step"), TOTAL)
    with pytest.raises(ValueError, match="positive"):
        decay(0.5, 1.0, 0.0, "exp")


@settings(max_examples=60, deadline=None)
@given(schedule=st.sampled_from(["cosine", "linear", "wsd", "constant", "inf-cos"]),
       warmup=st.integers(0, 50), total=st.integers(200, 2000), step=st.integers(0, 3000))
def test_pure_function_of_step_within_bounds(schedule, warmup, total, step):
    o = optim(schedule, warmup=warmup, cooldown_iters=50, constant_lr=0.4, anneal_fraction=0.1)
    lr = lr_at(step, o, total)
    assert lr == lr_at(step, o, total)  # resuming at a step gives the same value
    assert 0.0 <= lr <= LR
    if step >= warmup:
        assert lr >= MIN - 1e-12
