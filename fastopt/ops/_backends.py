"""Which implementation runs an op: the reference (pure torch, any device), the C++ kernels (CPU),
or Triton (GPUs; and CPU tensors under TRITON_INTERPRET=1, which is how the kernels are tested here); and the
plumbing every op module shares to call them (storage split, contiguous copies)."""
from __future__ import annotations

import importlib.util
import os

import torch

from fastopt.ops import library
from fastopt.quant.formats import Quantized

BACKENDS = ("reference", "cpu", "triton")
_TRITON = importlib.util.find_spec("triton") is not None  # decided at import: step() only reads it


def triton_available() -> bool:
    return _TRITON


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cpu_available() -> bool:
    return library.CPU_KERNELS


def check_backend(backend: str | None) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")


def resolve(backend: str | None, device: torch.device) -> str:
    """The implementation to use for tensors on `device`. None picks the fastest available one."""
    check_backend(backend)
    if backend is None:
        if device.type == "cpu":
            return "cpu" if cpu_available() else "reference"
        return "triton" if triton_available() and device.type in ("cuda", "xpu") else "reference"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs CPU tensors only, got tensors on {device}")
        if not cpu_available():
            raise RuntimeError("backend='cpu' requested but fastopt's C++ kernels are not available "
                               "(build them with `pip install --no-build-isolation -e .`)")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not installed")
        if device.type == "cpu" and not triton_interpreting():
            raise ValueError("backend='triton' runs CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1)")
    return backend


def run_contiguous(kernel, mutated: list[list[torch.Tensor]], read: list[list[torch.Tensor]], **uncopied) -> None:
    """Calls ``kernel(*mutated, *read)`` on contiguous tensors (kernels index flat storage), copying any
    non-contiguous input first and writing mutated copies back. Contiguous tensors are passed as they are.
    ``uncopied``: keyword arguments passed only when no tensor was copied (a ``Kept``, which must not hold copies)."""
    def dense(ts: list[torch.Tensor]) -> list[torch.Tensor]:  # the list itself when all of it is contiguous
        return ts if all(map(torch.Tensor.is_contiguous, ts)) else list(map(torch.Tensor.contiguous, ts))

    fixed, dense_read = list(map(dense, mutated)), list(map(dense, read))
    copied = any(f is not m for f, m in zip(fixed + dense_read, mutated + read))
    kernel(*fixed, *dense_read, **({} if copied else uncopied))
    for originals, copies in zip(mutated, fixed):
        if copies is not originals:
            for t, c in zip(originals, copies):
                if c is not t:
                    t.copy_(c)


def by_storage(moments: list) -> list[tuple[list[int], int]]:
    """Tensor indices grouped by how their moments are stored: bits 0 (float tensors), 4 or 8 (codes + scales)."""
    if Quantized not in set(map(type, moments)):
        return [(list(range(len(moments))), 0)] if moments else []
    bits = [m.fmt.bits if isinstance(m, Quantized) else 0 for m in moments]
    return [([i for i, b in enumerate(bits) if b == want], want) for want in sorted(set(bits))]


def step_kernel(name: str, backend: str, device: torch.device):
    """What runs fused op ``name`` for ``backend`` on ``device``: the torch.library op (C++ kernels on CPU tensors,
    Triton on GPU tensors) where torch must see it (a compiled step, or a dispatch mode such as fake tensors active);
    otherwise the op's kernel itself, as the dispatcher would call it, without the cost of passing every tensor of the
    lists through the dispatcher; in Triton's interpreter (CPU tensors) its Triton launcher."""
    if backend == "triton" and device.type == "cpu":
        return library.triton_kernel(name)
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return getattr(torch.ops.fastopt, name)
    if backend == "cpu":
        return library.cpu_kernel(name)
    return library.triton_kernel(name)


def fused_step(name: str, backend: str, params, grads, exp_avgs, exp_avg_sqs, counters: list[list[torch.Tensor]],
               hp: torch.Tensor, *, full: list[list[torch.Tensor]] = (),
               per_tensor: dict[str, torch.Tensor | None] | None = None, kernel=None, host: int | None = None,
               **options) -> None:
    """Runs the fused step op ``name`` (``step_kernel``) once per storage format among the tensors: float moments
    (bits 0), or 4-/8-bit codes, scales and the two maps. After the moments the op takes ``full`` (per-tensor lists of
    the params' size: amsgrad's max_exp_avg_sqs) and then ``counters`` (0-d per-tensor lists). Params, grads, float
    moments and ``full`` may be views and go through contiguous copies; codes, scales and 0-d counters go as they
    are (the optimizer's own flat state, and 0-d tensors are contiguous). ``per_tensor``: tensor options whose rows
    are the tensors' (e.g. grad_stats), passed to each call with its tensors' rows; None values are left out.
    ``kernel``: call this instead (a launcher given options that no op schema holds, e.g. a collective). ``host``:
    the id (library.register_host) of a caller that steps the same tensors with their ``.grad`` at every call (an
    optimizer's step plan), under which the op's kernel keeps what it checked (fastopt/kernels/checks.py ``Kept``): the
    kernel called directly is given its Kept (library.kept), the torch.library op the id."""
    op = kernel or step_kernel(name, backend, params[0].device)
    direct = op is (library.cpu_kernel(name) if backend == "cpu" else library.triton_kernel(name))
    rows = {k: v for k, v in (per_tensor or {}).items() if v is not None}
    for idx, bits in by_storage(exp_avgs):
        every = len(idx) == len(params)
        pick = lambda xs: xs if every else [xs[i] for i in idx] if xs else []  # noqa: E731
        ps, ms, vs, cs = pick(params), pick(exp_avgs), pick(exp_avg_sqs), [pick(c) for c in counters]
        if host is not None and direct:
            uncopied = {"kept": library.kept(host, name, backend, ps)}
        elif host is not None and op is getattr(torch.ops.fastopt, name):
            uncopied = {"host": host}
        else:  # a caller that does not step the same tensors again (no host): nothing to keep
            uncopied = {}
        options.update({k: v[idx].contiguous() for k, v in rows.items()})
        if bits:
            maps = [ms[0].fmt.table(ms[0].codes.device), vs[0].fmt.table(vs[0].codes.device)]
            quantized = [[m.codes for m in ms], [v.codes for v in vs], [m.scales for m in ms], [v.scales for v in vs]]
            run_contiguous(lambda ps, *rest, **kw: op(ps, rest[-1], *quantized, *rest[:-1], *cs, *maps, bits, hp,
                                                      **options, **kw),
                           [ps, *[pick(f) for f in full]], [pick(grads)], **uncopied)
        else:
            run_contiguous(lambda ps, m, v, *rest, **kw: op(ps, rest[-1], m, v, [], [], *rest[:-1], *cs, None, None, 0,
                                                            hp, **options, **kw),
                           [ps, ms, vs, *[pick(f) for f in full]], [pick(grads)], **uncopied)
