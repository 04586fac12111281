"""torch.optim's whole signature: the implementation flags (foreach, fused, capturable, differentiable) with
fastopt's documented meanings, named parameters, and torch's own error inputs (its OptimizerInfo database) raising
the exception types torch raises."""
import re

import pytest
import torch
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

import fastopt
from tests.optim.test_common import batches, flat, model, train

OPTIMIZERS = [fastopt.AdamW, fastopt.Adam, fastopt.StableSPAM, fastopt.SPAM, fastopt.GaLoreAdamW]


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_nanogpt_arguments_and_torch_flags(cls):
    """What nanoGPT's configure_optimizers passes to torch's AdamW (fused=True) and the other flags: accepted, kept in
    the param groups as torch keeps them, and the same step as without them; fused=False is the reference path."""
    nets = [model() for _ in range(4)]
    plain = cls(nets[0].parameters(), lr=6e-4, betas=(0.9, 0.95))
    flagged = cls(nets[1].parameters(), lr=6e-4, betas=(0.9, 0.95), fused=True, capturable=True)
    foreach = cls(nets[2].parameters(), lr=6e-4, betas=(0.9, 0.95), foreach=True, fused=None)
    unfused = cls(nets[3].parameters(), lr=6e-4, betas=(0.9, 0.95), fused=False)
    assert unfused.backend == "reference" and plain.backend is None
    assert flagged.param_groups[0]["fused"] is True and flagged.param_groups[0]["capturable"] is True
    assert foreach.param_groups[0]["foreach"] is True and plain.param_groups[0]["differentiable"] is False
    for net, opt in zip(nets, (plain, flagged, foreach, unfused)):
        train(net, opt, batches(3))
    assert torch.equal(flat(nets[0]), flat(nets[1])) and torch.equal(flat(nets[0]), flat(nets[2]))
    torch.testing.assert_close(flat(nets[3]), flat(nets[0]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_contradictory_or_unsupported_flags_raise(cls):
    params = model().parameters
    with pytest.raises(RuntimeError, match=r"`fused` and `foreach` cannot be `True` together"):
        cls(params(), fused=True, foreach=True)
    with pytest.raises(NotImplementedError, match=rf"{cls.__name__}: differentiable=True is not supported"):
        cls(params(), differentiable=True)
    with pytest.raises(ValueError, match=r"fused=False runs the unfused reference implementation, which contradicts "
                                         r"backend='cpu'"):
        cls(params(), fused=False, backend="cpu")
    with pytest.raises(ValueError, match=r"fused=True contradicts backend='reference'"):
        cls(params(), fused=True, backend="reference")


def test_named_parameters_and_param_names_as_torch():
    net = model()
    ours, theirs = fastopt.AdamW(net.named_parameters()), torch.optim.AdamW(net.named_parameters())
    assert ours.param_groups[0]["param_names"] == theirs.param_groups[0]["param_names"] == ["0.weight", "0.bias",
                                                                                              "2.weight", "2.bias"]
    train(net, ours, batches(2))
    sd = ours.state_dict()
    assert sd["param_groups"][0]["param_names"] == theirs.state_dict()["param_groups"][0]["param_names"]
    theirs.load_state_dict(sd)  # and torch takes it back
    fresh = fastopt.AdamW(net.named_parameters())
    fresh.load_state_dict(theirs.state_dict())
    assert fresh._step_count == 2


# torch's error inputs for its own limitations that fastopt lifts: a tensor lr or tensor betas work on every path.
LIFTED = {"lr as Tensor doesn't work with foreach & not capturable", "betas must be either both floats or both Tensors",
          r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True"}
ERROR_INPUTS = [(info.optim_cls.__name__, error) for info in optim_db if info.optim_cls.__name__ in ("Adam", "AdamW")
                for error in info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
                if error.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR]


@pytest.mark.parametrize("name,error", ERROR_INPUTS,
                         ids=[f"{n}-{e.optimizer_error_input.desc}" for n, e in ERROR_INPUTS])
def test_torch_error_inputs_raise_what_torch_raises(name, error):
    given = error.optimizer_error_input
    params = given.params if given.params is not None else [torch.nn.Parameter(torch.randn(3))]
    make = lambda: getattr(fastopt, name)(params, **given.kwargs)  # noqa: E731
    if given.desc in LIFTED:
        make()
        return
    # errors about params come from torch.optim.Optimizer itself, with torch's message; fastopt's own checks of a
    # hyperparameter word it differently and name the argument
    pattern = error.error_regex if given.params is not None else "|".join(re.escape(k) for k in given.kwargs)
    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=pattern):
            make()
    else:
        with pytest.raises(error.error_type, match=pattern):
            make()
