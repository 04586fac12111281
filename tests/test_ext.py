"""The compiled extension is really what runs on CPU: no silent fallback to the reference path."""
import pytest
import torch

import fastopt
from fastopt import _ext
from fastopt.ops import adam as adam_ops


def test_extension_is_installed_and_registered():
    assert _ext.load() == "installed", "fastopt._C is not built: run `make build`"
    assert torch.ops.fastopt.cpu_isa() in ("avx512vbmi", "avx512", "avx2", "scalar")


def test_adamw_on_cpu_runs_the_cpp_kernel(monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("the reference path ran instead of the C++ kernel")

    monkeypatch.setattr(adam_ops, "_reference", no_reference)
    p = torch.nn.Parameter(torch.randn(1000))
    opt = fastopt.AdamW([p])
    p.grad = torch.randn(1000)
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(before, p.detach())


def test_set_cpu_isa_rejects_unknown_names():
    with pytest.raises(RuntimeError, match="unknown isa 'sse9'"):
        torch.ops.fastopt.set_cpu_isa("sse9")
    assert torch.ops.fastopt.set_cpu_isa("auto") == torch.ops.fastopt.cpu_isa()
