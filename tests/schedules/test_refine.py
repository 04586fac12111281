"""refine() against a direct, loop-by-loop restatement of Defazio et al.'s refinement (facebookresearch/
adaptive_scheduling: README's median filter, find_closed_form_schedule, then normalization to a peak of 1)."""

import numpy as np
import pytest

from fastopt.schedules import Tabulated, refine


def refined_by_the_paper(norms, tau, adam):
    n = len(norms)
    width = 2 * (int(tau * n) // 2) + 1
    half, pad = width // 2, 2 * width
    # the series padded at its end by reflection (without repeating the last value), as np.pad(mode="reflect")
    extended = list(norms) + [norms[n - 2 - j] for j in range(pad)]
    # median over a centred window; before the start, the first value repeats (mode="nearest")
    smoothed = [float(np.median([extended[max(j, 0)] for j in range(i - half, i + half + 1)])) for i in range(n)]
    weights = [g ** (-1.0 if adam else -2.0) for g in smoothed]
    schedule = []
    for t in range(n):
        tail_after_t = sum(weights[t + 1 :])
        schedule.append(weights[t] * tail_after_t)  # η_{T-1} = 0: nothing comes after the last step
    peak = max(schedule)
    return [value / peak for value in schedule]


def synthetic_grad_norms(n=400, seed=0):
    """Norms that fall early, rise late, with multiplicative noise and a few spikes (what the filter is for)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, n)
    norms = (2.0 - 1.5 * t + 2.5 * t**3) * np.exp(0.2 * rng.standard_normal(n))
    norms[rng.choice(n, 5, replace=False)] *= 20.0
    return norms


@pytest.mark.parametrize("adam", [True, False])
@pytest.mark.parametrize("tau", [0.1, 0.03, 0.0])
def test_matches_the_papers_algorithm(adam, tau):
    norms = synthetic_grad_norms()
    sched = refine(norms, tau=tau, adam=adam)
    assert isinstance(sched, Tabulated) and sched.length == len(norms)
    np.testing.assert_allclose(sched.values(len(norms)), refined_by_the_paper(norms, tau, adam), rtol=1e-12, atol=1e-15)
    assert max(sched.table) == 1.0 and sched(len(norms) - 1) == 0.0


def test_constant_norms_give_linear_decay():
    # With equal weights, η_t ∝ T - 1 - t: refinement recovers the linear decay schedule (Defazio et al. §3).
    sched = refine(np.full(101, 3.0))
    np.testing.assert_allclose(sched.values(101), np.linspace(1.0, 0.0, 101), atol=1e-12)


@pytest.mark.parametrize(
    "norms, kwargs, message",
    [
        ([1.0], {}, "at least 2 steps"),
        ([[1.0, 2.0]], {}, "1-D series"),
        ([1.0, 0.0, 2.0], {}, "finite and > 0"),
        ([1.0, float("nan")], {}, "finite and > 0"),
        ([1.0, 2.0], {"tau": 1.5}, "tau must be in [0, 1), got 1.5"),
    ],
)
def test_errors(norms, kwargs, message):
    with pytest.raises(ValueError) as raised:
        refine(norms, **kwargs)
    assert message in str(raised.value)
