"""The Triton path launches a fixed number of kernels per step, whatever the number of tensors (multi-tensor launches,
fastopt/kernels/triton/_common.py), counted in Triton's interpreter; and a step whose tensors have not moved reuses
the tables and block maps it uploaded."""
import pytest
import torch
from triton.runtime import interpreter

import fastopt
from fastopt.kernels.triton import _common

# optimizer, its options, launches per step for one group of tensors (same dtypes and storage)
STEPS = {
    "AdamW": (fastopt.AdamW, {}, 2),                                  # step counts, update
    "AdamW 4-bit": (fastopt.AdamW, {"state_bits": 4, "min_quant_size": 0}, 2),
    "Adam amsgrad": (fastopt.Adam, {"amsgrad": True}, 2),
    "SPAM 8-bit": (fastopt.SPAM, {"state_bits": 8, "min_quant_size": 0}, 2),
    # counts, max|g| and Σg² per block, AdaClip per tensor, the clipped re-read, AdaGN per tensor, update
    "StableSPAM": (fastopt.StableSPAM, {}, 6),
    "StableSPAM 4-bit": (fastopt.StableSPAM, {"state_bits": 4, "min_quant_size": 0}, 6),
}


@pytest.fixture
def launches(monkeypatch):
    counted = []
    original = interpreter.GridExecutor.__call__

    def counting(self, *args, **kwargs):
        counted.append(self.fn.__name__ if hasattr(self.fn, "__name__") else str(self.fn))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", counting)
    return counted


def step_launches(launches, name: str, tensors: int) -> list[str]:
    cls, options, _ = STEPS[name]
    params = [torch.nn.Parameter(torch.randn(300 + 7 * i)) for i in range(tensors)]
    opt = cls(params, lr=1e-3, backend="triton", **options)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step creates the state
    launches.clear()
    opt.step()
    return list(launches)


@pytest.mark.parametrize("name", STEPS)
def test_launches_per_step_do_not_depend_on_the_number_of_tensors(launches, name):
    few, many = step_launches(launches, name, 2), step_launches(launches, name, 40)
    assert few == many, (few, many)
    assert len(many) == STEPS[name][2], many


def test_one_group_per_dtype_pair(launches):
    """Tensors of other dtypes go in their own launch: fp32 and bf16 params, each with moments of their dtype."""
    params = [torch.nn.Parameter(torch.randn(100).to(dtype)) for dtype in [torch.float32, torch.bfloat16] * 10]
    opt = fastopt.AdamW(params, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    launches.clear()
    opt.step()
    assert sorted(launches) == ["adam_kernel", "adam_kernel", "advance_kernel", "advance_kernel"]


def test_unmoved_tensors_reuse_their_uploaded_tables():
    """The table and block maps of a launch are built and uploaded once while the tensors stay where they are."""
    params = [torch.nn.Parameter(torch.randn(5000)) for _ in range(3)]
    opt = fastopt.StableSPAM(params, backend="triton", state_bits=4)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = set(_common._tables)
    opt.step()
    assert set(_common._tables) == before  # nothing built: the grads kept their storage
    params[1].grad = torch.randn_like(params[1])  # a new gradient tensor: a new table, the same block maps
    opt.step()
    assert [key[1] for key in set(_common._tables) - before] == ["table"]


def test_tables_a_graph_captured_are_never_evicted(monkeypatch):
    """A CUDA graph replays with the device addresses it captured: a table read while a graph was being captured
    stays, however many others pass through the cache after it; the others are still evicted, oldest first."""
    monkeypatch.setattr(_common, "_tables", _common.OrderedDict())
    monkeypatch.setattr(_common, "_captured", {})
    cpu = torch.device("cpu")

    def lookup(k):
        return _common._cached((cpu, "test", k), lambda: (torch.tensor([k]), None))[0]

    first, second = lookup(0), lookup(1)
    monkeypatch.setattr(_common, "_capturing", lambda device: True)
    assert lookup(0) is first  # found in the cache, read while capturing
    monkeypatch.setattr(_common, "_capturing", lambda device: False)
    for k in range(2, _common._CACHE_SIZE + 3):
        lookup(k)
    assert lookup(0) is first
    assert lookup(1) is not second  # evicted, then built anew
