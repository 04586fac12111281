"""Block quantization ops (fastopt/quant/formats.py) with reference and C++ implementations that agree
exactly: ``quantize`` returns (packed codes, scales); ``dequantize`` the fp32 values."""
from __future__ import annotations

import torch

from fastopt.ops._backends import resolve
from fastopt.quant import formats
from fastopt.quant.formats import QuantFormat


def quantize(x: torch.Tensor, fmt: QuantFormat, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    backend = resolve(backend, x.device)
    if backend == "cpu":
        return torch.ops.fastopt.quantize_blockwise(x.float(), fmt.table(), fmt.bits)
    if backend == "triton":
        from fastopt.kernels.triton.quant import quantize as triton_quantize

        return triton_quantize(x.float(), fmt)
    return formats.encode(x, fmt)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: QuantFormat, n: int, *,
               backend: str | None = None) -> torch.Tensor:
    backend = resolve(backend, codes.device)
    if backend == "cpu":
        return torch.ops.fastopt.dequantize_blockwise(codes, scales, fmt.table(), fmt.bits, n)
    if backend == "triton":
        from fastopt.kernels.triton.quant import dequantize as triton_dequantize

        return triton_dequantize(codes, scales, fmt, n)
    return formats.decode(codes, scales, fmt, n)
