"""fastopt.GaLoreAdamW(compat="official") against galore-torch's GaLoreAdamW: the same parameters after several
projector refreshes, for every proj_type on tall, wide and square matrices, at a rank below and at/above min(m, n);
float64 on the reference path (to rounding), float32 on each backend (~1e-6)."""
import pytest
import torch

import fastopt
from bench.galore import galore_torch_adamw

STEPS, GAP = 10, 3  # refreshes at steps 0, 3, 6, 9


def model(dtype):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 24), torch.nn.Tanh(), torch.nn.Linear(24, 16), torch.nn.Tanh(),
                              torch.nn.Linear(16, 16))  # weights: tall (24, 10), wide (16, 24), square (16, 16)
    return net.to(dtype)


def groups(net, rank, proj_type, **extra):
    weights = [m.weight for m in net if isinstance(m, torch.nn.Linear)]
    biases = [m.bias for m in net if isinstance(m, torch.nn.Linear)]
    return [{"params": weights, "rank": rank, "update_proj_gap": GAP, "scale": 0.25, "proj_type": proj_type, **extra},
            {"params": biases}]


def train(net, opt, steps=STEPS):
    g = torch.Generator().manual_seed(1)
    dtype = next(net.parameters()).dtype
    for _ in range(steps):
        x, y = torch.randn(32, 10, generator=g).to(dtype), torch.randn(32, 16, generator=g).to(dtype)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return torch.cat([p.detach().double().flatten() for p in net.parameters()])


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = [(proj_type, rank) for proj_type in ("std", "reverse_std", "left", "right", "full") for rank in (4, 16)
         if (proj_type, rank) != ("reverse_std", 16)]  # galore-torch fails on that one: see the test below
OPTIONS = dict(lr=1e-2, weight_decay=0.1)


@pytest.mark.parametrize("proj_type,rank", CASES, ids=[f"{t}-rank{r}" for t, r in CASES])
def test_float64_reference_equals_galore_torch(proj_type, rank):
    theirs, ours = model(torch.float64), model(torch.float64)
    expected = train(theirs, galore_torch_adamw(groups(theirs, rank, proj_type), **OPTIONS))
    got = train(ours, fastopt.GaLoreAdamW(groups(ours, rank, proj_type), compat="official", backend="reference",
                                          **OPTIONS))
    assert relative_error(got, expected) < 1e-12


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("proj_type,rank", CASES, ids=[f"{t}-rank{r}" for t, r in CASES])
def test_float32_matches_galore_torch(proj_type, rank, backend):
    theirs, ours = model(torch.float32), model(torch.float32)
    expected = train(theirs, galore_torch_adamw(groups(theirs, rank, proj_type), **OPTIONS))
    got = train(ours, fastopt.GaLoreAdamW(groups(ours, rank, proj_type), compat="official", backend=backend,
                                          **OPTIONS))
    assert relative_error(got, expected) < 2e-6


def test_galore_torch_fails_on_reverse_std_wide_at_full_rank_and_ours_does_not():
    theirs, ours = model(torch.float64), model(torch.float64)
    with pytest.raises(RuntimeError):
        train(theirs, galore_torch_adamw(groups(theirs, 16, "reverse_std"), **OPTIONS), steps=1)
    assert torch.isfinite(train(ours, fastopt.GaLoreAdamW(groups(ours, 16, "reverse_std"), compat="official",
                                                          **OPTIONS), steps=3)).all()


def test_defaults_are_galore_torchs():
    """Swapping the import is enough: the same constructor defaults, and groups that only give a rank."""
    net = model(torch.float64)
    params = [{"params": [net[0].weight], "rank": 4}, {"params": [net[0].bias]}]
    opt = fastopt.GaLoreAdamW(params)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-6, 0.0)
    assert (group["update_proj_gap"], group["scale"], group["proj_type"]) == (200, 0.25, "std")
    assert opt.param_groups[1]["rank"] is None


def test_default_mode_is_torch_adamws_arithmetic():
    """compat=None: eps inside torch's bias correction and decay before the update, i.e. exactly fastopt.AdamW on the
    projected gradient; compat="official" differs from it by the eps placement and the decay order."""
    net_a, net_b, net_c = model(torch.float64), model(torch.float64), model(torch.float64)
    options = dict(OPTIONS, eps=1e-3)  # a large eps makes the placement visible
    a = train(net_a, fastopt.GaLoreAdamW(groups(net_a, 4, "std"), **options))
    b = train(net_b, fastopt.AdamW(groups(net_b, 4, "std"), **options))
    c = train(net_c, fastopt.GaLoreAdamW(groups(net_c, 4, "std"), compat="official", **options))
    assert relative_error(a, b) < 1e-12
    assert relative_error(a, c) > 1e-4


def test_triton_backend_matches_the_reference():
    """Triton (in its interpreter here) runs the low-rank moments; the projections are torch matmuls."""
    ours, ref = model(torch.float32), model(torch.float32)
    a = train(ours, fastopt.GaLoreAdamW(groups(ours, 4, "std"), backend="triton", **OPTIONS), steps=4)
    b = train(ref, fastopt.GaLoreAdamW(groups(ref, 4, "std"), backend="reference", **OPTIONS), steps=4)
    assert relative_error(a, b) < 1e-6
