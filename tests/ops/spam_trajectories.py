"""What the fused Stable-SPAM / SPAM tests share (tests/ops/test_spam_cpu.py, test_spam_triton.py): a trajectory of
STEPS steps over three (Stable-SPAM) or two (SPAM) momentum resets, with a cosine factor s < 1, weight decay,
GradScaler's grad_scale, gradients with spikes (x50) and an all-zero gradient, and a found_inf step in the middle that
must change nothing; and how a fused backend's result is compared with the reference's."""
import pytest
import torch

from fastopt.ops.spam import spam_schedule, spam_step, stable_spam_schedule, stable_spam_step
from fastopt.quant import formats as quant

STEPS = 10
SPIKE_STEPS = {2, 7, 9}
ZERO_STEP = 4
SKIPPED_STEP = 5  # found_inf = 1 (and an inf in the gradient): nothing may change
GRAD_SCALE = 64.0
STABLE = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, gamma1=0.7, gamma2=0.9, gamma3=0.999)
SPAM = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1, threshold=5.0)
def moments(n, storage):
    if storage in (4, 8):
        return tuple(quant.zeros(n, quant.FORMATS[(storage, signed)], "cpu") for signed in (True, False))
    return torch.zeros(n, dtype=storage), torch.zeros(n, dtype=storage)


def snapshot(param, m, v, counters):
    parts = [param, *counters] + [t for x in (m, v) for t in (x[:2] if isinstance(x, quant.Quantized) else [x])]
    return [t.clone() for t in parts]


def gradient(k, n, dtype):
    g = torch.Generator().manual_seed(1000 + k)
    grad = torch.randn(n, generator=g)
    if k in SPIKE_STEPS:
        grad[torch.randint(n, (max(1, n // 2000),), generator=g)] *= 50
    if k == ZERO_STEP:
        grad.zero_()
    if k == SKIPPED_STEP:
        grad[0] = float("inf")
    return (grad * GRAD_SCALE).to(dtype)


def trajectory(algo, backend, n, dtype, storage, compat=None):
    """STEPS steps of one algorithm; returns the final param, decoded moments, counters, and the moments as stored."""
    param = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(dtype)
    m, v = moments(n, storage)
    counters = [torch.zeros(()) for _ in range(5 if algo == "stable" else 1)]
    for k in range(1, STEPS + 1):
        grad, found_inf = gradient(k, n, dtype), torch.tensor(float(k == SKIPPED_STEP))
        before = snapshot(param, m, v, counters)
        common = dict(grad_scale=torch.tensor(GRAD_SCALE), found_inf=found_inf, backend=backend)
        if algo == "stable":
            s, reset = stable_spam_schedule(k, total_T=8, eta_min=0.5, update_proj_gap=3)
            stable_spam_step([param], [grad], [m], [v], *[[c] for c in counters], **STABLE, scale=s,
                             reset=reset or k == SKIPPED_STEP, compat=compat, **common)
        else:
            s, reset, clip = spam_schedule(k - 1, warmup_steps=3, delta_t=4, grad_accu_steps=2, threshold=5.0)
            spam_step([param], [grad], [m], [v], counters, **SPAM, scale=s, reset=reset or k == SKIPPED_STEP,
                      clip=clip, **common)
        if k == SKIPPED_STEP:
            assert all(torch.equal(a, b) for a, b in zip(before, snapshot(param, m, v, counters)))
    values = [x.dequantize(n) if isinstance(x, quant.Quantized) else x.float() for x in (m, v)]
    return param.float(), *values, [c.item() for c in counters], (m, v)


def resolution(moment, values):
    """The largest gap between neighbouring codes of a quantized moment, at its largest scale."""
    return torch.tensor(moment.fmt.qmap).diff().max().item() * values.abs().max().item()


def check_close(ours, ref, dtype, storage):
    p, m, v, counters, stored = ours
    p_ref, m_ref, v_ref, counters_ref, stored_ref = ref
    start = torch.randn(p.numel(), generator=torch.Generator().manual_seed(7)).to(dtype).float()
    assert (p - start).abs().max() > 1e-3  # the params did move
    assert counters[:2] == counters_ref[:2]  # t (and u) exactly; the statistics to rounding
    assert counters[2:] == pytest.approx(counters_ref[2:], rel=1e-5)
    if storage in (4, 8):
        for x, x_ref, q, q_ref in ((m, m_ref, stored[0], stored_ref[0]), (v, v_ref, stored[1], stored_ref[1])):
            # a code flips where the two fp32 results straddle a rounding boundary (bf16 gradients put many values
            # exactly on one), and a flipped block maximum moves its block's scale: values stay one code step apart
            assert (q.codes != q_ref.codes).float().mean() < 5e-2
            torch.testing.assert_close(x, x_ref, rtol=0, atol=resolution(q, x_ref))
        # a flipped code moves that element's next updates by a fraction of lr: few elements, each by < lr
        far = (p - p_ref).abs() > 1e-5 + (2**-8 if dtype == torch.bfloat16 else 1e-5) * p_ref.abs()
        assert far.float().mean() < 1e-2
        torch.testing.assert_close(p, p_ref, rtol=2**-7, atol=STABLE["lr"])
    elif dtype == torch.float32 and storage == torch.float32:
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
        for x, x_ref in ((m, m_ref), (v, v_ref)):
            torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-6 * x_ref.abs().max().item())
    else:  # bf16 storage rounds alike in both; a rounding flip is one bf16 ulp, 2^-8 relative
        torch.testing.assert_close(p, p_ref, rtol=2**-7, atol=1e-4)
        for x, x_ref in ((m, m_ref), (v, v_ref)):
            torch.testing.assert_close(x, x_ref, rtol=2**-7, atol=2**-7 * x_ref.abs().max().item())
