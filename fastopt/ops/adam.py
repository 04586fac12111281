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

from fastopt.ops._backends import resolve, run_contiguous
from fastopt.ops.common import compute_dtype
from fastopt.quant.formats import Quantized


def adam_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
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
) -> None:
    """One step for tensors on one device. ``max_exp_avg_sqs`` is empty unless amsgrad. Params and grads
    share a dtype (fp32/bf16/fp16); the states share theirs; math is fp32 (float64 tensors: float64).
    A moment may instead be :class:`~fastopt.quant.Quantized` (4/8-bit codes + scales; both moments of a
    tensor then share the bit width, amsgrad excluded): the update uses the fp32 values it computes and
    only what is stored is quantized. ``backend`` None picks the fastest implementation for the device.
    ``lr``, the betas, ``eps`` and ``weight_decay`` may be 0-d tensors: Triton reads them on the device; the
    reference and C++ paths (host code) read their values."""
    if not params:
        return
    backend = resolve(backend, params[0].device)
    if backend != "triton":
        beta1, beta2, eps, weight_decay = (float(x) for x in (beta1, beta2, eps, weight_decay))
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
              maximize=maximize, independent_decay=independent_decay, grad_scale=grad_scale, found_inf=found_inf)
    quantized = [i for i, m in enumerate(exp_avgs) if isinstance(m, Quantized)]
    if quantized:
        if max_exp_avg_sqs:
            raise ValueError("adam_step: amsgrad is not supported with quantized moments")
        plain = [i for i in range(len(params)) if i not in set(quantized)]
        pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
        for bits in sorted({exp_avgs[i].fmt.bits for i in quantized}):
            idx = [i for i in quantized if exp_avgs[i].fmt.bits == bits]
            _adam_quantized(pick(params, idx), pick(grads, idx), pick(exp_avgs, idx), pick(exp_avg_sqs, idx),
                            pick(steps, idx), backend=backend, **hp)
        params, grads, exp_avgs, exp_avg_sqs, steps = (pick(xs, plain) for xs in (params, grads, exp_avgs,
                                                                                     exp_avg_sqs, steps))
        if not params:
            return
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


def _adam_quantized(params, grads, exp_avgs, exp_avg_sqs, steps, *, backend, **hp) -> None:
    if backend == "reference":
        if hp["found_inf"] is not None and hp["found_inf"].item() != 0:
            return
        for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            m32, v32 = m.dequantize(p.numel()).view(p.shape), v.dequantize(p.numel()).view(p.shape)
            _reference([p], [g], [m32], [v32], [], [step], **dict(hp, found_inf=None))
            m.assign(m32)
            v.assign(v32)
    elif backend == "cpu":
        hp["lr"] = float(hp["lr"])
        m_fmt, v_fmt = exp_avgs[0].fmt, exp_avg_sqs[0].fmt
        run_contiguous(lambda ps, g: torch.ops.fastopt.adam_step_quantized(
            ps, g, [m.codes for m in exp_avgs], [m.scales for m in exp_avgs], [v.codes for v in exp_avg_sqs],
            [v.scales for v in exp_avg_sqs], steps, m_fmt.table(), v_fmt.table(), m_fmt.bits, **hp), [params], [grads])
    else:
        from fastopt.kernels.triton.adam_quantized import adam_step_quantized

        run_contiguous(lambda ps, g: adam_step_quantized(ps, g, exp_avgs, exp_avg_sqs, steps, **hp), [params], [grads])


def _reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
               weight_decay, decoupled, maximize, independent_decay, grad_scale, found_inf) -> None:
    if found_inf is not None and found_inf.item() != 0:
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
