"""The op database the parity tests run over (like torch's OpInfo): for each fused step op, a short trajectory on
any backend from a fixed start, the cases (size, param dtype, moment storage, variant) each backend runs, and how
close a fused backend must come to the reference. tests/ops/test_parity.py runs every entry; a new op adds an entry.

Adam / AdamW: three steps from a mid-training state (one step with quantized moments), fp32 against the reference in
float64 (exact math), 16-bit storage against the reference on the same storage (fp32 math), within a few units in
the last place. Stable-SPAM and SPAM: STEPS steps over three (Stable-SPAM) or two (SPAM) momentum resets, with a
cosine factor s < 1, weight decay, GradScaler's grad_scale, gradients with spikes (x50) and an all-zero gradient,
and a found_inf step in the middle that must change nothing. Sizes break blocking: SIMD widths, the 1024-element
Triton tiles, the 4096-element reduction blocks, the 128/256-element quantization blocks, the 65536-element CPU
chunks.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from fastopt.ops import adam_step
from fastopt.ops.spam import spam_schedule, spam_step, stable_spam_schedule, stable_spam_step
from fastopt.quant import formats as quant
from tests.conftest import ODD_SIZES, TRITON_DEVICE, cpu_isas, device_of, to_device

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
ULP = {F32: 2.0**-23, BF16: 2.0**-8, F16: 2.0**-11}
LARGE = (100_003, F32, F32)  # the interpreter runs ~60 programs a second: one large case per algorithm
# the interpreter's size for the other cases that a GPU runs at their full size: 17 programs of 1024, a 1-element tail
INTERPRETED = 16_385
# Stable-SPAM's and SPAM's in the interpreter: 6 reduction blocks (4096 elements each) and 21 update programs
SPAM_LARGE = LARGE if TRITON_DEVICE.type == "cuda" else (20_483, F32, F32)


@dataclass(frozen=True)
class Case:
    n: int
    dtype: torch.dtype                  # params and grads
    storage: torch.dtype | int          # float moments of this dtype, or 4 / 8 bits
    variant: str = ""                   # the op's options (ADAM_VARIANTS; Stable-SPAM: "official" / "corrected")

    @property
    def id(self) -> str:
        storage = f"{self.storage}bit" if isinstance(self.storage, int) else str(self.storage)[6:]
        return "-".join(filter(None, [str(self.n), str(self.dtype)[6:], storage, self.variant]))


@dataclass(frozen=True)
class OpInfo:
    name: str
    run: Callable[[str, Case], tuple]          # (backend, case) -> what check compares
    check: Callable[[tuple, tuple, Case], None]  # (ours, the reference's, case)
    cases: dict[str, list[Case]]               # backend ("cpu", "triton") -> its cases


# ---- Adam / AdamW ------------------------------------------------------------------------------------------------
ADAM_HP = dict(lr=3e-3, beta1=0.9, beta2=0.99, eps=1e-8)
ADAM_VARIANTS = {
    "plain": dict(amsgrad=False, maximize=False, weight_decay=0.0, decoupled=True),
    "adamw": dict(amsgrad=False, maximize=False, weight_decay=0.1, decoupled=True),
    "amsgrad-adamw": dict(amsgrad=True, maximize=False, weight_decay=0.1, decoupled=True),
    "amsgrad-maximize-adamw": dict(amsgrad=True, maximize=True, weight_decay=0.1, decoupled=True),
    "maximize-adam": dict(amsgrad=False, maximize=True, weight_decay=0.1, decoupled=False),
    "amsgrad-adam": dict(amsgrad=True, maximize=False, weight_decay=0.1, decoupled=False),
}


def adam_run(backend: str, case: Case) -> tuple:
    """fp32 params with fp32 moments run the reference in float64; everything else on its own storage."""
    g = torch.Generator().manual_seed(case.n)
    n, flags = case.n, dict(ADAM_VARIANTS[case.variant])
    amsgrad = flags.pop("amsgrad")
    p = torch.randn(n, generator=g).to(case.dtype)
    grads = [torch.randn(n, generator=g).to(case.dtype) for _ in range(3)]
    if isinstance(case.storage, int):
        m = quant.Quantized(*quant.encode(torch.randn(n, generator=g) * 0.1, quant.FORMATS[(case.storage, True)]),
                            quant.FORMATS[(case.storage, True)])
        v = quant.Quantized(*quant.encode(torch.rand(n, generator=g) * 1e-2, quant.FORMATS[(case.storage, False)]),
                            quant.FORMATS[(case.storage, False)])
        vmax, steps = [], 1  # code flips compound over steps: one step is compared
    else:
        m = (torch.randn(n, generator=g) * 0.1).to(case.storage)
        v = (torch.rand(n, generator=g) * 0.01).to(case.storage)
        vmax = [(torch.rand(n, generator=g) * 0.02).to(case.storage)] if amsgrad else []
        steps = 3
        if backend == "reference" and case.dtype == F32 and case.storage == F32:  # exact math
            p, m, v, vmax, grads = p.double(), m.double(), v.double(), [x.double() for x in vmax], \
                [x.double() for x in grads]
    step = torch.tensor(3.0)
    device = device_of(backend)
    p, grads, m, v, vmax, step = to_device((p, grads, m, v, vmax, step), device)
    for k in range(steps):
        adam_step([p], [grads[k]], [m], [v], vmax, [step], backend=backend, **ADAM_HP, **flags)
    return to_device((p, m, v, vmax), torch.device("cpu")) + (step.item(),)


def adam_check(ours: tuple, ref: tuple, case: Case) -> None:
    p, m, v, vmax, step = ours
    p_ref, m_ref, v_ref, vmax_ref, step_ref = ref
    assert step == step_ref
    if isinstance(case.storage, int):
        ulp = ULP[case.dtype]
        torch.testing.assert_close(p, p_ref, rtol=4 * ulp, atol=4 * ulp)
        for a, b in ((m, m_ref), (v, v_ref)):
            torch.testing.assert_close(a.scales, b.scales, rtol=1e-6, atol=0)
            # codes agree except where fp32 rounding of the update lands on a rounding boundary
            assert (a.codes != b.codes).float().mean() < 1e-3
            code_step = torch.tensor(a.fmt.qmap).diff().max().item() * b.scales.max().item()
            assert (a.dequantize(case.n) - b.dequantize(case.n)).abs().max() <= code_step
        return
    # within a few ulps, relative to each tensor's magnitude (cancellation in m and v makes single elements small;
    # their error stays on the scale of the operands)
    tol = 4 * max(ULP[case.dtype], ULP[case.storage])
    for got, want in zip([p, m, v, *vmax], [p_ref, m_ref, v_ref, *vmax_ref]):
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * want.abs().max().item())


def adam_cases(backend: str) -> list[Case]:
    variants = ["plain", "amsgrad-maximize-adamw", "maximize-adam", "amsgrad-adam"]
    cases = []
    for n, dtype, variant in itertools.product(ODD_SIZES, (F32, BF16), variants):
        if backend == "triton" and n == ODD_SIZES[-1]:
            # one 1M case compiled on a GPU; the interpreter runs programs one by one (~60 a second): LARGE's size
            n = n if TRITON_DEVICE.type == "cuda" and variant == "plain" and dtype == F32 else (
                LARGE[0] if variant == "plain" and dtype == F32 else
                65_537 if TRITON_DEVICE.type == "cuda" else INTERPRETED)
        cases.append(Case(n, dtype, dtype, variant))
    mixed = [(F16, F16), (F16, F32), (BF16, F32), (F32, BF16)]
    cases += [Case(4097, p, s, v) for (p, s) in mixed for v in ("adamw", "amsgrad-adamw")]
    big = INTERPRETED if backend == "triton" and TRITON_DEVICE.type != "cuda" else 70_001
    cases += [Case(n, dtype, bits, "adamw") for bits in (4, 8) for n in (1, 127, 129, 255, 4097, big)
              for dtype in (F32, BF16)]
    return cases


# ---- Stable-SPAM and SPAM: trajectories over momentum resets -----------------------------------------------------
STEPS = 10
SPIKE_STEPS = {2, 7, 9}
ZERO_STEP = 4
SKIPPED_STEP = 5  # found_inf = 1 (and an inf in the gradient): nothing may change
GRAD_SCALE = 64.0
STABLE = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, gamma1=0.7, gamma2=0.9, gamma3=0.999)
SPAM = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1, threshold=5.0)
def moments(n, storage):
    if storage in (4, 8):
        return tuple(quant.zeros(n, quant.FORMATS[(storage, signed)], "cpu") for signed in (True, False))
    return torch.zeros(n, dtype=storage), torch.zeros(n, dtype=storage)


def snapshot(param, m, v, counters):
    parts = [param, *counters] + [t for x in (m, v) for t in (x[:2] if isinstance(x, quant.Quantized) else [x])]
    return [t.clone() for t in parts]


def gradient(k, n, dtype):
    g = torch.Generator().manual_seed(1000 + k)
    grad = torch.randn(n, generator=g)
    if k in SPIKE_STEPS:
        grad[torch.randint(n, (max(1, n // 2000),), generator=g)] *= 50
    if k == ZERO_STEP:
        grad.zero_()
    if k == SKIPPED_STEP:
        grad[0] = float("inf")
    return (grad * GRAD_SCALE).to(dtype)


def trajectory(algo, backend, n, dtype, storage, compat=None):
    """STEPS steps of one algorithm; returns the final param, decoded moments, counters, and the moments as stored."""
    device = device_of(backend)
    param = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(dtype)
    m, v = moments(n, storage)
    counters = [torch.zeros(()) for _ in range(5 if algo == "stable" else 1)]
    param, m, v, counters = to_device((param, m, v, counters), device)
    for k in range(1, STEPS + 1):
        grad, found_inf = to_device((gradient(k, n, dtype), torch.tensor(float(k == SKIPPED_STEP))), device)
        before = snapshot(param, m, v, counters)
        common = dict(grad_scale=torch.tensor(GRAD_SCALE, device=device), found_inf=found_inf, backend=backend)
        if algo == "stable":
            s, reset = stable_spam_schedule(k, total_T=8, eta_min=0.5, update_proj_gap=3)
            stable_spam_step([param], [grad], [m], [v], *[[c] for c in counters], **STABLE, scale=s,
                             reset=reset or k == SKIPPED_STEP, compat=compat, **common)
        else:
            s, reset, clip = spam_schedule(k - 1, warmup_steps=3, delta_t=4, grad_accu_steps=2, threshold=5.0)
            spam_step([param], [grad], [m], [v], counters, **SPAM, scale=s, reset=reset or k == SKIPPED_STEP,
                      clip=clip, **common)
        if k == SKIPPED_STEP:
            assert all(torch.equal(a, b) for a, b in zip(before, snapshot(param, m, v, counters)))
    param, m, v = to_device((param, m, v), torch.device("cpu"))
    values = [x.dequantize(n) if isinstance(x, quant.Quantized) else x.float() for x in (m, v)]
    return param.float(), *values, [c.item() for c in counters], (m, v)


def resolution(moment, values):
    """The largest gap between neighbouring codes of a quantized moment, at its largest scale."""
    return torch.tensor(moment.fmt.qmap).diff().max().item() * values.abs().max().item()


def check_close(ours, ref, dtype, storage):
    p, m, v, counters, stored = ours
    p_ref, m_ref, v_ref, counters_ref, stored_ref = ref
    start = torch.randn(p.numel(), generator=torch.Generator().manual_seed(7)).to(dtype).float()
    assert (p - start).abs().max() > 1e-3  # the params did move
    assert counters[:2] == counters_ref[:2]  # t (and u) exactly; the statistics to rounding
    assert counters[2:] == pytest.approx(counters_ref[2:], rel=1e-5)
    if storage in (4, 8):
        for x, x_ref, q, q_ref in ((m, m_ref, stored[0], stored_ref[0]), (v, v_ref, stored[1], stored_ref[1])):
            # a code flips where the two fp32 results straddle a rounding boundary (bf16 gradients put many values
            # exactly on one), and a flipped block maximum moves its block's scale: values stay one code step apart
            assert (q.codes != q_ref.codes).float().mean() < 5e-2
            torch.testing.assert_close(x, x_ref, rtol=0, atol=resolution(q, x_ref))
        # a flipped code moves that element's next updates by a fraction of lr: few elements, each by < lr
        far = (p - p_ref).abs() > 1e-5 + (2**-8 if dtype == torch.bfloat16 else 1e-5) * p_ref.abs()
        assert far.float().mean() < 1e-2
        torch.testing.assert_close(p, p_ref, rtol=2**-7, atol=STABLE["lr"])
    elif dtype == torch.float32 and storage == torch.float32:
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
        for x, x_ref in ((m, m_ref), (v, v_ref)):
            torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-6 * x_ref.abs().max().item())
    else:  # bf16 storage rounds alike in both; a rounding flip is one bf16 ulp, 2^-8 relative
        torch.testing.assert_close(p, p_ref, rtol=2**-7, atol=1e-4)
        for x, x_ref in ((m, m_ref), (v, v_ref)):
            torch.testing.assert_close(x, x_ref, rtol=2**-7, atol=2**-7 * x_ref.abs().max().item())


def spam_family(algo: str) -> tuple[Callable, Callable]:
    def run(backend: str, case: Case) -> tuple:
        compat = "official" if case.variant == "official" else None
        return trajectory(algo, backend, case.n, case.dtype, case.storage, compat)

    def check(ours: tuple, ref: tuple, case: Case) -> None:
        check_close(ours, ref, case.dtype, case.storage)
    return run, check


SPAM_CPU_CASES = [(n, F32, F32) for n in ODD_SIZES] + [
    (4097, BF16, BF16), (4097, F32, BF16), (129, F16, F32), (4097, F32, 8), (70_001, BF16, 8), (4097, F32, 4),
    (70_001, F32, 4)]
SPAM_TRITON_CASES = [(n, F32, F32) for n in (1, 127, 128, 129, 4095, 4097)] + [
    (4097, F32, BF16), (4097, BF16, BF16), (4097, BF16, F32), (4097, F32, 8), (4097, BF16, 8), (129, F32, 4),
    (4097, F32, 4), (4097, BF16, 4)]
MODES = ("official", "corrected")

OPS = [
    OpInfo("adam_step", adam_run, adam_check, {"cpu": adam_cases("cpu"), "triton": adam_cases("triton")}),
    OpInfo("stable_spam_step", *spam_family("stable"), {
        "cpu": [Case(*c, mode) for c in SPAM_CPU_CASES for mode in MODES],
        "triton": [Case(*c, mode) for c in SPAM_TRITON_CASES for mode in MODES] + [Case(*SPAM_LARGE, "corrected")]}),
    OpInfo("spam_step", *spam_family("spam"), {
        "cpu": [Case(*c) for c in SPAM_CPU_CASES], "triton": [Case(*c) for c in SPAM_TRITON_CASES + [SPAM_LARGE]]}),
]


def parity_cases() -> list:
    """(op, backend, CPU ISA or None, case) for every backend the machine runs: the C++ kernels once per ISA."""
    backends = [("cpu", isa) for isa in cpu_isas()] + [("triton", None)]
    return [pytest.param(op, backend, isa, case, id=f"{op.name}-{backend}{'-' + isa if isa else ''}-{case.id}")
            for op in OPS for backend, isa in backends for case in op.cases[backend]]
