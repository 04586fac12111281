"""The Adam / AdamW step (ALGORITHMS.md §1) over lists of tensors, in place, with three implementations
that agree: ``reference`` (pure torch, the ground truth), ``cpu`` (C++, torch.ops.fastopt.adam_step) and
``triton``. Each increments ``steps`` and then updates; when ``found_inf`` (GradScaler) is nonzero the
whole step, step counts included, is skipped.

    decoupled (AdamW):  p ← p·(1 − lr·wd)          coupled (Adam):  g ← g + wd·p
    m ← β1·m + (1−β1)·g        v ← β2·v + (1−β2)·g²        (amsgrad: v̂ ← max(v̂, v), used in place of v)
    p ← p − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps)
"""
from __future__ import annotations

import math

import torch

from fastopt.ops._backends import resolve, run_contiguous


def adam_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """One step for tensors on one device. ``max_exp_avg_sqs`` is empty unless amsgrad. Params and grads
    share a dtype (fp32/bf16/fp16); the states share theirs; math is fp32 (float64 tensors: float64).
    ``backend`` None picks the fastest implementation available for the tensors' device."""
    if not params:
        return
    backend = resolve(backend, params[0].device)
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
              maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)
    if backend == "reference":
        _reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, **hp)
    elif backend == "cpu":
        hp["lr"] = float(lr)
        run_contiguous(lambda p, m, v, vmax, g: torch.ops.fastopt.adam_step(p, g, m, v, vmax, steps, **hp),
                       [params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs], [grads])
    elif backend == "triton":
        from fastopt.kernels.triton.adam import adam_step as triton_adam_step

        run_contiguous(lambda p, m, v, vmax, g: triton_adam_step(p, g, m, v, vmax, steps, **hp),
                       [params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs], [grads])
    else:
        raise ValueError(f"unknown backend {backend!r}")


def _reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
               weight_decay, decoupled, maximize, grad_scale, found_inf) -> None:
    if found_inf is not None and found_inf.item() != 0:
        return
    amsgrad = len(max_exp_avg_sqs) > 0
    for i, p in enumerate(params):
        compute = torch.float64 if p.dtype == torch.float64 else torch.float32
        steps[i] += 1
        t = steps[i].item()
        param, grad = p.to(compute), grads[i].to(compute)
        if grad_scale is not None:
            grad = grad / grad_scale.to(device=p.device, dtype=compute)
        if maximize:
            grad = -grad
        if decoupled:
            param = param * (1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
        exp_avg = beta1 * exp_avgs[i].to(compute) + (1 - beta1) * grad
        exp_avg_sq = beta2 * exp_avg_sqs[i].to(compute) + (1 - beta2) * grad * grad
        exp_avgs[i].copy_(exp_avg)
        exp_avg_sqs[i].copy_(exp_avg_sq)
        if amsgrad:
            exp_avg_sq = torch.maximum(exp_avg_sq, max_exp_avg_sqs[i].to(compute))
            max_exp_avg_sqs[i].copy_(exp_avg_sq)
        step_size = lr / (1 - beta1**t)
        denom = exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t) + eps
        p.copy_(param - step_size * exp_avg / denom)
