"""What only the Triton Stable-SPAM and SPAM steps do (fastopt/kernels/triton/spam.py; in Triton's interpreter, or
compiled on a GPU by make gpu-check), beyond the parity trajectories of tests/ops/opinfo.py: the official reset's
stored zeros, a tensor lr with mixed storage in one call, the clipped re-read of only the spiked block."""
import pytest
import torch

from fastopt.ops.spam import spam_step, stable_spam_step
from tests.conftest import TRITON_DEVICE, device_of, to_device
from tests.ops.opinfo import BF16, F32, SPAM, STABLE, moments

CPU = torch.device("cpu")

def test_official_reset_stores_zero_codes_and_scales():
    """Official mode: the reset step's update uses the old moments, and stores codes 0 and scales 0."""
    n = 4097
    param, (m, v), counters = to_device((torch.randn(n), moments(n, 4), [torch.zeros(()) for _ in range(5)]),
                                        TRITON_DEVICE)
    for k in (1, 2):
        stable_spam_step([param], [torch.randn(n, device=TRITON_DEVICE)], [m], [v], *[[c] for c in counters],
                         **STABLE, reset=k == 2, compat="official", backend="triton")
    assert counters[0].item() == 1.0 and counters[1].item() == 2.0
    for q in (m, v):
        assert not q.codes.any() and not q.scales.any()


@pytest.mark.parametrize("algo", ["stable", "spam"])
def test_lr_tensor_and_mixed_storage_in_one_call(algo):
    """lr as a 0-d tensor, no grad_scale / found_inf, and one call over tensors of different sizes, dtypes and
    moment storage (an empty tensor too), each with its own counters."""
    sizes, dtypes, storages = [0, 3, 5000, 300, 9000], [F32, F32, BF16, BF16, F32], [F32, F32, 4, BF16, 8]
    start = [torch.randn(n).to(d) for n, d in zip(sizes, dtypes)]
    grads = [[torch.randn(n).to(d) for n, d in zip(sizes, dtypes)] for _ in range(3)]
    results = {}
    for backend, lr in (("reference", 1e-2), ("triton", torch.tensor(1e-2, device=TRITON_DEVICE))):
        device = device_of(backend)
        params = [p.clone().to(device) for p in start]
        ms, vs = to_device(tuple(zip(*[moments(n, s) for n, s in zip(sizes, storages)])), device)
        counters = to_device([[torch.full((), float(i)) for i in range(len(sizes))]
                              for _ in range(5 if algo == "stable" else 1)], device)
        for k, gs in enumerate(to_device(grads, device)):
            hp = dict(lr=lr, reset=k == 1, backend=backend)
            if algo == "stable":
                stable_spam_step(params, gs, list(ms), list(vs), *counters, **dict(STABLE, **hp))
            else:  # clipping against v = 0 would zero the gradient: clip only on the step after the reset
                spam_step(params, gs, list(ms), list(vs), *counters, clip=k == 2, **dict(SPAM, **hp))
        results[backend] = to_device((params, counters), CPU)
    (params, counters), (params_ref, counters_ref) = results["triton"], results["reference"]
    for p, p_ref, p0, storage in zip(params, params_ref, start, storages):
        exact = p.dtype == F32 and storage == F32
        tol = dict(rtol=1e-5, atol=1e-6) if exact else dict(rtol=2**-7, atol=1e-3)
        torch.testing.assert_close(p.float(), p_ref.float(), **tol)
        assert p.numel() == 0 or not torch.equal(p, p0)
    for cs, cs_ref in zip(counters, counters_ref):
        assert [c.item() for c in cs] == pytest.approx([c.item() for c in cs_ref], rel=1e-5)


def test_adaclip_rereads_only_the_spiked_block_and_agrees():
    """Spikes in one 4096-element block of three: that block alone is re-read for the clipped norm."""
    n = 3 * 4096
    grads = [torch.randn(n) for _ in range(3)]
    grads[2][5000:5010] *= 1e3
    results = []
    for backend in ("triton", "reference"):
        param, (m, v), counters = to_device((torch.zeros(n), moments(n, F32), [torch.zeros(()) for _ in range(5)]),
                                            device_of(backend))
        for g in to_device(grads, device_of(backend)):
            stable_spam_step([param], [g], [m], [v], *[[c] for c in counters], **STABLE, backend=backend)
        results.append((param.cpu(), [c.item() for c in counters]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-7)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
