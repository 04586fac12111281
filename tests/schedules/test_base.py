"""The Schedule contract: immutable specs, JSON round trips, spec-syntax repr, equality, composition, preview."""

import dataclasses
import json
import sys

import numpy as np
import pytest

from fastopt.schedules import (
    WSD,
    Constant,
    Cosine,
    Cycle,
    Join,
    Linear,
    Product,
    Ramp,
    Tabulated,
    from_dict,
    parse,
    schedule_types,
)

from .examples import EXAMPLES


def test_examples_cover_every_schedule_type():
    assert {type(s).__name__ for s in EXAMPLES} == set(schedule_types())


@pytest.mark.parametrize("sched", EXAMPLES, ids=repr)
def test_json_round_trip(sched):
    spec = sched.to_dict()
    assert spec["type"] == type(sched).__name__
    rebuilt = from_dict(json.loads(json.dumps(spec)))
    assert rebuilt == sched and hash(rebuilt) == hash(sched)
    n = (sched.length or 600) + 10
    np.testing.assert_array_equal(rebuilt.values(n), sched.values(n))


@pytest.mark.parametrize("sched", EXAMPLES, ids=repr)
def test_repr_is_spec_syntax(sched):
    assert parse(repr(sched)) == sched


def test_to_dict_is_plain_data():
    sched = Join([Ramp(0.0, 3e-4, 10), Tabulated(np.array([3e-4, 1e-4]))])
    assert sched.to_dict() == {
        "type": "Join",
        "phases": [
            {"type": "Ramp", "start": 0.0, "end": 3e-4, "steps": 10, "shape": "linear"},
            {"type": "Tabulated", "table": [3e-4, 1e-4]},
        ],
        "lengths": None,
    }


def test_equality_compares_specs():
    assert WSD(3e-4, 1000) == WSD(peak=3e-4, total=1000, decay=0.2)
    assert Cosine(1, 100) == Cosine(1.0, 100.0)  # numbers are stored in canonical form
    assert WSD(3e-4, 1000) != WSD(3e-4, 1001)
    assert WSD(1.0, 100, decay=1) != WSD(1.0, 100, decay=1.0)  # one step vs the whole run
    assert len({WSD(3e-4, 1000), WSD(3e-4, 1000), Cosine(3e-4, 1000)}) == 2


def test_schedules_are_immutable_and_leave_inputs_alone():
    sched = WSD(3e-4, 1000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.peak = 1.0
    phases, table = [Constant(1.0), Constant(2.0)], [0.3, 0.2]
    Join(phases, lengths=[5])
    Tabulated(table)
    assert phases == [Constant(1.0), Constant(2.0)] and table == [0.3, 0.2]
    before = [sched(k) for k in range(1000)]
    sched.values(1000), sched(500), sched.to_dict()
    assert [sched(k) for k in range(1000)] == before


def test_join_runs_phases_on_their_own_clock():
    warmup, decay = Ramp(0.0, 1.0, 10), Linear(1.0, 90)
    joined = Join([warmup, decay])
    assert joined.length == 100
    assert [joined(k) for k in (0, 5, 10, 55, 100, 200)] == [warmup(0), warmup(5), decay(0), decay(45), 0.0, 0.0]
    explicit = Join([Constant(1.0), Constant(2.0), Constant(3.0)], lengths=[3, 2])
    assert [explicit(k) for k in range(7)] == [1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert joined.milestones() == [(0, "ramp"), (10, "decay"), (100, "end")]


def test_cycle_repeats():
    inner = Linear(1.0, 10)
    assert [Cycle(inner)(k) for k in (0, 3, 10, 13, 25)] == [inner(0), inner(3), inner(0), inner(3), inner(5)]
    assert [Cycle(inner, period=4)(k) for k in (3, 4, 9)] == [inner(3), inner(0), inner(1)]
    assert Cycle(inner).length is None


def test_products_and_scaling():
    sched = WSD(3e-4, 1000, warmup=100)
    half = 0.5 * sched
    assert isinstance(half, Product) and half.factors == (0.5, sched)
    assert [half(k) for k in (50, 500, 900)] == [0.5 * sched(k) for k in (50, 500, 900)]
    assert (sched * 2)(500) == 2 * sched(500)
    warm = Ramp(0.0, 1.0, 10) * Cosine(1.0, 100)
    assert warm(5) == 0.5 * Cosine(1.0, 100)(5)
    assert (0.5 * half).factors == (0.5, 0.5, sched)  # flattened
    assert (sched * sched).length == 1000


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Join([Constant(1.0), Constant(2.0)]), "Join: phases[0] (Constant(value=1.0)) has no length"),
        (lambda: Join([Constant(1.0), Constant(2.0)], lengths=[1, 2]), "lengths needs one entry per phase"),
        (lambda: Join([]), "Join: phases must be a non-empty list of schedules"),
        (lambda: Join([Constant(1.0), 2.0], lengths=[3]), "Join: phases[1] must be a Schedule, got 2.0"),
        (lambda: Cycle(Constant(1.0)), "Cycle: schedule (Constant(value=1.0)) has no length of its own; pass period"),
        (lambda: Cycle(WSD(1.0, 10), period=0), "Cycle: period must be >= 1, got 0"),
        (lambda: Product([WSD(1.0, 10), -2.0]), "Product: factors[1] must be >= 0, got -2.0"),
        (lambda: from_dict({"type": "Nope"}), "from_dict: unknown schedule type 'Nope'"),
        (lambda: from_dict([1, 2]), "from_dict: expected a dict with a 'type' key"),
        (lambda: WSD(1.0, 10).values(-1), "values: n must be an int >= 0, got -1"),
    ],
)
def test_composition_errors(build, message):
    with pytest.raises((ValueError, TypeError)) as raised:
        build()
    assert message in str(raised.value)


def test_plot_writes_png(tmp_path):
    path = tmp_path / "wsd.png"
    figure = WSD(3e-4, 1000, warmup=100).plot(path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = figure.axes[0].lines[0]
    np.testing.assert_array_equal(line.get_ydata(), WSD(3e-4, 1000, warmup=100).values(1000))


def test_plot_without_matplotlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="Schedule.plot needs matplotlib: pip install matplotlib"):
        WSD(3e-4, 1000).plot()
