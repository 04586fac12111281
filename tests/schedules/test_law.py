"""AnnealingLaw (Tissue et al. 2024): its areas follow the stated recurrences, a fit recovers the constants of a curve
the law generated, and a fitted law predicts a schedule it never saw."""

import numpy as np
import pytest

from fastopt.schedules import WSD, AnnealingLaw, Constant, Cosine, Join, Ramp, WSDS, annealing_areas

TRUE = AnnealingLaw(L0=2.0, A=0.6, alpha=0.45, C=0.35)
TOTAL = 4000
STEPS = np.arange(50, TOTAL, 10)  # loss measured every 10 steps after the first 50


def measured(schedule, noise=0.0, seed=0):
    losses = TRUE.predict(schedule, STEPS)
    losses = losses * (1 + noise * np.random.default_rng(seed).standard_normal(losses.shape))
    return STEPS, schedule, losses


def test_areas_follow_the_recurrences():
    lrs = WSDS(1e-3, [300, 600], warmup=50, decay=0.2).values(700)  # warmup, decays and a jump back up
    s1, s2 = annealing_areas(lrs, lam=0.99)
    momentum, total, expected_s2 = 0.0, 0.0, []
    for i in range(len(lrs)):
        drop = lrs[i - 1] - lrs[i] if i > 50 else 0.0  # the initial warmup (lr rises at steps 1..50) is left out
        momentum = 0.99 * momentum + drop
        total += momentum
        expected_s2.append(total)
    np.testing.assert_allclose(s1, np.cumsum(lrs), rtol=1e-12)
    np.testing.assert_allclose(s2, expected_s2, rtol=1e-10, atol=1e-15)
    assert s2[360] < s2[299]  # the jump back to peak at step 300 counts as negative annealing


def test_fit_recovers_the_constants_of_its_own_curve():
    law = AnnealingLaw.fit(measured(WSD(1e-3, TOTAL, warmup=100, decay=0.2)))
    fitted = (law.L0, law.A, law.alpha, law.C)
    np.testing.assert_allclose(fitted, (TRUE.L0, TRUE.A, TRUE.alpha, TRUE.C), rtol=1e-6)


def test_predicts_a_held_out_schedule():
    constant = Join([Ramp(0.0, 1e-3, 100), Constant(1e-3)], lengths=[100])
    cosine = Cosine(1e-3, TOTAL, warmup=100)
    law = AnnealingLaw.fit(measured(constant, noise=0.003, seed=1), measured(cosine, noise=0.003, seed=2))
    held_out = WSD(1e-3, TOTAL, warmup=100, decay=0.2, shape="1-sqrt")
    predicted, actual = law.predict(held_out, STEPS), TRUE.predict(held_out, STEPS)
    assert np.max(np.abs(predicted - actual) / actual) < 3e-3
    # the ranking the law exists for: annealing helps, a WSD with a cooldown ends below the constant run
    assert law.predict(held_out, [TOTAL - 1])[0] < law.predict(constant, [TOTAL - 1])[0]


def test_predict_takes_a_schedule_or_its_lr_array():
    sched = Cosine(1e-3, 500, warmup=20)
    np.testing.assert_array_equal(TRUE.predict(sched), TRUE.predict(sched.values(500)))
    np.testing.assert_array_equal(TRUE.predict(sched, [10, 499]), TRUE.predict(sched.values(500))[[10, 499]])


@pytest.mark.parametrize(
    "curves, message",
    [
        ((), "give at least one (steps, lrs, losses) curve"),
        (((STEPS, Constant(1e-3)),), "curve 0 must be (steps, lrs, losses)"),
        (((STEPS, Constant(1e-3), np.ones(3)),), "curve 0 needs one finite loss > 0 per step"),
        (((STEPS, np.full(100, 1e-3), np.ones(len(STEPS))),), "lrs must give the lr of every step up to 3990"),
        (((STEPS - 100, Constant(1e-3), np.ones(len(STEPS))),), "steps must be a non-empty 1-D array of ints >= 0"),
    ],
)
def test_fit_errors(curves, message):
    with pytest.raises(ValueError) as raised:
        AnnealingLaw.fit(*curves)
    assert message in str(raised.value)
