"""Each catalog schedule against its formula (docs/algorithms.md#catalog), against transformers and torch where they define
the same schedule, and its validation errors."""

import math

import numpy as np
import pytest
import torch
from transformers.optimization import (
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
    get_wsd_schedule,
)

from fastopt.schedules import REX, WSD, WSDS, Constant, Cosine, InfiniteLR, Linear, Ramp, Rewarm, Tabulated

from .examples import EXAMPLES

PEAK, TOTAL, WARMUP = 3e-4, 1000, 100


def lrs_from_torch(make_scheduler, base_lr, n):
    """The lr each of n optimizer steps uses when a torch scheduler is stepped after every optimizer step."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = make_scheduler(optimizer)
    used = []
    for _ in range(n):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(used)


def assert_same(ours, theirs, scale=PEAK):
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12 * scale)


# -- formulas


def test_constant_and_ramp():
    assert [Constant(0.25)(k) for k in (0, 7, 10**9)] == [0.25] * 3
    ramp = Ramp(1.0, 3.0, 4)
    assert [ramp(k) for k in (0, 1, 2, 3, 4, 100)] == [1.0, 1.5, 2.0, 2.5, 3.0, 3.0]
    assert Ramp(1.0, 3.0, 4, shape="cosine")(2) == pytest.approx(2.0, abs=1e-15)
    assert Ramp(1.0, 4.0, 2, shape="exp")(1) == pytest.approx(2.0)  # geometric midpoint


def test_linear_formula():
    sched = Linear(PEAK, TOTAL, warmup=WARMUP)
    for t in (0, 1, 50, 99):
        assert sched(t) == pytest.approx(PEAK * t / WARMUP, abs=1e-18)
    for t in (100, 101, 550, 999):
        assert sched(t) == pytest.approx(PEAK * (1 - (t - WARMUP) / (TOTAL - WARMUP)), abs=1e-18)
    assert sched(TOTAL) == sched(10 * TOTAL) == 0.0
    assert Linear(PEAK, TOTAL, final=1e-5)(TOTAL // 2) == pytest.approx(1e-5 + (PEAK - 1e-5) * 0.5)


def test_cosine_formula():
    final = 1e-5
    sched = Cosine(PEAK, TOTAL, warmup=WARMUP, final=final)
    for t in (100, 250, 550, 999):
        p = (t - WARMUP) / (TOTAL - WARMUP)
        assert sched(t) == pytest.approx(final + 0.5 * (PEAK - final) * (1 + math.cos(math.pi * p)), abs=1e-18)
    assert sched(TOTAL) == sched(TOTAL + 1) == final


def test_cosine_sgdr_cycles_grow_by_period_mult():
    sched = Cosine(1.0, 700, period=100, period_mult=2)
    assert [start for start, _ in sched.milestones()] == [0, 100, 300, 700]  # T_i = 100, 200, 400
    for start, length in ((0, 100), (100, 200), (300, 400)):
        assert sched(start) == 1.0
        assert sched(start + length // 2) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "shape, relative",
    [
        ("linear", lambda f, p: f + (1 - f) * (1 - p)),
        ("cosine", lambda f, p: f + (1 - f) * 0.5 * (1 + math.cos(math.pi * p))),
        ("1-sqrt", lambda f, p: f + (1 - f) * (1 - math.sqrt(p))),
        ("exp", lambda f, p: f**p),
        ("inv", lambda f, p: 1 / (p / f + (1 - p))),
    ],
)
def test_wsd_decay_shapes(shape, relative):
    final = 0.1 * PEAK
    sched = WSD(PEAK, TOTAL, warmup=WARMUP, decay=0.2, shape=shape, final=final)
    assert sched(0) == 0.0 and sched(WARMUP // 2) == pytest.approx(PEAK / 2)
    assert sched(WARMUP) == sched(799) == PEAK
    for t in (800, 850, 900, 999):
        p = (t - 800) / 200
        assert sched(t) == pytest.approx(PEAK * relative(0.1, p), rel=1e-12)
    assert sched(TOTAL) == sched(5 * TOTAL) == final


def test_wsd_decay_units():
    assert WSD(1.0, 1000, decay=0.2).milestones()[1] == (800, "decay")  # fraction of total
    assert WSD(1.0, 1000, decay=150).milestones()[1] == (850, "decay")  # steps
    assert WSD(1.0, 1000, decay=1.0).milestones() == [(0, "decay"), (1000, "end")]  # all of it
    assert WSD(1.0, 1000, decay=1).milestones()[1] == (999, "decay")  # one step


def test_wsds_resumes_at_peak_without_rewarm():
    final = 1e-4
    sched = WSDS(1e-3, [1000, 2000, 4000], warmup=100, decay=0.1, final=final)
    assert sched(0) == 0.0 and sched(100) == 1e-3
    for checkpoint, decay in ((1000, 100), (2000, 100), (4000, 200)):
        start = checkpoint - decay
        assert sched(start - 1) == sched(start) == 1e-3
        assert sched(start + decay // 2) == pytest.approx(final + (1e-3 - final) * 0.5)
        assert sched(checkpoint - 1) == pytest.approx(final + (1e-3 - final) / decay)
    assert sched(1000) == sched(2000) == 1e-3  # the next cycle starts at peak: no warmup
    assert sched(4000) == final
    assert WSDS(1.0, [100])(100) == pytest.approx(0.1)  # default final: 0.1·peak (Wen et al.)


def test_infinite_lr_phases():
    peak, total = 1e-3, 10_000
    sched = InfiniteLR(peak, total)  # warmup 5%, cooldown to 30%, anneal over the last 20%
    constant, final = 0.25 * peak, 0.01 * peak
    assert [s for s, _ in sched.milestones()] == [0, 500, 3000, 8000, 10_000]
    assert sched(250) == pytest.approx(peak / 2)

    def h(p):
        return 1 / math.sqrt(1 + 10 * p) - 1

    for t in (500, 1000, 2999):
        p = (t - 500) / 2500
        assert sched(t) == pytest.approx(peak + (constant - peak) * h(p) / h(1), rel=1e-12)
    assert sched(3000) == sched(7999) == constant
    for t in (8000, 9000, 9999):
        assert sched(t) == pytest.approx(constant * (final / constant) ** ((t - 8000) / 2000), rel=1e-12)
    assert sched(total) == final
    assert InfiniteLR(peak, total, anneal=0)(10**6) == constant  # never anneals: the "infinite" use


def test_rewarm_each_stage():
    peak, final = 1e-3, 1e-4
    sched = Rewarm(peak, [1000, 2000], warmup=0.1, final=final)
    assert sched(0) == final and sched(100) == peak  # stage 1: 100 steps of warmup from `final`
    assert sched(1000) == final and sched(1200) == peak  # stage 2 re-warms over 10% of 2000
    p = (2100 - 1200) / 1800
    assert sched(2100) == pytest.approx(final + 0.5 * (peak - final) * (1 + math.cos(math.pi * p)))
    assert sched(3000) == final


def test_rex_formula():
    sched = REX(PEAK, TOTAL, warmup=WARMUP)
    for t in (100, 400, 999):
        z = (t - WARMUP) / (TOTAL - WARMUP)
        assert sched(t) == pytest.approx(PEAK * (1 - z) / (0.5 + 0.5 * (1 - z)), rel=1e-12)
    assert sched(TOTAL) == 0.0


def test_tabulated_reads_and_holds():
    sched = Tabulated([0.3, 0.2, 0.1])
    assert [sched(k) for k in range(5)] == [0.3, 0.2, 0.1, 0.1, 0.1]
    assert sched.length == 3


@pytest.mark.parametrize("sched", EXAMPLES, ids=repr)
def test_values_equal_per_step_calls(sched):
    n = (sched.length or 900) + 50
    expected = np.array([sched(k) for k in range(n)])
    np.testing.assert_allclose(sched.values(n), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("sched", [s for s in EXAMPLES if s.length is not None], ids=repr)  # Cycles never settle
def test_holds_final_value_after_length(sched):
    end = sched(sched.length)
    assert sched(sched.length + 1) == sched(10 * sched.length + 7) == end


# -- the same schedules in transformers and torch


def test_matches_transformers_cosine_and_linear():
    n = TOTAL + 1  # transformers' cosine rises again after the total; ours holds
    assert_same(Cosine(PEAK, TOTAL, WARMUP).values(n),
                lrs_from_torch(lambda o: get_cosine_schedule_with_warmup(o, WARMUP, TOTAL), PEAK, n))
    assert_same(Cosine(PEAK, TOTAL, WARMUP, final=3e-5).values(n),
                lrs_from_torch(lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, WARMUP, TOTAL, min_lr=3e-5),
                               PEAK, n))
    assert_same(Linear(PEAK, TOTAL, WARMUP).values(n + 50),
                lrs_from_torch(lambda o: get_linear_schedule_with_warmup(o, WARMUP, TOTAL), PEAK, n + 50))


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_matches_transformers_wsd(shape):
    n = TOTAL + 50
    ours = WSD(PEAK, TOTAL, warmup=WARMUP, decay=200, shape=shape).values(n)
    theirs = lrs_from_torch(lambda o: get_wsd_schedule(o, WARMUP, 200, TOTAL, decay_type=shape), PEAK, n)
    assert_same(ours, theirs)
    # With a floor, transformers warms up from min_lr instead of 0; after the warmup the two agree.
    ours = WSD(PEAK, TOTAL, warmup=WARMUP, decay=200, shape=shape, final=0.1 * PEAK).values(n)
    theirs = lrs_from_torch(
        lambda o: get_wsd_schedule(o, WARMUP, 200, TOTAL, decay_type=shape, min_lr_ratio=0.1), PEAK, n
    )
    assert_same(ours[WARMUP:], theirs[WARMUP:])


def test_matches_torch_schedulers():
    lr_scheduler = torch.optim.lr_scheduler
    assert_same(Cosine(PEAK, TOTAL, final=1e-5).values(TOTAL + 1),
                lrs_from_torch(lambda o: lr_scheduler.CosineAnnealingLR(o, TOTAL, eta_min=1e-5), PEAK, TOTAL + 1))
    assert_same(Cosine(PEAK, 1500, final=1e-5, period=100, period_mult=2).values(1500),
                lrs_from_torch(lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, 100, 2, eta_min=1e-5), PEAK, 1500))
    assert_same(Ramp(0.25 * PEAK, PEAK, 40).values(100),
                lrs_from_torch(lambda o: lr_scheduler.LinearLR(o, 0.25, 1.0, 40), PEAK, 100))


# -- validation


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: Cosine(peak=-1, total=10), ValueError, "Cosine: peak must be >= 0, got -1"),
        (lambda: Cosine(peak=float("nan"), total=10), ValueError, "Cosine: peak must be finite, got nan"),
        (lambda: Cosine(peak="big", total=10), TypeError, "Cosine: peak must be a number, got 'big'"),
        (lambda: Cosine(1.0, 100, warmup=200), ValueError, "Cosine: warmup must be <= total (100), got warmup=200"),
        (lambda: Cosine(1.0, 100, warmup=-3), ValueError, "Cosine: warmup must be >= 0 steps, got -3"),
        (lambda: Cosine(1.0, 100, period=200), ValueError, "Cosine: period must be <= total - warmup (100)"),
        (lambda: Cosine(1.0, 0), ValueError, "Cosine: total must be >= 1, got 0"),
        (lambda: Cosine(1.0, 10.5), TypeError, "Cosine: total must be a whole number of steps, got 10.5"),
        (lambda: Linear(1.0, 100, warmup=1.5), ValueError, "Linear: warmup=1.5 is a float, so a fraction of total"),
        (lambda: WSD(1.0, 100, decay=0.0), ValueError, "WSD: decay must be > 0 steps, got decay=0.0"),
        (lambda: WSD(1.0, 100, decay=1.2), ValueError,
         "WSD: decay=1.2 is a float, so a fraction of total, and must be in [0, 1]"),
        (lambda: WSD(1.0, 100, warmup=90, decay=20), ValueError,
         "WSD: decay must be <= total - warmup (10 steps), got decay=20"),
        (lambda: WSD(1.0, 100, decay=2000.0), ValueError, "pass an int for a number of steps"),
        (lambda: WSD(1.0, 100, shape="exp"), ValueError,
         "WSD: shape='exp' cannot reach or leave 0: final must be > 0, got 0.0"),
        (lambda: WSD(1.0, 100, shape="inv"), ValueError, "final must be > 0"),
        (lambda: WSD(1.0, 100, shape="step"), ValueError,
         "WSD: shape must be one of ['linear', 'cosine', '1-sqrt', 'exp', 'inv'], got 'step'"),
        (lambda: WSDS(1.0, [200, 100]), ValueError, "WSDS: checkpoints must be increasing, got [200, 100]"),
        (lambda: WSDS(1.0, [100, 110], decay=20), ValueError,
         "WSDS: decay (20 steps) does not fit in cycle 2 (10 steps)"),
        (lambda: WSDS(1.0, []), ValueError, "WSDS: checkpoints must be a non-empty list of step counts"),
        (lambda: InfiniteLR(1.0, 100, warmup=0.5, cooldown=0.4, anneal=0.2), ValueError,
         "InfiniteLR: warmup + cooldown + anneal (50 + 40 + 20 steps) must be <= total (100)"),
        (lambda: InfiniteLR(1.0, 100, final=0.0), ValueError, "InfiniteLR: final must be > 0, got 0.0"),
        (lambda: Rewarm(1.0, [100, 5], warmup=10), ValueError,
         "Rewarm: warmup must be <= each stage, got warmup=10 for stage 2"),
        (lambda: Rewarm(1.0, [100, 0]), ValueError, "Rewarm: stages[1] must be >= 1, got 0"),
        (lambda: REX(1.0, 100, final=-0.5), ValueError, "REX: final must be >= 0, got -0.5"),
        (lambda: Ramp(0.0, 1.0, 10, shape="exp"), ValueError,
         "Ramp: shape='exp' cannot reach or leave 0: start must be > 0"),
        (lambda: Tabulated([]), ValueError, "Tabulated: table must be a non-empty 1-D sequence"),
        (lambda: Tabulated([0.1, -0.2]), ValueError, "Tabulated: table[1] must be finite and >= 0, got -0.2"),
        (lambda: Constant(True), TypeError, "Constant: value must be a number, got True"),
    ],
)
def test_validation_errors_name_argument_and_value(build, error, message):
    with pytest.raises(error) as raised:
        build()
    assert message in str(raised.value)


def test_negative_step_is_an_error():
    with pytest.raises(ValueError, match="WSD: step must be >= 0, got -1"):
        WSD(1.0, 100)(-1)
