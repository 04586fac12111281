"""The Adam / AdamW step (docs/algorithms.md#adamw-and-adam) over lists of tensors, in place, with three implementations
that agree: ``reference`` (pure torch, the ground truth), ``cpu`` (C++, torch.ops.fastopt.adam_step) and
``triton``. Each increments ``steps`` and then updates; when ``found_inf`` (GradScaler) is nonzero the
whole step, step counts included, is skipped.

    decoupled (AdamW):  p ← p·(1 − lr·wd)          coupled (Adam):  g ← g + wd·p
                        (independent_decay: p ← p·(1 − wd), Wortsman et al. 2023)
    m ← β1·m + (1−β1)·g        v ← β2·v + (1−β2)·g²        (amsgrad: v̂ ← max(v̂, v), used in place of v)
    p ← p − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps)
"""
from __future__ import annotations

import math

import torch

from fastopt.ops._backends import fused_step, resolve
from fastopt.ops.common import ADAM_NUMBERS, compute_dtype, host_numbers, load_moment, skipped, store_moment
from fastopt.ops.library import pack_hyperparameters
from fastopt.ops.sharding import local_lists
from fastopt.quant.formats import Quantized


def adam_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor | Quantized],
    exp_avg_sqs: list[torch.Tensor | Quantized],
    max_exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    decoupled: bool,
    maximize: bool = False,
    independent_decay: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str | None = None,
    host: int | None = None,
) -> None:
    """One step for tensors on one device. ``max_exp_avg_sqs`` is empty unless amsgrad. Params and grads
    share a dtype (fp32/bf16/fp16); the states share theirs; math is fp32 (float64 tensors: float64).
    A moment may instead be :class:`~fastopt.quant.Quantized` (4/8-bit codes + scales; both moments of a
    tensor then share the bit width, amsgrad excluded): the update uses the fp32 values it computes and
    only what is stored is quantized. ``backend`` None picks the fastest implementation for the device.
    ``lr``, the betas, ``eps`` and ``weight_decay`` may be 0-d tensors: both fused backends take them as data (the op's
    ``hp`` tensor; Triton reads it on the device), the reference reads their values. DTensor params (FSDP2) and their
    states are stepped on their local shards (fastopt/ops/sharding.py). ``host``: the id that
    fastopt.ops.library.register_host gave a caller that steps the same tensors with their ``.grad`` at every call
    (an optimizer), so that the kernels check only the grads again (fastopt/ops/_backends.py ``fused_step``)."""
    if not params:
        return
    if max_exp_avg_sqs and any(isinstance(m, Quantized) for m in exp_avgs):
        raise ValueError("adam_step: amsgrad is not supported with quantized moments")
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = local_lists(params, grads, exp_avgs, exp_avg_sqs,
                                                                          max_exp_avg_sqs)
    backend = resolve(backend, params[0].device)
    flags = dict(decoupled=decoupled, maximize=maximize, independent_decay=independent_decay)
    amp = dict(grad_scale=grad_scale, found_inf=found_inf)
    if backend == "reference":
        hp = host_numbers(dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay), *ADAM_NUMBERS)
        _reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, **hp, **flags, **amp)
        return
    hp = pack_hyperparameters("adam_step", lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    fused_step("adam_step", backend, params, grads, exp_avgs, exp_avg_sqs, [steps], hp, full=[max_exp_avg_sqs],
               host=host, **flags, **amp)


def _reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
               weight_decay, decoupled, maximize, independent_decay, grad_scale, found_inf) -> None:
    if skipped(found_inf):
        return
    amsgrad = len(max_exp_avg_sqs) > 0
    for i, p in enumerate(params):
        compute = compute_dtype(p)
        steps[i] += 1
        t = steps[i].item()
        param, grad = p.to(compute), grads[i].to(compute)
        if grad_scale is not None:
            grad = grad / grad_scale.to(device=p.device, dtype=compute)
        if maximize:
            grad = -grad
        if decoupled:
            param = param * (1 - (1 if independent_decay else lr) * weight_decay)
        else:
            grad = grad + weight_decay * param
        exp_avg = beta1 * load_moment(exp_avgs[i], p, compute) + (1 - beta1) * grad
        exp_avg_sq = beta2 * load_moment(exp_avg_sqs[i], p, compute) + (1 - beta2) * grad * grad
        store_moment(exp_avgs[i], exp_avg)
        store_moment(exp_avg_sqs[i], exp_avg_sq)
        if amsgrad:
            exp_avg_sq = torch.maximum(exp_avg_sq, max_exp_avg_sqs[i].to(compute))
            max_exp_avg_sqs[i].copy_(exp_avg_sq)
        step_size = lr / (1 - beta1**t)
        denom = exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t) + eps
        p.copy_(param - step_size * exp_avg / denom)
