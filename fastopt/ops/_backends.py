"""Which implementation runs an op: the reference (pure torch, any device), the C++ kernels (CPU),
or Triton (GPUs; and CPU tensors under TRITON_INTERPRET=1, which is how the kernels are tested here)."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from fastopt import _ext

BACKENDS = ("reference", "cpu", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cpu_available() -> bool:
    return _ext.load() is not None


def check_backend(backend: str | None) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")


def resolve(backend: str | None, device: torch.device) -> str:
    """The implementation to use for tensors on `device`. None picks the fastest available one."""
    check_backend(backend)
    if backend is None:
        if device.type == "cpu":
            return "cpu" if cpu_available() else "reference"
        return "triton" if triton_available() and device.type in ("cuda", "xpu") else "reference"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs CPU tensors only, got tensors on {device}")
        if not cpu_available():
            raise RuntimeError("backend='cpu' requested but fastopt's C++ kernels are not available "
                               "(build them with `pip install --no-build-isolation -e .`)")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not installed")
        if device.type == "cpu" and not triton_interpreting():
            raise ValueError("backend='triton' runs CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1)")
    return backend


def run_contiguous(kernel, mutated: list[list[torch.Tensor]], read: list[list[torch.Tensor]]) -> None:
    """Calls ``kernel(*mutated, *read)`` on contiguous tensors (kernels index flat storage), copying any
    non-contiguous input first and writing mutated copies back. Contiguous tensors are passed as they are."""
    fixed = [[t.contiguous() for t in ts] for ts in mutated]
    kernel(*fixed, *[[t.contiguous() for t in ts] for ts in read])
    for originals, copies in zip(mutated, fixed):
        for t, c in zip(originals, copies):
            if c is not t:
                t.copy_(c)
