"""GaLore as a capability of every fastopt optimizer: the default (torch AdamW) arithmetic against an independent
float64 re-statement, weight decay rules, the moments policies at a refresh, refresh timing (stagger, non-finite
gradients), low-bit and Stable-SPAM training, state layout and checkpoint conversions."""
import io
import math

import pytest
import torch

import fastopt
from fastopt.galore import projector as proj


def restated_galore_adamw(param, grads, *, rank, gap, scale, lr, betas, eps, wd):
    """GaLore + torch AdamW semantics in float64, written out: refresh at k % gap == 0 (svd in float32 as galore-torch),
    R = G·Pᵀ (tall), Adam on R with torch's eps placement, p ← p·(1 − lr·wd) + scale·(−lr_t·N)·P."""
    p = param.detach().clone()
    m = v = P = None
    for k, g in enumerate(grads):
        if k % gap == 0:
            P = torch.linalg.svd(g.float(), full_matrices=False)[2][:rank].to(g.dtype)
        r = g @ P.T
        m = torch.zeros_like(r) if m is None else m
        v = torch.zeros_like(r) if v is None else v
        t = k + 1
        m = betas[0] * m + (1 - betas[0]) * r
        v = betas[1] * v + (1 - betas[1]) * r * r
        n = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        p = p * (1 - lr * wd) - lr * scale * n @ P
    return p


def test_default_arithmetic_equals_a_restatement():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(20, 8, dtype=torch.float64))
    grads = [torch.randn(20, 8, dtype=torch.float64) * 0.1 for _ in range(9)]
    options = dict(rank=3, gap=4, scale=0.25, lr=1e-2, betas=(0.9, 0.99), eps=1e-3, wd=0.1)
    expected = restated_galore_adamw(param, grads, **options)
    opt = fastopt.GaLoreAdamW([{"params": [param], "rank": 3, "update_proj_gap": 4}], lr=1e-2, betas=(0.9, 0.99),
                              eps=1e-3, weight_decay=0.1)
    for g in grads:
        param.grad = g
        opt.step()
    torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-14)


def one_step(make, lr=1e-2, **group):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(12, 6, dtype=torch.float64))
    opt = make([{"params": [param], "rank": 2, **group}], lr=lr)
    param.grad = torch.randn(12, 6, dtype=torch.float64)
    before = param.detach().clone()
    opt.step()
    return before, param.detach(), opt.state[param]


@pytest.mark.parametrize("compat,order", [(None, "before"), ("official", "after")])
def test_weight_decay_order(compat, order):
    """AdamW's order (decay, then update) by default; galore-torch's (update, then p ← p − lr·wd·p) when official."""
    before, after, _ = one_step(lambda g, lr: fastopt.GaLoreAdamW(g, lr=lr, weight_decay=0.5, compat=compat))
    _, undecayed, _ = one_step(lambda g, lr: fastopt.GaLoreAdamW(g, lr=lr, compat=compat))
    update = undecayed - before
    expected = before * (1 - 5e-3) + update if order == "before" else (before + update) * (1 - 5e-3)
    torch.testing.assert_close(after, expected, rtol=1e-13, atol=1e-15)


def test_tensor_lr_matches_a_float_lr():
    """A 0-d tensor lr is never read on the host: the decay is then a separate multiply instead of addmm's beta."""
    _, a, _ = one_step(lambda g, lr: fastopt.GaLoreAdamW(g, lr=lr, weight_decay=0.5), lr=torch.tensor(1e-2))
    _, b, _ = one_step(lambda g, lr: fastopt.GaLoreAdamW(g, lr=lr, weight_decay=0.5), lr=torch.tensor(1e-2).item())
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)  # a float32 lr tensor rounds the step size to float32


def test_adam_coupled_decay_enters_the_gradient_before_the_projection():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(12, 6, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    coupled = fastopt.Adam([{"params": [a], "rank": 2, "update_proj_gap": 2}], lr=1e-2, weight_decay=0.3)
    plain = fastopt.Adam([{"params": [b], "rank": 2, "update_proj_gap": 2}], lr=1e-2)
    for _ in range(5):
        g = torch.randn(12, 6, dtype=torch.float64)
        a.grad, b.grad = g, g + 0.3 * b.detach()
        coupled.step()
        plain.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-13, atol=1e-15)


def refresh_step_moments(moments, refresh="svd"):
    """(state before the 3rd step, state after it, that step's gradient): the 3rd step refreshes (update_proj_gap 2)."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(16, 10, dtype=torch.float64))
    opt = fastopt.GaLoreAdamW([{"params": [param], "rank": 3, "update_proj_gap": 2, "moments": moments,
                                "refresh": refresh}], lr=1e-2, betas=(0.5, 0.75))
    grads = [torch.randn(16, 10, dtype=torch.float64) for _ in range(3)]
    for g in grads[:2]:
        param.grad = g
        opt.step()
    before = {k: v.clone() for k, v in opt.state[param].items()}
    param.grad = grads[2]
    opt.step()
    return before, opt.state[param], grads[2]


@pytest.mark.parametrize("refresh", ["svd", "random"])
@pytest.mark.parametrize("moments", ["keep", "reset", "reproject"])
def test_moments_when_the_subspace_changes(moments, refresh):
    """Recover the moments the refresh step started from (m_after = β1·m + (1−β1)·R): kept, zero, or reprojected."""
    before, after, grad = refresh_step_moments(moments, refresh)
    if refresh == "svd":
        old, new = (None, before["proj_right"]), (None, after["proj_right"])
    else:
        keep = proj.sides((16, 10), "std")
        old, new = (proj.random_projectors((16, 10), 3, keep, int(s), torch.device("cpu"), torch.float64)
                    for s in (before["proj_seed"], after["proj_seed"]))
    assert not torch.allclose(old[1], new[1])
    r = proj.project(grad, *new)
    m = (after["exp_avg"] - 0.5 * r) / 0.5
    v = (after["exp_avg_sq"] - 0.25 * r * r) / 0.75
    if moments == "keep":
        expected_m, expected_v, step = before["exp_avg"], before["exp_avg_sq"], 3
    elif moments == "reset":
        expected_m, expected_v, step = torch.zeros_like(m), torch.zeros_like(v), 1
    else:
        basis = proj.change_of_basis(old, new)
        expected_m = proj.reproject(before["exp_avg"], basis, squared=False)
        expected_v = proj.reproject(before["exp_avg_sq"], basis, squared=True)
        step = 3
    torch.testing.assert_close(m, expected_m, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v, expected_v, rtol=1e-10, atol=1e-12)
    assert after["step"].item() == step
    assert after["proj_step"].item() == 3


def test_random_refresh_keeps_only_a_seed():
    _, _, state = one_step(lambda g, lr: fastopt.GaLoreAdamW(g, lr=lr), refresh="random")
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "param_shape", "proj_step", "proj_seed"}
    assert state["proj_seed"].dtype == torch.int64 and state["proj_seed"].device.type == "cpu"


def refresh_steps(param, opt, steps):
    """The steps at which each projector changed."""
    seen = {p: [] for p in param}
    last = {}
    for k in range(steps):
        for p in param:
            p.grad = torch.randn_like(p)
        opt.step()
        for p in param:
            current = opt.state[p]["proj_right"].clone()
            if p not in last or not torch.equal(current, last[p]):
                seen[p].append(k)
            last[p] = current
    return [seen[p] for p in param]


def test_stagger_spreads_refreshes_over_the_gap():
    params = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(6)]
    plain = refresh_steps(params, fastopt.GaLoreAdamW(params, rank=2, update_proj_gap=5), 11)
    assert all(steps == [0, 5, 10] for steps in plain)
    params = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(6)]
    staggered = refresh_steps(params, fastopt.GaLoreAdamW(params, rank=2, update_proj_gap=5, stagger=True), 11)
    assert all(steps[0] == 0 and len(steps) >= 2 and all(b - a == 5 for a, b in zip(steps[1:], steps[2:]))
               for steps in staggered)
    assert len({steps[1] for steps in staggered}) >= 4  # six layers, at least four different refresh steps


def test_non_finite_gradient_skips_the_refresh_and_retries():
    param = torch.nn.Parameter(torch.randn(8, 4))
    opt = fastopt.GaLoreAdamW([param], rank=2, update_proj_gap=2, lr=0.0)
    param.grad = torch.randn(8, 4)
    opt.step()
    param.grad = torch.randn(8, 4)
    opt.step()
    projector = opt.state[param]["proj_right"].clone()
    param.grad = torch.full((8, 4), float("nan"))
    opt.step()  # a refresh is due: skipped, the projector kept, the GaLore step count held back
    assert torch.equal(opt.state[param]["proj_right"], projector)
    assert opt.state[param]["proj_step"].item() == 2
    param.grad = torch.randn(8, 4)
    opt.step()  # retried
    assert not torch.equal(opt.state[param]["proj_right"], projector)
    assert opt.state[param]["proj_step"].item() == 3


def regression(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64), torch.nn.Tanh(),
                              torch.nn.Linear(64, 8))
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 8))
    return net, teacher


def train_regression(make, steps=150):
    net, teacher = regression()
    weights = [m.weight for m in net if isinstance(m, torch.nn.Linear)][:2]
    ids = {id(w) for w in weights}
    groups = [{"params": weights, "rank": 16, "update_proj_gap": 50, "scale": 1.0},
              {"params": [p for p in net.parameters() if id(p) not in ids]}]
    opt = make(groups)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 64, generator=g)
        with torch.no_grad():
            y = teacher(x)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt, weights


def test_low_bit_and_stable_spam_galore_train_close_to_fp32():
    """GaLore with 4-bit low-rank moments, and GaLore + Stable-SPAM + 4-bit (fastopt.StableSPAM(galore_groups,
    state_bits=4)): no NaN, and the loss ends close to fp32 GaLore AdamW's."""
    fp32, _, _ = train_regression(lambda g: fastopt.GaLoreAdamW(g, lr=3e-3))
    four_bit, opt, weights = train_regression(lambda g: fastopt.GaLoreAdamW(g, lr=3e-3, state_bits=4,
                                                                             min_quant_size=0))
    spam, spam_opt, spam_weights = train_regression(lambda g: fastopt.StableSPAM(g, lr=3e-3, state_bits=4,
                                                                                 min_quant_size=0))
    start = sum(fp32[:10]) / 10
    end = {name: sum(run[-10:]) / 10 for name, run in (("fp32", fp32), ("4bit", four_bit), ("spam", spam))}
    assert all(math.isfinite(x) for run in (fp32, four_bit, spam) for x in run)
    assert end["fp32"] < 0.5 * start
    assert end["4bit"] < 1.15 * end["fp32"] and end["spam"] < 1.15 * end["fp32"], end
    state = opt.state[weights[0]]  # (128, 64) at rank 16, "std": moments (128, 16), 2048 elements, 4-bit codes
    assert state["exp_avg_codes"].numel() == 1024 and state["exp_avg_sq_scales"].numel() == 16
    assert "exp_avg_codes" in spam_opt.state[spam_weights[0]]


def test_non_2d_params_and_groups_without_rank_are_plain():
    conv = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    bias = torch.nn.Parameter(torch.randn(4))
    other = torch.nn.Parameter(torch.randn(6, 5))
    opt = fastopt.GaLoreAdamW([{"params": [conv, bias], "rank": 2}, {"params": [other]}])
    for p in (conv, bias, other):
        p.grad = torch.randn_like(p)
    opt.step()
    for p in (conv, bias, other):
        assert opt.state[p]["exp_avg"].shape == p.shape and "proj_step" not in opt.state[p]


def test_bf16_params():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(32, 16))
    b = torch.nn.Parameter(a.detach().to(torch.bfloat16))
    opts = [fastopt.GaLoreAdamW([p], rank=4, update_proj_gap=3, lr=1e-2) for p in (a, b)]
    for _ in range(6):
        g = torch.randn(32, 16)
        a.grad, b.grad = g, g.to(torch.bfloat16)
        for opt in opts:
            opt.step()
    assert opts[1].state[b]["proj_right"].dtype == torch.bfloat16
    torch.testing.assert_close(b.detach().float(), a.detach(), rtol=0.05, atol=0.05)


def checkpoint(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_checkpoint_converts_low_rank_moments_between_formats():
    """An fp32 GaLore checkpoint loads into a 4-bit GaLore optimizer (moments quantized by their low-rank size)
    and back; host-side counters stay on the CPU."""
    param = torch.nn.Parameter(torch.randn(64, 32))
    fp32 = fastopt.GaLoreAdamW([param], rank=8, update_proj_gap=3)
    for _ in range(4):
        param.grad = torch.randn(64, 32)
        fp32.step()
    saved = checkpoint(fp32)
    four = fastopt.GaLoreAdamW([param], rank=8, update_proj_gap=3, state_bits=4, min_quant_size=0)
    four.load_state_dict(saved)
    state = four.state[param]
    assert state["exp_avg_codes"].numel() == 64 * 8 // 2 and state["proj_step"].device.type == "cpu"
    torch.testing.assert_close(state["proj_right"], fp32.state[param]["proj_right"], rtol=0, atol=0)
    back = fastopt.GaLoreAdamW([param], rank=8, update_proj_gap=3)
    back.load_state_dict(checkpoint(four))
    m = fp32.state[param]["exp_avg"]
    assert back.state[param]["exp_avg"].shape == (64, 8)
    assert (back.state[param]["exp_avg"] - m).abs().max() < 0.2 * m.abs().max()
    param.grad = torch.randn(64, 32)
    back.step()  # and it trains on

    other = fastopt.GaLoreAdamW([param], rank=4, update_proj_gap=3)
    other.load_state_dict(saved)  # GaLore options are hyperparameters: the checkpoint's rank comes with its state
    assert other.param_groups[0]["rank"] == 8 and other.state[param]["exp_avg"].shape == (64, 8)


def test_projector_shape_is_checked_on_load():
    param = torch.nn.Parameter(torch.randn(64, 32))
    opt = fastopt.GaLoreAdamW([param], rank=8, state_bits=4, min_quant_size=0)
    param.grad = torch.randn(64, 32)
    opt.step()
    saved = checkpoint(opt)
    saved["state"][0]["proj_right"] = saved["state"][0]["proj_right"][:4]
    with pytest.raises(ValueError, match=r"state of param 0: 'proj_right' has shape \(4, 32\), expected \(8, 32\)"):
        fastopt.GaLoreAdamW([param], rank=8, state_bits=4, min_quant_size=0).load_state_dict(saved)


def test_grad_scaler_takes_torchs_protocol_with_galore_groups():
    param = torch.nn.Parameter(torch.randn(8, 4))
    assert fastopt.AdamW([param])._step_supports_amp_scaling
    opt = fastopt.AdamW([param])
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(8, 4))], "rank": 2})
    assert not opt._step_supports_amp_scaling


@pytest.mark.parametrize("moments", ["reset", "reproject"])
def test_non_finite_gradient_on_a_device_keeps_the_projector_without_a_host_read(moments, monkeypatch):
    """The accelerator path, run on the CPU: the refresh is computed from a cleaned gradient and the old projector is
    selected on the device; moments are left as they were (reset multiplies by "unchanged", reproject by ≈ I)."""
    from fastopt.galore import policy
    monkeypatch.setattr(policy, "checks_on_host", lambda t: False)
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.float64))
    opt = fastopt.GaLoreAdamW([param], rank=2, update_proj_gap=2, lr=1e-2, moments=moments)
    for _ in range(2):
        param.grad = torch.randn(8, 4, dtype=torch.float64)
        opt.step()
    before = {k: v.clone() for k, v in opt.state[param].items()}
    param.grad = torch.full((8, 4), float("inf"), dtype=torch.float64)
    param.grad[0, 0] = 1.0
    opt.step()  # the refresh is due; the update itself is not finite, as with any optimizer fed inf
    state = opt.state[param]
    assert torch.equal(state["proj_right"], before["proj_right"])
    assert state["proj_step"].item() == 3  # no retry: that would need a host read
    if moments == "reset":
        assert state["step"].item() == 3  # not reset: the subspace did not change
