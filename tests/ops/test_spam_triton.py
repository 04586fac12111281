"""The Triton Stable-SPAM and SPAM steps (fastopt/kernels/triton/spam.py, in Triton's interpreter) against the
reference: trajectories over two (SPAM) or three (Stable-SPAM) momentum resets on sizes that break blocking (the
1024-element update tiles, the 4096-element reduction blocks, the 128/256-element quantization blocks), fp32 and bf16
params, moments in fp32, bf16, 8-bit and 4-bit, both Stable-SPAM modes, a cosine factor s < 1, weight decay,
GradScaler's grad_scale, gradients with spikes (x50) and an all-zero gradient, and a found_inf step in the middle that
must change nothing."""
import pytest
import torch

from fastopt.ops.spam import spam_step, stable_spam_step
from tests.ops.spam_trajectories import SPAM, STABLE, check_close, moments, trajectory

# the skipped step computes with an inf gradient (and stores nothing): numpy, running the interpreter, warns
skipped_step_warns = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")


F32, BF16 = torch.float32, torch.bfloat16
CASES = ([(n, F32, F32) for n in (1, 127, 128, 129, 4095, 4097)]
         + [(4097, F32, BF16), (4097, BF16, BF16), (4097, BF16, F32), (4097, F32, 8), (4097, BF16, 8), (129, F32, 4),
            (4097, F32, 4), (4097, BF16, 4)])
LARGE = (100_003, F32, F32)  # the interpreter runs ~60 programs a second: one large case per algorithm
STABLE_CASES = [(*case, compat) for case in CASES for compat in ("official", None)] + [(*LARGE, None)]


def name(n, dtype, storage, *compat):
    mode = [c or "corrected" for c in compat]
    return "-".join([str(n), str(dtype)[6:], f"{storage}bit" if isinstance(storage, int) else str(storage)[6:], *mode])


@skipped_step_warns
@pytest.mark.parametrize("n,dtype,storage,compat", STABLE_CASES, ids=[name(*c) for c in STABLE_CASES])
def test_stable_spam_triton_matches_reference(n, dtype, storage, compat):
    ours = trajectory("stable", "triton", n, dtype, storage, compat)
    check_close(ours, trajectory("stable", "reference", n, dtype, storage, compat), dtype, storage)


@skipped_step_warns
@pytest.mark.parametrize("n,dtype,storage", CASES + [LARGE], ids=[name(*c) for c in CASES + [LARGE]])
def test_spam_triton_matches_reference(n, dtype, storage):
    ours = trajectory("spam", "triton", n, dtype, storage)
    check_close(ours, trajectory("spam", "reference", n, dtype, storage), dtype, storage)


def test_official_reset_stores_zero_codes_and_scales():
    """Official mode: the reset step's update uses the old moments, and stores codes 0 and scales 0."""
    n = 4097
    param = torch.randn(n)
    m, v = moments(n, 4)
    counters = [torch.zeros(()) for _ in range(5)]
    for k in (1, 2):
        stable_spam_step([param], [torch.randn(n)], [m], [v], *[[c] for c in counters], **STABLE, reset=k == 2,
                         compat="official", backend="triton")
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
    for backend, lr in (("reference", 1e-2), ("triton", torch.tensor(1e-2))):
        params = [p.clone() for p in start]
        ms, vs = zip(*[moments(n, s) for n, s in zip(sizes, storages)])
        counters = [[torch.full((), float(i)) for i in range(len(sizes))] for _ in range(5 if algo == "stable" else 1)]
        for k, gs in enumerate(grads):
            hp = dict(lr=lr, reset=k == 1, backend=backend)
            if algo == "stable":
                stable_spam_step(params, gs, list(ms), list(vs), *counters, **dict(STABLE, **hp))
            else:  # clipping against v = 0 would zero the gradient: clip only on the step after the reset
                spam_step(params, gs, list(ms), list(vs), *counters, clip=k == 2, **dict(SPAM, **hp))
        results[backend] = params, counters
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
        param, (m, v) = torch.zeros(n), moments(n, F32)
        counters = [torch.zeros(()) for _ in range(5)]
        for g in grads:
            stable_spam_step([param], [g], [m], [v], *[[c] for c in counters], **STABLE, backend=backend)
        results.append((param, [c.item() for c in counters]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-7)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
