"""Schedules driving optimizer hyperparameters: the value applied at the k-th step() is sched(k), for lr, each
beta and weight decay; schedules survive state_dict (as JSON-able specs) and a resumed run continues exactly."""

import pytest
import torch

import fastopt
import fastopt.schedules
from fastopt.schedules import WSD, Constant, Cosine, Linear
from tests.optim.test_common import batches, flat, model, resume, train

LR = WSD(peak=3e-2, total=30, warmup=5, decay=0.4)
BETA1 = Cosine(peak=0.95, total=30, final=0.8)
WD = Linear(peak=0.1, total=30, final=0.01)


def train_torch_with_values(net, data, lr=None, beta1=None, wd=None):
    """torch.optim.AdamW with the group's values set by hand before each step: what a schedule must do."""
    opt = torch.optim.AdamW(net.parameters(), lr=0.0)
    for k, (x, y) in enumerate(data):
        group = opt.param_groups[0]
        group["lr"] = lr(k) if lr else 1e-2
        group["betas"] = (beta1(k) if beta1 else 0.9, 0.999)
        group["weight_decay"] = wd(k) if wd else 0.01
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("which", ["lr", "beta1", "weight_decay", "all"])
def test_schedule_sets_the_value_of_each_step(which, backend):
    scheds = {"lr": LR if which in ("lr", "all") else None, "beta1": BETA1 if which in ("beta1", "all") else None,
              "wd": WD if which in ("weight_decay", "all") else None}
    ours, theirs = model(), model()
    data = batches(30)
    opt = fastopt.AdamW(ours.parameters(), lr=scheds["lr"] or 1e-2, betas=(scheds["beta1"] or 0.9, 0.999),
                        weight_decay=scheds["wd"] or 0.01, backend=backend)
    train(ours, opt, data)
    train_torch_with_values(theirs, data, **scheds)
    assert (flat(ours) - flat(theirs)).norm() / flat(theirs).norm() < 1e-6


def test_schedule_is_validated_each_step():
    """A schedule that leaves the valid range raises, naming the argument, before anything is updated."""
    p = torch.nn.Parameter(torch.randn(3))
    opt = fastopt.AdamW([p], lr=lambda k: 1e-3 - 2e-3 * k)
    p.grad = torch.randn(3)
    opt.step()
    before = p.detach().clone()
    step_before = opt.state[p]["step"].clone()
    with pytest.raises(ValueError, match=r"lr must be >= 0.0, got -0.001"):
        opt.step()
    assert torch.equal(p.detach(), before) and torch.equal(opt.state[p]["step"], step_before)


def test_independent_weight_decay():
    """Wortsman et al.: p ← p·(1 − wd), not p·(1 − lr·wd); with zero gradients only the decay acts."""
    p = torch.nn.Parameter(torch.ones(10))
    opt = fastopt.AdamW([p], lr=1e-3, weight_decay=0.1, independent_weight_decay=True)
    p.grad = torch.zeros(10)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((10,), 0.9))
    with pytest.raises(ValueError, match="independent_weight_decay=True needs decoupled weight decay"):
        fastopt.Adam([p], weight_decay=0.1, independent_weight_decay=True)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_independent_weight_decay_backends_agree(backend):
    ours, ref = model(), model()
    data = batches(5)
    kw = dict(lr=LR, weight_decay=WD, independent_weight_decay=True)
    train(ours, fastopt.AdamW(ours.parameters(), backend=backend, **kw), data)
    train(ref, fastopt.AdamW(ref.parameters(), backend="reference", **kw), data)
    torch.testing.assert_close(flat(ours), flat(ref))


def test_state_dict_carries_schedules_and_resume_is_exact():
    data = batches(30)
    make = lambda net: fastopt.AdamW(net.parameters(), lr=LR, betas=(BETA1, 0.999), weight_decay=WD)  # noqa: E731
    straight = model()
    train(straight, make(straight), data)

    net = model()
    opt = make(net)
    train(net, opt, data[:12])
    resumed_net, resumed = resume(net, opt, fastopt.AdamW)  # built without schedules: the checkpoint brings them
    group = resumed.param_groups[0]
    assert group["lr"] == LR and group["betas"][0] == BETA1 and group["weight_decay"] == WD
    train(resumed_net, resumed, data[12:])
    assert torch.equal(flat(resumed_net), flat(straight))


def test_callable_without_spec():
    """A plain callable cannot be saved as a spec: loading keeps the one the optimizer was built with."""
    p = torch.nn.Parameter(torch.randn(3))
    fn = lambda k: 1e-3 / (k + 1)  # noqa: E731
    opt = fastopt.AdamW([p], lr=fn)
    p.grad = torch.randn(3)
    opt.step()
    sd = opt.state_dict()
    again = fastopt.AdamW([p], lr=fn)
    again.load_state_dict(sd)
    assert again.param_groups[0]["lr"] is fn and again._step_count == 1
    with pytest.raises(ValueError, match="lr was a schedule without to_dict"):
        fastopt.AdamW([p], lr=1e-3).load_state_dict(sd)


def test_as_lr_scheduler_drives_a_fastopt_optimizer_like_a_schedule():
    """fastopt.schedules.as_lr_scheduler (for any torch optimizer) and lr=schedule give the same run."""
    a, b = model(), model()
    data = batches(20)
    train(a, fastopt.AdamW(a.parameters(), lr=LR), data)
    opt = fastopt.AdamW(b.parameters(), lr=0.0)
    sched = fastopt.schedules.as_lr_scheduler(opt, LR)
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(b(x), y).backward()
        opt.step()
        sched.step()
    assert torch.equal(flat(a), flat(b))


def test_constant_schedule_equals_float():
    a, b = model(), model()
    data = batches(5)
    train(a, fastopt.AdamW(a.parameters(), lr=Constant(1e-2)), data)
    train(b, fastopt.AdamW(b.parameters(), lr=1e-2), data)
    assert torch.equal(flat(a), flat(b))
