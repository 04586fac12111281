"""fastopt.galore.step_in_backward: each param updated inside backward() as its gradient completes, its gradient
freed; the result equals a plain optimizer.step(), with gradient accumulation too, for any fastopt optimizer."""
import pytest
import torch

import fastopt
from fastopt.galore import step_in_backward
from fastopt.schedules import Cosine


def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 24), torch.nn.Tanh(),
                               torch.nn.Linear(24, 5))


def galore_groups(model):
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    return [{"params": weights, "rank": 4, "update_proj_gap": 3, "scale": 0.25},
            {"params": [m.bias for m in model if isinstance(m, torch.nn.Linear)]}]


OPTIMIZERS = {
    "GaLoreAdamW-scheduled": lambda g: fastopt.GaLoreAdamW(g, lr=Cosine(peak=1e-2, total=12), weight_decay=0.1),
    "GaLoreAdamW-randomized-4bit": lambda g: fastopt.GaLoreAdamW(g, lr=1e-2, refresh="randomized", state_bits=4,
                                                                 min_quant_size=0),
    "StableSPAM-GaLore": lambda g: fastopt.StableSPAM(g, lr=1e-2, update_proj_gap=3, total_T=10),
    "AdamW-plain": lambda g: fastopt.AdamW(g, lr=1e-2),
}


def train(make, accumulation, steps=8, per_layer=False, unused_every=None):
    model = net()
    opt = make(galore_groups(model))
    handle = step_in_backward(model, opt, accumulation_steps=accumulation) if per_layer else None
    g = torch.Generator().manual_seed(1)
    for k in range(steps * accumulation):
        x, y = torch.randn(16, 12, generator=g), torch.randn(16, 5, generator=g)
        hidden = model[:4](x)
        if unused_every and k % unused_every == 0:  # the last layer's weight gets no gradient in this micro-batch
            out = hidden @ model[4].weight.detach().T + model[4].bias
        else:
            out = model[4](hidden)
        (torch.nn.functional.mse_loss(out, y) / accumulation).backward()
        if per_layer and (k + 1) % accumulation == 0:
            assert all(p.grad is None for p in model.parameters() if p is not model[4].weight)
        if (k + 1) % accumulation == 0:
            opt.step()
            opt.zero_grad()
    if handle is not None:
        handle.remove()
    return model, opt


@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_per_layer_stepping_equals_a_normal_step(name, accumulation):
    plain, plain_opt = train(OPTIMIZERS[name], accumulation)
    layered, layered_opt = train(OPTIMIZERS[name], accumulation, per_layer=True)
    for p, q in zip(plain.parameters(), layered.parameters()):
        assert torch.equal(p, q)
    assert layered_opt._step_count == plain_opt._step_count == 8


def test_a_param_unused_in_a_micro_batch_is_stepped_by_step():
    """Its gradient arrives fewer than accumulation_steps times: it keeps it, and step() updates it as usual."""
    make = OPTIMIZERS["GaLoreAdamW-scheduled"]
    plain, _ = train(make, 3, steps=4, unused_every=3)
    layered, _ = train(make, 3, steps=4, per_layer=True, unused_every=3)
    for p, q in zip(plain.parameters(), layered.parameters()):
        assert torch.equal(p, q)


def test_remove_restores_plain_stepping():
    model = net()
    opt = fastopt.GaLoreAdamW(galore_groups(model), lr=1e-2)
    step_in_backward(model, opt).remove()
    model(torch.randn(4, 12)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_arguments():
    model = net()
    opt = fastopt.GaLoreAdamW(galore_groups(model)[:1])
    with pytest.raises(ValueError, match=r"accumulation_steps must be an integer >= 1, got 0"):
        step_in_backward(model, opt, accumulation_steps=0)
    with pytest.raises(ValueError, match=r"step_in_backward: parameter 1 \(shape \(32,\)\) is not in the optimizer"):
        step_in_backward(model, opt)
    with pytest.raises(TypeError, match=r"optimizer must be a fastopt optimizer, got SGD"):
        step_in_backward(model, torch.optim.SGD(model.parameters(), lr=0.1))
