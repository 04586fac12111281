"""The schedule catalog (docs/algorithms.md#catalog).

Units: `total`, `checkpoints` and `stages` are whole numbers of steps. A length inside a schedule (`warmup`,
`decay`, `cooldown`, `anneal`, `period`) is an int number of steps or a float fraction of the schedule's total
(rounded to whole steps): `decay=0.2` is the last 20%, `decay=2000` the last 2000 steps.

Values (`peak`, `final`, ...) are absolute: `final=3e-5` means a learning rate of 3e-5, not a ratio of `peak`.
Warmups start at 0 and reach `peak` at the end of the warmup (lr(0) = 0), as transformers' schedules do.
"""

from __future__ import annotations

import numpy as np

from .base import Phase, Piecewise, Schedule, schedule_type

# Shapes a ramp or a WSD decay may take (see shapes.py).
RAMP_SHAPES = ("linear", "cosine", "1-sqrt", "exp", "inv")


@schedule_type
class Constant(Piecewise):
    """The same value at every step."""

    value: float

    def _phases(self):
        value = self._number("value")
        return [Phase("constant", 0, value, value)]

    def milestones(self):
        return [(0, "constant")]


@schedule_type
class Ramp(Piecewise):
    """From `start` to `end` over `steps` steps along `shape`, then hold `end`.

    `Ramp(0.0, peak, 1000)` is a linear warmup; `Ramp(0.0, 1.0, 1000) * sched` adds a warmup to any schedule.
    """

    start: float
    end: float
    steps: int
    shape: str = "linear"

    def _phases(self):
        start, end = self._number("start"), self._number("end")
        steps = self._count("steps")
        shape = self._shape("shape", RAMP_SHAPES, start=start, end=end)
        return [Phase("ramp", steps, start, end, shape)]



@schedule_type
class Linear(Piecewise):
    """Linear warmup from 0 to `peak`, then linear decay to `final` at step `total`.

    transformers' get_linear_schedule_with_warmup; with warmup=0 it is the linear decay η(1 − t/T) that Defazio et
    al. 2023 ("When, Why and How Much?") show to be worst-case optimal for the last iterate.
    """

    peak: float
    total: int
    warmup: int | float = 0
    final: float = 0.0
    decay_shape = "linear"  # a class constant, not a field: REX is this schedule with its own decay profile

    def _phases(self):
        peak, final, total = self._number("peak"), self._number("final"), self._count("total")
        warmup = self._warmup(total)
        return [Phase("warmup", warmup, 0.0, peak), Phase("decay", total - warmup, peak, final, self.decay_shape)]


@schedule_type
class Cosine(Piecewise):
    """Linear warmup to `peak`, then cosine decay to `final` (Loshchilov & Hutter, SGDR).

    With `period`, the decay restarts at `peak` (SGDR warm restarts): cycle i lasts T_i = period·period_mult^i steps
    (torch's CosineAnnealingWarmRestarts with T_0=period, T_mult=period_mult); a cycle still running at `total` is
    cut there. Without it there is one cycle of total − warmup steps (torch's CosineAnnealingLR, transformers'
    get_cosine_schedule_with_warmup and get_cosine_with_min_lr_schedule_with_warmup).
    """

    peak: float
    total: int
    warmup: int | float = 0
    final: float = 0.0
    period: int | float | None = None
    period_mult: int = 1

    def _phases(self):
        peak, final, total = self._number("peak"), self._number("final"), self._count("total")
        warmup = self._warmup(total)
        span = total - warmup
        mult = self._count("period_mult")
        if self.period is None:
            period = span
        else:
            period = self._steps("period", total, positive=True)
            if period > span:
                raise self._error(f"period must be <= total - warmup ({span}), got period={self.period!r}")
        cycles, done = [], 0
        while done < span:
            cycles.append(min(period, span - done))
            done += period
            period *= mult
        cycles = cycles or [0]
        names = ["decay"] if len(cycles) == 1 else [f"cycle {i + 1}" for i in range(len(cycles))]
        return [Phase("warmup", warmup, 0.0, peak)] + [
            Phase(name, steps, peak, final, "cosine") for name, steps in zip(names, cycles)
        ]


@schedule_type
class WSD(Piecewise):
    """Warmup-stable-decay: linear warmup to `peak`, hold it, and decay to `final` over the last `decay` steps.

    Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations",
    epfml/schedules-and-scaling) and Wen et al. 2024. `decay` is a fraction of `total` (float, default 0.2) or a
    number of steps (int). Decay shapes, p the decay's progress: linear final + (peak − final)(1 − p); cosine;
    1-sqrt final + (peak − final)(1 − √p) (the default, Hägele et al.'s best); exp peak·(final/peak)^p;
    inv 1/(p/final + (1 − p)/peak). exp and inv need final > 0. Same values as transformers' get_wsd_schedule
    (linear warmup, min_lr_ratio = final/peak), except that its warmup starts from final instead of 0.
    """

    peak: float
    total: int
    warmup: int | float = 0
    decay: int | float = 0.2
    shape: str = "1-sqrt"
    final: float = 0.0

    def _phases(self):
        peak, final, total = self._number("peak"), self._number("final"), self._count("total")
        warmup = self._warmup(total)
        decay = self._steps("decay", total, positive=True)
        if decay > total - warmup:
            raise self._error(
                f"decay must be <= total - warmup ({total - warmup} steps), got decay={self.decay!r} ({decay} steps)"
            )
        shape = self._shape("shape", RAMP_SHAPES, peak=peak, final=final)
        return [
            Phase("warmup", warmup, 0.0, peak),
            Phase("stable", total - warmup - decay, peak, peak),
            Phase("decay", decay, peak, final, shape),
        ]


@schedule_type
class WSDS(Piecewise):
    """WSD-S (Wen et al. 2024, "Understanding Warmup-Stable-Decay Learning Rates: A River Valley Loss Landscape
    Perspective"): one run that yields a decayed model at each step of `checkpoints`.

    After a linear warmup, each cycle (from one checkpoint to the next) holds `peak` and decays to `final` over
    its last `decay` steps (a float: fraction of that cycle, default 0.1; an int: steps); the next cycle resumes at
    `peak` from the decayed weights, with no re-warmup. `final` defaults to 0.1·peak as in the paper; when given
    it is absolute.
    """

    peak: float
    checkpoints: tuple
    warmup: int | float = 0
    decay: int | float = 0.1
    shape: str = "linear"
    final: float | None = None

    def _phases(self):
        peak = self._number("peak")
        checkpoints = self._counts("checkpoints")
        if any(b <= a for a, b in zip(checkpoints, checkpoints[1:])):
            raise self._error(f"checkpoints must be increasing, got {list(checkpoints)}")
        final = 0.1 * peak if self.final is None else self._number("final")
        shape = self._shape("shape", RAMP_SHAPES, peak=peak, final=final)
        warmup = self._warmup(checkpoints[-1])
        phases, previous = [Phase("warmup", warmup, 0.0, peak)], 0
        for i, checkpoint in enumerate(checkpoints):
            cycle = checkpoint - previous
            decay = self._steps("decay", cycle, of="each cycle", positive=True)
            stable = cycle - decay - (warmup if i == 0 else 0)
            if stable < 0:
                raise self._error(
                    f"decay ({decay} steps) does not fit in cycle {i + 1} ({cycle} steps"
                    f"{f', {warmup} of them warmup' if i == 0 else ''}); got decay={self.decay!r}"
                )
            phases += [Phase(f"stable {i + 1}", stable, peak, peak), Phase(f"decay {i + 1}", decay, peak, final, shape)]
            previous = checkpoint
        return phases


@schedule_type
class InfiniteLR(Piecewise):
    """The infinite learning-rate schedule (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually
    Pre-train Large Language Models"; Singh et al. 2025, "Beyond Cosine Decay", code Pauljanson002/MAE-1).

    Linear warmup to `peak`; cooldown to `constant` along `shape` ("inv-sqrt": peak + (constant − peak)·h(p)/h(1),
    h(p) = 1/√(1 + 10p) − 1; or "cosine", "linear"); hold `constant` for as long as training goes on; and finally
    anneal exponentially, constant·(final/constant)^p, over the last `anneal` steps. Lengths are ints (steps) or
    floats (fractions of total). Defaults follow the paper: warmup 5%, cooldown to 30%, anneal over the last 20%,
    constant = 0.25·peak, final = 0.01·peak (absolute values when given). anneal=0 never anneals.
    """

    peak: float
    total: int
    warmup: int | float = 0.05
    cooldown: int | float = 0.25
    anneal: int | float = 0.2
    constant: float | None = None
    final: float | None = None
    shape: str = "inv-sqrt"

    def _phases(self):
        peak, total = self._number("peak", positive=True), self._count("total")
        warmup = self._warmup(total)
        cooldown, anneal = self._steps("cooldown", total), self._steps("anneal", total)
        if warmup + cooldown + anneal > total:
            raise self._error(
                f"warmup + cooldown + anneal ({warmup} + {cooldown} + {anneal} steps) must be <= total ({total}), "
                f"got warmup={self.warmup!r}, cooldown={self.cooldown!r}, anneal={self.anneal!r}"
            )
        constant = 0.25 * peak if self.constant is None else self._number("constant", positive=True)
        final = 0.01 * peak if self.final is None else self._number("final", positive=True)
        shape = self._shape("shape", ("inv-sqrt", "cosine", "linear"))
        return [
            Phase("warmup", warmup, 0.0, peak),
            Phase("cooldown", cooldown, peak, constant, shape),
            Phase("constant", total - warmup - cooldown - anneal, constant, constant),
            Phase("anneal", anneal, constant, final if anneal else constant, "exp"),  # anneal=0 holds constant
        ]


@schedule_type
class Rewarm(Piecewise):
    """Re-warm and re-decay for continual pre-training (Gupta et al. 2023, "Continual Pre-Training of Large
    Language Models: How to (re)warm your model?").

    Each data stage (its length in steps in `stages`) warms up linearly from `final` to `peak` over `warmup` (int:
    steps; float: fraction of that stage, default 1%), then decays to `final` with a cosine by the stage's end.
    The first stage also starts from `final`: the learning rate a previous run ended with.
    """

    peak: float
    stages: tuple
    warmup: int | float = 0.01
    final: float = 0.0

    def _phases(self):
        peak, final = self._number("peak"), self._number("final")
        phases = []
        for i, stage in enumerate(self._counts("stages")):
            warmup = self._steps("warmup", stage, of="each stage")
            if warmup > stage:
                raise self._error(
                    f"warmup must be <= each stage, got warmup={self.warmup!r} for stage {i + 1} ({stage} steps)"
                )
            phases += [
                Phase(f"warmup {i + 1}", warmup, final, peak),
                Phase(f"decay {i + 1}", stage - warmup, peak, final, "cosine"),
            ]
        return phases


@schedule_type
class REX(Linear):
    """REX (Chen et al. 2022, "REX: Revisiting Budgeted Training with an Improved Schedule"): after a linear warmup,
    final + (peak − final)·(1 − z)/(1/2 + (1 − z)/2), z the decay's progress."""

    decay_shape = "rex"


@schedule_type
class Tabulated(Schedule):
    """Values read from a table, one per step (e.g. from `refine`); the last value is held after the table ends."""

    table: tuple

    def __post_init__(self):
        try:
            array = np.array(self.table, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"Tabulated: table must be a 1-D sequence of numbers, got {self.table!r:.80}") from None
        if array.ndim != 1 or array.size == 0:
            raise self._error(f"table must be a non-empty 1-D sequence of numbers, got shape {array.shape}")
        bad = ~np.isfinite(array) | (array < 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise self._error(f"table[{i}] must be finite and >= 0, got {float(array[i])!r}")
        array.setflags(write=False)
        self._set("table", tuple(array.tolist()))
        self._set("_array", array)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"Tabulated: step must be >= 0, got {step!r}")
        return self.table[min(int(step), len(self.table) - 1)]

    def _at(self, steps: np.ndarray) -> np.ndarray:
        return self._array[np.minimum(steps, len(self.table) - 1)]

    @property
    def length(self) -> int:
        return len(self.table)

    def milestones(self):
        return [(0, "table"), (self.length, "end")]

