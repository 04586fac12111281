"""Block quantization ops (fastopt/quant/formats.py) with reference and C++ implementations that agree
exactly: ``quantize`` returns (packed codes, scales); ``dequantize`` the fp32 values."""
from __future__ import annotations

import torch

from fastopt.ops._backends import resolve, step_kernel
from fastopt.quant import formats
from fastopt.quant.formats import QuantFormat


def quantize(x: torch.Tensor, fmt: QuantFormat, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    backend = resolve(backend, x.device)
    if backend == "reference":
        return formats.encode(x, fmt)
    op = step_kernel("quantize_blockwise", backend, x.device)
    return op(x.float(), fmt.table(x.device), fmt.bits)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: QuantFormat, n: int, *,
               backend: str | None = None) -> torch.Tensor:
    backend = resolve(backend, codes.device)
    if backend == "reference":
        return formats.decode(codes, scales, fmt, n)
    return step_kernel("dequantize_blockwise", backend, codes.device)(codes, scales, fmt.table(codes.device),
                                                                      fmt.bits, n)
