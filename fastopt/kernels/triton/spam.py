"""Triton Stable-SPAM and SPAM steps: kernels and launchers (math: fastopt/ops/spam.py, docs/algorithms.md#stable-spam, #spam).

SPAM needs nothing global: one fused pass per tensor. Stable-SPAM needs two reductions of the gradient before its
update (max|g| for AdaClip, then the norm of the clipped gradient for AdaGN); they run on the device, so a step never
waits for the host. Per tensor, with g = grad / grad_scale (the launcher runs 1 for all tensors, then 2–3 for all,
then 4–5; for sharded params one all-reduce after 1 and one after 3 give each tensor the whole tensor's M and its
clipped Σg²):

  1. partials_kernel     per 4096-element block: max|g| and Σg² into a small fp32 workspace
  2. adaclip_kernel      one program: M = max of the block maxima; m_max; thr = m_max/(1−θ^u); thr/M
  3. partials_kernel     CLIPPED: only blocks whose max exceeds thr re-read g and replace their Σg² by the clipped
                         one (the other programs' loads are masked off and move no memory)
  4. adagn_kernel        one program: n = sqrt(Σ Σg²) (float64 across blocks); m_norm, v_norm; the factor c/n
                         (1 when n = 0); t ← 1 on a reset
  5. spam_kernel / spam_quantized_kernel: the fused update, shared with SPAM (constexprs select the algorithm)

Reductions run in a fixed order, without atomics: a resumed run repeats a step bit for bit. Counters advance on the
device by 1 − found_inf (adam.advance_steps); a nonzero found_inf masks every other store of statistics, counters,
moments and params. As in adam.py, hyperparameters are runtime arguments and constexprs only select code (moment
storage, reset mode, SPAM's clipping on or off). When any of β1, β2, eps, weight decay or the gammas is a tensor,
all of them come from one device tensor laid out as HP_LAYOUT (HP_IS_TENSOR): nothing is read on the host.

Bytes moved per parameter (the floor on any GPU):
  update (both algorithms): read p, g, m, v, write p, m, v — fp32 params and moments 28; bf16 both 14; bf16 params
      with fp32 moments 20; 4-bit moments 14.125 (bf16 params 8.125); 8-bit 16.06 (bf16 params 10.06).
      A reset the update sees (SPAM's; Stable-SPAM's corrected one) does not read the old moments.
  Stable-SPAM adds pass 1, one read of g (fp32 4, bf16/fp16 2), and pass 3, another read of g in the blocks that
      hold a clipped entry only (0 when nothing is clipped); the workspace is 8 bytes per 4096 params.
  Stable-SPAM total: fp32 32 (+4 in clipped blocks), bf16 16 (+2). SPAM: the update alone, as Adam.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastopt.kernels.triton._common import store_rounded
from fastopt.kernels.triton.adam import (BLOCK, NUM_WARPS, _log, adam_hyperparameters, adam_moments, adam_param,
                                         advance_steps, device_hyperparameters, step_scalars)
from fastopt.kernels.triton.quant import block_tile, blocks_per_program, decode, encode_store
from fastopt.quant.formats import Quantized

# The device hyperparameters (device_hyperparameters: adam_hyperparameters' four, then the gammas)
HP_LAYOUT = ("beta1·s", "beta2", "eps", "weight_decay", "gamma1·s", "gamma2", "gamma3")
PARTIAL_BLOCK = 4096  # gradient elements per workspace entry
STATS_BLOCK = 1024    # workspace entries a stats program reads at once


# ---- device helpers ----------------------------------------------------------------------------------------------
@triton.jit
def load_grad(g_ptr, offs, mask, grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr):
    """g / grad_scale in fp32, 0 where masked off. Every pass computes g with these same operations, so AdaClip's
    decisions agree between the reductions and the update."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = g / tl.load(grad_scale_ptr).to(tl.float32)
    return g


@triton.jit
def adaclip(g, work_ptr):
    """Where |g| > thr: g·thr/M (thr and thr/M are the workspace's first two entries)."""
    return tl.where(tl.abs(g) > tl.load(work_ptr), g * tl.load(work_ptr + 1), g)


@triton.jit
def keep_step(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """False when GradScaler found an inf: the step then stores nothing."""
    keep = tl.full((), 1, tl.int1)
    if HAS_FOUND_INF:
        keep = tl.load(found_inf_ptr) == 0
    return keep


@triton.jit
def spam_update(param, grad, exp_avg, exp_avg_sq, lr, bias_correction1, bias_correction2, beta1, beta2, eps,
                weight_decay, threshold, scale, work_ptr, STABLE: tl.constexpr, CLIP: tl.constexpr):
    """Either algorithm's update of fp32 tiles (grad already divided by grad_scale): (param, exp_avg, exp_avg_sq)."""
    if STABLE:  # decay first, AdaClip, AdaGN, then AdamW with beta1 = β1·s
        grad = adaclip(grad, work_ptr) * tl.load(work_ptr + 2)
        param, exp_avg, exp_avg_sq = adam_moments(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, weight_decay,
                                                  1.0, work_ptr, True, False, False)
        param = adam_param(param, exp_avg, exp_avg_sq, lr, bias_correction1, bias_correction2, eps)
    else:  # spike clipping against v before this step's update; the scaled update; decay last
        if CLIP:
            bound = threshold * exp_avg_sq
            root = tl.sqrt(bound)
            grad = tl.where(grad * grad > bound, tl.where(grad < 0, -root, root), grad)
        _, exp_avg, exp_avg_sq = adam_moments(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, 0.0, 1.0,
                                              work_ptr, True, False, False)
        step_size = scale * lr * tl.sqrt(bias_correction2) / bias_correction1
        param = param - step_size * exp_avg / (tl.sqrt(exp_avg_sq) + eps)
        param = param - lr * weight_decay * param
    return param, exp_avg, exp_avg_sq


@triton.jit
def zero_blocks(codes_ptr, scales_ptr, rows, row_mask, BITS: tl.constexpr, QBLOCK: tl.constexpr):
    """A reset of quantized blocks: codes 0 and scale 0 (the unsigned maps have no 0; scale 0 makes a block 0)."""
    offs = rows[:, None] * (QBLOCK * BITS // 8) + tl.arange(0, QBLOCK * BITS // 8)[None, :]
    tl.store(codes_ptr + offs, tl.zeros(offs.shape, tl.uint8), mask=row_mask[:, None])
    tl.store(scales_ptr + rows, tl.zeros(rows.shape, tl.float32), mask=row_mask)


# ---- Stable-SPAM's reductions ------------------------------------------------------------------------------------
@triton.jit
def partials_kernel(g_ptr, grad_scale_ptr, maxes_ptr, sums_ptr, work_ptr, n, HAS_GRAD_SCALE: tl.constexpr,
                    CLIPPED: tl.constexpr, BLOCK: tl.constexpr):
    """Per block: max|g| and Σg²; CLIPPED: Σg² after AdaClip, in the blocks that hold a clipped entry only."""
    block = tl.program_id(0)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if CLIPPED:
        clipped = tl.load(maxes_ptr + block) > tl.load(work_ptr)
        n = tl.where(clipped, n, 0)  # a block without clipped entries loads nothing
        g = adaclip(load_grad(g_ptr, offs, offs < n, grad_scale_ptr, HAS_GRAD_SCALE), work_ptr)
        tl.store(sums_ptr + block, tl.sum(g * g, axis=0), mask=clipped)
    else:
        g = load_grad(g_ptr, offs, offs < n, grad_scale_ptr, HAS_GRAD_SCALE)
        sum_sq = tl.sum(g * g, axis=0)  # NaN iff g holds a NaN: then so is the max, as torch.amax's
        tl.store(maxes_ptr + block, tl.where(sum_sq == sum_sq, tl.max(tl.abs(g), axis=0), sum_sq))
        tl.store(sums_ptr + block, sum_sq)


@triton.jit
def adaclip_kernel(maxes_ptr, u_ptr, m_max_ptr, work_ptr, found_inf_ptr, hp_ptr, num_blocks, theta, one_minus_theta,
                   log_theta, HAS_FOUND_INF: tl.constexpr, HP_IS_TENSOR: tl.constexpr, R: tl.constexpr):
    """One program: M, the running max m_max, AdaClip's threshold thr and thr/M (into the workspace)."""
    if HP_IS_TENSOR:
        theta = tl.load(hp_ptr + 6)
        one_minus_theta = 1.0 - theta
        log_theta = tl.log(theta.to(tl.float64))
    maxes = tl.zeros([R], tl.float32)
    for start in range(0, num_blocks, R):
        idx = start + tl.arange(0, R)
        maxes = tl.maximum(maxes, tl.load(maxes_ptr + idx, mask=idx < num_blocks, other=0.0),
                           propagate_nan=tl.PropagateNan.ALL)
    total = tl.sum(maxes, axis=0)  # NaN iff a block max is (they are >= 0): tl.max drops NaN on GPUs
    M = tl.where(total == total, tl.max(maxes, axis=0), total)
    m_max = theta * tl.load(m_max_ptr).to(tl.float32) + one_minus_theta * M  # fp32, as the reference
    u = tl.load(u_ptr).to(tl.float64)
    thr = (m_max.to(tl.float64) / (1.0 - tl.exp(u * log_theta))).to(tl.float32)
    keep = keep_step(found_inf_ptr, HAS_FOUND_INF)
    tl.debug_barrier()  # every thread has read m_max before one of them overwrites it
    tl.store(work_ptr, thr)
    tl.store(work_ptr + 1, tl.where(M > 0, thr, 1.0) / tl.where(M > 0, M, 1.0))  # 1 when M = 0
    tl.store(m_max_ptr, m_max.to(m_max_ptr.dtype.element_ty), mask=keep)


@triton.jit
def adagn_kernel(sums_ptr, u_ptr, step_ptr, m_norm_ptr, v_norm_ptr, work_ptr, found_inf_ptr, hp_ptr, num_blocks,
                 gamma1, one_minus_gamma1, log_gamma1, gamma2, one_minus_gamma2, log_gamma2, eps, RESET: tl.constexpr,
                 HAS_FOUND_INF: tl.constexpr, HP_IS_TENSOR: tl.constexpr, R: tl.constexpr):
    """One program: the clipped norm n, the running norm statistics, AdaGN's factor c/n; t ← 1 on a reset."""
    if HP_IS_TENSOR:
        eps = tl.load(hp_ptr + 2)
        gamma1, gamma2 = tl.load(hp_ptr + 4).to(tl.float64), tl.load(hp_ptr + 5).to(tl.float64)
        one_minus_gamma1, one_minus_gamma2 = 1.0 - gamma1, 1.0 - gamma2
        log_gamma1, log_gamma2 = tl.log(gamma1), tl.log(gamma2)
    sums = tl.zeros([R], tl.float64)  # a float32 sum of many blocks would drift by ~1e-5
    for start in range(0, num_blocks, R):
        idx = start + tl.arange(0, R)
        sums += tl.load(sums_ptr + idx, mask=idx < num_blocks, other=0.0).to(tl.float64)
    norm = tl.sqrt(tl.sum(sums, axis=0))
    u = tl.load(u_ptr).to(tl.float64)
    m_norm = gamma1 * tl.load(m_norm_ptr).to(tl.float64) + one_minus_gamma1 * norm
    v_norm = gamma2 * tl.load(v_norm_ptr).to(tl.float64) + one_minus_gamma2 * norm * norm
    c = (m_norm / (1.0 - tl.exp(u * log_gamma1))) / (tl.sqrt(v_norm / (1.0 - tl.exp(u * log_gamma2))) + eps)
    keep = keep_step(found_inf_ptr, HAS_FOUND_INF)
    tl.debug_barrier()  # every thread has read the statistics (and u, which may be t) before they are overwritten
    tl.store(work_ptr + 2, (tl.where(norm > 0, c, 1.0) / tl.where(norm > 0, norm, 1.0)).to(tl.float32))
    tl.store(m_norm_ptr, m_norm.to(m_norm_ptr.dtype.element_ty), mask=keep)
    tl.store(v_norm_ptr, v_norm.to(v_norm_ptr.dtype.element_ty), mask=keep)
    if RESET:
        tl.store(step_ptr, 1.0, mask=keep)


# ---- the fused updates ---------------------------------------------------------------------------------------------
@triton.jit
def spam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, lr_ptr, grad_scale_ptr, found_inf_ptr, work_ptr, hp_ptr, n, lr,
                beta1, beta2, log_beta1, log_beta2, eps, weight_decay, threshold, scale, STABLE: tl.constexpr,
                CLIP: tl.constexpr, ZERO_OLD: tl.constexpr, STORE_ZEROS: tl.constexpr, LR_IS_TENSOR: tl.constexpr,
                HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HP_IS_TENSOR: tl.constexpr,
                BLOCK: tl.constexpr):
    """ZERO_OLD: a reset this update sees (old moments are 0, not read). STORE_ZEROS: Stable-SPAM's official reset
    (the update uses the old moments; zeros are stored)."""
    beta1, beta2, eps, weight_decay, log_beta1, log_beta2 = adam_hyperparameters(
        beta1, beta2, eps, weight_decay, log_beta1, log_beta2, hp_ptr, HP_IS_TENSOR)
    n, lr, bias_correction1, bias_correction2 = step_scalars(n, lr, lr_ptr, step_ptr, found_inf_ptr, log_beta1,
                                                             log_beta2, LR_IS_TENSOR, HAS_FOUND_INF)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if ZERO_OLD:
        exp_avg = tl.zeros([BLOCK], tl.float32)
        exp_avg_sq = tl.zeros([BLOCK], tl.float32)
    else:
        exp_avg = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        exp_avg_sq = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    param, exp_avg, exp_avg_sq = spam_update(
        tl.load(p_ptr + offs, mask=mask).to(tl.float32), load_grad(g_ptr, offs, mask, grad_scale_ptr, HAS_GRAD_SCALE),
        exp_avg, exp_avg_sq, lr, bias_correction1, bias_correction2, beta1, beta2, eps, weight_decay, threshold,
        scale, work_ptr, STABLE, CLIP)
    store_rounded(p_ptr + offs, param, mask)
    if STORE_ZEROS:
        exp_avg = tl.zeros([BLOCK], tl.float32)
        exp_avg_sq = tl.zeros([BLOCK], tl.float32)
    store_rounded(m_ptr + offs, exp_avg, mask)
    store_rounded(v_ptr + offs, exp_avg_sq, mask)


@triton.jit
def spam_quantized_kernel(p_ptr, g_ptr, mc_ptr, ms_ptr, vc_ptr, vs_ptr, m_map_ptr, v_map_ptr, step_ptr, lr_ptr,
                          grad_scale_ptr, found_inf_ptr, work_ptr, hp_ptr, n, lr, beta1, beta2, log_beta1, log_beta2,
                          eps, weight_decay, threshold, scale, STABLE: tl.constexpr, CLIP: tl.constexpr,
                          ZERO_OLD: tl.constexpr, STORE_ZEROS: tl.constexpr, LR_IS_TENSOR: tl.constexpr,
                          HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HP_IS_TENSOR: tl.constexpr,
                          BITS: tl.constexpr, QBLOCK: tl.constexpr, NB: tl.constexpr):
    """spam_kernel on block-quantized moments, over NB whole quantization blocks (as adam_quantized_kernel)."""
    beta1, beta2, eps, weight_decay, log_beta1, log_beta2 = adam_hyperparameters(
        beta1, beta2, eps, weight_decay, log_beta1, log_beta2, hp_ptr, HP_IS_TENSOR)
    n, lr, bias_correction1, bias_correction2 = step_scalars(n, lr, lr_ptr, step_ptr, found_inf_ptr, log_beta1,
                                                             log_beta2, LR_IS_TENSOR, HAS_FOUND_INF)
    rows, row_mask, offs, mask = block_tile(n, BITS, QBLOCK, NB)
    if ZERO_OLD:
        exp_avg = tl.zeros([NB, QBLOCK], tl.float32)
        exp_avg_sq = tl.zeros([NB, QBLOCK], tl.float32)
    else:
        exp_avg = decode(mc_ptr, ms_ptr, m_map_ptr, rows, row_mask, BITS, QBLOCK)
        exp_avg_sq = decode(vc_ptr, vs_ptr, v_map_ptr, rows, row_mask, BITS, QBLOCK)
    param, exp_avg, exp_avg_sq = spam_update(
        tl.load(p_ptr + offs, mask=mask).to(tl.float32), load_grad(g_ptr, offs, mask, grad_scale_ptr, HAS_GRAD_SCALE),
        exp_avg, exp_avg_sq, lr, bias_correction1, bias_correction2, beta1, beta2, eps, weight_decay, threshold,
        scale, work_ptr, STABLE, CLIP)
    store_rounded(p_ptr + offs, param, mask)
    if STORE_ZEROS:
        zero_blocks(mc_ptr, ms_ptr, rows, row_mask, BITS, QBLOCK)
        zero_blocks(vc_ptr, vs_ptr, rows, row_mask, BITS, QBLOCK)
    else:
        encode_store(tl.where(mask, exp_avg, 0.0), mc_ptr, ms_ptr, m_map_ptr, rows, row_mask, BITS, QBLOCK)
        encode_store(tl.where(mask, exp_avg_sq, 0.0), vc_ptr, vs_ptr, v_map_ptr, rows, row_mask, BITS, QBLOCK)


# ---- launchers ------------------------------------------------------------------------------------------------------
def _update(p, g, m, v, step, work, hp, *, lr, beta1, beta2, log_beta1, log_beta2, eps, weight_decay, threshold,
            scale, grad_scale, found_inf, **flags) -> None:
    """One update kernel launch for one tensor, its moments plain or quantized. hp: the device hyperparameters
    (HP_LAYOUT), or None and beta1 … weight_decay are numbers (device_hyperparameters)."""
    n, any_ptr = p.numel(), step  # any_ptr stands in for the pointers a mode does not read
    lr_is_tensor = isinstance(lr, torch.Tensor)
    tail = (step, lr if lr_is_tensor else any_ptr, any_ptr if grad_scale is None else grad_scale,
            any_ptr if found_inf is None else found_inf, any_ptr if work is None else work,
            any_ptr if hp is None else hp, n, 0.0 if lr_is_tensor else float(lr), beta1, beta2, log_beta1,
            log_beta2, eps, weight_decay, threshold, scale)
    flags.update(LR_IS_TENSOR=lr_is_tensor, HAS_GRAD_SCALE=grad_scale is not None,
                 HAS_FOUND_INF=found_inf is not None, HP_IS_TENSOR=hp is not None, num_warps=NUM_WARPS)
    if isinstance(m, Quantized):
        fmt, nb = m.fmt, blocks_per_program(m.fmt.bits)
        spam_quantized_kernel[(triton.cdiv(fmt.num_blocks(n), nb),)](
            p, g, m.codes, m.scales, v.codes, v.scales, m.fmt.table(p.device), v.fmt.table(p.device), *tail,
            BITS=fmt.bits, QBLOCK=fmt.block, NB=nb, **flags)
    else:
        spam_kernel[(triton.cdiv(n, BLOCK),)](p, g, m, v, *tail, BLOCK=BLOCK, **flags)


class _Workspace(NamedTuple):
    """One tensor's reduction workspace: thr, thr/M, c/n (work[:4]); per-block maxima; per-block sums of squares."""
    n: int
    num_blocks: int
    work: torch.Tensor
    maxes: torch.Tensor
    sums: torch.Tensor


def _workspace(p: torch.Tensor) -> _Workspace:
    num_blocks = triton.cdiv(p.numel(), PARTIAL_BLOCK)
    width = triton.cdiv(num_blocks, 4) * 4  # keeps each piece 16-byte aligned
    work = torch.empty(4 + 2 * width, dtype=torch.float32, device=p.device)
    return _Workspace(p.numel(), num_blocks, work, work[4:4 + width], work[4 + width:])


def _whole_tensor(spaces: list[_Workspace], field: str, all_reduce) -> list[tuple[torch.Tensor, int]]:
    """Per tensor, the blocks' partial statistics that the next stats kernel reduces, as (entries, count): the
    tensor's own blocks, or with ``all_reduce`` one entry, this statistic of the whole tensor: the local ones of all
    tensors (max|g| in float32, Σg² in float64) go through one ``all_reduce(values, "MAX" | "SUM")``, on the device."""
    if all_reduce is None:
        return [(getattr(w, field), w.num_blocks) for w in spaces]
    maxes = field == "maxes"
    dtype = torch.float32 if maxes else torch.float64
    local = torch.stack([
        (getattr(w, field)[:w.num_blocks].amax() if maxes else getattr(w, field)[:w.num_blocks].double().sum())
        if w.num_blocks else torch.zeros((), dtype=dtype, device=w.work.device) for w in spaces])
    all_reduce(local, "MAX" if maxes else "SUM")
    return [(local[i:i + 1], 1) for i in range(len(spaces))]


def stable_spam_step(params, grads, exp_avgs, exp_avg_sqs, steps, stats_steps, m_norms, v_norms, m_maxes, *, lr,
                     beta1, beta2, eps, weight_decay, gamma1, gamma2, gamma3, scale, reset, official, grad_scale=None,
                     found_inf=None, all_reduce=None) -> None:
    """Five launches per tensor (see the module docstring), in three phases over all tensors: the first
    reduction; AdaClip and the clipped reduction; AdaGN and the update. ``all_reduce``: for tensors that are shards
    of larger ones, reduces the statistics across the ranks after each reduction phase (``_whole_tensor``; two
    small launches per tensor more). See fastopt.ops.spam.stable_spam_step."""
    found_inf = advance_steps(steps + stats_steps, found_inf)
    hp, (b1, beta2, eps, weight_decay, log_b1, log_beta2, g1, gamma2, gamma3) = device_hyperparameters(
        steps[0].device, beta1 * scale, beta2, eps, weight_decay, gamma1 * scale, gamma2, gamma3)
    has = dict(HAS_FOUND_INF=found_inf is not None, HP_IS_TENSOR=hp is not None, num_warps=NUM_WARPS)
    spaces = [_workspace(p) for p in params]
    u = steps if official else stats_steps  # official: AdaClip/AdaGN use Adam's t (quirk (b))
    fi = steps if found_inf is None else [found_inf] * len(params)
    hps = steps if hp is None else [hp] * len(params)

    def partials(i, clipped):
        w = spaces[i]
        partials_kernel[(w.num_blocks,)](grads[i], steps[i] if grad_scale is None else grad_scale, w.maxes, w.sums,
                                         w.work, w.n, HAS_GRAD_SCALE=grad_scale is not None, CLIPPED=clipped,
                                         BLOCK=PARTIAL_BLOCK, num_warps=NUM_WARPS)

    for i in range(len(params)):
        partials(i, False)
    maxes = _whole_tensor(spaces, "maxes", all_reduce)
    for i in range(len(params)):
        adaclip_kernel[(1,)](maxes[i][0], u[i], m_maxes[i], spaces[i].work, fi[i], hps[i], maxes[i][1], gamma3,
                             1 - gamma3, _log(gamma3), R=STATS_BLOCK, **has)
        partials(i, True)
    sums = _whole_tensor(spaces, "sums", all_reduce)
    for i, p in enumerate(params):
        adagn_kernel[(1,)](sums[i][0], u[i], steps[i], m_norms[i], v_norms[i], spaces[i].work, fi[i], hps[i],
                           sums[i][1], g1, 1 - g1, _log(g1), gamma2, 1 - gamma2, _log(gamma2), eps, RESET=reset,
                           R=STATS_BLOCK, **has)
        _update(p, grads[i], exp_avgs[i], exp_avg_sqs[i], steps[i], spaces[i].work, hp, lr=lr, beta1=b1, beta2=beta2,
                log_beta1=log_b1, log_beta2=log_beta2, eps=eps, weight_decay=weight_decay, threshold=0.0, scale=1.0,
                grad_scale=grad_scale, found_inf=found_inf, STABLE=True, CLIP=False,
                ZERO_OLD=reset and not official, STORE_ZEROS=reset and official)


def spam_step(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay, threshold, scale,
              reset, clip, grad_scale=None, found_inf=None) -> None:
    """One update launch per tensor. See fastopt.ops.spam.spam_step."""
    found_inf = advance_steps(steps, found_inf)
    hp, (beta1, beta2, eps, weight_decay, log_beta1, log_beta2) = device_hyperparameters(
        steps[0].device, beta1, beta2, eps, weight_decay)
    for i, p in enumerate(params):
        _update(p, grads[i], exp_avgs[i], exp_avg_sqs[i], steps[i], None, hp, lr=lr, beta1=beta1, beta2=beta2,
                log_beta1=log_beta1, log_beta2=log_beta2, eps=eps, weight_decay=weight_decay, threshold=threshold,
                scale=scale, grad_scale=grad_scale, found_inf=found_inf, STABLE=False, CLIP=clip, ZERO_OLD=reset,
                STORE_ZEROS=False)
