"""Stable-SPAM and SPAM against re-statements of docs/algorithms.md#stable-spam and #spam written here, independently of fastopt's
code: plain per-tensor loops in float64 over python numbers and torch ops, run on fixed gradient sequences with
spikes (x50), weight decay, an all-zero gradient, and several momentum resets. Then the corrected Stable-SPAM mode
against the official one: equal before the first reset, different exactly where the quirks are."""
import math

import pytest
import torch

from fastopt.ops.spam import spam_schedule, spam_step, stable_spam_schedule, stable_spam_step
from fastopt.optim.spam import SPAM, StableSPAM

SHAPES = [(6, 5), (17,), (1,)]
SPIKES = {2: [0], 6: [0, 1], 11: [2], 15: [0]}  # 1-based step → tensors whose gradient gets one spiked entry (x50)
ZERO = {7: [1]}                                    # 1-based step → tensors whose gradient is all zero


def gradient_sequence(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = []
    for k in range(1, steps + 1):
        grads = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in SHAPES]
        for i in SPIKES.get(k, []):
            grads[i].view(-1)[3 % grads[i].numel()] *= 50
        for i in ZERO.get(k, []):
            grads[i].zero_()
        seq.append(grads)
    return seq


def initial_params(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [0.5 * torch.randn(shape, generator=g, dtype=torch.float64) for shape in SHAPES]


# ---- re-statements of the papers' code (docs/algorithms.md), float64 ------------------------------------------------
def stable_spam_restated(grads_seq, *, lr, betas, eps, weight_decay, gamma1, gamma2, gamma3, update_proj_gap, total_T,
                         eta_min, corrected=False):
    """docs/algorithms.md#stable-spam-step, step by step; ``corrected`` applies the two fixes of fastopt's default mode (the reset acts on
    its own step; AdaClip/AdaGN use their own never-reset counter). Returns the params after every step and the
    final per-tensor states."""
    params = initial_params()
    states = [dict(t=0, u=0, m=torch.zeros_like(p), v=torch.zeros_like(p), m_norm=0.0, v_norm=0.0, m_max=0.0)
              for p in params]
    beta1, beta2 = betas
    history = []
    T = 0
    for grads in grads_seq:
        T += 1
        s = 1.0 if total_T is None else eta_min + (1 - eta_min) * (1 + math.cos(math.pi * T / (total_T + 1))) / 2
        for p, grad, st in zip(params, grads, states):
            g = grad.clone()
            p.mul_(1 - lr * weight_decay)
            st["t"] += 1
            st["u"] += 1
            u = st["u"] if corrected else st["t"]
            M = g.abs().max().item()
            st["m_max"] = gamma3 * st["m_max"] + (1 - gamma3) * M
            thr = st["m_max"] / (1 - gamma3**u)
            mask = g.abs() > thr
            g[mask] = g[mask] / M * thr
            n = g.norm().item()
            st["m_norm"] = gamma1 * s * st["m_norm"] + (1 - gamma1 * s) * n
            st["v_norm"] = gamma2 * st["v_norm"] + (1 - gamma2) * n**2
            c = (st["m_norm"] / (1 - (gamma1 * s) ** u)) / (math.sqrt(st["v_norm"] / (1 - gamma2**u)) + eps)
            if n > 0:
                g = g / n * c
            m, v = st["m"], st["v"]  # the official code holds on to these before it resets
            if update_proj_gap != 0 and T % update_proj_gap == 0:
                st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["t"] = 1
                if corrected:
                    m, v = st["m"], st["v"]
            b1 = beta1 * s
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = v.sqrt() / math.sqrt(1 - beta2 ** st["t"]) + eps
            p.add_(m / denom, alpha=-lr / (1 - b1 ** st["t"]))
        history.append([p.clone() for p in params])
    return history, states


def spam_restated(grads_seq, *, lr, betas, eps, weight_decay, warmup_steps, threshold, DeltaT, grad_accu_steps):
    """docs/algorithms.md#spam, step by step (ΔT = 0: no resets). Returns the params after every step, the update scale s
    of every step, and the final per-tensor states."""
    params = initial_params()
    states = [dict(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in params]
    beta1, beta2 = betas
    N, K = warmup_steps, grad_accu_steps
    T, c = 0, N + 1
    history, scales = [], []
    for grads in grads_seq:
        w = 0.99 * (1 + math.cos(math.pi * c / (N + 1))) / 2 if c < N else 0.0
        s = 1 - w
        scales.append(s)
        for p, grad, st in zip(params, grads, states):
            g = grad.clone()
            if DeltaT != 0 and (T + 1) % DeltaT == 0:
                st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
            st["t"] += 1
            m, v = st["m"], st["v"]
            k = T + 1
            if threshold != 0 and k >= K and (DeltaT == 0 or k % DeltaT >= K):
                mask = g**2 > threshold * v
                g[mask] = g[mask].sign() * torch.sqrt(threshold * v[mask])
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            step_size = lr * math.sqrt(1 - beta2 ** st["t"]) / (1 - beta1 ** st["t"])
            p.add_(m / (v.sqrt() + eps), alpha=-step_size * s)
            p.add_(p, alpha=-lr * weight_decay)
        T += 1
        c += 1
        if DeltaT != 0 and T != 0 and (T + 1) % DeltaT == 0:
            c = 0
        history.append([p.clone() for p in params])
    return history, scales, states


# ---- running fastopt on the same gradients ------------------------------------------------------------------------
def run(make, grads_seq, dtype, after_step=None):
    params = [torch.nn.Parameter(p.to(dtype)) for p in initial_params()]
    opt = make(params)
    history = []
    for k, grads in enumerate(grads_seq, start=1):
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        opt.step()
        history.append([p.detach().clone() for p in params])
        if after_step is not None:
            after_step(k, opt, params)
    return history, opt, params


def assert_trajectories_close(got, want, dtype, lr=1e-2):
    """Every step, every tensor: fp32 to ~1e-6 of the float64 re-statement, float64 to ~1e-12, relative to the
    tensor's norm (or to lr, one step's size, when the tensor passes near 0)."""
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    for k, (ours, theirs) in enumerate(zip(got, want), start=1):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            err = (a.double() - b).norm() / max(b.norm().item(), lr)
            assert err < tol, f"step {k}, tensor {i}: relative error {err:.2e}"


STABLE = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, gamma1=0.7, gamma2=0.9, gamma3=0.999,
              update_proj_gap=5, eta_min=0.5)
DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("total_T", [None, 8], ids=["no-total_T", "total_T=8"])
@pytest.mark.parametrize("compat", ["official", None], ids=["official", "corrected"])
def test_stable_spam_matches_restatement(compat, total_T, dtype):
    """17 steps, resets at 5, 10, 15, spikes before, at and after resets; total_T=8 also runs s past total_T."""
    grads_seq = gradient_sequence(17)
    want, want_states = stable_spam_restated(grads_seq, total_T=total_T, corrected=compat is None, **STABLE)
    got, opt, params = run(lambda ps: StableSPAM(ps, total_T=total_T, compat=compat, **STABLE), grads_seq, dtype)
    assert_trajectories_close(got, want, dtype)
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    for p, st in zip(params, want_states):
        ours = opt.state[p]
        assert ours["step"].item() == st["t"] and ours["stats_step"].item() == st["u"] == 17
        for key in ("m_norm", "v_norm", "m_max"):
            assert ours[key].item() == pytest.approx(st[key], rel=tol)
        for key, name in (("m", "exp_avg"), ("v", "exp_avg_sq")):
            assert (ours[name].double() - st[key]).norm() <= tol * st[key].norm()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("config", [
    dict(warmup_steps=3, threshold=5000, DeltaT=6, grad_accu_steps=2),  # resets at steps 6, 12, 18; spikes clipped
    dict(warmup_steps=4, threshold=2, DeltaT=7, grad_accu_steps=3),     # a low threshold: clipping most steps
    dict(warmup_steps=3, threshold=5, DeltaT=0, grad_accu_steps=2),     # no resets
    dict(warmup_steps=0, threshold=0, DeltaT=1, grad_accu_steps=0),     # a reset every step, no clipping
], ids=["default-threshold", "low-threshold", "no-reset", "reset-every-step"])
def test_spam_matches_restatement(config, dtype):
    grads_seq = gradient_sequence(20)
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1, **config)
    want, scales, want_states = spam_restated(grads_seq, **hp)
    got, opt, params = run(lambda ps: SPAM(ps, **hp), grads_seq, dtype)
    assert_trajectories_close(got, want, dtype)
    for T, s in enumerate(scales):
        assert spam_schedule(T, warmup_steps=config["warmup_steps"], delta_t=config["DeltaT"],
                             grad_accu_steps=config["grad_accu_steps"], threshold=config["threshold"])[0] == s
    for p, st in zip(params, want_states):
        assert opt.state[p]["step"].item() == st["t"] == 20


def test_spam_warmup_restarts_and_clipping_pauses_after_each_reset():
    """The schedule itself: s drops to 0.01 on each resetting step and climbs back over warmup_steps; clipping is off
    for the first K steps and for K steps from each reset."""
    rows = [spam_schedule(T, warmup_steps=3, delta_t=6, grad_accu_steps=2, threshold=5000) for T in range(14)]
    s, reset, clip = zip(*rows)
    assert [T for T in range(14) if reset[T]] == [5, 11]
    assert s[:5] == (1.0,) * 5 and s[5] == pytest.approx(0.01) and s[11] == pytest.approx(0.01)
    assert s[5] < s[6] < s[7] < s[8] == 1.0
    assert [T for T in range(14) if not clip[T]] == [0, 5, 6, 11, 12]  # k = T+1 < 2, and k % 6 < 2


def test_stable_spam_cosine_factor_is_torchs_cosine_annealing():
    """s(T) is CosineAnnealingLR(T_max=total_T+1, eta_min) of an lr of 1.0 stepped to T, past total_T too."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 8 + 1, 0.5)
    for T in range(1, 30):
        with pytest.warns(UserWarning):  # torch deprecates step(epoch); the closed form is what the authors used
            sched.step(T)
        s, _ = stable_spam_schedule(T, total_T=8, eta_min=0.5, update_proj_gap=0)
        assert s == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-12)
    assert stable_spam_schedule(7, total_T=None, eta_min=0.5, update_proj_gap=7) == (1.0, True)


# ---- the corrected mode differs from the official one exactly where the quirks are -----------------------------
def test_modes_are_identical_before_the_first_reset():
    grads_seq = gradient_sequence(6)
    official, _, _ = run(lambda ps: StableSPAM(ps, compat="official", **STABLE), grads_seq, torch.float32)
    corrected, _, _ = run(lambda ps: StableSPAM(ps, **STABLE), grads_seq, torch.float32)
    for k in range(4):  # steps 1..4; the first reset is step 5
        assert all(torch.equal(a, b) for a, b in zip(official[k], corrected[k]))
    assert not torch.equal(official[4][0], corrected[4][0])


def test_corrected_reset_takes_effect_on_its_own_step():
    """At the reset step (5) the corrected mode makes a fresh Adam step: m = (1−β1)·ĝ, v = (1−β2)·ĝ², and the
    update is lr·ĝ/(|ĝ| + eps) after decay. The official mode stores zeros after that step (its update used the
    old moments) and first uses them on step 6 with t = 2."""
    grads_seq = gradient_sequence(6)
    seen = {}

    def record(mode):
        def after(k, opt, params):
            st = opt.state[params[0]]
            seen[mode, k] = {key: v.clone() for key, v in st.items()} | {"p": params[0].detach().clone()}
        return after

    run(lambda ps: StableSPAM(ps, compat="official", **STABLE), grads_seq, torch.float64, record("official"))
    run(lambda ps: StableSPAM(ps, **STABLE), grads_seq, torch.float64, record("corrected"))
    lr, wd, (beta1, beta2), eps = STABLE["lr"], STABLE["weight_decay"], STABLE["betas"], STABLE["eps"]

    before, at = seen["corrected", 4], seen["corrected", 5]
    g_hat = at["exp_avg"] / (1 - beta1)
    torch.testing.assert_close(at["exp_avg_sq"], (1 - beta2) * g_hat**2, rtol=1e-12, atol=0)
    torch.testing.assert_close(at["p"], before["p"] * (1 - lr * wd) - lr * g_hat / (g_hat.abs() + eps),
                               rtol=1e-12, atol=1e-15)
    assert at["step"].item() == 1 and at["stats_step"].item() == 5

    official = seen["official", 5]
    assert not official["exp_avg"].any() and not official["exp_avg_sq"].any() and official["step"].item() == 1
    assert not torch.allclose(official["p"], at["p"])  # its update used the old moments
    # the statistics (AdaClip, AdaGN) are the same at the reset step: both modes count 5 there
    for key in ("m_norm", "v_norm", "m_max"):
        assert torch.equal(official[key], at[key])
    assert seen["official", 6]["step"].item() == 2 and seen["corrected", 6]["step"].item() == 2


def test_adaclip_threshold_not_inflated_after_reset_in_corrected_mode():
    """A x50 spike two steps after a reset at step 40: the official mode bias-corrects AdaClip's running max with
    t = 2 (threshold ≈ 1/(1−θ²) ≈ 500x the running max) and lets it through; the corrected mode clips it, as both
    modes do before the reset. Seen through the first moment: ĝ = (m_after − β1·m_before)/(1 − β1), whose entries
    keep the ratios of the clipped gradient (AdaGN scales them all alike)."""
    gen = torch.Generator().manual_seed(5)
    grads_seq = [[torch.randn(64, generator=gen, dtype=torch.float64)] for _ in range(42)]
    for k in (38, 42):
        grads_seq[k - 1][0][0] = 50.0
    hp = dict(STABLE, update_proj_gap=40, weight_decay=0.0)
    beta1 = hp["betas"][0]

    def spike_ratios(compat):
        params = [torch.nn.Parameter(torch.zeros(64, dtype=torch.float64))]
        opt = StableSPAM(params, compat=compat, **hp)
        ratios = {}
        for k, (g,) in enumerate(grads_seq, start=1):
            m_before = opt.state[params[0]]["exp_avg"].clone() if opt.state else torch.zeros(64, dtype=torch.float64)
            params[0].grad = g.clone()
            opt.step()
            if k in (38, 42):
                g_hat = (opt.state[params[0]]["exp_avg"] - beta1 * m_before) / (1 - beta1)
                ratios[k] = (g_hat[0] / g_hat[1]).item() / (g[0] / g[1]).item()  # 1.0: not clipped
        return ratios

    official, corrected = spike_ratios("official"), spike_ratios(None)
    assert official[38] < 0.2 and corrected[38] < 0.2       # before the reset both clip the spike
    assert official[42] == pytest.approx(1.0, rel=1e-9)     # official: AdaClip dormant after the reset
    assert corrected[42] < 0.2                              # corrected: still clipped


# ---- the op surface --------------------------------------------------------------------------------------------
def stable_state(n):
    return ([torch.randn(n)], [torch.randn(n)], [torch.randn(n) * 0.1], [torch.rand(n) * 0.01], [torch.tensor(3.0)],
            [torch.tensor(3.0)], [torch.tensor(1.0)], [torch.tensor(2.0)], [torch.tensor(0.01)])


STABLE_OP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, gamma1=0.7, gamma2=0.9, gamma3=0.999)
SPAM_OP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1, threshold=5.0)


def test_found_inf_skips_everything_and_grad_scale_unscales():
    state = stable_state(100)
    before = [[t.clone() for t in ts] for ts in state]
    stable_spam_step(*state, **STABLE_OP, reset=True, found_inf=torch.tensor(1.0), grad_scale=torch.tensor(8.0))
    assert all(torch.equal(a, b) for ts, bs in zip(state, before) for a, b in zip(ts, bs))
    spam_state = state[:5]
    spam_step(*spam_state, **SPAM_OP, reset=True, found_inf=torch.tensor(1.0))
    assert all(torch.equal(a, b) for ts, bs in zip(spam_state, before) for a, b in zip(ts, bs))

    for op, hp, n_lists in ((stable_spam_step, STABLE_OP, 9), (spam_step, SPAM_OP, 5)):
        plain = [[t.clone() for t in ts] for ts in before[:n_lists]]
        scaled = [[t.clone() for t in ts] for ts in before[:n_lists]]
        scaled[1][0] *= 1024
        op(*plain, **hp)
        op(*scaled, **hp, grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
        assert all(torch.equal(a, b) for ts, bs in zip(plain, scaled) for a, b in zip(ts, bs) if a is not ts[0])
        assert torch.equal(plain[0][0], scaled[0][0])


def test_unknown_compat_raises():
    with pytest.raises(ValueError, match=r"compat must be one of \(None, 'official'\), got 'paper'"):
        stable_spam_step(*stable_state(10), **STABLE_OP, compat="paper")


def test_grads_are_read_never_written():
    """The official code writes the clipped gradient into p.grad; fastopt leaves the user's gradients alone."""
    state = stable_state(100)
    state[1][0][5] = 1e4  # a spike that AdaClip clips
    grad = state[1][0].clone()
    stable_spam_step(*state, **STABLE_OP)
    spam_step(*state[:5], **SPAM_OP)
    assert torch.equal(state[1][0], grad)
