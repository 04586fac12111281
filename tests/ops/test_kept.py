"""A step that steps the same tensors again checks only their grads (fastopt/kernels/checks.py ``Kept``): what the
optimizer's step plan lets the ops' kernels (C++ and Triton) keep between steps, and what makes them check everything
again."""
import gc
import weakref

import pytest
import torch

import fastopt
from fastopt.kernels import checks
from fastopt.ops import adam_step, library
from tests.conftest import TRITON_DEVICE, device_of

BACKENDS = ["cpu", "triton"]  # Triton: on the GPU if there is one (make gpu-check), else in the interpreter

HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True)


@pytest.fixture
def full_checks(monkeypatch):
    """Counts the launchers' full checks of their tensors."""
    calls = []
    original = checks.step_tensors

    def counting(op, *args, **kwargs):
        calls.append(op)
        return original(op, *args, **kwargs)

    monkeypatch.setattr(checks, "step_tensors", counting)
    return calls


def _twins(cls, options, backend, shapes=((64, 80), (4097,), (3,))):
    """Fresh params and an optimizer over them, and copies of the params with the same optimizer on the reference
    path: (params, opt, twins, ref)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device_of(backend))) for s in shapes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    return (params, cls(params, lr=1e-2, backend=backend, **options), twins,
            cls(twins, lr=1e-2, backend="reference", **options))


def _step_both(step, ref, params, twins) -> None:
    """``step()`` and ``ref.step()`` with new grads, the same for each param and its twin (zero_grad's default)."""
    for p, q in zip(params, twins):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    step()
    ref.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls, options", [(fastopt.AdamW, {}), (fastopt.AdamW, {"state_bits": 4}),
                                          (fastopt.StableSPAM, {"state_bits": 8}), (fastopt.SPAM, {})])
def test_new_grads_are_not_a_new_check_and_moved_params_are(full_checks, cls, options, backend):
    """New grad tensors at every step (zero_grad's default) reuse the checks; a param given new storage
    (``p.data = ...``) is checked again and stepped where it now is, as the reference path steps it."""
    params, opt, twins, ref = _twins(cls, {"min_quant_size": 0, **options}, backend)
    for step in range(4):
        if step == 2:
            old = params[0].detach()
            params[0].data = old.clone()
            twins[0].data = twins[0].detach().clone()
            kept_old = old.clone()
        _step_both(opt.step, ref, params, twins)
        assert len(full_checks) == (1 if step < 2 else 2), (step, full_checks)
    assert torch.equal(old, kept_old)  # the storage the param left behind was not written
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("left_alive", [True, False], ids=["left storage alive", "left storage freed"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls, options", [(fastopt.AdamW, {}), (fastopt.StableSPAM, {"state_bits": 4})])
def test_state_moved_in_place_is_checked_again(full_checks, cls, options, backend, left_alive):
    """A state tensor given new storage in place (``t.data = t.data.to(device)``, as helpers that move an optimizer's
    state do) is checked again and stepped where it now is; the storage it left is not written (nor, once freed, read
    or written: what the sanitizer build would report, tests/sanitize.py)."""
    params, opt, twins, ref = _twins(cls, {"min_quant_size": 0, **options}, backend, shapes=[(64, 80), (4097,)])
    left = []
    for step in range(3):
        if step == 2:
            for state in (opt.state[params[1]], ref.state[twins[1]]):
                for t in state.values():
                    if isinstance(t, torch.Tensor):
                        if left_alive:
                            left.append((t.detach(), t.detach().clone()))
                        t.data = t.detach().clone()
        _step_both(opt.step, ref, params, twins)
    assert len(full_checks) == 2
    assert all(torch.equal(old, copy) for old, copy in left)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opt.state[params[1]]["step"].item() == ref.state[twins[1]]["step"].item() == 3


def test_steps_over_changing_params_keep_one_check_per_op(full_checks):
    """Steps whose params with grads change (grads that are None at some steps, as unused experts' are) keep one Kept
    per op and first param, checked again when the params change: what the optimizer keeps does not grow with the
    number of sets of params it has stepped."""
    params = [torch.nn.Parameter(torch.randn(64)) for _ in range(6)]
    opt = fastopt.AdamW(params)
    for last in range(1, 6):
        for _ in range(2):
            for i, p in enumerate(params):
                p.grad = torch.randn_like(p) if i <= last else None
            opt.step()
    assert len(library._kept[opt._host]) == 1
    assert len(full_checks) == 5  # the first step over each set of params; its second step checks only the grads


@pytest.mark.parametrize("backend", BACKENDS)
def test_copies_of_strided_params_are_not_kept(backend):
    """A strided param is stepped through a contiguous copy, made anew at every step: nothing keeps the copy alive
    between steps (the params' own tensors are the ones a Kept may hold)."""
    base = torch.randn(40, 30, device=device_of(backend))
    params = [torch.nn.Parameter(base.t()), torch.nn.Parameter(torch.randn(100, device=base.device))]
    opt = fastopt.AdamW(params, backend=backend)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    store = library._kept[opt._host]
    assert store and all(kept.value is None for kept, _ in store.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_dtype_reinterpreted_in_place_is_checked_again(backend):
    """A param viewed as another dtype of its size in place keeps its pointer, its shape and its grad's dtype: the
    grads then differ from it, which the kept check sees."""
    params = [torch.nn.Parameter(torch.randn(300, device=device_of(backend)).bfloat16())]
    opt = fastopt.AdamW(params, backend=backend)
    for step in range(2):
        params[0].grad = torch.randn_like(params[0])
        opt.step()
    params[0].data = params[0].data.view(torch.float16)
    with pytest.raises(RuntimeError, match=r"grads\[0\] dtype differs from params\[0\]"):
        opt.step()


class _Owner:  # what a store of Kepts lives as long as (library.register_host): an optimizer, in fastopt.optim
    pass


def _adam_inputs(device, n=300, count=3):
    params = [torch.randn(n + i, device=device) for i in range(count)]
    return (params, [torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params],
            [torch.zeros_like(p) for p in params], [], [torch.zeros((), device=device) for _ in params])


CHANGES = [(change, backend) for change in ["grad dtype", "grad size", "grad strides", "grad on the meta device",
                                            "moment replaced in the list", "list shortened",
                                            "moment viewed as another dtype in place", "moment shortened in place",
                                            "moment made strided in place", "counter viewed as another dtype in place"]
           for backend in BACKENDS]
if TRITON_DEVICE.type == "cuda":  # a grad moved off its param's device (p.grad.data = ...): only a GPU has another
    CHANGES.append(("grad device", "triton"))


@pytest.mark.parametrize("change, backend", CHANGES)
def test_what_kept_did_not_check_is_checked_again(full_checks, change, backend):
    """Inputs that differ from the kept ones in what a step with its params' grads could not change (or in the list
    entries themselves) raise as without ``kept``, naming the argument, and change nothing. The changes "in place"
    keep the tensor object and its data pointer (``t.data = ...`` over its own storage; new data where the old was
    freed does the same): only its dtype, element count or strides tell it from the kept one, and a kernel trusting
    the kept checks would write past its end."""
    device = device_of(backend)
    params, grads, exp_avgs, exp_avg_sqs, maxes, steps = _adam_inputs(device)
    owner = _Owner()
    host = library.register_host(owner)
    adam_step(params, grads, exp_avgs, exp_avg_sqs, maxes, steps, backend=backend, host=host, **HP)
    adam_step(params, grads, exp_avgs, exp_avg_sqs, maxes, steps, backend=backend, host=host, **HP)
    assert len(full_checks) == 1
    message = {"grad dtype": r"grads\[1\] dtype differs", "grad size": r"grads\[1\] has 300 elements",
               "grad strides": r"grads\[1\] must be contiguous", "moment replaced in the list": r"exp_avgs\[1\]",
               "list shortened": "same length", "grad device": r"grads\[1\] must be on",
               "grad on the meta device": r"grads\[1\] must be on",
               "moment viewed as another dtype in place": r"exp_avg_sqs\[1\] dtype differs from exp_avgs\[1\]",
               "moment shortened in place": r"exp_avgs\[1\]", "moment made strided in place": r"exp_avgs\[1\]",
               "counter viewed as another dtype in place": r"\[1\] must be a float32"}[change]
    if change == "grad dtype":
        grads[1] = grads[1].to(torch.bfloat16)
    elif change == "grad size":
        grads[1] = grads[1][1:]
    elif change == "grad strides":
        grads[1] = torch.randn(2 * grads[1].numel(), device=device)[::2]
    elif change == "grad device":
        grads[1] = grads[1].cpu()
    elif change == "grad on the meta device":
        grads[1] = torch.empty_like(grads[1], device="meta")
    elif change == "moment viewed as another dtype in place":
        exp_avgs[1].data = exp_avgs[1].data.view(torch.bfloat16)[:exp_avgs[1].numel()]
    elif change == "moment shortened in place":
        exp_avgs[1].data = exp_avgs[1].data[:-1]
    elif change == "moment made strided in place":  # 301 elements as 7 x 43, transposed: the same bytes
        exp_avgs[1].data = exp_avgs[1].data.view(43, 7).t()
    elif change == "counter viewed as another dtype in place":
        steps[1].data = steps[1].data.view(torch.int32)
    elif change == "moment replaced in the list":
        exp_avgs[1] = torch.zeros(5, device=device)
    else:
        exp_avg_sqs.pop()
    before = [t.clone() for t in params + exp_avgs + exp_avg_sqs + steps]
    with pytest.raises(RuntimeError, match=message):
        if change == "grad strides" or "in place" in change:  # the kernel itself, which trusts its Kept: the op
            # would pass it contiguous copies or refuse the tensors before
            kernel = (library.cpu_kernel if backend == "cpu" else library.triton_kernel)("adam_step")
            hp = torch.tensor([1e-2, 0.9, 0.999, 1e-8, 0.1], dtype=torch.float64)
            kernel(params, grads, exp_avgs, exp_avg_sqs, [], [], maxes, steps, None, None, 0, hp, decoupled=True,
                   maximize=False, independent_decay=False, kept=library.kept(host, "adam_step", backend, params))
        else:
            adam_step(params, grads, exp_avgs, exp_avg_sqs, maxes, steps, backend=backend, host=host, **HP)
    assert len(full_checks) == 2
    for a, b in zip(before, params + exp_avgs + exp_avg_sqs + steps):  # a moment viewed as bf16 may hold NaNs
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_reinterpreted_in_place_is_checked_again(backend):
    """Moments given another dtype in place over their own storage (``t.data = t.data.view(torch.bfloat16)[:n]``:
    the same tensor objects at the same addresses) are checked again and stepped as bf16 moments, as the reference
    path steps them; a kernel trusting what it kept would step them as fp32 and write past their end."""
    params, opt, twins, ref = _twins(fastopt.AdamW, {}, backend, shapes=[(64, 80), (4097,)])
    for step in range(3):
        if step == 2:
            for state in [*(opt.state[p] for p in params), *(ref.state[q] for q in twins)]:
                for name in ("exp_avg", "exp_avg_sq"):
                    t = state[name]
                    t.zero_()
                    t.data = t.data.view(torch.bfloat16).view(-1)[:t.numel()].view(t.shape)
        _step_both(opt.step, ref, params, twins)
    for p, q in zip(params, twins):
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])


def test_each_kernel_keeps_its_own_checks():
    """The C++ kernel and the Triton launchers keep different values (pointer arrays, launch groups): calls of both
    over the same params under one host (an optimizer whose backend changed, CPU tensors in Triton's interpreter)
    keep one Kept each, and step as the reference does."""
    params, grads, exp_avgs, exp_avg_sqs, maxes, steps = _adam_inputs("cpu")
    ref = [[t.clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs, steps)]
    owner = _Owner()
    host = library.register_host(owner)
    for backend in ["cpu", "triton", "cpu", "triton"]:
        adam_step(params, grads, exp_avgs, exp_avg_sqs, maxes, steps, backend=backend, host=host, **HP)
        adam_step(ref[0], grads, ref[1], ref[2], [], ref[3], backend="reference", **HP)
    assert len(library._kept[host]) == 2
    for got, want in zip((params, exp_avgs, exp_avg_sqs, steps), ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kept_compares_list_entries_not_lists():
    """A list changed in place is not the list that was kept; an equal copy of a kept list is."""
    a, b = torch.zeros(3), torch.zeros(3)
    kept = checks.Kept()
    params, grads = [a], [torch.zeros(3)]
    kept.keep((params, 4), len(params), "value")
    assert kept.holds((params, 4), grads) and kept.holds((list(params), 4), grads)
    assert not kept.holds((params, 8), grads)
    params[0] = b
    assert not kept.holds((params, 4), grads)


# Backends a compiled step runs: the C++ kernels, and Triton on a GPU (not in the interpreter, which it refuses).
COMPILED = ["cpu"] + (["triton"] if TRITON_DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("cls, options", [(fastopt.AdamW, {}), (fastopt.AdamW, {"state_bits": 4, "min_quant_size": 0}),
                                          (fastopt.AdamW, {"state_bits": 4, "min_quant_size": 100}),
                                          (fastopt.StableSPAM, {"state_bits": 8, "min_quant_size": 0}),
                                          (fastopt.SPAM, {})], ids=["fp32", "4-bit", "4-bit and fp32", "8-bit", "spam"])
def test_a_compiled_step_keeps_its_checks_too(full_checks, cls, options, backend):
    """The torch.library op of a compiled step keeps its kernel's checks under the optimizer (``host``), one per op
    call (a bucket with float and 4-bit moments makes two): new grads are no new check, a state moved in place is,
    and the steps equal the reference path's."""
    torch._dynamo.reset()
    params, opt, twins, ref = _twins(cls, options, backend)
    step = torch.compile(opt.step, fullgraph=True)
    calls = 2 if options.get("min_quant_size") == 100 else 1
    for i in range(4):
        if i == 2:
            for state in (opt.state[params[1]], ref.state[twins[1]]):
                for t in state.values():
                    if isinstance(t, torch.Tensor):
                        t.data = t.detach().clone()
        _step_both(step, ref, params, twins)
        assert len(full_checks) == (calls if i < 2 else calls + 1), (i, full_checks)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_eager_and_compiled_steps_keep_their_checks_in_one_store(full_checks):
    """An optimizer's eager steps (which call the kernels directly) and its compiled ones (the torch.library op) keep
    their checks under the optimizer, in one store: switching between them checks nothing again."""
    torch._dynamo.reset()
    params, opt, twins, ref = _twins(fastopt.AdamW, {"state_bits": 4, "min_quant_size": 100}, "cpu")
    compiled = torch.compile(opt.step, fullgraph=True)
    for step in (opt.step, opt.step, compiled, compiled, opt.step):
        _step_both(step, ref, params, twins)
    assert len(full_checks) == 2  # one per op call: the bucket's 4-bit moments and its float ones
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", COMPILED)
def test_a_compiled_step_given_copies_keeps_none_of_them(backend):
    """A graph that does not update the optimizer's tensors in place (``aot_eager``) hands the op copies, new at
    every call: the optimizer's store then keeps nothing of them, and the steps are right."""
    torch._dynamo.reset()
    params, opt, twins, ref = _twins(fastopt.AdamW, {"state_bits": 4, "min_quant_size": 100}, backend)
    step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        _step_both(step, ref, params, twins)
        assert not library._kept[opt._host]
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# How a step hands its kernel the optimizer's store: the torch.library op given ``host`` (a compiled step; on CPU
# tensors the op runs the C++ kernels, so Triton goes this way only on a GPU), or the kernel called directly with its
# Kept from the store (an eager step, fastopt/ops/_backends.py fused_step).
THROUGH = [("cpu", "op"), ("cpu", "kernel"), ("triton", "kernel")] + (
    [("triton", "op")] if TRITON_DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("backend, through", THROUGH)
def test_what_a_kernel_keeps_under_an_optimizer_keeps_no_tensor_alive(full_checks, backend, through):
    """A kernel given its optimizer's store (``host``) keeps its checks there, in entries that refer to the tensors
    weakly (the Triton launchers' launch groups included): an entry goes with its first param, the store with the
    optimizer."""
    owner = _Owner()
    host = library.register_host(owner)
    params, grads, exp_avgs, exp_avg_sqs, maxes, steps = _adam_inputs(device_of(backend))
    hp = torch.tensor([1e-2, 0.9, 0.999, 1e-8, 0.1], dtype=torch.float64)
    for _ in range(2):
        if through == "op":
            torch.ops.fastopt.adam_step(params, grads, exp_avgs, exp_avg_sqs, [], [], maxes, steps, None, None, 0, hp,
                                        decoupled=True, maximize=False, independent_decay=False, host=host)
        else:
            adam_step(params, grads, exp_avgs, exp_avg_sqs, maxes, steps, backend=backend, host=host, **HP)
    assert len(full_checks) == 1 and [s.item() for s in steps] == [2, 2, 2] and len(library._kept[host]) == 1
    moment, param = weakref.ref(exp_avgs[0]), weakref.ref(params[0])
    del params, grads, exp_avgs, exp_avg_sqs, steps
    gc.collect()
    assert moment() is None and param() is None and not library._kept[host]
    del owner
    gc.collect()
    assert host not in library._kept
