"""Test-wide setup. Triton kernels run in Triton's interpreter on CPU tensors (no GPU here); the flag must be
set before any kernel is defined. The AOT compile test runs in a subprocess without it."""
import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice; keeps its default

import pytest  # noqa: E402
import torch  # noqa: E402

import fastopt  # noqa: E402
from fastopt import _ext  # noqa: E402

# Sizes that break blocking: SIMD widths, the 1024-element Triton block, the 65536-element CPU chunk.
ODD_SIZES = [1, 127, 128, 129, 4095, 4097, 1_000_003]

# Where the Triton backend runs: a CUDA GPU when there is one and the interpreter is off (make gpu-check), else CPU
# tensors in Triton's interpreter. Tests of the Triton path put their tensors there (``to_triton_device``).
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else "cpu")


def device_of(backend: str | None) -> torch.device:
    return TRITON_DEVICE if backend == "triton" else torch.device("cpu")


def to_device(x, device):
    """Tensors, Quantized moments and lists/tuples of them on ``device`` (the same objects where they already are)."""
    from fastopt.quant import Quantized

    if isinstance(x, Quantized):
        return Quantized(x.codes.to(device), x.scales.to(device), x.fmt)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(y, device) for y in x)
    return x.to(device) if isinstance(x, torch.Tensor) else x


def cpu_isas() -> list[str]:
    """Every CPU kernel ISA this machine can run (the scalar path always)."""
    if _ext.load() is None:
        return []
    best = fastopt.cpu_isa()
    order = ["scalar", "avx2", "avx512", "avx512vbmi"]
    return order[: order.index(best) + 1]


@contextlib.contextmanager
def on_cpu_isa(isa: str):
    """Runs the block with the CPU kernels of `isa`, restoring the automatic choice afterwards."""
    fastopt.set_cpu_isa(isa)
    try:
        yield isa
    finally:
        fastopt.set_cpu_isa("auto")


@pytest.fixture
def cpu_isa(request):
    """Sets the CPU kernels' ISA for one test, restoring the automatic choice afterwards."""
    with on_cpu_isa(request.param):
        yield request.param


@pytest.fixture
def one_thread():
    """Runs the test on one thread, restoring the count after: tiny models gain nothing from threads (and on a busy
    machine wait for them), and a comparison with ranks running on one thread each must sum its matmuls alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
