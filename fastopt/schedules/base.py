"""The Schedule base: a pure function of the optimizer step that composes, serializes and previews itself.

A schedule is a frozen dataclass whose fields are its spec: they are the constructor arguments, the keys of
`to_dict()` and the text of `repr()`, and `==` compares them. What the spec implies (phase boundaries, resolved
step counts) is computed once by the constructor and never changes, so one schedule can be shared by many
optimizers, saved as JSON and evaluated at any step in any order (optax's model: the step is the only input).

Convention: the k-th call of `optimizer.step()` (k = 0, 1, 2, ...) uses `sched(k)` — what a torch LRScheduler
stepped after each optimizer step gives. From step `sched.length` on, a schedule holds its final value.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import numbers
import textwrap
from typing import NamedTuple

import numpy as np

from .shapes import POSITIVE_ONLY, SHAPES

_REGISTRY: dict[str, type[Schedule]] = {}


def schedule_type(cls):
    """Declare a schedule class: a frozen dataclass whose fields are its spec, registered by class name so that
    `from_dict` and the spec parser can rebuild it. Equality, hashing and repr come from `Schedule`."""
    cls = dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)
    _REGISTRY[cls.__name__] = cls
    return cls


def schedule_types() -> dict[str, type[Schedule]]:
    """The registered schedule classes by name."""
    return dict(_REGISTRY)


class Schedule:
    """A value per optimizer step: `sched(k) -> float`.

    Subclasses implement `__call__` with plain Python math (an optimizer calls it once per step on the host) and
    `_at`, the same formula vectorized over an int64 array of steps.
    """

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def _at(self, steps: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def length(self) -> int | None:
        """The step from which the schedule holds its final value for good (None if it never settles)."""
        raise NotImplementedError

    def milestones(self) -> list[tuple[int, str]]:
        """(step, name) of each phase's first step, in order."""
        return [(0, type(self).__name__)]

    # -- preview

    def values(self, n: int) -> np.ndarray:
        """`[sched(k) for k in range(n)]` as a float64 array, computed vectorized."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"values: n must be an int >= 0, got {n!r}")
        return self._at(np.arange(int(n), dtype=np.int64))

    def plot(self, n: int | None = None, path=None):
        """Plot steps 0..n-1 (default: the schedule's length) and save a PNG to `path` if given.

        Returns the matplotlib Figure (built without pyplot, so no global backend state is touched).
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError("Schedule.plot needs matplotlib: pip install matplotlib") from error
        n = self.length if n is None else n
        if not n:
            raise ValueError(f"plot: {type(self).__name__} has no length of its own; pass n (steps to plot)")
        fig = Figure(figsize=(7, 3.5), layout="constrained")
        ax = fig.add_subplot()
        ax.plot(np.arange(n), self.values(n))
        for step, _ in self.milestones():
            if 0 < step < n:
                ax.axvline(step, color="0.85", linewidth=0.8, zorder=0)
        ax.set(xlabel="step", ylabel="value")
        ax.set_title(textwrap.shorten(repr(self), 110), fontsize="small")
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig

    # -- spec: to_dict / repr / == / hash

    def to_dict(self) -> dict:
        """A JSON-able dict: "type" names the class, the other keys are its constructor arguments."""
        spec = {"type": type(self).__name__}
        for field in dataclasses.fields(self):
            spec[field.name] = _plain(getattr(self, field.name))
        return spec

    def __repr__(self) -> str:
        args = ", ".join(f"{f.name}={_spec_text(getattr(self, f.name))}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return _canonical(self) == _canonical(other)

    def __hash__(self) -> int:
        return hash(_canonical(self))

    # -- composition: 0.5 * sched, warmup * sched

    def __mul__(self, other):
        if not isinstance(other, (Schedule, numbers.Real)) or isinstance(other, bool):
            return NotImplemented
        return Product(_factors(self) + _factors(other))

    def __rmul__(self, other):
        if not isinstance(other, numbers.Real) or isinstance(other, bool):
            return NotImplemented
        return Product(_factors(other) + _factors(self))

    # -- validation helpers for constructors: check a field, store its canonical form, return it

    def _error(self, message: str) -> ValueError:
        return ValueError(f"{type(self).__name__}: {message}")

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    def _number(self, name: str, *, positive: bool = False) -> float:
        """A finite value >= 0 (> 0 if positive), stored as float."""
        value = _check_number(type(self).__name__, name, getattr(self, name), positive)
        self._set(name, value)
        return value

    def _count(self, name: str, *, minimum: int = 1) -> int:
        """A whole number of steps >= minimum, stored as int."""
        value = _check_count(type(self).__name__, name, getattr(self, name), minimum)
        self._set(name, value)
        return value

    def _counts(self, name: str, *, minimum: int = 1) -> tuple[int, ...]:
        """A non-empty list of whole numbers of steps, stored as a tuple."""
        values = getattr(self, name)
        if not isinstance(values, (list, tuple)) or not values:
            raise self._error(f"{name} must be a non-empty list of step counts, got {values!r}")
        owner = type(self).__name__
        values = tuple(_check_count(owner, f"{name}[{i}]", v, minimum) for i, v in enumerate(values))
        self._set(name, values)
        return values

    def _steps(self, name: str, total: int, *, of: str = "total", positive: bool = False) -> int:
        """A length given as an int (steps) or a float (fraction of `of`, in [0, 1], rounded to whole steps)."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"{type(self).__name__}: {name} must be an int (steps) or a float (fraction of {of}), got {value!r}"
            )
        if isinstance(value, numbers.Integral):
            value = int(value)
            if value < 0:
                raise self._error(f"{name} must be >= 0 steps, got {value!r}")
            steps = value
        else:
            value = float(value)
            if not 0 <= value <= 1:
                raise self._error(
                    f"{name}={value!r} is a float, so a fraction of {of}, and must be in [0, 1]; "
                    f"pass an int for a number of steps"
                )
            steps = round(value * total)
        if positive and steps == 0:
            raise self._error(f"{name} must be > 0 steps, got {name}={value!r} (0 steps of {of}={total})")
        self._set(name, value)
        return steps

    def _shape(self, name: str, allowed, **ends: float) -> str:
        """A shape name among `allowed`; exp/inv shapes also need every value in `ends` to be > 0."""
        shape = getattr(self, name)
        if shape not in allowed:
            raise self._error(f"{name} must be one of {list(allowed)}, got {shape!r}")
        for end_name, end in ends.items():
            if shape in POSITIVE_ONLY and end <= 0:
                raise self._error(f"{name}={shape!r} cannot reach or leave 0: {end_name} must be > 0, got {end!r}")
        return shape


class Phase(NamedTuple):
    """One piece of a Piecewise schedule: from `start` to `end` over `steps` steps, along `shape`."""

    name: str
    steps: int
    start: float
    end: float
    shape: str = "linear"


class Piecewise(Schedule):
    """A schedule made of phases that run one after another; the last phase's end value is held forever.

    Subclasses validate their spec and list their phases in `_phases()`; the constructor compiles them once into
    segment boundaries, and evaluation is a binary search plus one shape formula.
    """

    def _phases(self) -> list[Phase]:
        raise NotImplementedError

    def __post_init__(self):
        phases = self._phases()
        segments, step = [], 0
        for phase in phases:
            if phase.steps > 0:
                start, end = float(phase.start), float(phase.end)
                segments.append((step, phase.steps, start, end, SHAPES[phase.shape], phase.name))
                step += phase.steps
        self._set("_segments", tuple(segments))
        self._set("_ends", tuple(start + steps for start, steps, *_ in segments))
        self._set("_final", float(phases[-1].end))

    def _warmup(self, total: int) -> int:
        warmup = self._steps("warmup", total)
        if warmup > total:
            raise self._error(f"warmup must be <= total ({total}), got warmup={self.warmup!r}")
        return warmup

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"{type(self).__name__}: step must be >= 0, got {step!r}")
        i = bisect.bisect_right(self._ends, step)
        if i == len(self._ends):
            return self._final
        start, steps, a, b, shape, _ = self._segments[i]
        return shape(a, b, (step - start) / steps, math)

    def _at(self, steps: np.ndarray) -> np.ndarray:
        out = np.full(steps.shape, self._final)
        if not self._segments:
            return out
        starts, lengths, a, b, shapes, _ = zip(*self._segments)
        starts, lengths, a, b = (np.array(column, dtype=np.float64) for column in (starts, lengths, a, b))
        segment = np.searchsorted(self._ends, steps, side="right")
        inside = segment < len(self._segments)
        segment_of_step = np.minimum(segment, len(self._segments) - 1)
        for shape in set(shapes):
            uses_shape = np.array([s is shape for s in shapes])
            mask = inside & uses_shape[segment_of_step]
            i = segment[mask]
            out[mask] = shape(a[i], b[i], (steps[mask] - starts[i]) / lengths[i], np)
        return out

    @property
    def length(self) -> int:
        return self._ends[-1] if self._ends else 0

    def milestones(self) -> list[tuple[int, str]]:
        return [(start, name) for start, *_, name in self._segments] + [(self.length, "end")]


# -- composition


@schedule_type
class Join(Schedule):
    """Phases run one after another, each on its own clock: phase i sees `step - start_i` (optax's join_schedules).

    `lengths[i]` is how many steps phase i runs (one entry per phase but the last, which runs forever); if omitted,
    each phase runs for its own `length`, e.g. `Join([Ramp(0.0, 3e-4, 1000), Cosine(3e-4, 9000)])`.
    """

    phases: tuple
    lengths: tuple | None = None

    def __post_init__(self):
        phases = self.phases
        if not isinstance(phases, (list, tuple)) or not phases:
            raise self._error(f"phases must be a non-empty list of schedules, got {phases!r}")
        for i, phase in enumerate(phases):
            if not isinstance(phase, Schedule):
                raise TypeError(f"Join: phases[{i}] must be a Schedule, got {phase!r}")
        self._set("phases", tuple(phases))
        if self.lengths is None:
            lengths = []
            for i, phase in enumerate(phases[:-1]):
                if not phase.length:
                    raise self._error(f"phases[{i}] ({phase!r}) has no length of its own; pass lengths")
                lengths.append(phase.length)
        else:
            lengths = self._counts("lengths")
            if len(lengths) != len(phases) - 1:
                raise self._error(
                    f"lengths needs one entry per phase but the last ({len(phases) - 1}), got {list(lengths)}"
                )
        self._set("_starts", (0, *np.cumsum(lengths, dtype=np.int64).tolist()))

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"Join: step must be >= 0, got {step!r}")
        i = bisect.bisect_right(self._starts, step) - 1
        return self.phases[i](step - self._starts[i])

    def _at(self, steps: np.ndarray) -> np.ndarray:
        out = np.empty(steps.shape)
        phase_of_step = np.searchsorted(self._starts, steps, side="right") - 1
        for i, (phase, start) in enumerate(zip(self.phases, self._starts)):
            mask = phase_of_step == i
            if mask.any():
                out[mask] = phase._at(steps[mask] - start)
        return out

    @property
    def length(self) -> int | None:
        last = self.phases[-1].length
        return None if last is None else self._starts[-1] + last

    def milestones(self) -> list[tuple[int, str]]:
        marks = []
        ends = (*self._starts[1:], math.inf)
        for phase, start, end in zip(self.phases, self._starts, ends):
            marks += [(start + step, name) for step, name in phase.milestones() if start + step < end]
        return marks


@schedule_type
class Cycle(Schedule):
    """`schedule` repeated forever with period `period` (default: its length): sched(k) = schedule(k mod period)."""

    schedule: Schedule
    period: int | None = None

    def __post_init__(self):
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"Cycle: schedule must be a Schedule, got {self.schedule!r}")
        if self.period is None:
            if not self.schedule.length:
                raise self._error(f"schedule ({self.schedule!r}) has no length of its own; pass period")
            self._set("_period", self.schedule.length)
        else:
            self._set("_period", self._count("period"))

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"Cycle: step must be >= 0, got {step!r}")
        return self.schedule(step % self._period)

    def _at(self, steps: np.ndarray) -> np.ndarray:
        return self.schedule._at(steps % self._period)

    @property
    def length(self) -> None:
        return None

    def milestones(self) -> list[tuple[int, str]]:
        return [(step, name) for step, name in self.schedule.milestones() if step < self._period]


@schedule_type
class Product(Schedule):
    """The step-wise product of schedules and constants: `0.5 * sched`, `Ramp(0.0, 1.0, 500) * Cosine(...)`."""

    factors: tuple

    def __post_init__(self):
        factors = self.factors
        if not isinstance(factors, (list, tuple)) or not factors:
            raise self._error(f"factors must be a non-empty list of schedules and numbers, got {factors!r}")
        checked = []
        for i, factor in enumerate(factors):
            if not isinstance(factor, Schedule):
                factor = _check_number("Product", f"factors[{i}]", factor, positive=False)
            checked.append(factor)
        self._set("factors", tuple(checked))
        self._set("_scale", math.prod((f for f in checked if not isinstance(f, Schedule)), start=1.0))
        self._set("_schedules", tuple(f for f in checked if isinstance(f, Schedule)))

    def __call__(self, step: int) -> float:
        value = self._scale
        for schedule in self._schedules:
            value *= schedule(step)
        return value

    def _at(self, steps: np.ndarray) -> np.ndarray:
        out = np.full(steps.shape, self._scale)
        for schedule in self._schedules:
            out *= schedule._at(steps)
        return out

    @property
    def length(self) -> int | None:
        lengths = [s.length for s in self._schedules]
        return None if None in lengths else max(lengths, default=0)

    def milestones(self) -> list[tuple[int, str]]:
        marks = {}
        for schedule in reversed(self._schedules):
            marks.update(schedule.milestones())
        return sorted(marks.items())


# -- serialization


def from_dict(spec: dict) -> Schedule:
    """Rebuild a schedule from `to_dict()` output, e.g. after `json.loads(json.dumps(sched.to_dict()))`."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"from_dict: expected a dict with a 'type' key, got {spec!r}")
    kwargs = dict(spec)
    name = kwargs.pop("type")
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"from_dict: unknown schedule type {name!r}; known: {sorted(_REGISTRY)}")
    return cls(**{key: _revive(value) for key, value in kwargs.items()})


def _revive(value):
    if isinstance(value, dict) and "type" in value:
        return from_dict(value)
    if isinstance(value, list):
        return [_revive(v) for v in value]
    return value


def _plain(value):
    """A spec value as plain JSON data: nested schedules as dicts, tuples as lists, numpy scalars as Python."""
    if isinstance(value, Schedule):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def _spec_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_spec_text(v) for v in value) + "]"
    return repr(_plain(value)) if not isinstance(value, Schedule) else repr(value)


def _canonical(schedule: Schedule) -> str:
    # JSON text keeps int and float apart: WSD(decay=1) is one step, WSD(decay=1.0) the whole run.
    return json.dumps(schedule.to_dict(), sort_keys=True)


def _factors(x) -> tuple:
    return x.factors if isinstance(x, Product) else (x,)


def _check_number(owner: str, name: str, value, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{owner}: {name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _check_count(owner: str, name: str, value, minimum: int) -> int:
    whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        raise TypeError(f"{owner}: {name} must be a whole number of steps, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value!r}")
    return int(value)
