"""torch.compile of fastopt's step(): one graph (fullgraph=True) for every optimizer and state format on the CPU
path, compiled once, the eager result bit for bit (the same C++ kernels run); no recompiles when a schedule or a
tensor lr that an LRScheduler fills changes the lr every step, one when an LRScheduler first changes a float; the
graph kept across load_state_dict. The recipe is in the README."""
import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import fastopt
from fastopt.schedules import Cosine
from tests.optim.cases import CASES
from tests.optim.test_common import batches, model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run(net, step, data, after_step=None):
    for x, y in data:
        net.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        step()
        if after_step is not None:
            after_step()


def assert_same_state(a, b):
    for p, q in zip(a.state.values(), b.state.values()):
        assert p.keys() == q.keys()
        for key in p:
            assert torch.equal(p[key], q[key]), key


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_compiled_step_is_one_graph_equal_to_eager_and_never_recompiles(case):
    """lr follows a schedule, so its value changes at every step: one graph, compiled at the first call, serves
    every step (the state is created outside the graph, by _init_group, so the first call is the steady step)."""
    eager_net, compiled_net = model(), model()
    lr = Cosine(peak=1e-2, total=12, warmup=3)
    eager, compiled = case.make(eager_net.parameters(), lr=lr), case.make(compiled_net.parameters(), lr=lr)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(compiled.step, fullgraph=True, backend=counter)
    data = batches(12)
    run(eager_net, eager.step, data)
    run(compiled_net, step, data[:3])
    frames = counter.frame_count
    run(compiled_net, step, data[3:])
    assert frames == 1 and counter.frame_count == frames
    for p, q in zip(eager_net.parameters(), compiled_net.parameters()):
        assert torch.equal(p, q)
    assert_same_state(eager, compiled)
    assert compiled._step_count == eager._step_count == 12


@pytest.mark.parametrize("lr,frames", [(0.01, 3), (torch.tensor(0.01), 1)],
                         ids=["float lr", "tensor lr"])
def test_lr_scheduler_drives_a_compiled_step(lr, frames):
    """torch's compiled-optimizer recipe: an LRScheduler steps outside the compiled step. fastopt takes the lr as data
    whether the scheduler writes floats into the param groups or fills a tensor lr in place. (The scheduler wraps
    opt.step in a function that torch.compile does not trace, for torch.optim too: compiled without fullgraph, the
    step inside it is one graph.) Frames counted: step()'s graph, compiled once. Floats the scheduler changes (here
    the lr and beta1) recompile it once, at their first change (with an empty frame besides), and never again: Dynamo
    guards every float in the param groups and then makes a changed one dynamic (torch.optim.AdamW recompiles once
    for a float lr too, and at every step while beta1 cycles). A tensor lr, beta1 left alone, never recompiles."""
    nets = model(), model()
    opts = [fastopt.AdamW(n.parameters(), lr=copy.deepcopy(lr), state_bits=4, min_quant_size=0) for n in nets]
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10,
                                                      cycle_momentum=isinstance(lr, float)) for o in opts]
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda: opts[1].step(), backend=counter)
    data = batches(10)
    run(nets[0], opts[0].step, data, schedulers[0].step)
    run(nets[1], step, data[:2], schedulers[1].step)
    run(nets[1], step, data[2:], schedulers[1].step)
    assert counter.frame_count == frames
    for p, q in zip(*(n.parameters() for n in nets)):
        assert torch.equal(p, q)


@pytest.mark.parametrize("state_bits", [32, 4])
def test_compiled_run_resumed_from_a_state_dict_repeats_itself(state_bits):
    """A compiled step holds the state tensors in its graph, guarded by identity. load_state_dict copies the loaded
    values into those tensors, so the graph is kept (one frame) and steps the loaded state; state tensors replaced by
    hand recompile it, and are the state stepped. Either way a resumed compiled run repeats the original one bit for bit."""
    net = model()
    opt = fastopt.StableSPAM([{"params": [net[0].weight], "rank": 4, "update_proj_gap": 2},
                              {"params": [net[0].bias, net[2].weight, net[2].bias]}],
                             lr=1e-2, state_bits=state_bits, min_quant_size=0)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, fullgraph=True, backend=counter)
    data = batches(6)
    run(net, step, data[:3])
    saved_params, saved_state = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    run(net, step, data[3:])
    first = copy.deepcopy(net.state_dict())
    for reload in ("load_state_dict", "new tensors"):
        net.load_state_dict(saved_params)
        opt.load_state_dict(saved_state)
        if reload == "new tensors":
            for state in opt.state.values():
                state.update({key: value.clone() for key, value in state.items()})
        run(net, step, data[3:])
        for key, value in net.state_dict().items():
            assert torch.equal(value, first[key]), (reload, key)
        assert counter.frame_count == (1 if reload == "load_state_dict" else 2)


def test_load_state_dict_of_its_own_reordered_states():
    """load_state_dict copies loaded values into the state tensors it holds; when the values are this optimizer's
    own tensors in another order (a state_dict it returned, two same-shaped params' states swapped), no copy may
    overwrite a value another copy still reads."""
    params = [torch.nn.Parameter(torch.randn(300)) for _ in range(2)]
    opt = fastopt.AdamW(params, lr=1e-2)
    for k in range(2):
        params[k].grad = torch.randn(300)
    opt.step()
    before = [{key: value.clone() for key, value in opt.state[p].items()} for p in params]
    state_dict = opt.state_dict()
    state_dict["state"] = {0: state_dict["state"][1], 1: state_dict["state"][0]}
    opt.load_state_dict(state_dict)
    for p, want in zip(params, reversed(before)):
        for key, value in want.items():
            assert torch.equal(opt.state[p][key], value), key


def test_inductor_compiles_the_step_into_the_same_result():
    """The real backend (Inductor) on Stable-SPAM with 4-bit moments and a scheduled lr: bit for bit the eager run."""
    nets = model(), model()
    opts = [fastopt.StableSPAM(n.parameters(), lr=Cosine(peak=1e-2, total=8), update_proj_gap=3, state_bits=4,
                               min_quant_size=0) for n in nets]
    data = batches(8)
    run(nets[0], opts[0].step, data)
    run(nets[1], torch.compile(opts[1].step, fullgraph=True), data)
    for p, q in zip(*(n.parameters() for n in nets)):
        assert torch.equal(p, q)
    assert_same_state(*opts)


def test_step_compiled_without_size_asserts_keeps_the_ops_checks():
    """The README's recipe for a compiled step() alone on CPU params, Inductor's size_asserts off: the eager result,
    and a param or state tensor resized by hand behind the graph's back is still refused, by the op's own checks, with
    nothing changed. Dynamo guards params and state by identity only, so the same graph runs and only those checks
    see the new size (with the asserts on, Inductor's would fail first)."""
    nets = model(), model()
    opts = [fastopt.AdamW(n.parameters(), lr=1e-2, state_bits=4, min_quant_size=0) for n in nets]
    step = torch.compile(opts[1].step, fullgraph=True, options={"size_asserts": False})
    data = batches(4)
    run(nets[0], opts[0].step, data)
    run(nets[1], step, data)
    for p, q in zip(*(n.parameters() for n in nets)):
        assert torch.equal(p, q)
    assert_same_state(*opts)

    p = next(nets[1].parameters())
    before = [t.clone() for t in nets[1].parameters()]
    state = [t.clone() for s in opts[1].state.values() for t in s.values()]
    p.data = torch.zeros(p.numel() + 256)  # its grad keeps its shape: the grads' guards still hold
    with pytest.raises(RuntimeError, match=r"grads\[0\] has \d+ elements, params\[0\] has \d+"):
        step()
    p.data = before[0].clone()
    scales = opts[1].state[p]["exp_avg_scales"]
    kept, scales.data = scales.data, torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"exp_avg_scales\[0\] must be a contiguous float32 CPU tensor of \d+ "
                                           r"blocks"):
        step()
    scales.data = kept
    assert all(torch.equal(a, b) for a, b in zip(before, nets[1].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(state, (t for s in opts[1].state.values() for t in s.values())))
    assert opts[1]._step_count == opts[0]._step_count


def test_compiled_training_step_matches_eager_as_closely_as_torch_optim():
    """forward, backward, opt.step() and zero_grad() in one compiled function: the difference from eager is within
    what the same test gives for torch.optim.AdamW (the compiled forward and backward round differently)."""
    def difference(make):
        nets = model(), model()
        opts = [make(n.parameters()) for n in nets]

        def train_step(net, opt, x, y):
            loss = torch.nn.functional.mse_loss(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        compiled = torch.compile(train_step)
        for x, y in batches(10):
            train_step(nets[0], opts[0], x, y)
            compiled(nets[1], opts[1], x, y)
        torch._dynamo.reset()
        return max((p - q).abs().max().item() for p, q in zip(*(n.parameters() for n in nets)))

    ours = difference(lambda ps: fastopt.AdamW(ps, lr=1e-2))
    theirs = difference(lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    assert ours <= max(2 * theirs, 1e-6), (ours, theirs)


GALORE_CASES = [  # (optimizer, its options, the GaLore group's options, backend)
    (fastopt.GaLoreAdamW, {}, {}, "aot_eager"),
    (fastopt.SPAM, {"state_bits": 16}, {}, "aot_eager"),
    (fastopt.StableSPAM, {"state_bits": 32}, {"refresh": "randomized"}, "aot_eager"),
    (fastopt.AdamW, {"state_bits": 8, "min_quant_size": 0}, {"refresh": "random"}, "aot_eager"),
    (fastopt.Adam, {"weight_decay": 0.1}, {"refresh": "randomized", "moments": "reproject"}, "aot_eager"),
    (fastopt.StableSPAM, {"state_bits": 4, "min_quant_size": 0}, {"moments": "reset"}, "inductor"),
]


def galore_case_id(case) -> str:
    cls, options, galore, backend = case
    return f"{cls.__name__}-{options.get('state_bits')}-{backend}-{'-'.join(map(str, galore.values())) or 'svd'}"


@pytest.mark.parametrize("cls,options,galore,backend", GALORE_CASES, ids=[galore_case_id(c) for c in GALORE_CASES])
def test_galore_groups_compile_into_one_graph_equal_to_eager(cls, options, galore, backend):
    """A GaLore group's step is one opaque op in the graph (fastopt::galore_step): fullgraph=True works, every
    refresh (steps 0, 3 and 6 here) and the steps between give the eager result bit for bit, weight decay (before
    the update for AdamW, after it for SPAM, in the gradient for Adam) included, and nothing recompiles."""
    nets = model(), model()
    options = {"weight_decay": 0.1, **options}
    opts = [cls([{"params": [n[0].weight], "rank": 4, "update_proj_gap": 3, **galore},
                 {"params": [n[0].bias, n[2].weight, n[2].bias]}], lr=1e-2, **options) for n in nets]
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    step = torch.compile(opts[1].step, fullgraph=True, backend=counter)
    data = batches(8)
    run(nets[0], opts[0].step, data)
    run(nets[1], step, data[:3])
    frames = counter.frame_count
    run(nets[1], step, data[3:])
    assert frames == 1 and counter.frame_count == frames
    for p, q in zip(*(n.parameters() for n in nets)):
        assert torch.equal(p, q)
    assert_same_state(*opts)


@pytest.mark.parametrize("dtype,backend", [(torch.float64, None), (torch.float32, "triton")])
def test_compiling_another_backend_is_refused_clearly(dtype, backend):
    """A compiled step runs the fused ops (C++ on CPU params, Triton on GPU params): the reference path (float64
    params) and Triton in its interpreter (CPU params) raise a clear error."""
    net = model(dtype=dtype)
    opt = fastopt.AdamW(net.parameters(), backend=backend)
    net(torch.randn(2, 12, dtype=dtype)).sum().backward()
    where = " in the interpreter" if backend else ""
    with pytest.raises(Exception, match=rf"a compiled step\(\) runs fastopt's fused ops .* {dtype} param on cpu "
                                        rf"takes the '{backend or 'reference'}' backend{where}, which torch.compile"):
        torch.compile(opt.step, fullgraph=True, backend="aot_eager")()
