"""The Stable-SPAM step (docs/algorithms.md#stable-spam) and the SPAM step
(docs/algorithms.md#spam) over lists of tensors, in place.

Three implementations that agree: ``reference`` (pure torch; float32 math, float64 for float64 tensors), ``cpu``
(C++: torch.ops.fastopt.stable_spam_step / spam_step) and ``triton`` (fastopt/kernels/triton/spam.py). What is global to a
step (the cosine factor s, whether this step resets the moments, whether SPAM clips) is decided once per step by
``stable_spam_schedule`` / ``spam_schedule`` from the optimizer's step count and reaches the op as runtime values.

Stable-SPAM, per tensor (t: Adam's counter; u: the AdaClip/AdaGN statistics' counter; θ = gamma3):

    p ← p·(1 − lr·wd)
    t ← t + 1;  u ← u + 1                       compat="official": u is t (one counter, reset with the moments)
    M = max|g|;  mmax ← θ·mmax + (1−θ)·M;  thr = mmax/(1−θ^u);  where |g| > thr: g ← g/M·thr         (AdaClip)
    n = ‖g‖₂;  mn ← γ1s·mn + (1−γ1s)·n;  vn ← γ2·vn + (1−γ2)·n²
    c = (mn/(1−(γ1s)^u)) / (sqrt(vn/(1−γ2^u)) + eps);  if n > 0: g ← g/n·c                           (AdaGN)
    if reset:  m, v ← 0;  t ← 1                 compat="official": this step's update still uses the old m, v;
                                                the zeros are stored after it and first used on the next step
    b1 = β1·s;  m ← b1·m + (1−b1)·g;  v ← β2·v + (1−β2)·g²
    p ← p − lr/(1−b1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps)

SPAM, per tensor (s: the update scale that warms up again after a reset; θ = threshold):

    if reset:  m, v ← 0                         (t keeps counting)
    t ← t + 1
    if clip:  where g² > θ·v:  g ← sign(g)·sqrt(θ·v)        (v before this step's update)
    m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
    p ← p − s·lr·sqrt(1−β2^t)/(1−β1^t) · m / (sqrt(v) + eps)
    p ← p − lr·wd·p

Grads are first divided by ``grad_scale``; a nonzero ``found_inf`` (GradScaler) skips the whole step, counters
included. A moment may be a tensor or a :class:`~fastopt.quant.Quantized` (decoded, updated in fp32, encoded; a
reset zeros its codes and its scales, and scale 0 means the block is 0).
"""
from __future__ import annotations

import math

import torch

from fastopt.ops import library
from fastopt.ops._backends import fused_step, resolve
from fastopt.ops.common import (ADAM_NUMBERS, as_number, check_compat, compute_dtype, host_numbers, load_moment,
                                skipped, store_moment, zero_moment)
from fastopt.ops.library import pack_hyperparameters
from fastopt.ops.sharding import all_reduce_max, local_lists, shard_group
from fastopt.quant.formats import Quantized


# ---- what is global to a step --------------------------------------------------------------------------------
def stable_spam_schedule(T: int, *, total_T: int | None, eta_min: float, update_proj_gap: int) -> tuple[float, bool]:
    """(s, reset) for Stable-SPAM's step T (the optimizer's step count after its increment: 1 on the first step).

    s = CosineAnnealingLR(T_max = total_T + 1, eta_min) of an lr of 1.0, at T (torch's closed form, which
    keeps following the cosine past T_max: nothing clamps it); 1.0 without total_T. reset: ΔT ≠ 0 and T % ΔT == 0.
    """
    s = 1.0 if total_T is None else eta_min + (1 - eta_min) * (1 + math.cos(math.pi * T / (total_T + 1))) / 2
    return s, update_proj_gap != 0 and T % update_proj_gap == 0


def spam_schedule(T: int, *, warmup_steps: int, delta_t: int, grad_accu_steps: int,
                  threshold: float) -> tuple[float, bool, bool]:
    """(s, reset, clip) for SPAM's step T (the optimizer's step count before its increment: 0 on the first step).

    reset: (T+1) % ΔT == 0. The warmup counter c starts at N+1 (no warmup at first), counts steps, and restarts at
    0 on each resetting step T ≥ 1; s = 1 − w(c) with w(c) = 0.99·(1 + cos(π·c/(N+1)))/2 for c < N, else 0.
    clip: θ ≠ 0 and k = T+1 ≥ K and (ΔT == 0 or k % ΔT ≥ K): clipping pauses for K steps after each reset.
    ΔT = 0 means no resets (and no warmup restarts).
    """
    N, K = warmup_steps, grad_accu_steps
    c = N + 1 + T
    if delta_t != 0:
        last_reset = T - (T + 1) % delta_t  # the latest T' <= T with (T'+1) % ΔT == 0
        if last_reset >= 1:
            c = T - last_reset
    w = 0.99 * (1 + math.cos(math.pi * c / (N + 1))) / 2 if c < N else 0.0
    k = T + 1
    reset = delta_t != 0 and k % delta_t == 0
    clip = threshold != 0 and k >= K and (delta_t == 0 or k % delta_t >= K)
    return 1 - w, reset, clip


# ---- the ops ---------------------------------------------------------------------------------------------------
def stable_spam_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor | Quantized],
    exp_avg_sqs: list[torch.Tensor | Quantized],
    steps: list[torch.Tensor],
    stats_steps: list[torch.Tensor],
    m_norms: list[torch.Tensor],
    v_norms: list[torch.Tensor],
    m_maxes: list[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    gamma1: float | torch.Tensor,
    gamma2: float | torch.Tensor,
    gamma3: float | torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    reset: bool | float | torch.Tensor = False,
    compat: str | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str | None = None,
    host: int | None = None,
) -> None:
    """One Stable-SPAM step for tensors on one device. ``steps`` (t) and ``stats_steps`` (u) are float32 0-d
    counters; ``m_norms``, ``v_norms``, ``m_maxes`` 0-d statistics per tensor. ``scale`` is s (it multiplies beta1
    and gamma1); ``reset`` says whether this step resets the moments; ``compat="official"`` reproduces the
    official code's quirks (docs/algorithms.md#stable-spam-quirks (a), (b)). Hyperparameters may be 0-d tensors
    (``scale`` and ``reset`` too: a compiled step passes them as data): both fused backends take them in the op's
    ``hp`` tensor (Triton reads it on the device), the reference reads them on the host. DTensor params (FSDP2) are
    stepped on their local shards with the whole tensors' max|g| and norm, reduced across the ranks that hold the
    other shards: the call is then a collective, which every one of those ranks makes with the same tensors.
    ``host`` as in adam_step."""
    check_compat("stable_spam_step", compat)
    if not params:
        return
    group = _shard_group(params)
    params, grads, exp_avgs, exp_avg_sqs = local_lists(params, grads, exp_avgs, exp_avg_sqs)
    backend = resolve(backend, params[0].device)
    stats = [steps, stats_steps, m_norms, v_norms, m_maxes]
    official, amp = compat == "official", dict(grad_scale=grad_scale, found_inf=found_inf)
    if backend == "reference":
        hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, gamma1=gamma1, gamma2=gamma2,
                  gamma3=gamma3, scale=as_number(scale), reset=bool(reset), official=official, **amp)
        _stable_spam_reference(params, grads, exp_avgs, exp_avg_sqs, *stats, group=group,
                               **host_numbers(hp, *ADAM_NUMBERS, "gamma1", "gamma2", "gamma3"))
        return
    hp = pack_hyperparameters("stable_spam_step", lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                              gamma1=gamma1, gamma2=gamma2, gamma3=gamma3, scale=scale, reset=reset)
    options = dict(official=official, **amp)
    if group is not None and backend == "cpu":  # the whole tensors' statistics, reduced across the shards, go in
        options["per_tensor"] = {"grad_stats": reduced_grad_stats(
            [g.contiguous() for g in grads], steps if official else stats_steps, m_maxes, as_number(gamma3),
            lambda x, op: _all_reduce(x, op, group), _cpu_grad_stats(grad_scale))}
    if group is not None and backend == "triton":  # the launcher reduces across the shards between its kernels
        options["all_reduce"] = lambda x, op: _all_reduce(x, op, group)
        fused_step("stable_spam_step", backend, params, grads, exp_avgs, exp_avg_sqs, stats, hp,
                   kernel=library.triton_kernel("stable_spam_step"), host=host, **options)
        return
    fused_step("stable_spam_step", backend, params, grads, exp_avgs, exp_avg_sqs, stats, hp, host=host, **options)


# ---- sharded params: the per-tensor statistics of the whole tensor, from its shards ----------------------------------
def _shard_group(params: list) -> "torch.distributed.ProcessGroup | None":
    """The process group over which the params are sharded (None for plain tensors); one per op call."""
    group = shard_group(params[0])
    if any(shard_group(p) is not group for p in params[1:]):
        raise ValueError("stable_spam_step: the params are sharded over different process groups (or some are not "
                         "sharded); call the op once per group")
    return group


def _cpu_grad_stats(grad_scale):
    return lambda grads, clip: torch.ops.fastopt.grad_stats(grads, clip, grad_scale)


def adaclip_limits(maxes: torch.Tensor, counters: list[torch.Tensor], m_maxes: list[torch.Tensor],
                   theta: float) -> torch.Tensor:
    """AdaClip's (threshold, thr/M) per tensor for this step, float32 (n, 2), from the tensors' max|g| (``maxes``)
    and their statistics before the step (``counters``: u before its increment), as the kernels compute them. The
    counters and maxima are one-element tensors (0-d in the optimizer's state; the ops take any shape of one)."""
    u = torch.stack(counters).double().reshape(-1) + 1
    m_max = (theta * torch.stack(m_maxes).double().reshape(-1) + (1 - theta) * maxes).float().double()
    thr = (m_max / (1 - theta ** u)).float()
    mul = torch.where(maxes > 0, thr.double() / torch.where(maxes > 0, maxes, 1.0), 1.0).float()
    return torch.stack([thr, mul], dim=1).contiguous()


def reduced_grad_stats(grads: list[torch.Tensor], counters: list[torch.Tensor], m_maxes: list[torch.Tensor],
                       theta: float, all_reduce, local_stats, select_on_host: bool | None = None) -> torch.Tensor:
    """(max|g|, Σ of g² after AdaClip) of each whole tensor from the local shards ``grads``, float64 (n, 2), with
    two calls of ``all_reduce(values, "MAX" | "SUM")`` (in place, across the ranks holding the other shards; float32
    maxima, float64 sums) for all tensors: a max, then a sum, since the clip threshold needs the max first.
    ``local_stats(grads, clip)`` gives the local (max, Σ clipped g²); a shard whose max is under its threshold keeps
    its unclipped sum, as the unsharded kernels do. Which shards clip is read on the host where that waits for
    nothing (``select_on_host``, by default for CPU tensors), and only those are read again; on a GPU every shard is
    read again instead, so that the step never waits for the device. The limits repeat the C++ op's AdaClip
    arithmetic (``adaclip_limits``); tests/ops/test_spam_cpu.py checks that the op given these statistics steps bit
    for bit as it does on its own, either way."""
    first = local_stats(grads, None)
    maxes = first[:, 0].float()  # float32 maxima, exactly (the kernels' max is float32)
    all_reduce(maxes, "MAX")
    maxes = maxes.double()
    clip = adaclip_limits(maxes, counters, m_maxes, theta)
    sums = first[:, 1].clone()
    over = ~(first[:, 0] <= clip[:, 0])  # NaN maxima included, as the kernels do
    if select_on_host if select_on_host is not None else grads[0].device.type == "cpu":
        clipped = over.nonzero().flatten().tolist()
        if clipped:
            sums[clipped] = local_stats([grads[i] for i in clipped], clip[clipped].contiguous())[:, 1]
    else:
        sums = torch.where(over, local_stats(grads, clip)[:, 1], sums)
    all_reduce(sums, "SUM")
    return torch.stack([maxes, sums], dim=1).contiguous()


def spam_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor | Quantized],
    exp_avg_sqs: list[torch.Tensor | Quantized],
    steps: list[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    threshold: float | torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    reset: bool | float | torch.Tensor = False,
    clip: bool | float | torch.Tensor = True,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    backend: str | None = None,
    host: int | None = None,
) -> None:
    """One SPAM step for tensors on one device. ``steps`` (t) are float32 0-d counters. ``scale`` is s, ``reset``
    whether this step resets the moments, ``clip`` whether spike clipping at ``threshold`` is on this step. Tensor
    hyperparameters and ``host`` as in stable_spam_step."""
    if not params:
        return
    params, grads, exp_avgs, exp_avg_sqs = local_lists(params, grads, exp_avgs, exp_avg_sqs)
    backend = resolve(backend, params[0].device)
    amp = dict(grad_scale=grad_scale, found_inf=found_inf)
    if backend == "reference":
        hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, threshold=as_number(threshold),
                  scale=as_number(scale), reset=bool(reset), clip=bool(clip), **amp)
        _spam_reference(params, grads, exp_avgs, exp_avg_sqs, steps, **host_numbers(hp, *ADAM_NUMBERS))
        return
    hp = pack_hyperparameters("spam_step", lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                              threshold=threshold, scale=scale, reset=reset, clip=clip)
    fused_step("spam_step", backend, params, grads, exp_avgs, exp_avg_sqs, [steps], hp, host=host, **amp)


# ---- reference implementation --------------------------------------------------------------------------------
def _bias_correction(beta: float, t: torch.Tensor) -> torch.Tensor:
    """1 − beta^t as a float64 0-d tensor (1 − 0.999 in float32 would be off by 1e-5 relative)."""
    return 1 - beta ** t.double()


def _grad(p: torch.Tensor, grad: torch.Tensor, grad_scale: torch.Tensor | None, compute: torch.dtype) -> torch.Tensor:
    g = grad.to(compute)
    return g if grad_scale is None else g / grad_scale.to(device=p.device, dtype=compute)


def _stable_spam_reference(params, grads, exp_avgs, exp_avg_sqs, steps, stats_steps, m_norms, v_norms, m_maxes, *,
                           lr, beta1, beta2, eps, weight_decay, gamma1, gamma2, gamma3, scale, reset, official,
                           grad_scale, found_inf, group=None) -> None:
    """``group``: the process group over which the params are sharded: max|g| and ‖g‖ are reduced across it."""
    theta = gamma3
    if skipped(found_inf):
        for p in params if group is not None else ():  # the other ranks' reductions wait for this rank's
            _all_reduce(torch.zeros((), dtype=compute_dtype(p)), "MAX", group)
            _all_reduce(torch.zeros((), dtype=torch.float64), "SUM", group)
        return
    b1, g1 = beta1 * scale, gamma1 * scale
    for i, p in enumerate(params):
        compute = compute_dtype(p)
        param, g = p.to(compute), _grad(p, grads[i], grad_scale, compute)
        param = param * (1 - lr * weight_decay)
        steps[i] += 1
        stats_steps[i] += 1
        u = steps[i] if official else stats_steps[i]  # official: the same t for the statistics and for Adam

        # AdaClip: clip entries above the bias-corrected running max of max|g|
        M = g.abs().amax() if g.numel() else g.new_zeros(())
        if group is not None:
            _all_reduce(M, "MAX", group)
        m_max = theta * m_maxes[i] + (1 - theta) * M
        thr = m_max / _bias_correction(theta, u)
        g = torch.where(g.abs() > thr, g / M * thr, g)

        # AdaGN: rescale g to the running norm statistics
        n = torch.linalg.vector_norm(g, dtype=torch.float64)  # a float32 sum of 1e6 squares is off by ~1e-5
        if group is not None:
            n = _all_reduce(n * n, "SUM", group).sqrt()
        m_norm = g1 * m_norms[i] + (1 - g1) * n
        v_norm = gamma2 * v_norms[i] + (1 - gamma2) * n * n
        c = (m_norm / _bias_correction(g1, u)) / ((v_norm / _bias_correction(gamma2, u)).sqrt() + eps)
        g = torch.where(n > 0, g / n * c, g)
        m_maxes[i].copy_(m_max)
        m_norms[i].copy_(m_norm)
        v_norms[i].copy_(v_norm)

        # momentum reset, then Adam
        if reset:
            steps[i].fill_(1)
            if not official:
                zero_moment(exp_avgs[i])
                zero_moment(exp_avg_sqs[i])
        t = steps[i]
        m = b1 * load_moment(exp_avgs[i], p, compute) + (1 - b1) * g
        v = beta2 * load_moment(exp_avg_sqs[i], p, compute) + (1 - beta2) * g * g
        if reset and official:  # quirk (a): this update used the old moments; the zeros count from the next step
            zero_moment(exp_avgs[i])
            zero_moment(exp_avg_sqs[i])
        else:
            store_moment(exp_avgs[i], m)
            store_moment(exp_avg_sqs[i], v)
        step_size = lr / _bias_correction(b1, t)
        denom = v.sqrt() / _bias_correction(beta2, t).sqrt() + eps
        p.copy_(param - step_size * m / denom)


def _all_reduce(x: torch.Tensor, op: str, group) -> torch.Tensor:
    """``x`` reduced in place across ``group``: "MAX" of maxima of |g| (NaN kept, sharding.all_reduce_max) or "SUM"."""
    import torch.distributed as dist

    if op == "MAX":
        all_reduce_max(x, group)
    else:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def _spam_reference(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay, threshold,
                    scale, reset, clip, grad_scale, found_inf) -> None:
    if skipped(found_inf):
        return
    for i, p in enumerate(params):
        compute = compute_dtype(p)
        param, g = p.to(compute), _grad(p, grads[i], grad_scale, compute)
        if reset:
            zero_moment(exp_avgs[i])
            zero_moment(exp_avg_sqs[i])
        steps[i] += 1
        t = steps[i]
        m, v = load_moment(exp_avgs[i], p, compute), load_moment(exp_avg_sqs[i], p, compute)
        if clip:  # spike-aware clipping against v before this step's update
            g = torch.where(g * g > threshold * v, g.sign() * (threshold * v).sqrt(), g)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        store_moment(exp_avgs[i], m)
        store_moment(exp_avg_sqs[i], v)
        step_size = lr * _bias_correction(beta2, t).sqrt() / _bias_correction(beta1, t)
        param = param - scale * step_size * m / (v.sqrt() + eps)
        p.copy_(param - lr * weight_decay * param)
