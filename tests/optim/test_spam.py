"""fastopt.StableSPAM and fastopt.SPAM as optimizers: checkpoints across a momentum reset, 4-bit moments (a reset
zeros codes and scales), training quality with 4-bit states, backends, schedules. The tests every optimizer
shares (validation, mixed dtypes, state_dict) run over tests/optim/cases.py in test_common.py."""
import math

import pytest
import torch

from fastopt.ops.spam import spam_step, stable_spam_schedule, stable_spam_step
from fastopt.optim.spam import SPAM, StableSPAM
from fastopt.quant import FORMATS, Quantized, encode, zeros
from fastopt.schedules import Cosine
from tests.optim.test_common import batches, flat, model, resume, train
from tests.optim.test_low_bit import regression_task

CONFIGS = {  # every one resets its moments at least once in 12 steps
    "StableSPAM": lambda ps, **kw: StableSPAM(ps, lr=1e-2, weight_decay=0.1, update_proj_gap=5, **kw),
    "StableSPAM-official-total_T": lambda ps, **kw: StableSPAM(ps, lr=1e-2, weight_decay=0.1, update_proj_gap=5,
                                                               total_T=8, compat="official", **kw),
    "SPAM": lambda ps, **kw: SPAM(ps, lr=1e-2, weight_decay=0.1, DeltaT=6, warmup_steps=3, grad_accu_steps=2,
                                  threshold=50, **kw),
}
STORAGE = {"fp32": {}, "4bit": dict(state_bits=4, min_quant_size=0)}


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("name", CONFIGS)
def test_resume_across_a_reset_is_bit_for_bit(name, storage):
    """Saved at step 4 (before the reset), loaded with weights_only=True into a fresh optimizer, continued through
    two resets: identical to the uninterrupted run, state included."""
    make = lambda ps: CONFIGS[name](ps, **STORAGE[storage])  # noqa: E731
    data = batches(12)
    straight_net = model()
    straight = make(straight_net.parameters())
    train(straight_net, straight, data)

    net = model()
    opt = make(net.parameters())
    train(net, opt, data[:4])
    resumed_net, resumed = resume(net, opt, make)
    assert resumed._step_count == 4
    train(resumed_net, resumed, data[4:])
    assert torch.equal(flat(resumed_net), flat(straight_net))
    for p, q in zip(straight_net.parameters(), resumed_net.parameters()):
        a, b = straight.state[p], resumed.state[q]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_state_layout():
    p = torch.nn.Parameter(torch.randn(300))
    for opt, keys in ((StableSPAM([p], state_bits=4, min_quant_size=0),
                       {"step", "stats_step", "m_norm", "v_norm", "m_max", "exp_avg_codes", "exp_avg_scales",
                        "exp_avg_sq_codes", "exp_avg_sq_scales", "param_shape"}),
                      (SPAM([p]), {"step", "exp_avg", "exp_avg_sq"})):
        p.grad = torch.randn(300)
        opt.step()
        assert set(opt.state[p]) == keys
        for key in ("step", "stats_step", "m_norm", "v_norm", "m_max"):
            if key in keys:
                t = opt.state[p][key]
                assert t.shape == () and t.dtype == torch.float32 and t.device == p.device
    q = torch.nn.Parameter(torch.randn(30, dtype=torch.float64))  # float64 params: float64 statistics, float64 math
    opt = StableSPAM([q])
    q.grad = torch.randn_like(q)
    opt.step()
    assert opt.state[q]["m_norm"].dtype == torch.float64 and opt.state[q]["step"].dtype == torch.float32


def test_4bit_official_reset_zeros_codes_and_scales():
    """compat="official" stores fresh zeros after the reset step: every code and every scale is 0."""
    p = torch.nn.Parameter(torch.randn(1000))
    opt = StableSPAM([p], update_proj_gap=3, compat="official", state_bits=4, min_quant_size=0)
    for k in range(1, 4):
        p.grad = torch.randn(1000)
        opt.step()
        state = opt.state[p]
        moments = [state[f"{name}_{part}"] for name in ("exp_avg", "exp_avg_sq") for part in ("codes", "scales")]
        if k < 3:
            assert all(t.any() for t in moments)
        else:
            assert all(not t.any() for t in moments) and state["step"].item() == 1


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_reset_is_a_fresh_state(bits):
    """A reset of quantized moments holding old values gives exactly what fresh zeros give (the unsigned map has no
    0, so leaving the scales would keep v alive): Stable-SPAM (corrected) and SPAM."""
    n = 1000
    torch.manual_seed(0)
    p0, g = torch.randn(n), torch.randn(n)
    m_fmt, v_fmt = FORMATS[(bits, True)], FORMATS[(bits, False)]
    old_m = lambda: Quantized(*encode(torch.randn(n, generator=torch.Generator().manual_seed(1)), m_fmt), m_fmt)  # noqa
    old_v = lambda: Quantized(*encode(torch.rand(n, generator=torch.Generator().manual_seed(2)), v_fmt), v_fmt)  # noqa
    stable = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, gamma1=0.7, gamma2=0.9, gamma3=0.999)
    stats = lambda: [[torch.tensor(7.0)], [torch.tensor(2.0)], [torch.tensor(3.0)], [torch.tensor(1.5)]]  # noqa
    reset = [p0.clone()], [g], [old_m()], [old_v()], [torch.tensor(7.0)], *stats()
    fresh = [p0.clone()], [g], [zeros(n, m_fmt, "cpu")], [zeros(n, v_fmt, "cpu")], [torch.tensor(0.0)], *stats()
    stable_spam_step(*reset, **stable, reset=True)
    stable_spam_step(*fresh, **stable, reset=False)
    assert torch.equal(reset[0][0], fresh[0][0])
    for a, b in ((reset[2][0], fresh[2][0]), (reset[3][0], fresh[3][0])):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)

    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1, threshold=5.0, scale=0.01)
    reset = [p0.clone()], [g], [old_m()], [old_v()], [torch.tensor(7.0)]
    fresh = [p0.clone()], [g], [zeros(n, m_fmt, "cpu")], [zeros(n, v_fmt, "cpu")], [torch.tensor(7.0)]
    spam_step(*reset, **hp, reset=True, clip=False)
    spam_step(*fresh, **hp, reset=False, clip=False)
    assert torch.equal(reset[0][0], fresh[0][0]) and torch.equal(reset[3][0].scales, fresh[3][0].scales)


TRAINING = {
    "StableSPAM": lambda ps, **kw: StableSPAM(ps, lr=3e-3, update_proj_gap=60, **kw),
    "StableSPAM-official": lambda ps, **kw: StableSPAM(ps, lr=3e-3, update_proj_gap=60, compat="official", **kw),
    "SPAM": lambda ps, **kw: SPAM(ps, lr=3e-3, DeltaT=60, warmup_steps=10, grad_accu_steps=5, **kw),
}


@pytest.mark.parametrize("name", TRAINING)
def test_4bit_training_tracks_fp32(name):
    """150 steps of a small MLP with resets at 60 and 120: 4-bit moments (every tensor, min_quant_size=0) end within
    a few percent of fp32 moments, with no NaN."""
    def final_loss(**storage):
        net, xs, ys = regression_task()
        opt = TRAINING[name](net.parameters(), **storage)
        losses = []
        for x, y in zip(xs[:150], ys[:150]):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] / 2
        return sum(losses[-20:]) / 20, opt

    fp32, _ = final_loss()
    four, opt = final_loss(state_bits=4, min_quant_size=0)
    assert opt.state[opt.param_groups[0]["params"][1]]["exp_avg_codes"].dtype == torch.uint8  # the bias too
    assert abs(four - fp32) / fp32 < 0.05, (four, fp32)


def test_schedule_leaving_its_range_raises_before_any_update():
    p = torch.nn.Parameter(torch.randn(3))
    opt = StableSPAM([p], gamma1=lambda k: 0.7 + 0.3 * k)
    p.grad = torch.randn(3)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(ValueError, match=r"gamma1 must be \[0.0, 1.0\), got 1.0"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in opt.state[p].items())


BACKENDS = ["cpu", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("name", CONFIGS)
def test_fused_backends_train_like_the_reference(name, storage, backend):
    """Each fused backend against the reference through the optimizer: 12 steps of a small model (spikes from the
    data, resets), fp32 params to ~1e-5, 4-bit moments to the format's resolution."""
    def trained(backend):
        torch.manual_seed(0)
        net = model()
        start = flat(net)
        train(net, CONFIGS[name](net.parameters(), backend=backend, **STORAGE[storage]), batches(12))
        return flat(net), (flat(net) - start).norm()

    (ours, moved), (ref, _) = trained(backend), trained("reference")
    tol = 1e-5 if storage == "fp32" else 1e-2
    assert (ours - ref).norm() <= tol * moved, f"distance {(ours - ref).norm():.2e}, the params moved {moved:.2e}"


@pytest.mark.parametrize("cls", [StableSPAM, SPAM])
def test_backend_choice(cls):
    p = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    with pytest.raises(ValueError, match=r"backend must be None or one of"):
        cls(p, backend="gpu")
    opt = cls(p)
    assert [opt._backend_for(q) for q in p] == ["cpu", "reference"]  # float64: exact math on the reference path
    with pytest.raises(ValueError, match=r"backend='cpu' takes float32, bfloat16 and float16 params, params\[1\] is "
                                         r"torch.float64"):
        cls(p, backend="cpu")


def run_with_values(make, values, steps=16):
    """Sets the group's values by hand before each step (what a schedule must amount to)."""
    net = model()
    opt = make(net.parameters())
    for k, (x, y) in enumerate(batches(steps)):
        opt.param_groups[0].update(values(k))
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return flat(net)


@pytest.mark.parametrize("cls,extra", [
    (StableSPAM, dict(update_proj_gap=5, total_T=10)),
    (SPAM, dict(DeltaT=6, warmup_steps=3, grad_accu_steps=2)),
])
def test_schedules_on_lr_and_betas(cls, extra):
    lr, beta1 = Cosine(peak=1e-2, total=16), Cosine(peak=0.9, total=16, final=0.8)
    net = model()
    train(net, cls(net.parameters(), lr=lr, betas=(beta1, 0.999), **extra), batches(16))
    by_hand = run_with_values(lambda ps: cls(ps, **extra), lambda k: {"lr": lr(k), "betas": (beta1(k), 0.999)})
    assert torch.equal(flat(net), by_hand)


def test_stable_spam_schedules_on_gamma1_and_the_reset_interval():
    gamma1, gap = Cosine(peak=0.7, total=16, final=0.5), (lambda k: 4 if k < 8 else 6)
    net = model()
    train(net, StableSPAM(net.parameters(), lr=1e-2, gamma1=gamma1, update_proj_gap=gap), batches(16))
    by_hand = run_with_values(lambda ps: StableSPAM(ps, lr=1e-2),
                              lambda k: {"gamma1": gamma1(k), "update_proj_gap": gap(k)})
    assert torch.equal(flat(net), by_hand)


def test_total_T_is_a_cosine_factor_on_beta1_and_gamma1():
    """total_T=10 is the same as schedules β1·s(T), γ1·s(T) with T = k+1 at the k-th step(); the lr is untouched."""
    s = lambda k: stable_spam_schedule(k + 1, total_T=10, eta_min=0.5, update_proj_gap=0)[0]  # noqa: E731
    a, b = model(), model()
    train(a, StableSPAM(a.parameters(), lr=1e-2, update_proj_gap=5, total_T=10), batches(16))
    train(b, StableSPAM(b.parameters(), lr=1e-2, update_proj_gap=5, betas=(lambda k: 0.9 * s(k), 0.999),
                        gamma1=lambda k: 0.7 * s(k)), batches(16))
    assert torch.equal(flat(a), flat(b))


@pytest.mark.parametrize("cls,after", [(SPAM, True), (StableSPAM, False)])
def test_galore_weight_decay_where_each_optimizer_applies_it(cls, after):
    """On a GaLore param the decay sits where the optimizer's own step puts it: SPAM after the update
    (p ← (p + Δ)(1 − lr·wd)), Stable-SPAM before it (p ← p(1 − lr·wd) + Δ), Δ being the update without decay."""
    lr, wd = 0.1, 0.5
    torch.manual_seed(0)
    start, grad = torch.randn(8, 6), torch.randn(8, 6)

    def one_step(weight_decay):
        p = torch.nn.Parameter(start.clone())
        opt = cls([{"params": [p], "rank": 3}], lr=lr, weight_decay=weight_decay)
        p.grad = grad.clone()
        opt.step()
        return p.detach()

    plain, decayed = one_step(0.0), one_step(wd)
    delta = plain - start
    assert delta.abs().max() > 1e-3  # the step moved the param
    want = (start + delta) * (1 - lr * wd) if after else start * (1 - lr * wd) + delta
    torch.testing.assert_close(decayed, want, rtol=1e-5, atol=1e-6)
