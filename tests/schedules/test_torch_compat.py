"""as_lr_scheduler drives any torch optimizer with a Schedule, through torch's LRScheduler protocol."""

import io

import pytest
import torch

from fastopt.schedules import WSD, Cosine, ScheduleLR, as_lr_scheduler

SCHED = WSD(peak=1e-2, total=30, warmup=5, decay=0.3)


def make_model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "weight_decay": 0.0}]
    return model, torch.optim.AdamW(groups, lr=123.0)  # the constructor lr is overwritten by the schedule


def train(model, optimizer, scheduler, steps, start=0):
    """Run `steps` steps; return the lr each param group used at each step."""
    used = []
    for k in range(start, start + steps):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(k))
        model(x).pow(2).mean().backward()
        used.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return used


def test_kth_optimizer_step_uses_schedule_of_k():
    model, optimizer = make_model_and_optimizer()
    scheduler = as_lr_scheduler(optimizer, SCHED)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) and isinstance(scheduler, ScheduleLR)
    used = train(model, optimizer, scheduler, 40)
    assert used == [[SCHED(k), SCHED(k)] for k in range(40)]  # absolute values, exactly
    assert scheduler.get_last_lr() == [SCHED(40), SCHED(40)]


def test_one_schedule_per_param_group():
    model, optimizer = make_model_and_optimizer()
    other = Cosine(1e-3, 20)
    used = train(model, optimizer, as_lr_scheduler(optimizer, [SCHED, other]), 25)
    assert used == [[SCHED(k), other(k)] for k in range(25)]


def test_tensor_lr_is_filled_in_place():
    param = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.AdamW([param], lr=torch.tensor(0.5))
    scheduler = as_lr_scheduler(optimizer, SCHED)
    lr = optimizer.param_groups[0]["lr"]
    for k in range(10):
        assert lr.item() == pytest.approx(SCHED(k))
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] is lr


def test_state_dict_resume_equals_uninterrupted_run():
    model, optimizer = make_model_and_optimizer()
    scheduler = as_lr_scheduler(optimizer, SCHED)
    used = train(model, optimizer, scheduler, 40)
    reference = [p.detach().clone() for p in model.parameters()]

    model, optimizer = make_model_and_optimizer()
    scheduler = as_lr_scheduler(optimizer, SCHED)
    first = train(model, optimizer, scheduler, 17)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # plain data: specs, not pickled objects

    model, optimizer = make_model_and_optimizer()
    scheduler = as_lr_scheduler(optimizer, Cosine(5.0, 3))  # replaced by the saved schedule
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    assert scheduler.schedules == (SCHED,)
    second = train(model, optimizer, scheduler, 23, start=17)

    assert first + second == used
    for resumed, expected in zip(model.parameters(), reference):
        assert torch.equal(resumed, expected)


def test_errors():
    _, optimizer = make_model_and_optimizer()
    with pytest.raises(ValueError, match="got 3 schedules for 2 param groups"):
        as_lr_scheduler(optimizer, [SCHED] * 3)
    with pytest.raises(TypeError, match="schedule\\[0\\] must be a fastopt Schedule"):
        as_lr_scheduler(optimizer, lambda k: 0.1)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        as_lr_scheduler("adam", SCHED)
