"""Triton Adam/AdamW step: the kernel and its launcher (math: fastopt/ops/adam.py, docs/algorithms.md#adamw-and-adam).

Hyperparameters are runtime arguments (Triton does not specialize on float values), so schedules never
recompile; constexprs only select code. Tensor hyperparameters stay on the device: lr by pointer, and β1, β2, eps
and weight decay, when any of them is a tensor, from one 4-element device tensor (``device_hyperparameters``).
Bias corrections are computed in the kernel from the on-device step count, in float64, so nothing is read back to
the host. With GradScaler's ``found_inf`` set, steps are incremented by 1 − found_inf and the kernel masks out every
store: no host synchronization.

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
def adam_hyperparameters(beta1, beta2, eps, weight_decay, log_beta1, log_beta2, hp_ptr, HP_IS_TENSOR: tl.constexpr):
    """β1, β2, eps, weight decay and the betas' logs: the launch's numbers, or (HP_IS_TENSOR) read on the device from
    hp_ptr = [β1, β2, eps, weight decay]."""
    if HP_IS_TENSOR:
        beta1, beta2 = tl.load(hp_ptr), tl.load(hp_ptr + 1)
        eps, weight_decay = tl.load(hp_ptr + 2), tl.load(hp_ptr + 3)
        log_beta1, log_beta2 = tl.log(beta1.to(tl.float64)), tl.log(beta2.to(tl.float64))
    return beta1, beta2, eps, weight_decay, log_beta1, log_beta2


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
def adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, step_ptr, lr_ptr, grad_scale_ptr, found_inf_ptr, hp_ptr,
                n, lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, grad_sign,
                DECOUPLED: tl.constexpr, INDEPENDENT_DECAY: tl.constexpr, AMSGRAD: tl.constexpr,
                LR_IS_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                HP_IS_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    beta1, beta2, eps, weight_decay, log_beta1, log_beta2 = adam_hyperparameters(
        beta1, beta2, eps, weight_decay, log_beta1, log_beta2, hp_ptr, HP_IS_TENSOR)
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


def device_hyperparameters(device, beta1, beta2, eps, weight_decay, *extra):
    """(hp, numbers). hp = [β1, β2, eps, weight decay, *extra] (adam_hyperparameters' layout, then a kernel's own)
    as a float32 device tensor when any of them is a tensor (built on the device: no host read, no blocking copy),
    else None; with hp the kernels derive 1 − β and log β from those float32 values. numbers: what the launch passes
    by value, (β1, β2, eps, weight decay, log β1, log β2, *extra), all 0.0 with hp."""
    values = (beta1, beta2, eps, weight_decay, *extra)
    if not any(isinstance(x, torch.Tensor) for x in values):
        beta1, beta2, eps, weight_decay, *extra = (float(x) for x in values)
        return None, (beta1, beta2, eps, weight_decay, _log(beta1), _log(beta2), *extra)
    hp = torch.stack([x.to(device=device, dtype=torch.float32, non_blocking=True) if isinstance(x, torch.Tensor)
                      else torch.full((), x, dtype=torch.float32, device=device) for x in values])
    return hp, (0.0,) * (len(values) + 2)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
              weight_decay, decoupled, maximize, independent_decay=False, grad_scale=None, found_inf=None) -> None:
    """Launches one kernel per tensor (all on one device, contiguous). See fastopt.ops.adam.adam_step."""
    found_inf = advance_steps(steps, found_inf)
    hp, (beta1, beta2, eps, weight_decay, log_beta1, log_beta2) = device_hyperparameters(
        steps[0].device, beta1, beta2, eps, weight_decay)
    lr_is_tensor = isinstance(lr, torch.Tensor)
    amsgrad = len(max_exp_avg_sqs) > 0
    for i, p in enumerate(params):
        n = p.numel()
        any_ptr = steps[i]  # stands in for the pointers a mode does not read
        adam_kernel[(triton.cdiv(n, BLOCK),)](
            p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else any_ptr, steps[i],
            lr if lr_is_tensor else any_ptr, any_ptr if grad_scale is None else grad_scale,
            any_ptr if found_inf is None else found_inf, any_ptr if hp is None else hp,
            n, 0.0 if lr_is_tensor else float(lr), beta1, beta2, log_beta1, log_beta2, eps, weight_decay,
            -1.0 if maximize else 1.0,
            DECOUPLED=decoupled, INDEPENDENT_DECAY=independent_decay, AMSGRAD=amsgrad, LR_IS_TENSOR=lr_is_tensor,
            HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, HP_IS_TENSOR=hp is not None,
            BLOCK=BLOCK, num_warps=NUM_WARPS)
