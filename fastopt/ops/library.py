"""The fastopt ops as torch sees them: schemas, fake kernels, and where each implementation comes from.

Every fused op is a ``torch.library`` op in the ``fastopt`` namespace, defined here at import (never inside a
step), so that ``torch.compile`` and ``torch.library.opcheck`` see it: a schema that marks what the op mutates
(``Tensor(a!)[]``), a fake kernel (shapes only, for tracing), a CPU kernel (fastopt/ops/cpu.py: argument checks,
then the C++ kernels through their C ABI, loaded here too) and a CUDA kernel (the Triton launcher, imported on first
use). The pure-torch reference is called by fastopt/ops/*.py directly, and so are the Triton launchers on CPU
tensors, in Triton's interpreter.

The three step ops share one shape: params, grads, both moments as float tensors (``bits`` 0) or as uint8 codes
with fp32 scales and the two maps (``bits`` 4 or 8), the per-tensor counters and statistics, and ``hp``: the step's
hyperparameters as one float64 tensor (on the CPU for the C++ kernels; for Triton on the CPU or, holding tensor
hyperparameters, on the params' device), so that a compiled step takes them as data (an lr that changes every step
recompiles nothing). Layouts of ``hp`` (``HP_LAYOUTS``):

    adam_step         lr, beta1, beta2, eps, weight_decay
    stable_spam_step  lr, beta1, beta2, eps, weight_decay, gamma1, gamma2, gamma3, scale, reset
    spam_step         lr, beta1, beta2, eps, weight_decay, threshold, scale, reset, clip

``grad_stats`` gives per tensor max|g| and Σg² (after an optional AdaClip), the statistics that Stable-SPAM reduces
across the shards of sharded params before its step op takes them as ``grad_stats`` (fastopt/ops/spam.py).

A step op's ``host`` is -1, or the id of an optimizer (``register_host``) that steps the same tensors with their
``.grad`` at every call: its kernel then keeps its checks of the tensors between calls (fastopt/kernels/checks.py
``Kept``) in the optimizer's store (``kept``), which an eager step's direct kernel calls use too.

``host_values`` runs the host part of an optimizer's step (schedules, step-count rules) as an opaque op, so that
a compiled ``step()`` calls back into Python for it at every step instead of baking its values into the graph.
``galore_step`` does the same for a group's GaLore params: its refreshes are decided on the host from counters, and
its projections are matmuls that a compiler has nothing to fuse with, so the whole GaLore step is one opaque op that
mutates the params and state tensors it is given (and nothing else).
"""
from __future__ import annotations

import importlib.util
import itertools
import weakref
from typing import Callable

import torch

from fastopt import _ext
from fastopt.kernels.checks import BLOCKS, HP_LAYOUTS, Kept

_STORAGE = "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] exp_avg_scales, Tensor(e!)[] exp_avg_sq_scales"
_MAPS_BITS_HP = "Tensor? exp_avg_map, Tensor? exp_avg_sq_map, int bits, Tensor hp"
_AMP = "Tensor? grad_scale=None, Tensor? found_inf=None, int host=-1"
SCHEMAS = {
    "adam_step": f"(Tensor(a!)[] params, Tensor[] grads, {_STORAGE}, Tensor(f!)[] max_exp_avg_sqs, "
                 f"Tensor(g!)[] steps, {_MAPS_BITS_HP}, *, bool decoupled, bool maximize, bool independent_decay, "
                 f"{_AMP}) -> ()",
    "stable_spam_step": f"(Tensor(a!)[] params, Tensor[] grads, {_STORAGE}, Tensor(f!)[] steps, "
                        f"Tensor(g!)[] stats_steps, Tensor(h!)[] m_norms, Tensor(i!)[] v_norms, Tensor(j!)[] m_maxes, "
                        f"{_MAPS_BITS_HP}, *, bool official, Tensor? grad_stats=None, {_AMP}) -> ()",
    "spam_step": f"(Tensor(a!)[] params, Tensor[] grads, {_STORAGE}, Tensor(f!)[] steps, {_MAPS_BITS_HP}, *, "
                 f"{_AMP}) -> ()",
    "grad_stats": "(Tensor[] grads, Tensor? clip, Tensor? grad_scale) -> Tensor",
    "quantize_blockwise": "(Tensor x, Tensor map, int bits) -> (Tensor codes, Tensor scales)",
    "dequantize_blockwise": "(Tensor codes, Tensor scales, Tensor map, int bits, int n) -> Tensor",
    "host_values": "(Tensor step_count, int host, int n) -> Tensor",
    "galore_step": "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state, Tensor step_count, int host, "
                   "int group) -> ()",
}
STEP_OPS = tuple(HP_LAYOUTS)

_library = torch.library.Library("fastopt", "FRAGMENT")  # kept alive: the definitions last as long as it does
for _name, _schema in SCHEMAS.items():
    _library.define(_name + _schema)


def _no_outputs(*args, **kwargs) -> None:  # the step ops only mutate their arguments
    return None


for _name in (*STEP_OPS, "galore_step"):
    torch.library.register_fake(f"fastopt::{_name}", _no_outputs, lib=_library)


@torch.library.register_fake("fastopt::grad_stats", lib=_library)
def _(grads, clip, grad_scale):
    return torch.empty(len(grads), 2, dtype=torch.float64)


@torch.library.register_fake("fastopt::quantize_blockwise", lib=_library)
def _(x, map, bits):
    blocks = -(-x.numel() // BLOCKS[bits])
    return (x.new_empty(blocks * BLOCKS[bits] * bits // 8, dtype=torch.uint8),
            x.new_empty(blocks, dtype=torch.float32))


@torch.library.register_fake("fastopt::dequantize_blockwise", lib=_library)
def _(codes, scales, map, bits, n):
    return scales.new_empty(n, dtype=torch.float32)


# ---- the host part of a step ---------------------------------------------------------------------------------
_hosts: dict[int, tuple[weakref.ref, dict[str, Callable]]] = {}
_kept: dict[int, dict[tuple, tuple[Kept, weakref.ref]]] = {}  # host -> what its steps' kernel calls keep
_host_ids = itertools.count()


def register_host(owner: object, **callbacks: Callable) -> int:
    """Registers an optimizer's host callbacks and returns the id that ``host_values`` and ``galore_step`` take:
    ``values(owner, step_count) -> list[float]`` (the floats its step computes on the host) and
    ``galore_step(owner, group, params, grads, state, step_count)``; the step ops take it as ``host``. The entry, and
    what the step kernels keep under it (``kept``), live as long as ``owner``."""
    key = next(_host_ids)

    def forget(_) -> None:
        _hosts.pop(key, None)
        _kept.pop(key, None)

    _hosts[key] = (weakref.ref(owner, forget), callbacks)
    _kept[key] = {}
    return key


def kept(host: int, name: str, backend: str, params: list) -> Kept | None:
    """The Kept of step op ``name``'s ``backend`` kernel ("cpu" or "triton": each keeps its own kind of value) for
    ``host`` over ``params``: one per op, kernel and first param (a Kept that does not hold for a call's tensors is
    rebuilt), so that steps over changing sets of params (grads that are None at some steps) do not add up entries
    while the first param stays; None for an unknown host. The store refers to the tensors weakly, and
    an entry goes with its first param: a compiler that hands the op copies of the optimizer's tensors (a graph that
    does not update them in place) leaves nothing behind."""
    store = _kept.get(host)
    if store is None or not params:
        return None
    key = (name, backend, id(params[0]))
    entry = store.get(key)
    if entry is None:  # with a weak reference to the first param that removes the entry
        entry = store[key] = (Kept(), weakref.ref(params[0], lambda _: store.pop(key, None)))
    return entry[0]


def _keeping(name: str, backend: str, kernel: Callable[[], Callable]) -> Callable:
    """Step op ``name``'s ``backend`` kernel (``kernel()``) as the dispatcher calls it: given a ``host``, with its
    ``kept``."""
    def run(params, *args, host: int = -1, **kwargs):
        return kernel()(params, *args, kept=kept(host, name, backend, params), **kwargs)
    return run


def _callback(host: int, name: str) -> Callable:
    ref, callbacks = _hosts[host]
    return lambda *args: callbacks[name](ref(), *args)


def _host_values(step_count: torch.Tensor, host: int, n: int) -> torch.Tensor:
    values = _callback(host, "values")(int(step_count))
    if len(values) != n:
        raise RuntimeError(f"fastopt.host_values: the optimizer's host part gave {len(values)} values, the compiled "
                           f"step expects {n} (its param groups changed after compiling?)")
    return torch.tensor(values, dtype=torch.float64)


_library.impl("host_values", _host_values, "CPU")


def _galore_step(params, grads, state, step_count: torch.Tensor, host: int, group: int) -> None:
    with torch.no_grad():  # an optimizer step, as the other step ops (whose kernels autograd never sees)
        _callback(host, "galore_step")(group, params, grads, state, int(step_count))


for _device in ("CPU", "CUDA"):
    _library.impl("galore_step", _galore_step, _device)


@torch.library.register_fake("fastopt::host_values", lib=_library)
def _(step_count, host, n):
    return step_count.new_empty(n, dtype=torch.float64)


# The C++ kernels: their CPU implementations attach to the ops defined above. Loaded here, at import, so that step()
# never loads, builds or registers anything; without them CPU tensors take the reference path (after one warning).
CPU_KERNELS = _ext.load() is not None
if CPU_KERNELS:
    from fastopt.ops import cpu

    for _name, _kernel in cpu.KERNELS.items():
        _library.impl(_name, _keeping(_name, "cpu", lambda k=_kernel: k) if _name in STEP_OPS else _kernel, "CPU")

# The Triton launchers are the ops' GPU kernels.
TRITON_OPS = ("adam_step", "stable_spam_step", "spam_step", "quantize_blockwise", "dequantize_blockwise")
if importlib.util.find_spec("triton") is not None:
    for _name in TRITON_OPS:
        _launcher = lambda _name=_name: triton_kernel(_name)  # noqa: E731
        _library.impl(_name, _keeping(_name, "triton", _launcher) if _name in STEP_OPS else
                      lambda *args, _launcher=_launcher, **kwargs: _launcher()(*args, **kwargs), "CUDA")


def pack_hyperparameters(op: str, **named: float | torch.Tensor) -> torch.Tensor:
    """``hp`` of step op ``op``: the named values in its HP_LAYOUTS order, as one float64 tensor, stacked where the
    0-d tensors among them live (not read: a tensor lr on the GPU stays there, for the Triton kernels to read), else
    on the CPU. The C++ kernels take it on the CPU; the Triton kernels read it on their device."""
    layout = HP_LAYOUTS[op]
    if set(named) != set(layout):
        raise TypeError(f"pack_hyperparameters: {op} takes {layout}, got {tuple(named)}")
    values = [named[name] for name in layout]
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return torch.tensor(values, dtype=torch.float64)
    device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
    return torch.stack([v.detach().to(device, torch.float64).reshape(()) if isinstance(v, torch.Tensor)
                        else torch.full((), float(v), dtype=torch.float64, device=device) for v in values])


def cpu_kernel(name: str):
    """The CPU kernel of op ``name`` (fastopt/ops/cpu.py: checks, then the C++ kernels)."""
    return cpu.KERNELS[name]


def triton_kernel(name: str):
    """The Triton launcher of op ``name`` (imported when first asked for: importing triton takes a while)."""
    from fastopt.kernels.triton import KERNELS

    return KERNELS[name]
