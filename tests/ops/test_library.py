"""The op surface (fastopt/ops/library.py): every op is a torch.library op whose schema, aliasing, fake kernel and
autograd registration pass torch.library.opcheck, for every storage format and on sizes that break blocking; the
raw ops refuse bad input before touching anything."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastopt

from fastopt.ops import library
from fastopt.quant import FORMATS, zeros

ROOT = Path(__file__).resolve().parents[2]
SIZES = [1, 129, 4097]
STORAGES = ["fp32", "bf16-params", "4bit", "8bit"]
HP = {  # one valid value per hp entry, in each op's layout
    "adam_step": [1e-3, 0.9, 0.999, 1e-8, 0.01],
    "stable_spam_step": [1e-3, 0.9, 0.999, 1e-8, 0.01, 0.7, 0.9, 0.999, 0.8, 0.0],
    "spam_step": [1e-3, 0.9, 0.999, 1e-6, 0.01, 50.0, 0.5, 0.0, 1.0],
}


def step_args(op: str, storage: str, n: int, seed: int = 0):
    """Positional and keyword arguments of one call of a step op over two tensors of n and n + 3 elements."""
    g = torch.Generator().manual_seed(seed)
    sizes = [n, n + 3]
    dtype = torch.bfloat16 if storage == "bf16-params" else torch.float32
    params = [torch.randn(k, generator=g).to(dtype) for k in sizes]
    grads = [torch.randn(k, generator=g).to(dtype) for k in sizes]
    if storage in ("4bit", "8bit"):
        bits = int(storage[0])
        m = [zeros(k, FORMATS[(bits, True)], "cpu") for k in sizes]
        v = [zeros(k, FORMATS[(bits, False)], "cpu") for k in sizes]
        moments = [[q.codes for q in m], [q.codes for q in v], [q.scales for q in m], [q.scales for q in v]]
        maps = [FORMATS[(bits, True)].table(), FORMATS[(bits, False)].table()]
    else:
        bits = 0
        moments = [[torch.zeros(k) for k in sizes], [torch.rand(k, generator=g) for k in sizes], [], []]
        maps = [None, None]
    counters = lambda: [torch.zeros(()) for _ in sizes]  # noqa: E731
    hp = torch.tensor(HP[op], dtype=torch.float64)
    if op == "adam_step":
        return (params, grads, *moments, [], counters(), *maps, bits, hp), dict(decoupled=True, maximize=False,
                                                                               independent_decay=False)
    if op == "stable_spam_step":
        return (params, grads, *moments, *[counters() for _ in range(5)], *maps, bits, hp), dict(official=False)
    return (params, grads, *moments, counters(), *maps, bits, hp), {}


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("op", library.STEP_OPS)
def test_step_ops_pass_opcheck(op, storage, n):
    args, kwargs = step_args(op, storage, n)
    torch.library.opcheck(getattr(torch.ops.fastopt, op).default, args, kwargs)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", [4, 8])
def test_codec_ops_pass_opcheck(bits, n):
    x = torch.randn(n)
    fmt = FORMATS[(bits, True)]
    torch.library.opcheck(torch.ops.fastopt.quantize_blockwise.default, (x, fmt.table(), bits))
    codes, scales = torch.ops.fastopt.quantize_blockwise(x, fmt.table(), bits)
    torch.library.opcheck(torch.ops.fastopt.dequantize_blockwise.default, (codes, scales, fmt.table(), bits, n))


def test_host_values_op_calls_back_and_passes_opcheck():
    class Host:
        def values(self, step):
            return [0.5 * step, 1.0]

    host = Host()
    key = library.register_host(host, values=Host.values)
    assert torch.ops.fastopt.host_values(torch.tensor(4), key, 2).tolist() == [2.0, 1.0]
    torch.library.opcheck(torch.ops.fastopt.host_values.default, (torch.tensor(3), key, 2))
    with pytest.raises(RuntimeError, match=r"gave 2 values, the compiled step expects 3"):
        torch.ops.fastopt.host_values(torch.tensor(1), key, 3)


@pytest.mark.parametrize("refresh", ["svd", "random"])
def test_galore_step_op_steps_the_tensors_it_is_given_and_passes_opcheck(refresh):
    """fastopt::galore_step mutates only the params and state tensors it is given (a refresh writes the new projector
    into the given one) and equals the eager GaLore step, at a refresh and between refreshes."""
    torch.manual_seed(0)
    start = torch.randn(24, 16)
    weights = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    eager, by_op = (fastopt.AdamW([{"params": [w], "rank": 4, "update_proj_gap": 2, "refresh": refresh}], lr=0.1)
                    for w in weights)
    for step in range(3):
        grad = torch.randn(24, 16)
        for w in weights:
            w.grad = grad.clone()
        eager.step()
        if step == 0:  # the state exists after a first step
            by_op.step()
            continue
        state = [by_op.state[weights[1]][key] for key in sorted(by_op.state[weights[1]])]
        before = [t.clone() for t in state]
        args = ([weights[1]], [weights[1].grad], state, by_op._steps_taken, by_op._host, 0)
        torch.ops.fastopt.galore_step(*args)
        by_op._steps_taken.add_(1)
        assert torch.equal(weights[0], weights[1])
        for key, value in eager.state[weights[0]].items():  # a refreshed projector too
            assert torch.equal(value, by_op.state[weights[1]][key]), key
        assert all(a is b for a, b in zip(state, [by_op.state[weights[1]][k] for k in sorted(by_op.state[weights[1]])]))
        assert any(not torch.equal(a, b) for a, b in zip(state, before))
        torch.library.opcheck(torch.ops.fastopt.galore_step.default, args)


def test_ops_are_defined_at_import_with_their_fake_kernels():
    """torch.compile needs the schemas and fake kernels before the first step, not inside it: in a fresh process,
    right after ``import fastopt``, every op runs on fake tensors."""
    script = """
import torch, fastopt
from torch._subclasses.fake_tensor import FakeTensorMode
from tests.ops.test_library import step_args
from fastopt.ops.library import STEP_OPS
with FakeTensorMode(allow_non_fake_inputs=True):
    for op in STEP_OPS:
        args, kwargs = step_args(op, "4bit", 300)
        getattr(torch.ops.fastopt, op)(*args, **kwargs)
    codes, scales = torch.ops.fastopt.quantize_blockwise(torch.empty(300), torch.empty(16), 4)
    out = torch.ops.fastopt.dequantize_blockwise(codes, scales, torch.empty(16), 4, 300)
print(tuple(codes.shape), tuple(scales.shape), tuple(out.shape))
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[-2] == "(192,) (3,) (300,)"


@pytest.mark.parametrize("kernel", ["cpu", "triton"])
@pytest.mark.parametrize("op", library.STEP_OPS)
def test_step_ops_refuse_bad_input_before_any_change(op, kernel):
    """Both kernels of each op (the CPU kernel through the op, the Triton launcher called as the op would call it on a
    GPU) run the same checks (fastopt/kernels/checks.py) before anything changes."""
    run = getattr(torch.ops.fastopt, op) if kernel == "cpu" else library.triton_kernel(op)

    def call_with(**change):
        args, kwargs = step_args(op, "fp32", 100)
        args = list(args)
        for index, value in change.items():
            args[int(index[1:])] = value(args) if callable(value) else value
        before = [t.clone() for a in args if isinstance(a, list) for t in a]  # params, moments, counters
        return args, kwargs, before

    cases = [
        (dict(a1=lambda a: [torch.randn(99), a[1][1]]), r"grads\[0\] has 99 elements, params\[0\] has 100"),
        (dict(a0=lambda a: [p.double() for p in a[0]], a1=lambda a: [g.double() for g in a[1]]),
         r"params must be float32, bfloat16 or float16"),
        (dict(a1=lambda a: a[1][:1]), r"all tensor lists must have the same length"),
    ]
    hp_index = len(step_args(op, "fp32", 1)[0]) - 1
    cases.append(({f"a{hp_index}": torch.zeros(3, dtype=torch.float64)},
                  rf"hp must be a contiguous float64 CPU tensor of {len(HP[op])} values \({', '.join(library.HP_LAYOUTS[op])}\)"))
    cases.append(({f"a{hp_index}": lambda a: a[hp_index].float()}, r"hp must be a contiguous float64 CPU tensor"))
    cases.append((dict(a2=lambda a: [a[2][0][:50], a[2][1]]), r"exp_avgs\[0\] has 50 elements, params\[0\] has 100"))
    cases.append((dict(a3=lambda a: [a[3][0], torch.zeros(2 * a[3][1].numel())[::2]]),
                  r"exp_avg_sqs\[1\] must be contiguous"))
    for change, message in cases:
        args, kwargs, before = call_with(**change)
        with pytest.raises(RuntimeError, match=message):
            run(*args, **kwargs)
        after = [t for a in args if isinstance(a, list) for t in a]
        assert all(torch.equal(p, q) for p, q in zip(after, before))


@pytest.mark.parametrize("kernel", ["cpu", "triton"])
def test_codecs_refuse_bad_input(kernel):
    """Both kernels of the codec ops check their arguments before they run."""
    run = (lambda op: getattr(torch.ops.fastopt, op)) if kernel == "cpu" else library.triton_kernel
    fmt = FORMATS[(4, True)]
    x = torch.randn(300)
    codes, scales = torch.ops.fastopt.quantize_blockwise(x, fmt.table(), 4)
    cases = [
        ("quantize_blockwise", (x, fmt.table(), 5), r"bits must be 4 or 8, got 5"),
        ("quantize_blockwise", (x, torch.zeros(15), 4), r"map must be a contiguous float32 CPU tensor of 16 entries"),
        ("quantize_blockwise", (x.double(), fmt.table(), 4), r"x must be a float32"),
        ("dequantize_blockwise", (codes[:-1], scales, fmt.table(), 4, 300),
         r"x_codes\[0\] must be a contiguous uint8 CPU tensor of 192 bytes for 300 elements at 4 bits"),
        ("dequantize_blockwise", (codes, scales.double(), fmt.table(), 4, 300),
         r"x_scales\[0\] must be a contiguous float32 CPU tensor of 3 blocks"),
        ("dequantize_blockwise", (codes, scales, fmt.table(), 4, 400), r"x_codes\[0\] must be .* for 400 elements"),
    ]
    for op, args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            run(op)(*args)


def test_adam_op_refuses_amsgrad_with_quantized_moments():
    args, kwargs = step_args("adam_step", "4bit", 256)
    args = list(args)
    args[6] = [torch.zeros(256), torch.zeros(259)]
    with pytest.raises(RuntimeError, match=r"max_exp_avg_sqs \(amsgrad\) needs float moments \(bits 0\), got bits 4"):
        torch.ops.fastopt.adam_step(*args, **kwargs)


def test_step_ops_take_empty_lists():
    """The raw ops take a step over no tensors (the Python wrappers return early)."""
    for op in library.STEP_OPS:
        args, kwargs = step_args(op, "4bit", 1)
        empty = [[] if isinstance(a, list) else a for a in args]
        assert getattr(torch.ops.fastopt, op)(*empty, **kwargs) is None


@pytest.mark.parametrize("n", SIZES)
def test_grad_stats_passes_opcheck(n):
    grads = [torch.randn(n), torch.randn(n + 3).bfloat16()]
    clip = torch.tensor([[0.5, 0.25], [float("inf"), 1.0]], dtype=torch.float32)
    for args in ((grads, None, None), (grads, clip, torch.tensor(4.0))):
        torch.library.opcheck(torch.ops.fastopt.grad_stats.default, args)
    args, kwargs = step_args("stable_spam_step", "4bit", n)
    kwargs["grad_stats"] = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastopt.stable_spam_step.default, args, kwargs)


def test_step_checks_on_another_device():
    """The checks' branch for devices other than the CPU (the Triton launchers on a GPU), run on meta tensors: a good
    call passes, and a tensor left on the CPU is named."""
    from fastopt.kernels import checks

    meta = torch.device("meta")
    args, _ = step_args("adam_step", "4bit", 300)
    params, grads, m_codes, v_codes, m_scales, v_scales, _, steps, m_map, v_map, bits, _ = [
        [t.to(meta) for t in a] if isinstance(a, list) else a.to(meta) if isinstance(a, torch.Tensor) else a
        for a in args]
    call = lambda **change: checks.step_tensors(  # noqa: E731
        "adam_step", meta, change.get("params", params), grads, m_codes, v_codes, m_scales, v_scales, m_map, v_map,
        bits, {"steps": change.get("steps", steps)})
    assert call()[0] == [300, 303]
    with pytest.raises(RuntimeError, match=r"steps\[1\] must be a float32 meta scalar tensor"):
        call(steps=[steps[0], torch.zeros(())])
    with pytest.raises(RuntimeError, match=r"params\[0\] must be a contiguous meta tensor"):
        call(params=[torch.zeros(300), params[1]])
