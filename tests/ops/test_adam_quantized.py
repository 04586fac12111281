"""The Adam step on block-quantized moments beyond the parity cases of tests/ops/opinfo.py: 16-bit params rounded
exactly, the AVX-512 register kernels bit-identical to AVX2, GradScaler, mixed storage in one call, any map pair."""
import pytest
import torch

import fastopt
from fastopt.ops import adam_step
from fastopt.quant import FORMATS, SIGNED_4BIT, UNSIGNED_4BIT, Quantized, encode
from tests.conftest import cpu_isas, on_cpu_isa

BACKENDS = [("cpu", isa) for isa in cpu_isas()] + [("triton", None)]
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8}


def quantized_state(n, bits):
    """Moments as they look mid-training: m ~ 0.1·N(0,1), v ~ small positive, quantized."""
    m = Quantized(*encode(torch.randn(n) * 0.1, FORMATS[(bits, True)]), FORMATS[(bits, True)])
    v = Quantized(*encode(torch.rand(n) * 1e-2, FORMATS[(bits, False)]), FORMATS[(bits, False)])
    return m, v


def clone(q):
    return Quantized(q.codes.clone(), q.scales.clone(), q.fmt)


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_params_round_the_fp32_result_to_nearest_even(isa, bits, dtype):
    """A 16-bit param is the fp32 kernel's result on the widened param, rounded to nearest even (torch's .to()):
    exactly, which the reference comparison's tolerance could not tell from truncation."""
    n = 70_001
    fastopt.set_cpu_isa(isa)
    try:
        p, g = torch.randn(n).to(dtype), (torch.randn(n) * 1e-2).to(dtype)
        m, v = quantized_state(n, bits)
        hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True)
        half = [p.clone()], [g], [clone(m)], [clone(v)], [], [torch.tensor(4.0)]
        wide = [p.float()], [g.float()], [clone(m)], [clone(v)], [], [torch.tensor(4.0)]
        adam_step(*half, backend="cpu", **hp)
        adam_step(*wide, backend="cpu", **hp)
        assert torch.equal(half[0][0], wide[0][0].to(dtype))
        assert torch.equal(half[2][0].codes, wide[2][0].codes) and torch.equal(half[3][0].codes, wide[3][0].codes)
    finally:
        fastopt.set_cpu_isa("auto")

@pytest.mark.parametrize("isa", [isa for isa in cpu_isas() if isa.startswith("avx512")])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n", [1, 16, 63, 64, 65, 240, 255, 257, 70_001])
def test_avx512_computes_the_same_bits_as_avx2(isa, bits, dtype, n):
    """Five steps with the AVX-512 kernels (blocks kept in registers) and the AVX2 ones (blocks staged in arrays):
    the same fp32 operations, FMAs included, so params, codes and scales are bit-identical, tail blocks of every
    shape included. (The baseline x86-64 build has no FMA: it is held to the reference's tolerance. GCC contracts
    a·b + c into an FMA alike in both builds; a compiler that did not would fail here first.)"""
    p, (m, v) = torch.randn(n).to(dtype), quantized_state(n, bits)
    grads = [(torch.randn(n) * 10.0 ** (k % 3 - 2)).to(dtype) for k in range(5)]
    results = []
    for chosen in (isa, "avx2"):
        state = [p.clone()], None, [clone(m)], [clone(v)], [], [torch.tensor(0.0)]
        with on_cpu_isa(chosen):
            for g in grads:
                adam_step(state[0], [g], *state[2:], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                          decoupled=True, backend="cpu")
        results.append([state[0][0], state[2][0].codes, state[2][0].scales, state[3][0].codes, state[3][0].scales])
    assert all(torch.equal(a, b) for a, b in zip(*results))


SPECIAL_16BIT = {  # NaNs with payloads and both signs, ±inf, the largest finite, subnormals of both signs
    torch.float16: [0x7D01, 0xFFFF, 0x7C00, 0xFC00, 0x7BFF, 0x0001, 0x8001, 0x03FF],
    torch.bfloat16: [0x7F81, 0xFFFF, 0x7F80, 0xFF80, 0x7F7F, 0x0001, 0x8001, 0x007F],
}


@pytest.mark.parametrize("isa", [isa for isa in cpu_isas() if isa.startswith("avx512")])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_param_specials_round_as_avx2(isa, bits, dtype):
    """The AVX-512 register kernels convert 16-bit params with vector instructions, the AVX2 ones with from_f32:
    NaN payloads (a canonical NaN out: fp16 keeps the sign, bf16 does not), infinities, the largest finite value and
    subnormals agree."""
    n = 4097
    p = torch.randn(n).to(dtype)
    where = torch.tensor([0, 17, 130, 255, 256, 2049, 4000, 4096])  # several blocks and the tail
    p.view(torch.int16)[where] = torch.tensor(SPECIAL_16BIT[dtype], dtype=torch.int32).to(torch.int16)
    g, (m, v) = (torch.randn(n) * 1e-2).to(dtype), quantized_state(n, bits)
    results = []
    for chosen in (isa, "avx2"):
        state = [p.clone()], [g], [clone(m)], [clone(v)], [], [torch.tensor(0.0)]
        with on_cpu_isa(chosen):
            adam_step(*state, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True,
                      backend="cpu")
        results.append(state[0][0].view(torch.int16))
    assert torch.equal(*results)
    assert results[0][where[:2]].tolist() == ([0x7E00, -512] if dtype == torch.float16 else [0x7FC0, 0x7FC0])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_found_inf_skips_everything(backend):
    n = 1000
    p, g = torch.randn(n), torch.randn(n)
    m, v = quantized_state(n, 4)
    state = [p.clone()], [g], [clone(m)], [clone(v)], [], [torch.tensor(2.0)]
    adam_step(*state, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True,
              found_inf=torch.tensor(1.0), grad_scale=torch.tensor(8.0), backend=backend)
    assert torch.equal(state[0][0], p) and state[5][0].item() == 2.0
    assert torch.equal(state[2][0].codes, m.codes) and torch.equal(state[3][0].scales, v.scales)


def test_mixed_quantized_and_plain_in_one_call():
    """Small tensors keep float moments next to quantized ones: one call handles both kinds."""
    ps = [torch.randn(100), torch.randn(5000), torch.randn(300)]
    gs = [torch.randn_like(p) for p in ps]
    m4, v4 = quantized_state(5000, 4)
    moments = lambda: ([torch.zeros(100), clone(m4), torch.zeros(300)],  # noqa: E731
                       [torch.zeros(100), clone(v4), torch.zeros(300)])
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True)
    results = {}
    for backend in ("reference", "cpu"):
        params = [p.clone() for p in ps]
        ms, vs = moments()
        adam_step(params, gs, ms, vs, [], [torch.tensor(0.0) for _ in ps], backend=backend, **hp)
        results[backend] = params
    for a, b in zip(results["cpu"], results["reference"]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("m_fmt,v_fmt", [(UNSIGNED_4BIT, SIGNED_4BIT), (UNSIGNED_4BIT, UNSIGNED_4BIT),
                                         (SIGNED_4BIT, SIGNED_4BIT)], ids=["swapped", "both-linear", "both-dynamic"])
def test_any_pair_of_4bit_maps_matches_reference(isa, m_fmt, v_fmt):
    """The CPU kernels pick an encoder per map (arithmetic for the linear one, a threshold search otherwise); every
    combination, not only the standard (signed dynamic m, linear v), agrees with the reference."""
    n = 3001
    p, g = torch.randn(n), torch.randn(n)
    m = Quantized(*encode(torch.randn(n) * 0.1, m_fmt), m_fmt)
    v = Quantized(*encode(torch.rand(n) * 1e-2, v_fmt), v_fmt)
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True)
    want = [p.clone()], [g], [clone(m)], [clone(v)], [], [torch.tensor(4.0)]
    got = [p.clone()], [g], [clone(m)], [clone(v)], [], [torch.tensor(4.0)]
    adam_step(*want, backend="reference", **hp)
    fastopt.set_cpu_isa(isa)
    try:
        adam_step(*got, backend="cpu", **hp)
    finally:
        fastopt.set_cpu_isa("auto")
    torch.testing.assert_close(got[0][0], want[0][0], rtol=4 * ULP[torch.float32], atol=4 * ULP[torch.float32])
    for a, b in ((got[2][0], want[2][0]), (got[3][0], want[3][0])):
        torch.testing.assert_close(a.scales, b.scales, rtol=1e-6, atol=0)
        assert (a.codes != b.codes).float().mean() < 1e-3
