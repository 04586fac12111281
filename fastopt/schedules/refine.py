"""Schedule refinement from a previous run's gradient norms (Defazio, Cutkosky, Mehta & Mishchenko 2023, "When, Why
and How Much? Adaptive Learning Rate Scheduling by Refinement", code facebookresearch/adaptive_scheduling)."""

from __future__ import annotations

import numpy as np

from .catalog import Tabulated


def refine(grad_norms, tau: float = 0.1, adam: bool = True) -> Tabulated:
    """The refined schedule for a new run of the same length, normalized to a peak of 1 (scale it: `3e-4 * s`).

    `grad_norms[t]` is the gradient norm at step t of a previous run: the ℓ1 norm for Adam-type optimizers
    (`adam=True`), the ℓ2 norm for SGD. The paper's recipe:
      1. smooth G with a median filter of width τ·T (odd; τ=0.1), the series padded by reflection at its end;
      2. weights w = G^-1 (Adam) or G^-2 (SGD);
      3. η_t ∝ w_t · Σ_{s>t} w_s, so η_{T-1} = 0; normalize to max 1.
    """
    try:
        from scipy.ndimage import median_filter
    except ImportError as error:
        raise ImportError("refine needs scipy (its median filter): pip install scipy") from error
    norms = np.asarray(grad_norms, dtype=np.float64)
    if norms.ndim != 1 or norms.size < 2:
        raise ValueError(f"refine: grad_norms must be a 1-D series of at least 2 steps, got shape {norms.shape}")
    if not (np.isfinite(norms).all() and (norms > 0).all()):
        raise ValueError("refine: grad_norms must all be finite and > 0")
    if not 0 <= tau < 1:
        raise ValueError(f"refine: tau must be in [0, 1), got {tau!r}")

    width = 2 * (int(tau * norms.size) // 2) + 1
    pad = 2 * width
    smoothed = median_filter(np.pad(norms, (0, pad), mode="reflect"), size=width, mode="nearest")[: norms.size]
    weights = smoothed ** (-1.0 if adam else -2.0)
    tail = np.cumsum(weights[::-1])[::-1]  # tail[t] = Σ_{s>=t} w_s
    lrs = np.zeros_like(weights)
    lrs[:-1] = weights[:-1] * tail[1:]
    return Tabulated(lrs / lrs.max())
