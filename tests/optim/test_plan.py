"""The step plan (fastopt/optim/plan.py): kept between steps, and never stale — state edited by hand, grads that come
and go, and loaded state_dicts act exactly as they do in torch.optim, which keeps nothing between steps."""
import gc
import weakref

import pytest
import torch

import fastopt
from fastopt.optim import plan as plan_module
from tests.optim.test_common import batches, flat, model

EDITS = {
    "moment replaced": lambda opt, ps: opt.state[ps[0]].__setitem__("exp_avg", torch.full_like(ps[0], 0.01)),
    "moment changed in place": lambda opt, ps: opt.state[ps[1]]["exp_avg_sq"].mul_(4.0),
    "scales changed in place": lambda opt, ps: opt.state[ps[1]]["exp_avg_sq_scales"].mul_(4.0),
    "state reset to {}": lambda opt, ps: opt.state.__setitem__(ps[2], {}),
    "state deleted": lambda opt, ps: opt.state.pop(ps[3]),
    "a grad set to None": lambda opt, ps: setattr(ps[1], "grad", None),
    "no edit": lambda opt, ps: None,
}


def step_with_edits(net, opt, data, edits):
    params = list(net.parameters())
    for (x, y), edit in zip(data, edits):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        EDITS[edit](opt, params)
        opt.step()


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_state_edited_between_steps_acts_as_in_torch(backend):
    edits = ["no edit", "no edit", "moment replaced", "no edit", "moment changed in place", "state reset to {}",
             "no edit", "a grad set to None", "no edit", "state deleted", "no edit", "no edit"]
    data = batches(len(edits))
    ours, theirs = model(), model()
    step_with_edits(ours, fastopt.AdamW(ours.parameters(), lr=0.01, backend=backend), data, edits)
    step_with_edits(theirs, torch.optim.AdamW(theirs.parameters(), lr=0.01), data, edits)
    a, b = flat(ours), flat(theirs)
    assert (a - b).norm() / b.norm() < 1e-6, (a - b).abs().max()


def test_plan_is_built_once_and_again_only_when_it_no_longer_holds(monkeypatch):
    built = []
    monkeypatch.setattr(plan_module.StepPlan, "__init__",
                        lambda self, *args, _init=plan_module.StepPlan.__init__: built.append(1) or _init(self, *args))
    net = model()
    opt = fastopt.StableSPAM(net.parameters(), lr=0.01, state_bits=4, min_quant_size=0)
    data = batches(8)
    step_with_edits(net, opt, data[:4], ["no edit"] * 4)
    assert len(built) == 1
    step_with_edits(net, opt, data[4:5], ["scales changed in place"])
    assert len(built) == 1
    step_with_edits(net, opt, data[5:6], ["state reset to {}"])
    assert len(built) == 2
    opt.load_state_dict(opt.state_dict())
    assert not opt._plans  # the old plan's state is let go at once
    step_with_edits(net, opt, data[6:8], ["no edit"] * 2)
    assert len(built) == 3


def test_a_removed_param_group_is_let_go():
    """A param group removed from param_groups (and its params' state deleted) is not kept alive by its step plan:
    the next step lets go of the plan, as torch.optim keeps nothing between steps."""
    kept, removed = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(20))
    opt = fastopt.AdamW([{"params": [kept]}, {"params": [removed]}])
    kept.grad, removed.grad = torch.randn_like(kept), torch.randn_like(removed)
    opt.step()
    gone = weakref.ref(removed), weakref.ref(opt.state[removed]["exp_avg"])
    opt.param_groups.pop()
    del opt.state[removed], removed
    opt.step()
    gc.collect()
    assert all(ref() is None for ref in gone) and len(opt._plans) == 1
