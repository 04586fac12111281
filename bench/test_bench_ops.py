"""pytest-benchmark suite for tracking regressions of the fused ops (not part of `make test`):

    .venv/bin/python -m pytest bench/test_bench_ops.py --benchmark-only [--benchmark-compare]

Times one multi-tensor step over 4M parameters per configuration on the CPU kernels."""
import pytest
import torch

from fastopt.ops import adam_step
from fastopt.ops.quant import quantize
from fastopt.quant import FORMATS, zeros

N = 4 * 1024 * 1024
HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adam_step(benchmark, dtype):
    p, g = torch.randn(N).to(dtype), torch.randn(N).to(dtype)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    benchmark(adam_step, [p], [g], [m], [v], [], [torch.tensor(0.0)], backend="cpu", **HP)


@pytest.mark.parametrize("bits", [8, 4])
def test_adam_step_quantized(benchmark, bits):
    p, g = torch.randn(N), torch.randn(N)
    m, v = zeros(N, FORMATS[(bits, True)], "cpu"), zeros(N, FORMATS[(bits, False)], "cpu")
    benchmark(adam_step, [p], [g], [m], [v], [], [torch.tensor(0.0)], backend="cpu", **HP)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize(benchmark, bits):
    x = torch.randn(N)
    benchmark(quantize, x, FORMATS[(bits, True)], backend="cpu")
