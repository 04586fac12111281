"""Triton Adam/AdamW step: the kernel and its launcher (math: fastopt/ops/adam.py, ALGORITHMS.md §1).

Hyperparameters are runtime arguments (Triton does not specialize on float values), so schedules never
recompile; constexprs only select code. Bias corrections are computed in the kernel from the on-device
step count, in float64, so nothing is read back to the host. With GradScaler's ``found_inf`` set, steps
are incremented by 1 − found_inf and the kernel masks out every store: no host synchronization.

Bytes moved per parameter (the floor on any GPU): read p, g, m, v and write p, m, v —
fp32 params and states: 28; bf16 params and states: 14; bf16 params, fp32 states: 20; +2·state bytes with amsgrad.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastopt.kernels.triton._common import store_rounded

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def step_scalars(n, lr, lr_ptr, step_ptr, found_inf_ptr, log_beta1, log_beta2, LR_IS_TENSOR: tl.constexpr,
                 HAS_FOUND_INF: tl.constexpr):
    """(n, lr, bias_correction1, bias_correction2) for this step, read on the device: nothing reaches the host.
    GradScaler's found_inf turns n into 0 so the step touches nothing."""
    if HAS_FOUND_INF:
        n = tl.where(tl.load(found_inf_ptr) == 0, n, 0)
    if LR_IS_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float32)
    t = tl.load(step_ptr).to(tl.float64)
    bias_correction1 = (1.0 - tl.exp(t * log_beta1)).to(tl.float32)
    bias_correction2 = (1.0 - tl.exp(t * log_beta2)).to(tl.float32)
    return n, lr, bias_correction1, bias_correction2


@triton.jit
def adam_moments(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, weight_decay, grad_sign, grad_scale_ptr,
                 DECOUPLED: tl.constexpr, INDEPENDENT_DECAY: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """Weight decay and the new moments (fp32): returns (param, exp_avg, exp_avg_sq)."""
    grad = grad * grad_sign
    if HAS_GRAD_SCALE:
        grad = grad / tl.load(grad_scale_ptr).to(tl.float32)
    if DECOUPLED:
        if INDEPENDENT_DECAY:
            param = param * (1.0 - weight_decay)
        else:
            param = param * (1.0 - lr * weight_decay)
    else:
        grad = grad + weight_decay * param
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    return param, exp_avg, exp_avg_sq


@triton.jit
def adam_param(param, exp_avg, exp_avg_sq, lr, bias_correction1, bias_correction2, eps):
    denom = tl.sqrt(exp_avg_sq) / tl.sqrt(bias_correction2) + eps
    return param - (lr / bias_correction1) * exp_avg / denom


@triton.jit
def adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, step_ptr, lr_ptr, grad_scale_ptr, found_inf_ptr,
                n, lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, grad_sign,
                DECOUPLED: tl.constexpr, INDEPENDENT_DECAY: tl.constexpr, AMSGRAD: tl.constexpr,
                LR_IS_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                BLOCK: tl.constexpr):
    n, lr, bias_correction1, bias_correction2 = step_scalars(n, lr, lr_ptr, step_ptr, found_inf_ptr, log_beta1,
                                                             log_beta2, LR_IS_TENSOR, HAS_FOUND_INF)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    param, exp_avg, exp_avg_sq = adam_moments(
        tl.load(p_ptr + offs, mask=mask).to(tl.float32), tl.load(g_ptr + offs, mask=mask).to(tl.float32),
        tl.load(m_ptr + offs, mask=mask).to(tl.float32), tl.load(v_ptr + offs, mask=mask).to(tl.float32),
        lr, beta1, beta2, weight_decay, grad_sign, grad_scale_ptr, DECOUPLED, INDEPENDENT_DECAY, HAS_GRAD_SCALE)
    store_rounded(m_ptr + offs, exp_avg, mask)
    store_rounded(v_ptr + offs, exp_avg_sq, mask)
    if AMSGRAD:
        exp_avg_sq = tl.maximum(exp_avg_sq, tl.load(vmax_ptr + offs, mask=mask).to(tl.float32))
        store_rounded(vmax_ptr + offs, exp_avg_sq, mask)
    param = adam_param(param, exp_avg, exp_avg_sq, lr, bias_correction1, bias_correction2, eps)
    store_rounded(p_ptr + offs, param, mask)


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


def advance_steps(steps, found_inf):
    """steps += 1 − found_inf, on the device (torch's fused optimizers do the same); returns found_inf as fp32."""
    torch._foreach_add_(steps, 1)
    if found_inf is not None:
        found_inf = found_inf.to(device=steps[0].device, dtype=torch.float32)
        torch._foreach_sub_(steps, [found_inf] * len(steps))
    return found_inf


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
              weight_decay, decoupled, maximize, independent_decay=False, grad_scale=None, found_inf=None) -> None:
    """Launches one kernel per tensor (all on one device, contiguous). See fastopt.ops.adam.adam_step."""
    found_inf = advance_steps(steps, found_inf)
    lr_is_tensor = isinstance(lr, torch.Tensor)
    amsgrad = len(max_exp_avg_sqs) > 0
    for i, p in enumerate(params):
        n = p.numel()
        any_ptr = steps[i]  # stands in for the pointers a mode does not read
        adam_kernel[(triton.cdiv(n, BLOCK),)](
            p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else any_ptr, steps[i],
            lr if lr_is_tensor else any_ptr, any_ptr if grad_scale is None else grad_scale,
            any_ptr if found_inf is None else found_inf,
            n, 0.0 if lr_is_tensor else float(lr), beta1, beta2, _log(beta1), _log(beta2), eps, weight_decay,
            -1.0 if maximize else 1.0,
            DECOUPLED=decoupled, INDEPENDENT_DECAY=independent_decay, AMSGRAD=amsgrad, LR_IS_TENSOR=lr_is_tensor, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
