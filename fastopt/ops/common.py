"""Small pieces every layer above the kernels shares, each defined once."""
from __future__ import annotations

import torch

from fastopt.quant.formats import Quantized

COMPAT = (None, "official")  # compat=: fastopt's corrected arithmetic, or the official code's, quirks included


def compute_dtype(t: torch.Tensor | torch.dtype) -> torch.dtype:
    """The dtype the math runs in for a tensor (or dtype): float64 for float64, float32 for every other float."""
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_number(value: float | torch.Tensor) -> float:
    """A hyperparameter as a host number. Reading a 0-d tensor waits for its device: outside step() (validation)
    only, or for options that decide on the host which kernels run."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def host_numbers(hp: dict, *names: str) -> dict:
    """``hp`` with the named 0-d tensors read as numbers, for math that takes host scalars (the reference's); lr and
    the others stay as they are (torch's arithmetic takes a 0-d tensor lr without reading it)."""
    return {k: as_number(v) if k in names and isinstance(v, torch.Tensor) else v for k, v in hp.items()}


ADAM_NUMBERS = ("beta1", "beta2", "eps", "weight_decay")  # what the reference reads of Adam's hyperparameters


def check_compat(owner: str, compat) -> None:
    if compat not in COMPAT:
        raise ValueError(f"{owner}: compat must be one of {COMPAT}, got {compat!r}")


# ---- the reference implementations' moments: float tensors or Quantized, read and written alike ---------------------
def load_moment(moment: torch.Tensor | Quantized, like: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """A moment's values in ``compute`` dtype, shaped as ``like`` (a Quantized one is decoded)."""
    if isinstance(moment, Quantized):
        return moment.dequantize(like.numel()).view(like.shape).to(compute)
    return moment.to(compute)


def store_moment(moment: torch.Tensor | Quantized, value: torch.Tensor) -> None:
    if isinstance(moment, Quantized):
        moment.assign(value)
    else:
        moment.copy_(value)


def zero_moment(moment: torch.Tensor | Quantized) -> None:
    """A momentum reset. A quantized moment loses its codes and its scales: the second moment's map has no 0, so
    only scale 0 makes a block decode to 0."""
    if isinstance(moment, Quantized):
        moment.codes.zero_()
        moment.scales.zero_()
    else:
        moment.zero_()


def skipped(found_inf: torch.Tensor | None) -> bool:
    """Whether GradScaler found inf/NaN this step (a host read: the reference path's)."""
    return found_inf is not None and found_inf.item() != 0
