"""The Adam/AdamW op beyond the parity cases of tests/ops/opinfo.py (run by test_parity.py): many tensors in one
call, GradScaler, tensor hyperparameters, non-contiguous inputs, edge values."""
import itertools

import pytest
import torch

from fastopt.ops import adam_step
from tests.conftest import device_of, to_device

CPU = torch.device("cpu")
HP = dict(lr=3e-3, beta1=0.9, beta2=0.99, eps=1e-8)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_many_tensors_in_one_call(backend):
    """The multi-tensor path: mixed sizes and dtypes in one call, each tensor with its own step count."""
    sizes = [1, 3, 70_000, 129, 4097]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]
    ps = [torch.randn(n).to(d) for n, d in zip(sizes, dtypes)]
    gs = [torch.randn(n).to(d) for n, d in zip(sizes, dtypes)]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    steps = [torch.tensor(float(k)) for k in range(len(ps))]
    args = lambda: ([p.clone() for p in ps], gs, [m.clone() for m in ms], [v.clone() for v in vs], [],  # noqa: E731
                    [s.clone() for s in steps])
    hp = dict(HP, weight_decay=0.01, decoupled=True)
    want, got = args(), to_device(args(), device_of(backend))
    adam_step(*want, backend="reference", **hp)
    adam_step(*got, backend=backend, **hp)
    for a, b in zip(itertools.chain(*to_device(got, CPU)), itertools.chain(*want)):
        torch.testing.assert_close(a.double(), b.double(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_grad_scale_and_found_inf(backend):
    """GradScaler's fused protocol: grads are divided by grad_scale; found_inf skips the step, counts included."""
    n = 1000
    p, g = torch.randn(n), torch.randn(n)
    scale = torch.tensor(1024.0)
    hp = dict(HP, weight_decay=0.01, decoupled=True)
    device = device_of(backend)
    want = [p.clone()], [torch.zeros(n)], [torch.zeros(n)], [], [torch.tensor(0.0)]
    got = to_device(([p.clone()], [torch.zeros(n)], [torch.zeros(n)], [], [torch.tensor(0.0)]), device)
    scaled, scale, zero, one = to_device((g * scale, scale, torch.tensor(0.0), torch.tensor(1.0)), device)
    adam_step(want[0], [g], *want[1:], backend="reference", **hp)
    adam_step(got[0], [scaled], *got[1:], backend=backend, grad_scale=scale, found_inf=zero, **hp)
    torch.testing.assert_close(got[0][0].cpu(), want[0][0])
    before = [t[0].clone() for t in (got[0], got[1], got[2], got[4])]
    adam_step(got[0], [scaled], *got[1:], backend=backend, grad_scale=scale, found_inf=one, **hp)
    for a, b in zip(before, (got[0][0], got[1][0], got[2][0], got[4][0])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_lr_as_tensor_and_non_contiguous(backend):
    p = torch.randn(64, 48)
    g = torch.randn(48, 64).t()  # a non-contiguous gradient
    hp = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True)
    device = device_of(backend)
    want = [p.clone()], [g], [torch.zeros_like(p)], [torch.zeros_like(p)], [], [torch.tensor(0.0)]
    got = ([p.to(device).t().contiguous().t()], [g.to(device).t().contiguous().t()],
           *to_device(([torch.zeros_like(p)], [torch.zeros_like(p)], [], [torch.tensor(0.0)]), device))
    adam_step(*want, lr=0.01, backend="reference", **hp)
    adam_step(*got, lr=torch.tensor(0.01, device=device), backend=backend, **hp)
    assert not got[0][0].is_contiguous() and not got[1][0].is_contiguous()
    torch.testing.assert_close(got[0][0].cpu(), want[0][0])
    torch.testing.assert_close(got[2][0].cpu(), want[2][0])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("bits", [None, 4])
def test_tensor_hyperparameters(backend, bits, monkeypatch):
    """Betas, eps and weight decay as 0-d tensors give the numbers' result (Triton reads them on the device; with
    beta1 = 0 too); the Triton path never reads a tensor back to the host."""
    from fastopt.quant import formats as quant

    def state(n):
        if bits is None:
            return [torch.zeros(n)], [torch.zeros(n)]
        return [quant.zeros(n, quant.FORMATS[(bits, True)], "cpu")], [quant.zeros(n, quant.FORMATS[(bits, False)], "cpu")]

    for beta1 in (0.9, 0.0):
        p, g = torch.randn(4097), torch.randn(4097)
        numbers = dict(beta1=beta1, beta2=0.99, eps=1e-6, weight_decay=0.1)
        device = device_of(backend)
        want = to_device(([p.clone()], [g], *state(4097), [], [torch.tensor(2.0)]), device)
        got = to_device(([p.clone()], [g], *state(4097), [], [torch.tensor(2.0)]), device)
        adam_step(*want, lr=0.01, decoupled=True, backend=backend, **numbers)
        if backend == "triton":
            def no_reads(self, *args):
                raise AssertionError("the Triton path read a tensor on the host")
            monkeypatch.setattr(torch.Tensor, "item", no_reads)
            monkeypatch.setattr(torch.Tensor, "__float__", no_reads)
        adam_step(*got, lr=torch.tensor(0.01, device=device), decoupled=True, backend=backend,
                  **{k: torch.tensor(v, device=device) for k, v in numbers.items()})
        monkeypatch.undo()
        assert got[5][0].item() == 3.0
        torch.testing.assert_close(got[0][0], want[0][0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_zero_beta_and_first_step(backend):
    """beta1 = 0 (1 − β^t is 1 without a log of 0 in the Triton kernel) and the first step's bias correction."""
    p, g = torch.randn(300), torch.randn(300)
    hp = dict(lr=0.1, beta1=0.0, beta2=0.5, eps=1e-8, weight_decay=0.0, decoupled=True)
    want = [p.clone()], [g], [torch.zeros(300)], [torch.zeros(300)], [], [torch.tensor(0.0)]
    got = to_device(([p.clone()], [g], [torch.zeros(300)], [torch.zeros(300)], [], [torch.tensor(0.0)]),
                    device_of(backend))
    adam_step(*want, backend="reference", **hp)
    adam_step(*got, backend=backend, **hp)
    torch.testing.assert_close(got[0][0].cpu(), want[0][0])
    torch.testing.assert_close(got[0][0].cpu(), p - 0.1 * torch.sign(g), rtol=1e-5, atol=1e-6)  # |m/sqrt(v)| = 1
