"""Tests written once for every optimizer configuration in cases.py."""
import io

import pytest
import torch

import fastopt
from tests.optim.cases import CASES, TWIN_CASES

BACKENDS = ["reference", "cpu", "triton"]
case_ids = [c.id for c in CASES]
twin_ids = [c.id for c in TWIN_CASES]


def model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5)).to(dtype)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randn(16, 5, generator=g)) for _ in range(n)]


def train(net, opt, data, scaler=None):
    for x, y in data:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x.to(next(net.parameters()).dtype)).float(), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


def resume(net, opt, make_optimizer, seed=123):
    """What resuming a run does: torch.save model and optimizer, torch.load(weights_only=True) into a fresh model
    (another init) and a fresh optimizer from ``make_optimizer(params)``."""
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed_net = model(seed=seed)
    resumed_net.load_state_dict(ckpt["model"])
    resumed = make_optimizer(resumed_net.parameters())
    resumed.load_state_dict(ckpt["opt"])
    return resumed_net, resumed


def flat(net):
    return torch.cat([p.detach().double().flatten() for p in net.parameters()])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", TWIN_CASES, ids=twin_ids)
def test_trajectory_matches_torch(case, backend):
    """50 steps of a small model in fp32 track torch.optim to ~1e-6 relative."""
    ours, theirs = model(), model()
    data = batches(50)
    train(ours, case.make(ours.parameters(), backend=backend), data)
    train(theirs, case.torch_twin(theirs.parameters()), data)
    a, b = flat(ours), flat(theirs)
    assert (a - b).norm() / b.norm() < 1e-6, (a - b).abs().max()


@pytest.mark.parametrize("case", TWIN_CASES, ids=twin_ids)
def test_state_dict_round_trip_through_torch(case):
    """fastopt → torch.optim → fastopt: both continue exactly as the uninterrupted run, state keys as torch's."""
    data = batches(20)
    ref_net = model()
    ref = case.make(ref_net.parameters())
    train(ref_net, ref, data)

    net = model()
    ours = case.make(net.parameters())
    train(net, ours, data[:10])
    twin = case.torch_twin(net.parameters())
    twin.load_state_dict(ours.state_dict())
    assert set(twin.state_dict()["state"][0]) == set(ours.state_dict()["state"][0])
    back = case.make(net.parameters())
    back.load_state_dict(twin.state_dict())
    train(net, back, data[10:])
    assert torch.equal(flat(net), flat(ref_net))


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_resume_is_bit_for_bit(case):
    """Save at step k with torch.save, load with weights_only=True into a fresh optimizer, continue: identical."""
    data = batches(30)
    straight_net = model()
    train(straight_net, case.make(straight_net.parameters()), data)

    net = model()
    opt = case.make(net.parameters())
    train(net, opt, data[:13])
    resumed_net, resumed = resume(net, opt, case.make)
    train(resumed_net, resumed, data[13:])
    assert torch.equal(flat(resumed_net), flat(straight_net))


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_bad_hyperparameters_raise_and_change_nothing(case):
    for kwargs, message in case.bad:
        with pytest.raises(ValueError, match=message):
            case.make([torch.nn.Parameter(torch.randn(3))], **kwargs)
        opt = case.make([torch.nn.Parameter(torch.randn(3))])
        with pytest.raises(ValueError, match=message):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], **kwargs})
        assert len(opt.param_groups) == 1


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_sparse_gradient_raises_before_any_update(case):
    dense, sparse = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = case.make([dense, sparse])
    dense.grad = torch.randn(4)
    sparse.grad = torch.randn(4).to_sparse()
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match=r"sparse gradients are not supported \(param_groups\[0\]\['params'\]\[1\]\)"):
        opt.step()
    assert torch.equal(dense.detach(), before)
    assert not opt.state


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_complex_and_integer_params_rejected(case):
    with pytest.raises(ValueError, match=r"complex parameters are not supported \(params\[1\] is torch.complex64\)"):
        case.make([torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match=r"params\[0\] has dtype torch.int64"):
        case.make([torch.zeros(3, dtype=torch.long)])


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_state_dict_from_another_optimizer_or_shape_is_rejected(case):
    net = model()
    opt = case.make(net.parameters())
    train(net, opt, batches(2))
    before = {k: v.clone() for k, v in opt.state[next(net.parameters())].items()}

    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    for momentum in (0.9, 0.0):  # without momentum SGD keeps no state: its param groups tell
        sgd_net = model()
        sgd = torch.optim.SGD(sgd_net.parameters(), lr=0.1, momentum=momentum)
        train(sgd_net, sgd, batches(2))
        with pytest.raises(ValueError, match=r"param group 0 of the state_dict lacks \[.*'betas'.*\] \(a state_dict "
                                             r"of another optimizer\? it has \[.*'momentum'"):
            opt.load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match=r"state of param 0 has keys \['momentum_buffer'\]"):
        opt.load_state_dict({**opt.state_dict(), "state": {0: {"momentum_buffer": torch.zeros(32, 12)}}})
    with pytest.raises(ValueError, match=r"expected a dict with 'state' and 'param_groups'"):
        opt.load_state_dict(net.state_dict())
    bad_lr = opt.state_dict()
    bad_lr["param_groups"] = [{**g, "lr": -1.0} for g in bad_lr["param_groups"]]
    with pytest.raises(ValueError, match=r"lr must be >= 0.0, got -1.0"):
        opt.load_state_dict(bad_lr)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before

    other = torch.nn.Sequential(torch.nn.Linear(12, 31), torch.nn.Tanh(), torch.nn.Linear(31, 5))
    other_opt = case.make(other.parameters())
    train(other, other_opt, batches(2))
    with pytest.raises(ValueError, match=r"param 0 .*shape \(31, 12\).* \(32, 12\)"):
        opt.load_state_dict(other_opt.state_dict())
    for k, v in opt.state[next(net.parameters())].items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_closure_hooks_and_zero_grad(case):
    net = model()
    opt = case.make(net.parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in net.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    opt.step()  # no grads: nothing happens, nothing fails


@pytest.mark.parametrize("case", TWIN_CASES, ids=twin_ids)
def test_param_group_added_later(case):
    """A group added mid-training (with its own lr) starts from fresh state, exactly as in torch.optim."""
    ours, theirs = model(), model()
    data = batches(10)
    o = case.make(list(ours[0].parameters()))
    t = case.torch_twin(list(theirs[0].parameters()))
    train(ours, o, data[:5])
    train(theirs, t, data[:5])
    o.add_param_group({"params": list(ours[2].parameters()), "lr": 3e-3})
    t.add_param_group({"params": list(theirs[2].parameters()), "lr": 3e-3})
    train(ours, o, data[5:])
    train(theirs, t, data[5:])
    assert (flat(ours) - flat(theirs)).norm() / flat(theirs).norm() < 1e-6
    assert o.state[ours[2].weight]["step"].item() == 5 and o.state[ours[0].weight]["step"].item() == 10


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_grad_scaler(case):
    """GradScaler's fused protocol: results match unscaled training (scales are powers of two, so exactly up
    to kernel rounding), and an inf gradient skips the step without touching parameters or state."""
    plain, scaled = model(), model()
    data = batches(10)
    train(plain, case.make(plain.parameters()), data)
    opt = case.make(scaled.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    train(scaled, opt, data, scaler=scaler)
    torch.testing.assert_close(flat(scaled), flat(plain), rtol=1e-6, atol=1e-7)

    before = flat(scaled)
    step_before = opt.state[scaled[0].weight]["step"].clone()
    x, y = data[0]
    opt.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(scaled(x), y) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(flat(scaled), before)
    assert torch.equal(opt.state[scaled[0].weight]["step"], step_before)
    assert scaler.get_scale() == 2.0**9


@pytest.mark.parametrize("backend", [None, "triton"])
@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_mixed_dtypes_in_one_optimizer(case, backend):
    """fp32, bf16 and fp16 params together (and float64, which backend=None runs on the reference path): each steps
    exactly as it would alone (the math is per tensor), keeps its moments in its own dtype where the state format
    follows the param, and matches the reference path."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16) + ((torch.float64,) if backend is None else ())
    torch.manual_seed(3)
    init = [torch.randn(300).to(d) for d in dtypes]
    grads = [[torch.randn(300).to(d) for d in dtypes] for _ in range(5)]
    together, alone, ref = ([torch.nn.Parameter(x.clone()) for x in init] for _ in range(3))
    opts = ([case.make(together, backend=backend)] + [case.make([p], backend=backend) for p in alone]
            + [case.make(ref, backend="reference")])
    for gs in grads:
        for ps in (together, alone, ref):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
        for opt in opts:
            opt.step()
    for p, q, r in zip(together, alone, ref):
        assert p.dtype == q.dtype == r.dtype and torch.equal(p, q)
        if "exp_avg" in opts[0].state[p] and opts[0].param_groups[0]["state_bits"] is None:
            assert opts[0].state[p]["exp_avg"].dtype == p.dtype
        torch.testing.assert_close(p, r, rtol=2**-7, atol=1e-5)


TENSOR_HP_CASES = {  # optimizer, which hyperparameters are tensors (besides lr), options
    "AdamW": (fastopt.AdamW, ("betas", "eps", "weight_decay"), {}),
    "AdamW 4-bit, eps a number": (fastopt.AdamW, ("betas", "weight_decay"), dict(state_bits=4, min_quant_size=0)),
    "StableSPAM": (fastopt.StableSPAM, ("betas", "eps", "weight_decay", "gamma1", "gamma2", "gamma3"),
                   dict(update_proj_gap=2, total_T=5)),
    "StableSPAM 8-bit official, gamma2 a number": (
        fastopt.StableSPAM, ("betas", "eps", "weight_decay", "gamma1", "gamma3"),
        dict(update_proj_gap=2, compat="official", state_bits=8, min_quant_size=0)),
    "SPAM 4-bit": (fastopt.SPAM, ("betas", "eps", "weight_decay"),
                   dict(DeltaT=2, warmup_steps=1, grad_accu_steps=0, threshold=2.0, state_bits=4, min_quant_size=0)),
}
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


def forbid_host_reads(monkeypatch, opt, only: list[torch.Tensor] | None = None) -> None:
    """Makes every host read of a tensor (or of the tensors in ``only``) raise, until monkeypatch.undo(); except for
    ``opt``'s step count, which lives on the host whatever the params' device."""
    for name in HOST_READS:
        def no_reads(self, *args, _original=getattr(torch.Tensor, name)):
            if self is not opt._steps_taken and (only is None or any(self is t for t in only)):
                raise AssertionError("step() read a tensor on the host")
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, no_reads)


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_step_never_reads_a_tensor_lr(case, monkeypatch, only_the_lr=False):
    """A 0-d tensor lr is checked when its group is added; on the Triton backend (the GPU path) step() never reads
    it (nor, unless ``only_the_lr``, any other tensor) back to the host: on a GPU each read would make the step wait
    for the device."""
    net = model()
    lr = torch.tensor(1e-2)
    opt = case.make(net.parameters(), lr=lr, backend="triton")
    start = flat(net)
    for x, y in batches(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        forbid_host_reads(monkeypatch, opt, [lr] if only_the_lr else None)
        opt.step()
        monkeypatch.undo()
    assert (flat(net) - start).norm() > 0


@pytest.mark.parametrize("case", TENSOR_HP_CASES)
def test_triton_step_never_reads_tensor_hyperparameters(case, monkeypatch):
    """On the Triton backend, lr and the named hyperparameters as 0-d tensors (the others numbers): nothing is read
    back to the host during step() (on a GPU, each read would wait for the device), and the steps (with momentum
    resets) and their statistics match the same optimizer given numbers, up to the tensors' float32 rounding."""
    cls, as_tensors, options = TENSOR_HP_CASES[case]
    numbers = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    if cls is fastopt.StableSPAM:
        numbers.update(gamma1=0.7, gamma2=0.9, gamma3=0.999)
    t = torch.tensor
    tensors = dict(numbers, lr=t(numbers["lr"]))
    tensors.update({k: tuple(t(b) for b in numbers[k]) if k == "betas" else t(numbers[k]) for k in as_tensors})
    nets = model(), model()
    with_numbers = cls(nets[0].parameters(), **numbers, **options, backend="triton")
    with_tensors = cls(nets[1].parameters(), **tensors, **options, backend="triton")
    start = flat(nets[1])

    for x, y in batches(3):
        for net, opt in zip(nets, (with_numbers, with_tensors)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            if opt is with_tensors:
                forbid_host_reads(monkeypatch, opt)
            opt.step()
            monkeypatch.undo()
    assert (flat(nets[1]) - start).norm() > 0
    torch.testing.assert_close(flat(nets[1]), flat(nets[0]), rtol=1e-5, atol=1e-6)
    for p_numbers, p_tensors in zip(nets[0].parameters(), nets[1].parameters()):
        for key, value in with_numbers.state[p_numbers].items():
            if key in ("step", "stats_step", "m_norm", "v_norm", "m_max"):
                # 1 − γ3 of a float32 tensor 0.999 is 1.3e-5 off that of the number 0.999
                torch.testing.assert_close(with_tensors.state[p_tensors][key], value, rtol=3e-5, atol=0)


def test_backend_argument_is_checked():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=r"backend must be None or one of \('reference', 'cpu', 'triton'\), got 'gpu'"):
        fastopt.AdamW(p, backend="gpu")
    with pytest.raises(ValueError, match=r"backend='cpu' takes float32, bfloat16 and float16 params, params\[0\] is "
                                         r"torch.float64"):
        fastopt.AdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))], backend="cpu")


def test_torch_lr_scheduler_drives_the_optimizer():
    ours, theirs = model(), model()
    o, t = fastopt.AdamW(ours.parameters(), lr=0.01), torch.optim.AdamW(theirs.parameters(), lr=0.01)
    so = torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=20)
    st = torch.optim.lr_scheduler.OneCycleLR(t, max_lr=0.05, total_steps=20)
    for x, y in batches(20):
        for net, opt, sched in ((ours, o, so), (theirs, t, st)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
            sched.step()
    assert (flat(ours) - flat(theirs)).norm() / flat(theirs).norm() < 1e-6
