"""The checks of a fused step op's tensors, which both of its kernels run before anything changes: the CPU kernel
(fastopt/ops/cpu.py, before the C++ kernels) and the Triton launchers (fastopt/kernels/triton/, before a launch).
Neither kernel could tell a wrong tensor from a right one once running: it would read or write past its end.

The checks run over whole lists first (``map`` over each list, no Python step per tensor); only when one fails are
the tensors looked at one by one, to name the first bad one. The errors are RuntimeErrors naming the op, the
argument and the tensor's index, as torch's own ops raise.
"""
from __future__ import annotations

import itertools
import operator
import weakref

import torch

from fastopt.quant.formats import FORMATS

KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # and the C ABI's FASTOPT_F32, _BF16, _F16
BLOCKS = {bits: FORMATS[(bits, True)].block for bits in (4, 8)}  # elements per scale

HP_LAYOUTS = {  # each step op's ``hp``: its hyperparameters in this order (fastopt/ops/library.py)
    "adam_step": ("lr", "beta1", "beta2", "eps", "weight_decay"),
    "stable_spam_step": ("lr", "beta1", "beta2", "eps", "weight_decay", "gamma1", "gamma2", "gamma3", "scale", "reset"),
    "spam_step": ("lr", "beta1", "beta2", "eps", "weight_decay", "threshold", "scale", "reset", "clip"),
}

# Per-tensor attributes read over whole lists.
_numel, _dtype, _device, _is_cpu = torch.Tensor.numel, *map(operator.attrgetter, ("dtype", "device", "is_cpu"))
_contiguous, _data_ptr = torch.Tensor.is_contiguous, torch.Tensor.data_ptr


def check(ok: bool, op: str, message: str) -> None:
    if not ok:
        raise RuntimeError(f"fastopt.{op}: {message}")


def dtype_code(t: torch.Tensor, op: str, what: str) -> int:
    code = KERNEL_DTYPES.get(t.dtype)
    check(code is not None, op, f"{what} must be float32, bfloat16 or float16, got {t.dtype}")
    return code


def _kind(device: torch.device) -> str:
    """How the messages name ``device``'s tensors: "CPU", or the device ("cuda:0")."""
    return "CPU" if device.type == "cpu" else str(device)


def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.is_cpu if device.type == "cpu" else t.device == device


def _all_on(device: torch.device, *lists, contiguous: bool = True) -> bool:
    """Whether every tensor of ``lists`` is on ``device`` (and contiguous)."""
    if device.type == "cpu":
        placed = all(all(map(_is_cpu, xs)) for xs in lists)
    else:
        placed = all(set(map(_device, xs)) <= {device} for xs in lists)
    return placed and (not contiguous or all(all(map(_contiguous, xs)) for xs in lists))


def check_bits(bits: int, op: str) -> None:
    check(bits in (4, 8), op, f"bits must be 4 or 8, got {bits}")


def hyperparameters(hp: torch.Tensor, op: str, device: torch.device) -> None:
    """``hp``: the op's hyperparameters, a contiguous float64 tensor of its layout's length, on the CPU or on
    ``device`` (the C++ kernels read it on the CPU; the Triton kernels read it on their device, uploading a CPU one)."""
    layout = HP_LAYOUTS[op]
    count = len(layout)
    place = "CPU" if device.type == "cpu" else f"CPU or {device}"
    check((hp.is_cpu or hp.device == device) and hp.dtype == torch.float64 and hp.dim() == 1 and hp.numel() == count
          and hp.is_contiguous(), op, f"hp must be a contiguous float64 {place} tensor of {count} values "
          f"({', '.join(layout)}), got {hp.dtype} of shape {tuple(hp.shape)} on {hp.device}")


def check_map(table: torch.Tensor | None, bits: int, op: str, what: str, device: torch.device) -> None:
    check(table is not None, op, "quantized moments need exp_avg_map and exp_avg_sq_map")
    check(_on(table, device) and table.is_contiguous() and table.dtype == torch.float32 and table.numel() == 1 << bits,
          op, f"{what} must be a contiguous float32 {_kind(device)} tensor of {1 << bits} entries")


def check_codec_input(x: torch.Tensor, op: str, device: torch.device) -> None:
    """The values a codec quantizes: float32, on ``device`` (any shape and strides: the codec flattens a copy)."""
    check(_on(x, device) and x.dtype == torch.float32, op,
          f"x must be a float32 {_kind(device)} tensor, got {x.dtype} on {x.device}")


def check_quantized(codes: torch.Tensor, scales: torch.Tensor, n: int, bits: int, op: str, what: str, i: int,
                    device: torch.device) -> None:
    blocks = -(-n // BLOCKS[bits])
    nbytes = blocks * BLOCKS[bits] * bits // 8
    kind = _kind(device)
    check(_on(codes, device) and codes.is_contiguous() and codes.dtype == torch.uint8 and codes.numel() == nbytes, op,
          f"{what}_codes[{i}] must be a contiguous uint8 {kind} tensor of {nbytes} bytes for {n} elements at {bits} "
          "bits")
    check(_on(scales, device) and scales.is_contiguous() and scales.dtype == torch.float32 and scales.numel() == blocks,
          op, f"{what}_scales[{i}] must be a contiguous float32 {kind} tensor of {blocks} blocks")


def _check_like(p: torch.Tensor, t: torch.Tensor, op: str, what: str, i: int, device: torch.device) -> None:
    check(_on(t, device), op, f"{what}[{i}] must be on {'the CPU' if device.type == 'cpu' else device}")
    check(t.numel() == p.numel(), op, f"{what}[{i}] has {t.numel()} elements, params[{i}] has {p.numel()}")
    check(t.is_contiguous(), op, f"{what}[{i}] must be contiguous")


def step_tensors(op: str, device: torch.device, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales,
                 exp_avg_sq_scales, exp_avg_map, exp_avg_sq_map, bits: int, counters: dict[str, list],
                 max_exp_avg_sqs=()) -> tuple[list[int], list[int], list[int]]:
    """Checks every tensor of one step op call on ``device``: params (float32, bfloat16 or float16) and grads of their
    dtype; float moments (one dtype per tensor for its moments) or 4-/8-bit codes and scales sized for the param; the
    maps; the one-element float32 counters (``counters``: name -> list); all contiguous, on ``device``. Returns each
    param's element count and the dtype codes (KERNEL_DTYPES) of the params and of their float moments (0 for
    quantized ones)."""
    n = len(params)
    check(bits in (0, 4, 8), op, f"bits must be 0 (float moments), 4 or 8, got {bits}")
    check(not max_exp_avg_sqs or bits == 0, op,
          f"max_exp_avg_sqs (amsgrad) needs float moments (bits 0), got bits {bits}")
    lists = [grads, exp_avgs, exp_avg_sqs, *counters.values()] + ([exp_avg_scales, exp_avg_sq_scales] if bits else [])
    lists += [max_exp_avg_sqs] if max_exp_avg_sqs else []
    check(all(len(xs) == n for xs in lists), op, "all tensor lists must have the same length")
    if bits:
        check_map(exp_avg_map, bits, op, "exp_avg_map", device)
        check_map(exp_avg_sq_map, bits, op, "exp_avg_sq_map", device)
    numels = list(map(_numel, params))
    param_types = list(map(_dtype, params))
    state_types = [] if bits else list(map(_dtype, exp_avgs))
    param_dtypes = list(map(KERNEL_DTYPES.get, param_types))
    state_dtypes = [0] * n if bits else list(map(KERNEL_DTYPES.get, state_types))
    like_params = [grads] if bits else [grads, exp_avgs, exp_avg_sqs, *([max_exp_avg_sqs] if max_exp_avg_sqs else [])]
    counter_lists = [xs for xs in counters.values() if xs]
    ok = (None not in param_dtypes and None not in state_dtypes
          and _all_on(device, params, *like_params)
          and all(list(map(_numel, xs)) == numels for xs in like_params)
          and list(map(_dtype, grads)) == param_types
          and _all_on(device, *counter_lists, contiguous=False)  # one element: contiguous whatever its strides
          and all(set(map(_dtype, xs)) == {torch.float32} and set(map(_numel, xs)) == {1} for xs in counter_lists))
    if ok and bits:
        block = BLOCKS[bits]
        blocks = [-(-k // block) for k in numels]
        nbytes = [b * block * bits // 8 for b in blocks]
        ok = (_all_on(device, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales)
              and set(map(_dtype, exp_avgs)) | set(map(_dtype, exp_avg_sqs)) <= {torch.uint8}
              and set(map(_dtype, exp_avg_scales)) | set(map(_dtype, exp_avg_sq_scales)) <= {torch.float32}
              and list(map(_numel, exp_avgs)) == nbytes and list(map(_numel, exp_avg_sqs)) == nbytes
              and list(map(_numel, exp_avg_scales)) == blocks and list(map(_numel, exp_avg_sq_scales)) == blocks)
    elif ok:
        ok = all(list(map(_dtype, xs)) == state_types for xs in like_params[2:])
    if not ok:
        _explain(op, device, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, bits, counters,
                 max_exp_avg_sqs)
    return numels, param_dtypes, state_dtypes


def _explain(op: str, device: torch.device, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
             bits: int, counters: dict[str, list], max_exp_avg_sqs) -> None:
    """The checks of ``step_tensors`` tensor by tensor: raises for the first tensor that fails one, naming it."""
    kind = _kind(device)
    for i, p in enumerate(params):
        check(_on(p, device) and p.is_contiguous(), op, f"params[{i}] must be a contiguous {kind} tensor")
        dtype_code(p, op, "params")
        _check_like(p, grads[i], op, "grads", i, device)
        check(grads[i].dtype == p.dtype, op, f"grads[{i}] dtype differs from params[{i}]")
        if bits:
            check_quantized(exp_avgs[i], exp_avg_scales[i], p.numel(), bits, op, "exp_avg", i, device)
            check_quantized(exp_avg_sqs[i], exp_avg_sq_scales[i], p.numel(), bits, op, "exp_avg_sq", i, device)
        else:
            m = exp_avgs[i]
            _check_like(p, m, op, "exp_avgs", i, device)
            _check_like(p, exp_avg_sqs[i], op, "exp_avg_sqs", i, device)
            dtype_code(m, op, "exp_avgs")
            check(exp_avg_sqs[i].dtype == m.dtype, op, f"exp_avg_sqs[{i}] dtype differs from exp_avgs[{i}]")
            if max_exp_avg_sqs:
                _check_like(p, max_exp_avg_sqs[i], op, "max_exp_avg_sqs", i, device)
                check(max_exp_avg_sqs[i].dtype == m.dtype, op, f"max_exp_avg_sqs[{i}] dtype differs from exp_avgs[{i}]")
        for what, xs in counters.items():
            c = xs[i]
            check(_on(c, device) and c.dtype == torch.float32 and c.numel() == 1, op,
                  f"{what}[{i}] must be a float32 {kind} scalar tensor")


def checked_once(kept: Kept | None, build, op: str, device: torch.device, params, grads, exp_avgs, exp_avg_sqs,
                 exp_avg_scales, exp_avg_sq_scales, exp_avg_map, exp_avg_sq_map, bits: int, counters: dict[str, list],
                 max_exp_avg_sqs=()):
    """``build(step_tensors(...))``: what a kernel makes of one step op call's tensors once they are checked (C++: its
    pointer arrays; Triton: its launch groups). With ``kept`` (an optimizer's, or None): the value it kept when it
    holds for these tensors, which then checks only the grads; else the value just built, which it keeps."""
    inputs = (params, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, max_exp_avg_sqs, *counters.values(),
              exp_avg_map, exp_avg_sq_map, bits)
    if kept is not None and kept.holds(inputs, grads):
        return kept.value
    checked = step_tensors(op, device, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                           exp_avg_map, exp_avg_sq_map, bits, counters, max_exp_avg_sqs)
    value = build(checked)
    if kept is not None:
        kept.keep(inputs, len(params), value)
    return value


class Kept:
    """What a kernel keeps between calls that step the same tensors, so that such a call checks only what changes
    from one step to the next: the grads. An optimizer's store holds one per op call of its steps, eager or compiled
    (fastopt/ops/library.py ``kept``); the kernels take it as ``kept`` and pass it to ``checked_once``.

    ``holds`` is true when every input of the call but the grads is the object it was when ``keep`` was called (lists
    compared entry by entry, by identity, as torch.compile guards an optimizer's params and states; other values by
    value) at the same data pointer, with the same dtype, element count and contiguity (``t.data = ...`` swaps what a
    tensor object is, as helpers that move an optimizer's state to a device do, and the new data may sit where the
    old was), and the grads have the params' element counts, dtypes and device and are contiguous. What it does not
    read again is what only in-place changes of sizes or strides that keep the element count and contiguity
    (``resize_`` within the storage, ``as_strided_``) could change, which a flat kernel does not see. ``value`` is
    what the kernel made of the checked inputs (C++: its pointer arrays; Triton: its launch groups).

    Identity is compared by ``id``, which is only sound while the objects live: a Kept refers to its tensors weakly
    (it must not keep them alive: a compiler may hand the op copies) and no longer holds once one of them is gone."""

    def __init__(self):
        self.value = None
        self._layout: tuple | None = None  # nothing kept yet
        self._lost = False

    def holds(self, inputs: tuple, grads: list) -> bool:
        if self._lost or _layout(inputs) != self._layout:
            return False
        tensors = list(_tensors(inputs))
        return (list(map(id, tensors)) == self._ids and list(map(_data_ptr, tensors)) == self._pointers
                and list(map(_dtype, tensors)) == self._tensor_dtypes
                and list(map(_numel, tensors)) == self._tensor_numels
                and list(map(_contiguous, tensors)) == self._tensor_contiguity
                and len(grads) == len(self._numels) and list(map(_numel, grads)) == self._numels
                and list(map(_dtype, grads)) == self._dtypes
                and set(map(_device, grads)) == self._device and all(map(_contiguous, grads)))

    def keep(self, inputs: tuple, n_params: int, value) -> None:
        """Notes ``inputs`` (which the kernel has just checked; its first list holds the ``n_params`` params, which the
        grads must match) and ``value``."""
        tensors = list(_tensors(inputs))
        self._held = [weakref.ref(t, self._lose) for t in tensors]
        self._lost = False
        self._layout, self._ids, self._pointers = _layout(inputs), list(map(id, tensors)), list(map(_data_ptr, tensors))
        self._tensor_dtypes, self._tensor_numels = list(map(_dtype, tensors)), list(map(_numel, tensors))
        self._tensor_contiguity = list(map(_contiguous, tensors))
        self._numels, self._dtypes = self._tensor_numels[:n_params], self._tensor_dtypes[:n_params]
        self._device = set(map(_device, tensors[:n_params]))
        self.value = value

    def _lose(self, _) -> None:  # a kept tensor is gone: its id may be another object's now
        self._lost = True


def _tensors(inputs: tuple):
    """Every tensor among ``inputs`` (in lists, or alone), in order."""
    return itertools.chain.from_iterable(x if isinstance(x, (list, tuple)) else (x,) for x in inputs
                                         if isinstance(x, (list, tuple, torch.Tensor)))


def _layout(inputs: tuple) -> tuple:
    """What ``_tensors`` does not tell apart: each list's length, where a tensor stands alone, the other values."""
    return tuple((len(x),) if isinstance(x, (list, tuple)) else torch.Tensor if isinstance(x, torch.Tensor) else x
                 for x in inputs)
