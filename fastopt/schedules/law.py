"""Predict a loss curve from a learning-rate schedule: the scaling law with LR annealing of Tissue, Wang & Wang
2024 ("Scaling Law with Learning Rate Annealing", arXiv 2408.11029).

    L(s) = L0 + A·S1(s)^(−α) − C·S2(s)
    S1(s) = Σ_{i≤s} η_i                                       forward area: how far the lr has pushed
    S2(s) = Σ_{i≤s} m_i,  m_i = λ·m_{i−1} + (η_{i−1} − η_i)   annealing area: lr drops, remembered (λ)

Fit (L0, A, α, C) on one or two measured curves, then compare schedules by their predicted curves.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from .base import Schedule

BOUNDS = ((0.0, 10.0), (0.0, 20.0), (0.0, 10.0), (0.0, 20.0))  # L0, A, alpha, C (Tissue et al.)


def annealing_areas(lrs, lam: float = 0.999) -> tuple[np.ndarray, np.ndarray]:
    """(S1, S2) at every step for a per-step lr array, with m_0 = 0.

    The initial warmup (the lr's first monotone rise) is left out of the momentum: it is not an annealing in
    reverse, and counting it would add a large negative S2 (about −peak/(1−λ)) to every run with a warmup. Later
    rises (re-warms, restarts) do count, negatively: the law reads them as raising the loss.
    """
    lrs = np.asarray(lrs, dtype=np.float64)
    drops = np.diff(lrs, prepend=lrs[:1]) * -1.0
    rising = drops[1:] < 0
    drops[: lrs.size if rising.all() else 1 + int(np.argmin(rising))] = 0.0
    momentum = np.empty_like(lrs)
    m = 0.0
    for i, drop in enumerate(drops.tolist()):
        m = lam * m + drop
        momentum[i] = m
    return np.cumsum(lrs), np.cumsum(momentum)


@dataclasses.dataclass(frozen=True)
class AnnealingLaw:
    """L(s) = L0 + A·S1^(−α) − C·S2 with fitted constants; see the module docstring and README.md.

    Typical use: run one or two short trainings (e.g. a constant and a cosine schedule), fit, then predict the
    final loss of candidate schedules and train with the best:

        law = AnnealingLaw.fit((steps, lrs, losses), (steps2, lrs2, losses2))
        law.predict(WSD(peak=3e-4, total=10000, decay=0.2), [9999])
    """

    L0: float
    A: float
    alpha: float
    C: float
    lam: float = 0.999

    def predict(self, lrs, steps=None) -> np.ndarray:
        """Predicted loss at `steps` (default: every step) for a Schedule or a per-step lr array.

        Steps before any lr has been applied (S1 = 0) predict inf.
        """
        steps, lrs = _steps_and_lrs(lrs, steps)
        s1, s2 = annealing_areas(lrs, self.lam)
        with np.errstate(divide="ignore"):
            return self.L0 + self.A * s1[steps] ** -self.alpha - self.C * s2[steps]

    @classmethod
    def fit(cls, *curves, lam: float = 0.999, delta: float = 1e-3) -> AnnealingLaw:
        """Fit on measured curves, each `(steps, lrs, losses)`.

        `steps` are the steps where the loss was measured, `losses` the losses there, and `lrs` the lr of EVERY step
        from 0 on (an array indexed by step, or the Schedule that was used). Minimizes the Huber loss (δ=1e-3, as
        Hoffmann et al. 2022 do) of log L with scipy's L-BFGS-B from a grid of initial points, within
        L0∈(0,10), A∈(0,20), α∈(0,10), C∈(0,20). Steps where S1 = 0 (before the lr first rises) are skipped.
        """
        try:
            from scipy.optimize import minimize
        except ImportError as error:
            raise ImportError("AnnealingLaw.fit needs scipy: pip install scipy") from error
        if not curves:
            raise ValueError("AnnealingLaw.fit: give at least one (steps, lrs, losses) curve")
        points = []  # (S1, S2, loss) at every measured step, all curves together
        for i, curve in enumerate(curves):
            if len(curve) != 3:
                raise ValueError(f"AnnealingLaw.fit: curve {i} must be (steps, lrs, losses), got {len(curve)} items")
            steps, lrs = _steps_and_lrs(curve[1], curve[0])
            loss = np.asarray(curve[2], dtype=np.float64)
            if loss.shape != steps.shape or not (np.isfinite(loss).all() and (loss > 0).all()):
                raise ValueError(f"AnnealingLaw.fit: curve {i} needs one finite loss > 0 per step ({steps.size})")
            s1, s2 = (area[steps] for area in annealing_areas(lrs, lam))
            points.append(np.stack([s1, s2, loss])[:, s1 > 0])
        s1, s2, loss = np.concatenate(points, axis=1)
        log_s1, log_loss = np.log(s1), np.log(loss)

        def objective(theta):
            l0, a, alpha, c = theta
            power = np.exp(-alpha * log_s1)
            predicted = l0 + a * power - c * s2
            valid = predicted > 0
            residual = np.where(valid, np.log(np.where(valid, predicted, 1.0)), -50.0) - log_loss
            huber = np.where(abs(residual) <= delta, 0.5 * residual**2, delta * (abs(residual) - 0.5 * delta))
            slope = np.where(valid, np.clip(residual, -delta, delta) / np.where(valid, predicted, 1.0), 0.0)
            grad = [slope.sum(), (slope * power).sum(), -(slope * a * power * log_s1).sum(), -(slope * s2).sum()]
            return huber.sum() / delta, np.array(grad) / delta

        lowest = float(loss.min())
        starts = itertools.product((0.5 * lowest, 0.9 * lowest), (0.3, 3.0), (0.2, 0.8), (0.1, 2.0))
        best = min(
            (
                minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=BOUNDS,
                         options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12})
                for x0 in starts
            ),
            key=lambda result: result.fun,
        )
        l0, a, alpha, c = (float(x) for x in best.x)
        return cls(L0=l0, A=a, alpha=alpha, C=c, lam=lam)


def _steps_and_lrs(lrs, steps) -> tuple[np.ndarray, np.ndarray]:
    """Steps as an int array and the per-step lrs covering them (a Schedule is evaluated up to the last step)."""
    if steps is None:
        length = lrs.length if isinstance(lrs, Schedule) else len(lrs)
        if not length:
            raise ValueError("AnnealingLaw: this schedule has no length of its own; pass steps")
        steps = np.arange(length)
    steps = np.asarray(steps)
    if steps.ndim != 1 or steps.size == 0 or not np.issubdtype(steps.dtype, np.integer) or steps.min() < 0:
        raise ValueError(f"AnnealingLaw: steps must be a non-empty 1-D array of ints >= 0, got {steps!r:.80}")
    needed = int(steps.max()) + 1
    lrs = lrs.values(needed) if isinstance(lrs, Schedule) else np.asarray(lrs, dtype=np.float64)
    if lrs.ndim != 1 or lrs.size < needed:
        raise ValueError(f"AnnealingLaw: lrs must give the lr of every step up to {needed - 1}, got shape {lrs.shape}")
    return steps, lrs[:needed]

