"""The CPU implementations of the fastopt ops: every argument is checked here, before anything changes, and then one
call of the C++ kernels' C ABI (csrc/fastopt.h, loaded by fastopt/_ext.py) does the work. fastopt/ops/library.py
registers these as the ops' CPU kernels at import; under torch.compile the dispatcher calls them like any op.

The errors name the op, the argument and the tensor's index; they are RuntimeErrors, as torch's own ops raise.
"""
from __future__ import annotations

import ctypes
import operator
from array import array

import torch

from fastopt import _ext

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the C ABI's FASTOPT_F32, _BF16, _F16
_BLOCKS = {4: 128, 8: 256}  # elements per scale (fastopt/quant/formats.py)
_HP_NAMES = {  # the layouts of hp (library.HP_LAYOUTS), for messages
    "adam_step": "lr, beta1, beta2, eps, weight_decay",
    "stable_spam_step": "lr, beta1, beta2, eps, weight_decay, gamma1, gamma2, gamma3, scale, reset",
    "spam_step": "lr, beta1, beta2, eps, weight_decay, threshold, scale, reset, clip",
}


def _check(ok: bool, op: str, message: str) -> None:
    if not ok:
        raise RuntimeError(f"fastopt.{op}: {message}")


def _dtype_code(t: torch.Tensor, op: str, what: str) -> int:
    code = _DTYPES.get(t.dtype)
    _check(code is not None, op, f"{what} must be float32, bfloat16 or float16, got {t.dtype}")
    return code


def _on_cpu_contiguous(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.is_contiguous()


def _array(ctype, code: str, values: list[int]) -> ctypes.Array:
    """``values`` as a ctypes array of ``ctype``. ctypes' own constructor converts each value separately; for long
    lists an array.array (typecode ``code``) shared with ctypes costs a third of that (the ctypes array keeps it
    alive), for short ones a little more."""
    if len(values) < 32:
        return (ctype * len(values))(*values)
    return (ctype * len(values)).from_buffer(array(code, values))


def _pointers(tensors) -> ctypes.Array:
    return _array(ctypes.c_void_p, "q", list(map(torch.Tensor.data_ptr, tensors)))


# Per-tensor attributes read over whole lists (map runs them without a Python frame per tensor).
_numel, _dtype, _is_cpu = torch.Tensor.numel, operator.attrgetter("dtype"), operator.attrgetter("is_cpu")


def _all_cpu(tensors) -> bool:
    return all(map(_is_cpu, tensors))


def _all_cpu_contiguous(*lists) -> bool:
    return all(_all_cpu(xs) and all(map(torch.Tensor.is_contiguous, xs)) for xs in lists)


def _hyperparameters(hp: torch.Tensor, op: str) -> int:
    count = len(_HP_NAMES[op].split(", "))
    _check(hp.device.type == "cpu" and hp.dtype == torch.float64 and hp.dim() == 1 and hp.numel() == count
           and hp.is_contiguous(), op, f"hp must be a contiguous float64 CPU tensor of {count} values "
           f"({_HP_NAMES[op]}), got {hp.dtype} of shape {tuple(hp.shape)} on {hp.device}")
    return hp.data_ptr()


def _check_map(table: torch.Tensor | None, bits: int, op: str, what: str) -> None:
    _check(table is not None, op, "quantized moments need exp_avg_map and exp_avg_sq_map")
    _check(_on_cpu_contiguous(table) and table.dtype == torch.float32 and table.numel() == 1 << bits, op,
           f"{what} must be a contiguous float32 CPU tensor of {1 << bits} entries")


def _check_quantized(codes: torch.Tensor, scales: torch.Tensor, n: int, bits: int, op: str, what: str, i: int) -> None:
    blocks = -(-n // _BLOCKS[bits])
    nbytes = blocks * _BLOCKS[bits] * bits // 8
    _check(_on_cpu_contiguous(codes) and codes.dtype == torch.uint8 and codes.numel() == nbytes, op,
           f"{what}_codes[{i}] must be a contiguous uint8 CPU tensor of {nbytes} bytes for {n} elements at {bits} bits")
    _check(_on_cpu_contiguous(scales) and scales.dtype == torch.float32 and scales.numel() == blocks, op,
           f"{what}_scales[{i}] must be a contiguous float32 CPU tensor of {blocks} blocks")


def _check_like(p: torch.Tensor, t: torch.Tensor, op: str, what: str, i: int) -> None:
    _check(t.device.type == "cpu", op, f"{what}[{i}] must be on the CPU")
    _check(t.numel() == p.numel(), op, f"{what}[{i}] has {t.numel()} elements, params[{i}] has {p.numel()}")
    _check(t.is_contiguous(), op, f"{what}[{i}] must be contiguous")


def _moments(op: str, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, exp_avg_map,
             exp_avg_sq_map, bits: int, counters: dict[str, list], max_exp_avg_sqs=()) -> _ext.Moments:
    """Checks one step op's tensors (every one, before anything changes) and returns the C ABI's fastopt_moments for
    them (ctypes keeps the arrays it points into alive as long as it lives). The checks run over whole lists first;
    only when one fails does ``_explain`` look at the tensors one by one, to name the first bad one."""
    n = len(params)
    _check(bits in (0, 4, 8), op, f"bits must be 0 (float moments), 4 or 8, got {bits}")
    _check(not max_exp_avg_sqs or bits == 0, op, f"max_exp_avg_sqs (amsgrad) needs float moments (bits 0), got bits {bits}")
    lists = [grads, exp_avgs, exp_avg_sqs, *counters.values()] + ([exp_avg_scales, exp_avg_sq_scales] if bits else [])
    lists += [max_exp_avg_sqs] if max_exp_avg_sqs else []
    _check(all(len(xs) == n for xs in lists), op, "all tensor lists must have the same length")
    if bits:
        _check_map(exp_avg_map, bits, op, "exp_avg_map")
        _check_map(exp_avg_sq_map, bits, op, "exp_avg_sq_map")
    numels = list(map(_numel, params))
    param_types = list(map(_dtype, params))
    state_types = [] if bits else list(map(_dtype, exp_avgs))
    param_dtypes = list(map(_DTYPES.get, param_types))
    state_dtypes = [0] * n if bits else list(map(_DTYPES.get, state_types))
    like_params = [grads] if bits else [grads, exp_avgs, exp_avg_sqs, *([max_exp_avg_sqs] if max_exp_avg_sqs else [])]
    ok = (None not in param_dtypes and None not in state_dtypes
          and _all_cpu_contiguous(params, *like_params)
          and all(list(map(_numel, xs)) == numels for xs in like_params)
          and list(map(_dtype, grads)) == param_types
          and all(_all_cpu(xs) and set(map(_dtype, xs)) == {torch.float32} and set(map(_numel, xs)) == {1}
                  for xs in counters.values() if xs))
    if ok and bits:
        block = _BLOCKS[bits]
        blocks = [-(-k // block) for k in numels]
        nbytes = [b * block * bits // 8 for b in blocks]
        ok = (_all_cpu_contiguous(exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales)
              and set(map(_dtype, exp_avgs)) | set(map(_dtype, exp_avg_sqs)) <= {torch.uint8}
              and set(map(_dtype, exp_avg_scales)) | set(map(_dtype, exp_avg_sq_scales)) <= {torch.float32}
              and list(map(_numel, exp_avgs)) == nbytes and list(map(_numel, exp_avg_sqs)) == nbytes
              and list(map(_numel, exp_avg_scales)) == blocks and list(map(_numel, exp_avg_sq_scales)) == blocks)
    elif ok:
        ok = all(list(map(_dtype, xs)) == state_types for xs in like_params[2:])
    if not ok:
        _explain(op, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, bits, counters,
                 max_exp_avg_sqs)
    arrays = [_array(ctypes.c_int64, "q", numels), _array(ctypes.c_int32, "i", param_dtypes),
              _array(ctypes.c_int32, "i", state_dtypes),
              _pointers(params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs)]
    arrays += [_pointers(exp_avg_scales), _pointers(exp_avg_sq_scales)] if bits else [None, None]
    arrays.append(_pointers(max_exp_avg_sqs) if max_exp_avg_sqs else None)
    return _ext.Moments(n, *[ctypes.cast(a, f[1]) if a is not None else None
                             for a, f in zip(arrays, _ext.Moments._fields_[1:11])], bits,
                        exp_avg_map.data_ptr() if bits else None, exp_avg_sq_map.data_ptr() if bits else None)


def _explain(op: str, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, bits: int,
             counters: dict[str, list], max_exp_avg_sqs) -> None:
    """The checks of ``_moments`` tensor by tensor: raises for the first tensor that fails one, naming it."""
    for i, p in enumerate(params):
        _check(_on_cpu_contiguous(p), op, f"params[{i}] must be a contiguous CPU tensor")
        _dtype_code(p, op, "params")
        _check_like(p, grads[i], op, "grads", i)
        _check(grads[i].dtype == p.dtype, op, f"grads[{i}] dtype differs from params[{i}]")
        if bits:
            _check_quantized(exp_avgs[i], exp_avg_scales[i], p.numel(), bits, op, "exp_avg", i)
            _check_quantized(exp_avg_sqs[i], exp_avg_sq_scales[i], p.numel(), bits, op, "exp_avg_sq", i)
        else:
            m = exp_avgs[i]
            _check_like(p, m, op, "exp_avgs", i)
            _check_like(p, exp_avg_sqs[i], op, "exp_avg_sqs", i)
            _dtype_code(m, op, "exp_avgs")
            _check(exp_avg_sqs[i].dtype == m.dtype, op, f"exp_avg_sqs[{i}] dtype differs from exp_avgs[{i}]")
            if max_exp_avg_sqs:
                _check_like(p, max_exp_avg_sqs[i], op, "max_exp_avg_sqs", i)
                _check(max_exp_avg_sqs[i].dtype == m.dtype, op, f"max_exp_avg_sqs[{i}] dtype differs from exp_avgs[{i}]")
        for what, xs in counters.items():
            c = xs[i]
            _check(c.device.type == "cpu" and c.dtype == torch.float32 and c.numel() == 1, op,
                   f"{what}[{i}] must be a float32 CPU scalar tensor")


def _amp(grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> tuple[float, bool]:
    """(1 / GradScaler's scale, whether GradScaler found inf/NaN and the step is skipped): CPU tensors, read here."""
    grad_mul = 1.0 / grad_scale.item() if grad_scale is not None else 1.0
    return grad_mul, found_inf is not None and found_inf.item() != 0


def _call(function, *args) -> None:
    if function(*args) != 0:
        raise RuntimeError(f"fastopt: the C++ kernels failed: {_ext.library().fastopt_last_error().decode()}")


def adam_step(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, max_exp_avg_sqs, steps,
              exp_avg_map, exp_avg_sq_map, bits, hp, *, decoupled, maximize, independent_decay, grad_scale=None,
              found_inf=None) -> None:
    op = "adam_step"
    hp_ptr = _hyperparameters(hp, op)
    moments = _moments(op, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, exp_avg_map,
                             exp_avg_sq_map, bits, {"steps": steps}, max_exp_avg_sqs)
    grad_mul, skip = _amp(grad_scale, found_inf)
    if skip:
        return
    _call(_ext.library().fastopt_adam_step, moments, _pointers(steps), hp_ptr, decoupled, maximize, independent_decay,
          grad_mul, torch.get_num_threads())


def stable_spam_step(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, steps, stats_steps,
                     m_norms, v_norms, m_maxes, exp_avg_map, exp_avg_sq_map, bits, hp, *, official, grad_stats=None,
                     grad_scale=None, found_inf=None) -> None:
    op = "stable_spam_step"
    hp_ptr = _hyperparameters(hp, op)
    counters = {"steps": steps, "stats_steps": stats_steps, "m_norms": m_norms, "v_norms": v_norms, "m_maxes": m_maxes}
    moments = _moments(op, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, exp_avg_map,
                             exp_avg_sq_map, bits, counters)
    if grad_stats is not None:
        _check(grad_stats.device.type == "cpu" and grad_stats.dtype == torch.float64 and grad_stats.dim() == 2
               and tuple(grad_stats.shape) == (len(params), 2) and grad_stats.is_contiguous(), op,
               f"grad_stats must be a contiguous float64 CPU tensor of shape ({len(params)}, 2), got {grad_stats.dtype} "
               f"of shape {tuple(grad_stats.shape)}")
    grad_mul, skip = _amp(grad_scale, found_inf)
    if skip:
        return
    _call(_ext.library().fastopt_stable_spam_step, moments, *[_pointers(xs) for xs in counters.values()], hp_ptr,
          official, grad_mul, grad_stats.data_ptr() if grad_stats is not None else None, torch.get_num_threads())


def spam_step(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, steps, exp_avg_map,
              exp_avg_sq_map, bits, hp, *, grad_scale=None, found_inf=None) -> None:
    op = "spam_step"
    hp_ptr = _hyperparameters(hp, op)
    moments = _moments(op, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, exp_avg_map,
                             exp_avg_sq_map, bits, {"steps": steps})
    grad_mul, skip = _amp(grad_scale, found_inf)
    if skip:
        return
    _call(_ext.library().fastopt_spam_step, moments, _pointers(steps), hp_ptr, grad_mul, torch.get_num_threads())


def grad_stats(grads, clip, grad_scale) -> torch.Tensor:
    op, n = "grad_stats", len(grads)
    _check(clip is None or (_on_cpu_contiguous(clip) and clip.dtype == torch.float32 and tuple(clip.shape) == (n, 2)),
           op, f"clip must be a contiguous float32 CPU tensor of shape ({n}, 2)")
    dtypes = []
    for i, g in enumerate(grads):
        _check(_on_cpu_contiguous(g), op, f"grads[{i}] must be a contiguous CPU tensor")
        dtypes.append(_dtype_code(g, op, "grads"))
    out = torch.empty(n, 2, dtype=torch.float64)
    grad_mul, _ = _amp(grad_scale, None)
    _call(_ext.library().fastopt_grad_stats, n, _pointers(grads), _array(ctypes.c_int64, "q", list(map(_numel, grads))),
          _array(ctypes.c_int32, "i", dtypes), clip.data_ptr() if clip is not None else None, grad_mul, out.data_ptr(),
          torch.get_num_threads())
    return out


def _check_bits(bits: int, op: str) -> None:
    _check(bits in (4, 8), op, f"bits must be 4 or 8, got {bits}")


def quantize_blockwise(x: torch.Tensor, table: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    op = "quantize_blockwise"
    _check_bits(bits, op)
    _check_map(table, bits, op, "map")
    _check(x.device.type == "cpu" and x.dtype == torch.float32, op, "x must be a float32 CPU tensor")
    flat = x.contiguous().view(-1)
    n, block = flat.numel(), _BLOCKS[bits]
    blocks = -(-n // block)
    codes = torch.empty(blocks * block * bits // 8, dtype=torch.uint8)
    scales = torch.empty(blocks, dtype=torch.float32)
    _call(_ext.library().fastopt_quantize_blockwise, flat.data_ptr(), n, table.data_ptr(), bits, codes.data_ptr(),
          scales.data_ptr())
    return codes, scales


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, bits: int,
                         n: int) -> torch.Tensor:
    op = "dequantize_blockwise"
    _check_bits(bits, op)
    _check_map(table, bits, op, "map")
    _check_quantized(codes, scales, n, bits, op, "x", 0)
    out = torch.empty(n, dtype=torch.float32)
    _call(_ext.library().fastopt_dequantize_blockwise, codes.data_ptr(), scales.data_ptr(), n, table.data_ptr(), bits,
          out.data_ptr())
    return out


KERNELS = {"adam_step": adam_step, "stable_spam_step": stable_spam_step, "spam_step": spam_step,
           "grad_stats": grad_stats, "quantize_blockwise": quantize_blockwise,
           "dequantize_blockwise": dequantize_blockwise}
