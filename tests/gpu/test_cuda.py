"""The Triton path compiled on a CUDA GPU: every optimizer against the reference and against torch's fused CUDA
AdamW, no host synchronization inside step(), a step captured in a CUDA graph and replayed (torch's capturable
contract), and compiled steps (fullgraph, and a whole training step with mode="reduce-overhead")."""
import pytest
import torch

import fastopt

CUDA = torch.device("cuda")
CONFIGS = {  # name: (class, options)
    "AdamW": (fastopt.AdamW, dict(weight_decay=0.1)),
    "AdamW 8-bit": (fastopt.AdamW, dict(state_bits=8, min_quant_size=0)),
    "AdamW 4-bit": (fastopt.AdamW, dict(state_bits=4, min_quant_size=0)),
    "Adam amsgrad": (fastopt.Adam, dict(amsgrad=True, weight_decay=0.1)),
    "StableSPAM": (fastopt.StableSPAM, dict(update_proj_gap=3)),
    "StableSPAM 4-bit": (fastopt.StableSPAM, dict(state_bits=4, min_quant_size=0, update_proj_gap=3)),
    "SPAM 4-bit": (fastopt.SPAM, dict(state_bits=4, min_quant_size=0, DeltaT=3, warmup_steps=1, grad_accu_steps=0)),
    "GaLoreAdamW": (fastopt.GaLoreAdamW, dict()),
}


def model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Tanh(), torch.nn.Linear(512, 64)).to(CUDA, dtype)


def groups(net, name):
    if name != "GaLoreAdamW":
        return net.parameters()
    layers = [m for m in net if isinstance(m, torch.nn.Linear)]
    return [{"params": [m.weight for m in layers], "rank": 32, "update_proj_gap": 4},
            {"params": [m.bias for m in layers]}]


def batch(k: int, dtype=torch.float32):
    g = torch.Generator(device=CUDA).manual_seed(k)
    return torch.randn(32, 256, device=CUDA, generator=g, dtype=dtype), torch.randn(32, 64, device=CUDA, generator=g)


def train(net, opt, steps, dtype=torch.float32):
    for k in range(steps):
        x, y = batch(k, dtype)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x).float(), y).backward()
        opt.step()


def flat(net):
    return torch.cat([p.detach().double().flatten() for p in net.parameters()])


@pytest.mark.parametrize("name", CONFIGS)
def test_triton_on_cuda_matches_the_reference(name):
    cls, options = CONFIGS[name]
    nets = model(), model()
    train(nets[0], cls(groups(nets[0], name), lr=1e-2, backend="triton", **options), 6)
    train(nets[1], cls(groups(nets[1], name), lr=1e-2, backend="reference", **options), 6)
    quantized = "bit" in name
    torch.testing.assert_close(flat(nets[0]), flat(nets[1]), rtol=1e-2 if quantized else 1e-4,
                               atol=1e-2 if quantized else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_matches_torch_fused_cuda_adamw(dtype):
    nets = model(dtype), model(dtype)
    train(nets[0], fastopt.AdamW(nets[0].parameters(), lr=1e-3, weight_decay=0.1), 20, dtype)
    train(nets[1], torch.optim.AdamW(nets[1].parameters(), lr=1e-3, weight_decay=0.1, fused=True), 20, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(flat(nets[0]), flat(nets[1]), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", CONFIGS)
def test_step_never_synchronizes_with_the_host(name):
    cls, options = CONFIGS[name]
    net = model()
    lr = torch.tensor(1e-2, device=CUDA)
    opt = cls(groups(net, name), lr=lr, **options)
    train(net, opt, 2)  # state created, Triton compiled, tables uploaded
    x, y = batch(5)
    opt.zero_grad()
    torch.nn.functional.mse_loss(net(x), y).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name", ["AdamW", "AdamW 4-bit", "StableSPAM 4-bit", "SPAM 4-bit"])
def test_a_captured_step_replays_like_eager_steps(name):
    """torch's capturable contract: static params and grads, a tensor lr; warm-up steps on a side stream, one step
    captured in a CUDA graph, then replays with new gradients copied in equal eager steps."""
    cls, options = CONFIGS[name]
    options = {k: v for k, v in options.items() if k not in ("update_proj_gap", "DeltaT")}  # host-side step rules
    nets = model(), model()
    opts = [cls(n.parameters(), lr=torch.tensor(1e-2, device=CUDA), **options) for n in nets]
    grads = [[torch.randn_like(p) for p in nets[0].parameters()] for _ in range(6)]
    for net in nets:
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for k in range(2):
            for net, opt in zip(nets, opts):
                for p, g in zip(net.parameters(), grads[k]):
                    p.grad.copy_(g)
                opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opts[0].step()
    for k in range(2, 6):
        for net in nets:
            for p, g in zip(net.parameters(), grads[k]):
                p.grad.copy_(g)
        graph.replay()
        opts[1].step()
    torch.cuda.synchronize()
    torch.testing.assert_close(flat(nets[0]), flat(nets[1]), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["AdamW", "AdamW 4-bit", "StableSPAM 4-bit", "SPAM 4-bit"])
def test_fullgraph_compiled_step_equals_eager_without_recompiling(name):
    from fastopt.schedules import Cosine

    cls, options = CONFIGS[name]
    nets = model(), model()
    opts = [cls(n.parameters(), lr=Cosine(1e-2, total=10), **options) for n in nets]
    compiled = torch.compile(opts[0].step, fullgraph=True)
    torch._dynamo.utils.counters.clear()
    for k in range(6):
        x, y = batch(k)
        for net, opt, step in zip(nets, opts, (compiled, opts[1].step)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the state is made outside it (_init_group)
    torch.testing.assert_close(flat(nets[0]), flat(nets[1]), rtol=1e-6, atol=1e-7)


def test_compiled_training_step_with_reduce_overhead_matches_eager():
    nets = model(), model()
    opts = [fastopt.AdamW(n.parameters(), lr=torch.tensor(1e-3, device=CUDA), state_bits=4, min_quant_size=0)
            for n in nets]

    def training_step(net, opt, x, y):
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    compiled = torch.compile(training_step, mode="reduce-overhead")
    for net in nets:
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
    for k in range(8):
        x, y = batch(k)
        compiled(nets[0], opts[0], x, y)
        training_step(nets[1], opts[1], x, y)
    torch.cuda.synchronize()
    torch.testing.assert_close(flat(nets[0]), flat(nets[1]), rtol=1e-4, atol=1e-5)
