"""The CPU implementations of the fastopt ops: every argument is checked before anything changes (the step ops' tensors
by fastopt/kernels/checks.py, which the Triton launchers share), and then one call of the C++ kernels' C ABI
(csrc/fastopt.h, loaded by fastopt/_ext.py) does the work. fastopt/ops/library.py
registers these as the ops' CPU kernels at import; under torch.compile the dispatcher calls them like any op.

The errors name the op, the argument and the tensor's index; they are RuntimeErrors, as torch's own ops raise.
"""
from __future__ import annotations

import ctypes
from array import array

import torch

from fastopt import _ext
from fastopt.kernels import checks
from fastopt.kernels.checks import BLOCKS, check as _check, check_bits, check_map, check_quantized, dtype_code

_CPU = torch.device("cpu")


def _array(ctype, code: str, values: list[int]) -> ctypes.Array:
    """``values`` as a ctypes array of ``ctype``. ctypes' own constructor converts each value separately; for long
    lists an array.array (typecode ``code``) shared with ctypes costs a third of that (the ctypes array keeps it
    alive), for short ones a little more."""
    if len(values) < 32:
        return (ctype * len(values))(*values)
    return (ctype * len(values)).from_buffer(array(code, values))


def _pointers(tensors) -> ctypes.Array:
    return _array(ctypes.c_void_p, "q", list(map(torch.Tensor.data_ptr, tensors)))


def _hyperparameters(hp: torch.Tensor, op: str) -> int:
    checks.hyperparameters(hp, op, _CPU)
    return hp.data_ptr()


def _moments(op: str, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, exp_avg_map,
             exp_avg_sq_map, bits: int, counters: dict[str, list], max_exp_avg_sqs=(),
             kept: checks.Kept | None = None) -> tuple[_ext.Moments, list[ctypes.Array]]:
    """Checks one step op's tensors (``checks.step_tensors``: every one, before anything changes) and returns the C
    ABI's fastopt_moments for them (ctypes keeps the arrays it points into alive as long as it lives) and the
    counters' pointer arrays. With ``kept`` holding (``checks.checked_once``), only the grads' pointers are read."""
    def build(checked) -> tuple[list, list[ctypes.Array]]:
        numels, param_dtypes, state_dtypes = checked
        arrays = [_array(ctypes.c_int64, "q", numels), _array(ctypes.c_int32, "i", param_dtypes),
                  _array(ctypes.c_int32, "i", state_dtypes), _pointers(params), None, _pointers(exp_avgs),
                  _pointers(exp_avg_sqs)]
        arrays += [_pointers(exp_avg_scales), _pointers(exp_avg_sq_scales)] if bits else [None, None]
        arrays.append(_pointers(max_exp_avg_sqs) if max_exp_avg_sqs else None)
        return arrays, [_pointers(xs) for xs in counters.values()]

    arrays, counter_arrays = checks.checked_once(kept, build, op, _CPU, params, grads, exp_avgs, exp_avg_sqs,
                                                 exp_avg_scales, exp_avg_sq_scales, exp_avg_map, exp_avg_sq_map, bits,
                                                 counters, max_exp_avg_sqs)
    arrays = [*arrays[:_GRADS], _pointers(grads), *arrays[_GRADS + 1:]]
    moments = _ext.Moments(len(params), *[ctypes.cast(a, f[1]) if a is not None else None
                                          for a, f in zip(arrays, _ext.Moments._fields_[1:11])], bits,
                           exp_avg_map.data_ptr() if bits else None, exp_avg_sq_map.data_ptr() if bits else None)
    return moments, counter_arrays


_GRADS = 4  # the grads' pointers among fastopt_moments' arrays


def _amp(grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> tuple[float, bool]:
    """(1 / GradScaler's scale, whether GradScaler found inf/NaN and the step is skipped): CPU tensors, read here."""
    grad_mul = 1.0 / grad_scale.item() if grad_scale is not None else 1.0
    return grad_mul, found_inf is not None and found_inf.item() != 0


def _call(function, *args) -> None:
    if function(*args) != 0:
        raise RuntimeError(f"fastopt: the C++ kernels failed: {_ext.library().fastopt_last_error().decode()}")


def adam_step(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, max_exp_avg_sqs, steps,
              exp_avg_map, exp_avg_sq_map, bits, hp, *, decoupled, maximize, independent_decay, grad_scale=None,
              found_inf=None, kept=None) -> None:
    op = "adam_step"
    hp_ptr = _hyperparameters(hp, op)
    moments, (step_ptrs,) = _moments(op, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                                     exp_avg_map, exp_avg_sq_map, bits, {"steps": steps}, max_exp_avg_sqs, kept)
    grad_mul, skip = _amp(grad_scale, found_inf)
    if skip:
        return
    _call(_ext.library().fastopt_adam_step, moments, step_ptrs, hp_ptr, decoupled, maximize, independent_decay,
          grad_mul, torch.get_num_threads())


def stable_spam_step(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, steps, stats_steps,
                     m_norms, v_norms, m_maxes, exp_avg_map, exp_avg_sq_map, bits, hp, *, official, grad_stats=None,
                     grad_scale=None, found_inf=None, kept=None) -> None:
    op = "stable_spam_step"
    hp_ptr = _hyperparameters(hp, op)
    counters = {"steps": steps, "stats_steps": stats_steps, "m_norms": m_norms, "v_norms": v_norms, "m_maxes": m_maxes}
    moments, counter_ptrs = _moments(op, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                                     exp_avg_map, exp_avg_sq_map, bits, counters, kept=kept)
    if grad_stats is not None:
        _check(grad_stats.device.type == "cpu" and grad_stats.dtype == torch.float64 and grad_stats.dim() == 2
               and tuple(grad_stats.shape) == (len(params), 2) and grad_stats.is_contiguous(), op,
               f"grad_stats must be a contiguous float64 CPU tensor of shape ({len(params)}, 2), got {grad_stats.dtype} "
               f"of shape {tuple(grad_stats.shape)}")
    grad_mul, skip = _amp(grad_scale, found_inf)
    if skip:
        return
    _call(_ext.library().fastopt_stable_spam_step, moments, *counter_ptrs, hp_ptr,
          official, grad_mul, grad_stats.data_ptr() if grad_stats is not None else None, torch.get_num_threads())


def spam_step(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, steps, exp_avg_map,
              exp_avg_sq_map, bits, hp, *, grad_scale=None, found_inf=None, kept=None) -> None:
    op = "spam_step"
    hp_ptr = _hyperparameters(hp, op)
    moments, (step_ptrs,) = _moments(op, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                                     exp_avg_map, exp_avg_sq_map, bits, {"steps": steps}, kept=kept)
    grad_mul, skip = _amp(grad_scale, found_inf)
    if skip:
        return
    _call(_ext.library().fastopt_spam_step, moments, step_ptrs, hp_ptr, grad_mul, torch.get_num_threads())


def grad_stats(grads, clip, grad_scale) -> torch.Tensor:
    op, n = "grad_stats", len(grads)
    _check(clip is None or (clip.is_cpu and clip.is_contiguous() and clip.dtype == torch.float32
                            and tuple(clip.shape) == (n, 2)),
           op, f"clip must be a contiguous float32 CPU tensor of shape ({n}, 2)")
    dtypes = []
    for i, g in enumerate(grads):
        _check(g.is_cpu and g.is_contiguous(), op, f"grads[{i}] must be a contiguous CPU tensor")
        dtypes.append(dtype_code(g, op, "grads"))
    out = torch.empty(n, 2, dtype=torch.float64)
    grad_mul, _ = _amp(grad_scale, None)
    numels = _array(ctypes.c_int64, "q", list(map(torch.Tensor.numel, grads)))
    _call(_ext.library().fastopt_grad_stats, n, _pointers(grads), numels, _array(ctypes.c_int32, "i", dtypes),
          clip.data_ptr() if clip is not None else None, grad_mul, out.data_ptr(), torch.get_num_threads())
    return out


def quantize_blockwise(x: torch.Tensor, table: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    op = "quantize_blockwise"
    check_bits(bits, op)
    check_map(table, bits, op, "map", _CPU)
    checks.check_codec_input(x, op, _CPU)
    flat = x.contiguous().view(-1)
    n, block = flat.numel(), BLOCKS[bits]
    blocks = -(-n // block)
    codes = torch.empty(blocks * block * bits // 8, dtype=torch.uint8)
    scales = torch.empty(blocks, dtype=torch.float32)
    _call(_ext.library().fastopt_quantize_blockwise, flat.data_ptr(), n, table.data_ptr(), bits, codes.data_ptr(),
          scales.data_ptr())
    return codes, scales


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, bits: int,
                         n: int) -> torch.Tensor:
    op = "dequantize_blockwise"
    check_bits(bits, op)
    check_map(table, bits, op, "map", _CPU)
    check_quantized(codes, scales, n, bits, op, "x", 0, _CPU)
    out = torch.empty(n, dtype=torch.float32)
    _call(_ext.library().fastopt_dequantize_blockwise, codes.data_ptr(), scales.data_ptr(), n, table.data_ptr(), bits,
          out.data_ptr())
    return out


KERNELS = {"adam_step": adam_step, "stable_spam_step": stable_spam_step, "spam_step": spam_step,
           "grad_stats": grad_stats, "quantize_blockwise": quantize_blockwise,
           "dequantize_blockwise": dequantize_blockwise}
