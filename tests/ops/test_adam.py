"""Every Adam/AdamW implementation against the reference, on sizes that break blocking and fresh random data.

fp32 results are compared with the reference run in float64 (exact math); bf16/fp16 results with the reference
run on the same low-precision storage (fp32 math), to within one unit in the last place of the storage dtype.
"""
import itertools

import pytest
import torch

from fastopt.ops import adam_step
from tests.conftest import ODD_SIZES, cpu_isas

BACKENDS = [("cpu", isa) for isa in cpu_isas()] + [("triton", None)]
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def make_state(n, param_dtype, state_dtype, amsgrad):
    p = torch.randn(n).to(param_dtype)
    m = (torch.randn(n) * 0.1).to(state_dtype)
    v = (torch.rand(n) * 0.01).to(state_dtype)
    vmax = [(torch.rand(n) * 0.02).to(state_dtype)] if amsgrad else []
    return [p], [m], [v], vmax, [torch.tensor(3.0)]


def clone(tensors, dtype=None):
    return [t.clone() if dtype is None else t.to(dtype) for t in tensors]


def run(backend, state, grads, steps=3, **hp):
    p, m, v, vmax, step = state
    for k in range(steps):
        adam_step(p, grads[k], m, v, vmax, step, backend=backend, **hp)
    return p, m, v, vmax, step


def check(state, expected, dtype):
    """Within a few units in the last place, relative to each tensor's magnitude (cancellation in m and v
    makes single elements small; their error stays on the scale of the operands)."""
    for got, want in zip(itertools.chain(*state[:4]), itertools.chain(*expected[:4])):
        tol = ULP[dtype] * 4
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * want.abs().max().item())
    assert state[4][0].item() == expected[4][0].item()


HP = dict(lr=3e-3, beta1=0.9, beta2=0.99, eps=1e-8)


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=[f"{b}-{i}" if i else b for b, i in BACKENDS])
@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("amsgrad,maximize,weight_decay,decoupled",
                         [(False, False, 0.0, True), (True, True, 0.1, True), (False, True, 0.1, False),
                          (True, False, 0.1, False)],
                         ids=["plain", "amsgrad-maximize-adamw", "maximize-adam", "amsgrad-adam"])
def test_backend_matches_reference(backend, isa, n, dtype, amsgrad, maximize, weight_decay, decoupled):
    if backend == "triton" and n == ODD_SIZES[-1] and (amsgrad or dtype != torch.float32):
        n = 65_537  # the interpreter runs programs one by one in Python: one 1M case per dtype is enough
    if isa:
        torch.ops.fastopt.set_cpu_isa(isa)
    try:
        state = make_state(n, dtype, dtype, amsgrad)
        grads = [[torch.randn(n).to(dtype)] for _ in range(3)]
        hp = dict(HP, weight_decay=weight_decay, decoupled=decoupled, maximize=maximize)
        if dtype == torch.float32:  # exact math as the reference
            expected = run("reference", [clone(s, torch.float64) for s in state[:4]] + [clone(state[4])],
                           [clone(g, torch.float64) for g in grads], **hp)
        else:
            expected = run("reference", [clone(s) for s in state], grads, **hp)
        got = run(backend, state, grads, **hp)
        check(got, expected, dtype)
    finally:
        torch.ops.fastopt.set_cpu_isa("auto")


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=[f"{b}-{i}" if i else b for b, i in BACKENDS])
@pytest.mark.parametrize("param_dtype,state_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                                     (torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["fp16", "bf16-fp32state", "fp16-fp32state", "fp32-bf16state"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_mixed_precision_matches_reference(backend, isa, param_dtype, state_dtype, amsgrad):
    if isa:
        torch.ops.fastopt.set_cpu_isa(isa)
    try:
        n = 4097
        state = make_state(n, param_dtype, state_dtype, amsgrad)
        grads = [[torch.randn(n).to(param_dtype)] for _ in range(3)]
        hp = dict(HP, weight_decay=0.1, decoupled=True, maximize=False)
        expected = run("reference", [clone(s) for s in state], grads, **hp)
        got = run(backend, state, grads, **hp)
        check(got, expected, param_dtype if ULP[param_dtype] > ULP[state_dtype] else state_dtype)
    finally:
        torch.ops.fastopt.set_cpu_isa("auto")


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
    want, got = args(), args()
    adam_step(*want, backend="reference", **hp)
    adam_step(*got, backend=backend, **hp)
    for a, b in zip(itertools.chain(*got), itertools.chain(*want)):
        torch.testing.assert_close(a.double(), b.double(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_grad_scale_and_found_inf(backend):
    """GradScaler's fused protocol: grads are divided by grad_scale; found_inf skips the step, counts included."""
    n = 1000
    p, g = torch.randn(n), torch.randn(n)
    scale = torch.tensor(1024.0)
    hp = dict(HP, weight_decay=0.01, decoupled=True)
    want = [p.clone()], [torch.zeros(n)], [torch.zeros(n)], [], [torch.tensor(0.0)]
    got = [p.clone()], [torch.zeros(n)], [torch.zeros(n)], [], [torch.tensor(0.0)]
    adam_step(want[0], [g], *want[1:], backend="reference", **hp)
    adam_step(got[0], [g * scale], *got[1:], backend=backend, grad_scale=scale, found_inf=torch.tensor(0.0), **hp)
    torch.testing.assert_close(got[0][0], want[0][0])
    before = [t[0].clone() for t in (got[0], got[1], got[2], got[4])]
    adam_step(got[0], [g * scale], *got[1:], backend=backend, grad_scale=scale, found_inf=torch.tensor(1.0), **hp)
    for a, b in zip(before, (got[0][0], got[1][0], got[2][0], got[4][0])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_lr_as_tensor_and_non_contiguous(backend):
    p = torch.randn(64, 48)
    g = torch.randn(48, 64).t()  # a non-contiguous gradient
    hp = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True)
    want = [p.clone()], [g], [torch.zeros_like(p)], [torch.zeros_like(p)], [], [torch.tensor(0.0)]
    got = [p.t().contiguous().t()], [g], [torch.zeros_like(p)], [torch.zeros_like(p)], [], [torch.tensor(0.0)]
    adam_step(*want, lr=0.01, backend="reference", **hp)
    adam_step(*got, lr=torch.tensor(0.01), backend=backend, **hp)
    assert not got[0][0].is_contiguous()
    torch.testing.assert_close(got[0][0], want[0][0])
    torch.testing.assert_close(got[2][0], want[2][0])


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # log(beta1 = 0), numpy
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("bits", [None, 4])
def test_tensor_hyperparameters(backend, bits, monkeypatch):
    """Betas, eps and weight decay as 0-d tensors give the numbers' result (Triton reads them on the device; with
    beta1 = 0 too, the log of 0 in the kernel); the Triton path never reads a tensor back to the host."""
    from fastopt.quant import formats as quant

    def state(n):
        if bits is None:
            return [torch.zeros(n)], [torch.zeros(n)]
        return [quant.zeros(n, quant.FORMATS[(bits, True)], "cpu")], [quant.zeros(n, quant.FORMATS[(bits, False)], "cpu")]

    for beta1 in (0.9, 0.0):
        p, g = torch.randn(4097), torch.randn(4097)
        numbers = dict(beta1=beta1, beta2=0.99, eps=1e-6, weight_decay=0.1)
        want = [p.clone()], [g], *state(4097), [], [torch.tensor(2.0)]
        got = [p.clone()], [g], *state(4097), [], [torch.tensor(2.0)]
        adam_step(*want, lr=0.01, decoupled=True, backend=backend, **numbers)
        if backend == "triton":
            def no_reads(self, *args):
                raise AssertionError("the Triton path read a tensor on the host")
            monkeypatch.setattr(torch.Tensor, "item", no_reads)
            monkeypatch.setattr(torch.Tensor, "__float__", no_reads)
        adam_step(*got, lr=torch.tensor(0.01), decoupled=True, backend=backend,
                  **{k: torch.tensor(v) for k, v in numbers.items()})
        monkeypatch.undo()
        assert got[5][0].item() == 3.0
        torch.testing.assert_close(got[0][0], want[0][0], rtol=1e-6, atol=1e-7)


def test_zero_beta_and_first_step():
    """beta1 = 0 (log of 0 in the Triton kernel) and the first step's bias correction."""
    for backend in ("cpu", "triton"):
        p, g = torch.randn(300), torch.randn(300)
        hp = dict(lr=0.1, beta1=0.0, beta2=0.5, eps=1e-8, weight_decay=0.0, decoupled=True)
        want = [p.clone()], [g], [torch.zeros(300)], [torch.zeros(300)], [], [torch.tensor(0.0)]
        got = [p.clone()], [g], [torch.zeros(300)], [torch.zeros(300)], [], [torch.tensor(0.0)]
        adam_step(*want, backend="reference", **hp)
        adam_step(*got, backend=backend, **hp)
        torch.testing.assert_close(got[0][0], want[0][0])
        torch.testing.assert_close(got[0][0], p - 0.1 * torch.sign(g), rtol=1e-5, atol=1e-6)  # |m/sqrt(v)| = 1
