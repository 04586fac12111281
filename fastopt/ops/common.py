"""Small pieces every layer above the kernels shares, each defined once."""
from __future__ import annotations

import torch

COMPAT = (None, "official")  # compat=: fastopt's corrected arithmetic, or the official code's, quirks included


def compute_dtype(t: torch.Tensor | torch.dtype) -> torch.dtype:
    """The dtype the math runs in for a tensor (or dtype): float64 for float64, float32 for every other float."""
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_number(value: float | torch.Tensor) -> float:
    """A hyperparameter as a host number. Reading a 0-d tensor waits for its device: outside step() (validation)
    only, or for options that decide on the host which kernels run."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def check_compat(owner: str, compat) -> None:
    if compat not in COMPAT:
        raise ValueError(f"{owner}: compat must be one of {COMPAT}, got {compat!r}")
