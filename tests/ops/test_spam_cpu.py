"""What only the C++ Stable-SPAM and SPAM steps do, beyond the parity trajectories of tests/ops/opinfo.py (run on
every ISA by test_parity.py): AVX-512 bit-identical to AVX2, chunked reductions, groups of tensors, argument checks,
the gradient norm's accuracy."""
import pytest
import torch

from fastopt.ops.spam import spam_step, stable_spam_step
from tests.conftest import cpu_isas, on_cpu_isa
from tests.ops.opinfo import SPAM, STABLE, moments, trajectory

@pytest.mark.parametrize("isa", [isa for isa in cpu_isas() if isa.startswith("avx512")])
@pytest.mark.parametrize("n", [65, 257, 70_001])
@pytest.mark.parametrize("storage", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("algo,compat", [("stable", "official"), ("stable", None), ("spam", None)],
                         ids=["stable-official", "stable-corrected", "spam"])
def test_avx512_computes_the_same_bits_as_avx2(algo, compat, dtype, storage, n, isa):
    """The AVX-512 kernels (blocks kept in registers) and the AVX2 ones (blocks staged in arrays) do the same fp32
    operations, FMAs included: the whole trajectory (resets, spikes, a tail block) is bit-identical. (The baseline
    x86-64 build has no FMA, so it rounds some products separately: it is held to the reference's tolerance.)"""
    results = []
    for chosen in (isa, "avx2"):
        with on_cpu_isa(chosen):
            param, _, _, counters, (m, v) = trajectory(algo, "cpu", n, dtype, storage, compat)
        results.append(([param, m.codes, m.scales, v.codes, v.scales], counters))
    (got, got_counters), (want, want_counters) = results
    assert got_counters == want_counters
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_found_inf_changes_nothing_on_cpu():
    param, grad = torch.randn(5000), torch.randn(5000)
    m, v = moments(5000, 4)
    counters = [torch.full((), 2.0) for _ in range(5)]
    before = [param.clone(), m.codes.clone(), m.scales.clone(), *[c.clone() for c in counters]]
    stable_spam_step([param], [grad], [m], [v], *[[c] for c in counters], **STABLE, reset=True, found_inf=torch.ones(()),
                     backend="cpu")
    spam_step([param], [grad], [m], [v], counters[:1], **SPAM, reset=True, found_inf=torch.ones(()), backend="cpu")
    after = [param, m.codes, m.scales, *counters]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_adaclip_clips_only_where_the_reference_does():
    """A gradient whose spikes sit in one 65536-element chunk of three: only that chunk is re-read for the clipped
    norm, and the result equals the reference."""
    n = 3 * 65536
    grads = [torch.randn(n) for _ in range(3)]
    for g in grads:
        g[70_000:70_010] *= 1e3
    results = []
    for backend in ("cpu", "reference"):
        param, (m, v) = torch.zeros(n), moments(n, torch.float32)
        counters = [torch.zeros(()) for _ in range(5)]
        for g in grads:
            stable_spam_step([param], [g], [m], [v], *[[c] for c in counters], **STABLE, backend=backend)
        results.append((param, counters[2].item()))  # param and m_norm
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-7)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)


def test_bad_lists_raise_naming_the_argument():
    with pytest.raises(RuntimeError, match="stable_spam_step: grads\\[0\\] has 3 elements, params\\[0\\] has 4"):
        stable_spam_step([torch.zeros(4)], [torch.zeros(3)], [torch.zeros(4)], [torch.zeros(4)],
                         *[[torch.zeros(())] for _ in range(5)], **STABLE, backend="cpu")


@pytest.mark.parametrize("storage", [torch.float32, 4, 8], ids=["fp32", "4bit", "8bit"])
def test_many_tensors_in_one_call(storage):
    """Tensors are reduced and updated in groups of about 8 MB of gradient: sizes below, across and above that, so
    that a group's update carries the next group's reduction whether that has fewer chunks, up to twice as many
    (with quantized moments: each update prefetches one or two that its thread then reduces), many more, or when
    this group has none (an empty tensor alone). The statistics, which come from the gradients alone, must match as
    tightly at every storage."""
    sizes = [0, 3_000_000, 1000, 2_500_000, 5, 1_500_000, 2_000_000, 100]
    results = []
    for backend in ("cpu", "reference"):
        gen = torch.Generator().manual_seed(3)
        params = [torch.randn(n, generator=gen) for n in sizes]
        state = list(zip(*[moments(n, storage) for n in sizes]))
        counters = [[torch.zeros(()) for _ in sizes] for _ in range(5)]
        for k in range(3):
            grads = [torch.randn(n, generator=gen) * (50 if k == 1 and i == 1 else 1) for i, n in enumerate(sizes)]
            stable_spam_step(params, grads, *state, *counters, **STABLE, backend=backend)
        results.append((params, counters))
    for ours, ref in zip(results[0][1], results[1][1]):
        assert [c.item() for c in ours] == pytest.approx([c.item() for c in ref], rel=1e-5)
    for ours, ref in zip(results[0][0], results[1][0]):
        if storage == torch.float32:
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        else:  # a code that flips between the two moves that element by a fraction of lr (check_close)
            torch.testing.assert_close(ours, ref, rtol=2**-7, atol=STABLE["lr"])


@pytest.mark.parametrize("cpu_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("kind", ["normal", "equal magnitudes"])
def test_gradient_norm_is_accurate(cpu_isa, kind):
    """The reduction sums squares in float runs of a few per lane, then in double: over a million elements the norm
    AdaGN sees (m_norm = (1 − γ1)·‖g‖ after the first step) is float64's to within m_norm's own float32 rounding
    (6e-8) and AdaClip's threshold (M, up to rounding: at most a 1-ulp clip). Equal magnitudes are where long float
    sums drift (by ~2e-5 here, were the runs long)."""
    n = 1_000_003
    g = torch.randn(n, generator=torch.Generator().manual_seed(5)) * 3
    if kind == "equal magnitudes":
        g = 0.1 * g.sign()
    counters = [[torch.zeros(())] for _ in range(5)]
    stable_spam_step([torch.zeros(n)], [g], *[[x] for x in moments(n, torch.float32)], *counters, **STABLE,
                     backend="cpu")
    m_norm, m_max = counters[2][0].item(), counters[4][0].item()
    assert m_norm / (1 - STABLE["gamma1"]) == pytest.approx(g.double().norm().item(), rel=3e-7)
    assert m_max == pytest.approx((1 - STABLE["gamma3"]) * g.abs().max().item(), rel=1e-7)


@pytest.mark.parametrize("compat", [None, "official"])
@pytest.mark.parametrize("storage", [torch.float32, 4])
def test_given_statistics_reproduce_the_ops_own_bit_for_bit(storage, compat):
    """What a sharded Stable-SPAM step does (fastopt/ops/spam.py: grad_stats, AdaClip's limits and the clipped sums
    by reduced_grad_stats, then the op taking them as grad_stats), run on one rank: the same clipping, norms and
    update as the op's own reductions, bit for bit, over steps with a spike in one chunk; whether only the clipped
    tensors are read again (on the CPU) or all of them (on a GPU, where choosing would wait for the device)."""
    from fastopt.ops._backends import fused_step
    from fastopt.ops.library import pack_hyperparameters
    from fastopt.ops.spam import _cpu_grad_stats, reduced_grad_stats

    sizes = [70_001, 129, 3 * 65536]
    hp = pack_hyperparameters("stable_spam_step", **STABLE, scale=1.0, reset=0.0)
    runs = []
    for given in (None, "selected on the host", "all read again"):  # the op's own; the sharded path's two ways
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(n, generator=gen) for n in sizes]
        ms, vs = zip(*[moments(n, storage) for n in sizes])
        counters = [[torch.zeros(()) for _ in sizes] for _ in range(5)]  # t, u, m_norm, v_norm, m_max
        for step in range(4):
            grads = [torch.randn(n, generator=gen) for n in sizes]
            if step == 2:
                grads[2][70_000:70_010] *= 1e3
            stats = None
            if given:
                stats = reduced_grad_stats(grads, counters[0] if compat else counters[1], counters[4],
                                           STABLE["gamma3"], lambda values, op: None, _cpu_grad_stats(None),
                                           select_on_host=given == "selected on the host")
            fused_step("stable_spam_step", "cpu", params, grads, list(ms), list(vs), counters, hp,
                     per_tensor={"grad_stats": stats}, official=compat == "official")
        flat = lambda xs: [t for x in xs for t in ((x.codes, x.scales) if hasattr(x, "codes") else (x,))]  # noqa
        runs.append(params + flat(ms) + flat(vs) + [c for cs in counters for c in cs])
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


def test_adaclip_limits_take_counters_of_any_one_element_shape():
    """The ops take one-element counters of any shape; AdaClip's limits for sharded params must too (a (1,) counter
    once broadcast the limits to (n, 2, n), and no tensor was found to clip)."""
    from fastopt.ops.spam import adaclip_limits

    maxes = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    scalar = adaclip_limits(maxes, [torch.tensor(3.0)] * 3, [torch.tensor(0.5)] * 3, 0.999)
    vector = adaclip_limits(maxes, [torch.tensor([3.0])] * 3, [torch.tensor([0.5])] * 3, 0.999)
    assert scalar.shape == vector.shape == (3, 2) and torch.equal(scalar, vector)
