"""Property-based tests (hypothesis): the C++ codecs and steps against the reference on random shapes, dtypes,
storage formats and hyperparameters, with extreme and non-finite inputs. Each test draws a few dozen examples per run
(more with HYPOTHESIS_PROFILE=thorough); a failure prints the smallest example hypothesis found."""
import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastopt.ops import adam_step, spam_step, stable_spam_step
from fastopt.ops.quant import quantize
from fastopt.quant import FORMATS, Quantized, encode

settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SPECIAL = [0.0, -0.0, 1e-38, -1e-38, 1e-45, 3e38, -3e38]  # zeros, subnormals, near the largest float


@st.composite
def vectors(draw, min_size=1, max_size=3000, specials=True, nonfinite=False):
    """A float32 vector: normal values over a drawn range of magnitudes, with extreme entries sprinkled in."""
    n = draw(st.integers(min_size, max_size))
    seed = draw(st.integers(0, 2**31 - 1))
    exponent = draw(st.integers(-30, 30))
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 2.0**exponent
    extra = SPECIAL + ([math.inf, -math.inf, math.nan] if nonfinite else [])
    if specials:
        for _ in range(draw(st.integers(0, 4))):
            x[draw(st.integers(0, n - 1))] = draw(st.sampled_from(extra))
    return x


@given(x=vectors(nonfinite=True), bits=st.sampled_from([4, 8]), signed=st.booleans())
def test_cpu_codec_equals_the_reference(x, bits, signed):
    """Scales bit for bit, and codes bit for bit in every block whose scale is a number, infinities included. A block
    holding a NaN has scale NaN: it decodes to NaN whatever its codes, which are unspecified there."""
    fmt = FORMATS[(bits, signed)]
    x = x if signed else x.abs()
    codes, scales = quantize(x, fmt, backend="cpu")
    want_codes, want_scales = encode(x, fmt)
    assert torch.equal(scales.isnan(), want_scales.isnan())
    assert torch.equal(scales.nan_to_num(), want_scales.nan_to_num())
    per_block = codes.view(scales.numel(), -1), want_codes.view(scales.numel(), -1)
    numbers = ~scales.isnan()
    assert torch.equal(per_block[0][numbers], per_block[1][numbers])
    decoded = Quantized(codes, scales, fmt).dequantize(x.numel()).view(-1)
    blocks = torch.arange(x.numel()) // fmt.block
    assert decoded[scales.isnan()[blocks]].isnan().all()


hyperparameters = st.fixed_dictionaries(dict(
    lr=st.floats(1e-6, 0.1), beta1=st.floats(0.0, 0.999), beta2=st.floats(0.0, 0.9999), eps=st.floats(1e-10, 1e-2),
    weight_decay=st.floats(0.0, 0.5)))


def moments(n, storage, seed):
    g = torch.Generator().manual_seed(seed)
    m, v = torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 1e-2
    if storage == "fp32":
        return m, v
    bits = int(storage[0])
    return (Quantized(*encode(m, FORMATS[(bits, True)]), FORMATS[(bits, True)]),
            Quantized(*encode(v, FORMATS[(bits, False)]), FORMATS[(bits, False)]))


def clone(x):
    return Quantized(x.codes.clone(), x.scales.clone(), x.fmt) if isinstance(x, Quantized) else x.clone()


def magnitudes(x):
    """|x|, for a float tensor or a quantized moment (decoded, |·|, encoded again)."""
    if isinstance(x, Quantized):
        n = x.codes.numel() * 8 // x.fmt.bits
        return Quantized(*encode(x.dequantize(n).abs(), x.fmt), x.fmt)
    return x.abs()


def assert_moments_close(got, want, bound):
    """Float moments: m within a few fp32 ulps of its terms' size (``bound``'s m, from |m| and |g|), v (a sum of
    positive terms) relative to itself. Quantized ones: the same scales to rounding, values within one code step
    (a code flips where the two fp32 results straddle a rounding boundary)."""
    for a, b, size in zip(got, want, bound):
        if isinstance(a, Quantized):
            n = a.codes.numel() * 8 // a.fmt.bits
            torch.testing.assert_close(a.scales, b.scales, rtol=1e-5, atol=1e-30)
            code_step = torch.tensor(a.fmt.qmap).diff().max().item() * b.scales.max().item()
            assert (a.dequantize(n) - b.dequantize(n)).abs().max() <= code_step * 1.001 + 1e-30
        else:
            tolerance = 16 * 2.0**-23 * size.double().abs() + 1e-30
            assert ((a.double() - b.double()).abs() <= tolerance).all()


def assert_params_close(got, want, start, dtype, bound):
    """Within a few ulps of the param plus a few fp32 ulps of ``bound``, the size of the step's terms: the same step
    on |p|, |g| and |m| (no term cancels there), minus |p|. The kernels round their fp32 math in another order than
    the reference, and where terms cancel, a relative bound on the result would not hold."""
    ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}[dtype]
    got, want = got.double(), want.double()
    bound = (bound.double() - start.double().abs()).abs()
    assert torch.equal(got.isfinite(), want.isfinite())
    finite = want.isfinite()
    tolerance = 8 * ulp * want.abs() + 32 * 2.0**-23 * bound + 1e-30
    assert ((got - want).abs()[finite] <= tolerance[finite]).all(), (got - want).abs().max()


@given(p=vectors(max_size=2000), hp=hyperparameters, dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       storage=st.sampled_from(["fp32", "4bit", "8bit"]), decoupled=st.booleans(), maximize=st.booleans(),
       step=st.integers(0, 1000), seed=st.integers(0, 2**31 - 1))
def test_cpu_adam_step_matches_the_reference(p, hp, dtype, storage, decoupled, maximize, step, seed):
    n = p.numel()
    p = p.clamp(-1e4, 1e4).to(dtype)
    g = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1e-2).to(dtype)
    m, v = moments(n, storage, seed)
    args = lambda p, g, m: ([p.clone()], [g], [clone(m)], [clone(v)], [], [torch.tensor(float(step))])  # noqa: E731
    got, want, bound = args(p, g, m), args(p, g, m), args(p.abs(), g.abs(), magnitudes(m))
    options = dict(hp, decoupled=decoupled, maximize=False)
    adam_step(*got, backend="cpu", **dict(options, maximize=maximize))
    adam_step(*want, backend="reference", **dict(options, maximize=maximize))
    adam_step(*bound, backend="reference", **options)
    assert got[5][0].item() == want[5][0].item() == step + 1
    assert_params_close(got[0][0], want[0][0], p, dtype, bound[0][0])
    assert_moments_close([got[2][0], got[3][0]], [want[2][0], want[3][0]], [bound[2][0], bound[3][0]])


@given(p=vectors(max_size=2000), hp=hyperparameters, gammas=st.tuples(*[st.floats(0.0, 0.999)] * 3),
       storage=st.sampled_from(["fp32", "4bit", "8bit"]), reset=st.booleans(), official=st.booleans(),
       step=st.integers(0, 100), seed=st.integers(0, 2**31 - 1))
def test_cpu_stable_spam_step_matches_the_reference(p, hp, gammas, storage, reset, official, step, seed):
    n = p.numel()
    p = p.clamp(-1e4, 1e4)
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=generator) * 1e-2
    g[torch.randint(0, n, (max(1, n // 100),), generator=generator)] *= 1e3  # gradient spikes for AdaClip
    m, v = moments(n, storage, seed)
    stats = torch.rand(3, generator=generator)

    def args(p, g, m):
        counters = [[torch.tensor(float(step))], [torch.tensor(float(step))]]
        return ([p.clone()], [g], [clone(m)], [clone(v)], *counters, *[[s.clone()] for s in stats])
    got, want, bound = args(p, g, m), args(p, g, m), args(p.abs(), g.abs(), magnitudes(m))
    options = dict(hp, gamma1=gammas[0], gamma2=gammas[1], gamma3=gammas[2], scale=0.9, reset=reset,
                   compat="official" if official else None)
    stable_spam_step(*got, backend="cpu", **options)
    stable_spam_step(*want, backend="reference", **options)
    stable_spam_step(*bound, backend="reference", **options)
    for a, b in zip(got[4:], want[4:]):  # counters and statistics
        torch.testing.assert_close(a[0], b[0], rtol=2e-6, atol=1e-30)
    assert_params_close(got[0][0], want[0][0], p, torch.float32, bound[0][0])
    assert_moments_close([got[2][0], got[3][0]], [want[2][0], want[3][0]], [bound[2][0], bound[3][0]])


@given(p=vectors(max_size=2000), hp=hyperparameters, threshold=st.floats(0.0, 1e4), scale=st.floats(0.01, 1.0),
       storage=st.sampled_from(["fp32", "4bit", "8bit"]), reset=st.booleans(), clip=st.booleans(),
       step=st.integers(0, 1000), seed=st.integers(0, 2**31 - 1))
def test_cpu_spam_step_matches_the_reference(p, hp, threshold, scale, storage, reset, clip, step, seed):
    n = p.numel()
    p = p.clamp(-1e4, 1e4)
    g = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1e-1
    m, v = moments(n, storage, seed)
    args = lambda p, g, m: ([p.clone()], [g], [clone(m)], [clone(v)], [torch.tensor(float(step))])  # noqa: E731
    got, want, bound = args(p, g, m), args(p, g, m), args(p.abs(), g.abs(), magnitudes(m))
    options = dict(hp, threshold=threshold, scale=scale, reset=reset, clip=clip)
    spam_step(*got, backend="cpu", **options)
    spam_step(*want, backend="reference", **options)
    spam_step(*bound, backend="reference", **options)
    assert got[4][0].item() == want[4][0].item() == step + 1
    assert_params_close(got[0][0], want[0][0], p, torch.float32, bound[0][0])
    assert_moments_close([got[2][0], got[3][0]], [want[2][0], want[3][0]], [bound[2][0], bound[3][0]])
