"""Optimizer states in 8-bit and 4-bit (and bf16/fp32) through state_bits: training quality, memory, conversions
between fp32 and quantized checkpoints, and the dtypes torch's loader would otherwise cast away."""
import pytest
import torch

import fastopt
from fastopt.quant import FORMATS, decode, encode
from tests.optim.test_common import flat


def regression_task(seed=0):
    """A small MLP on a fixed teacher: every weight matrix has >= 4096 elements, so the default
    min_quant_size quantizes them and keeps the biases in fp32."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64), torch.nn.GELU(),
                              torch.nn.Linear(64, 8))
    teacher = torch.nn.Linear(64, 8)
    g = torch.Generator().manual_seed(seed + 1)
    xs = torch.randn(400, 32, 64, generator=g)
    with torch.no_grad():
        ys = torch.tanh(teacher(xs)) + 0.05 * torch.randn(400, 32, 8, generator=g)
    return net, xs, ys


def final_loss(state_bits, backend=None, steps=400):
    net, xs, ys = regression_task()
    opt = fastopt.AdamW(net.parameters(), lr=3e-3, state_bits=state_bits, backend=backend)
    losses = []
    for x, y in zip(xs[:steps], ys[:steps]):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-50:]) / 50, losses, opt


@pytest.mark.parametrize("bits", [8, 4])
def test_low_bit_training_tracks_fp32(bits):
    """A few hundred steps: the low-bit final loss is within a few percent of fp32 states, and finite."""
    reference, _, _ = final_loss(32)
    low, losses, opt = final_loss(bits)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] / 3
    assert abs(low - reference) / reference < 0.05, (low, reference)
    weight = opt.param_groups[0]["params"][0]
    assert opt.state[weight]["exp_avg_codes"].dtype == torch.uint8  # really quantized
    assert "exp_avg" in opt.state[opt.param_groups[0]["params"][1]]  # the bias is small: fp32


@pytest.mark.parametrize("bits,limit", [(8, 2.05), (4, 1.07)])
def test_state_bytes_per_param(bits, limit):
    p = torch.nn.Parameter(torch.randn(1024, 1024))
    opt = fastopt.AdamW([p], state_bits=bits)
    p.grad = torch.randn_like(p)
    opt.step()
    moments = sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if k not in ("step", "param_shape"))
    assert moments / p.numel() <= limit


def test_fp32_checkpoint_loads_into_4bit_and_exports_back():
    """torch.optim.AdamW state → fastopt 4-bit (quantized on load) → fastopt fp32 (decoded on load)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(100, 50))
    torch_opt = torch.optim.AdamW([p])
    p.grad = torch.randn_like(p)
    torch_opt.step()
    fp32_state = torch_opt.state[p]

    four = fastopt.AdamW([p], state_bits=4, min_quant_size=0)
    four.load_state_dict(torch_opt.state_dict())
    codes, scales = encode(fp32_state["exp_avg"], FORMATS[(4, True)])
    assert torch.equal(four.state[p]["exp_avg_codes"], codes) and torch.equal(four.state[p]["exp_avg_scales"], scales)
    assert four.state[p]["param_shape"].tolist() == [100, 50]

    back = fastopt.AdamW([p], state_bits=32)
    back.load_state_dict(four.state_dict())
    want = decode(codes, scales, FORMATS[(4, True)], p.numel()).view(100, 50)
    assert torch.equal(back.state[p]["exp_avg"], want)
    assert set(back.state[p]) == {"step", "exp_avg", "exp_avg_sq"}  # a torch.optim.AdamW layout again
    torch.optim.AdamW([p]).load_state_dict(back.state_dict())


def test_8bit_checkpoint_loads_into_4bit():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3000))
    eight = fastopt.AdamW([p], state_bits=8, min_quant_size=0)
    p.grad = torch.randn_like(p)
    eight.step()
    four = fastopt.AdamW([p], state_bits=4, min_quant_size=0)
    four.load_state_dict(eight.state_dict())
    values = decode(eight.state[p]["exp_avg_sq_codes"], eight.state[p]["exp_avg_sq_scales"], FORMATS[(8, False)], 3000)
    codes, _ = encode(values, FORMATS[(4, False)])
    assert torch.equal(four.state[p]["exp_avg_sq_codes"], codes)


def test_state_dtypes_survive_loading():
    """fp32 moments of bf16 params stay fp32 through a state_dict round trip (torch's loader would cast them to
    bf16); state_bits=16 keeps bf16 moments for fp32 params."""
    p = torch.nn.Parameter(torch.randn(50).bfloat16())
    opt = fastopt.AdamW([p], state_bits=32)
    p.grad = torch.randn_like(p)
    opt.step()
    again = fastopt.AdamW([p], state_bits=32)
    again.load_state_dict(opt.state_dict())
    assert again.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(again.state[p]["exp_avg"], opt.state[p]["exp_avg"])
    q = torch.nn.Parameter(torch.randn(50))
    half = fastopt.AdamW([q], state_bits=16)
    q.grad = torch.randn_like(q)
    half.step()
    assert half.state[q]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_4bit_backends_agree_over_training(backend):
    ref, _, _ = final_loss(4, backend="reference", steps=20)
    got, _, _ = final_loss(4, backend=backend, steps=20)
    assert abs(got - ref) / ref < 1e-3


def test_resume_4bit_across_devices_map_location():
    """A 4-bit checkpoint saved and loaded with map_location and weights_only continues bit for bit."""
    import io

    net, xs, ys = regression_task()
    opt = fastopt.AdamW(net.parameters(), lr=3e-3, state_bits=4)

    def run(n, net, opt, start):
        for x, y in zip(xs[start:start + n], ys[start:start + n]):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()

    run(5, net, opt, 0)
    buf = io.BytesIO()
    torch.save({"net": net.state_dict(), "opt": opt.state_dict()}, buf)
    run(5, net, opt, 5)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True, map_location="cpu")
    net2, _, _ = regression_task(seed=9)
    net2.load_state_dict(ckpt["net"])
    opt2 = fastopt.AdamW(net2.parameters(), lr=3e-3, state_bits=4)
    opt2.load_state_dict(ckpt["opt"])
    run(5, net2, opt2, 5)
    assert torch.equal(flat(net), flat(net2))
