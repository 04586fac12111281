"""Triton Stable-SPAM and SPAM steps: the kernels of ``torch.ops.fastopt.stable_spam_step`` / ``spam_step`` on GPUs
(math: fastopt/ops/spam.py, docs/algorithms.md#stable-spam, #spam).

Every launch covers all tensors of a group (same dtypes, same moment storage), whatever their number
(fastopt/kernels/triton/_common.py). SPAM needs nothing global: one launch advances the step counts, one steps every
tensor. Stable-SPAM needs two reductions of each gradient before its update (max|g| for AdaClip, then the norm of
the clipped gradient for AdaGN); they run on the device, so a step never waits for the host. Per group, with
g = grad / grad_scale, six launches:

  0. advance_kernel      every tensor's t and u += 1 − found_inf
  1. partials_kernel     per 4096-element block of every tensor: max|g| and Σg² into a small fp32 workspace
  2. adaclip_kernel      one program per tensor: M = max of its block maxima; m_max; thr = m_max/(1−θ^u); thr/M
  3. partials_kernel     CLIPPED: only blocks whose max exceeds their tensor's thr re-read g and replace their Σg² by
                         the clipped one (the other programs' loads are masked off and move no memory)
  4. adagn_kernel        one program per tensor: n = sqrt(Σ Σg²) (float64 across blocks); m_norm, v_norm; the factor
                         c/n (1 when n = 0); t ← 1 on a reset
  5. spam_kernel         the fused update of every tensor, shared with SPAM (float or quantized moments)

For sharded params (FSDP2), the statistics of the whole tensors come from an all-reduce of every tensor's local
statistic after 1 (max) and after 3 (sum), each preceded by one launch that reduces the blocks of each tensor
(tensor_stats_kernel): two collectives and two launches more per step, for all tensors together.

Reductions run in a fixed order, without atomics: a resumed run repeats a step bit for bit. A nonzero found_inf
masks every store of statistics, counters, moments and params. All hyperparameters, the cosine factor s and whether
this step resets (and SPAM's clipping) included, are read from ``hp`` on the device: nothing recompiles when they
change, and nothing is read on the host.

Bytes moved per parameter (the floor on any GPU):
  update (both algorithms): read p, g, m, v, write p, m, v — fp32 params and moments 28; bf16 both 14; bf16 params
      with fp32 moments 20; 4-bit moments 14.125 (bf16 params 8.125); 8-bit 16.06 (bf16 params 10.06).
  Stable-SPAM adds pass 1, one read of g (fp32 4, bf16/fp16 2), and pass 3, another read of g in the blocks that
      hold a clipped entry only (0 when nothing is clipped); the workspace is 8 bytes per 4096 params.
  Stable-SPAM total: fp32 32 (+4 in clipped blocks), bf16 16 (+2). SPAM: the update alone, as Adam.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastopt.kernels.triton._common import (BLOCK, NUM_WARPS, Launch, advance, checked_launches, column,
                                            device_hp, f32_column, load, program_tensor, store_rounded)
from fastopt.kernels.triton.adam import adam_moments, adam_param, one_minus_power, step_scalars
from fastopt.kernels.triton.quant import block_tile, blocks_per_program, decode, encode_moments
from fastopt.kernels import checks

PARTIAL_BLOCK = tl.constexpr(4096)  # gradient elements per workspace entry
STATS_BLOCK = 1024    # workspace entries a stats program reads at once
# The table's columns: pointers to the param, its grad, both moments (float, or codes), both moments' scales
# (quantized), Adam's counter t, the statistics' counter u, m_norm, v_norm, m_max (Stable-SPAM's, 0 for SPAM); then
# Launch's element count and first programs of the update and of the reductions.
P, G, M, V = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
M_SCALES, V_SCALES, STEP, STATS_STEP = tl.constexpr(4), tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
M_NORM, V_NORM, M_MAX = tl.constexpr(8), tl.constexpr(9), tl.constexpr(10)
N, FIRST, FIRST_PARTIAL, COLUMNS = tl.constexpr(11), tl.constexpr(12), tl.constexpr(13), tl.constexpr(14)
# hp layouts (fastopt/ops/library.py HP_LAYOUTS)
STABLE_HP = ("lr", "beta1", "beta2", "eps", "weight_decay", "gamma1", "gamma2", "gamma3", "scale", "reset")
SPAM_HP = ("lr", "beta1", "beta2", "eps", "weight_decay", "threshold", "scale", "reset", "clip")


# ---- device helpers ----------------------------------------------------------------------------------------------
@triton.jit
def load_grad(g_ptr, offs, mask, grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr, FULL: tl.constexpr):
    """g / grad_scale in fp32, 0 where masked off. Every pass computes g with these same operations, so AdaClip's
    decisions agree between the reductions and the update."""
    g = load(g_ptr + offs, mask, FULL).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = g / tl.load(grad_scale_ptr).to(tl.float32)
    return g


@triton.jit
def adaclip(g, work_ptr):
    """Where |g| > thr: g·thr/M (thr and thr/M are the tensor's first two workspace entries)."""
    return tl.where(tl.abs(g) > tl.load(work_ptr), g * tl.load(work_ptr + 1), g)


@triton.jit
def keep_step(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """False when GradScaler found an inf: the step then stores nothing."""
    keep = tl.full((), 1, tl.int1)
    if HAS_FOUND_INF:
        keep = tl.load(found_inf_ptr) == 0
    return keep


@triton.jit
def block_max(values_ptr, first, count, R: tl.constexpr):
    """max of ``count`` non-negative float32 values from ``first`` on, NaN if any is NaN (tl.max drops NaN on GPUs)."""
    maxes = tl.zeros([R], tl.float32)
    start = 0
    while start < count:
        idx = start + tl.arange(0, R)
        maxes = tl.maximum(maxes, tl.load(values_ptr + first + idx, mask=idx < count, other=0.0),
                           propagate_nan=tl.PropagateNan.ALL)
        start += R
    total = tl.sum(maxes, axis=0)  # NaN iff a value is (they are >= 0)
    return tl.where(total == total, tl.max(maxes, axis=0), total)


@triton.jit
def block_sum(values_ptr, first, count, R: tl.constexpr):
    """Σ of ``count`` float32 values from ``first`` on, in float64 (a float32 sum of many blocks drifts by ~1e-5)."""
    sums = tl.zeros([R], tl.float64)
    start = 0
    while start < count:
        idx = start + tl.arange(0, R)
        sums += tl.load(values_ptr + first + idx, mask=idx < count, other=0.0).to(tl.float64)
        start += R
    return tl.sum(sums, axis=0)


@triton.jit
def spam_update(param, grad, exp_avg, exp_avg_sq, bias_correction1, bias_correction2, hp_ptr, work_ptr,
                STABLE: tl.constexpr):
    """Either algorithm's update of fp32 tiles (grad already divided by grad_scale): (param, exp_avg, exp_avg_sq).
    Stable-SPAM reads beta1 = β1·s; SPAM its clipping flag, threshold and scale, all from hp."""
    lr = tl.load(hp_ptr).to(tl.float32)
    beta2, eps, weight_decay = tl.load(hp_ptr + 2), tl.load(hp_ptr + 3), tl.load(hp_ptr + 4)
    if STABLE:  # decay first, AdaClip, AdaGN, then AdamW with beta1 = β1·s
        beta1 = tl.load(hp_ptr + 1) * tl.load(hp_ptr + 8)
        grad = adaclip(grad, work_ptr) * tl.load(work_ptr + 2)
        param, exp_avg, exp_avg_sq = adam_moments(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2,
                                                  weight_decay.to(tl.float32), work_ptr, False, True, False, False)
        param = adam_param(param, exp_avg, exp_avg_sq, lr, bias_correction1, bias_correction2, eps.to(tl.float32))
    else:  # spike clipping against v before this step's update; the scaled update; decay last
        beta1 = tl.load(hp_ptr + 1)
        threshold, scale = tl.load(hp_ptr + 5).to(tl.float32), tl.load(hp_ptr + 6).to(tl.float32)
        bound = tl.where(tl.load(hp_ptr + 8) != 0, threshold * exp_avg_sq, float("inf"))  # no clipping: +inf
        root = tl.sqrt(bound)
        grad = tl.where(grad * grad > bound, tl.where(grad < 0, -root, root), grad)
        _, exp_avg, exp_avg_sq = adam_moments(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, 0.0, work_ptr, False,
                                              True, False, False)
        step_size = scale * lr * tl.sqrt(bias_correction2) / bias_correction1
        param = param - step_size * exp_avg / (tl.sqrt(exp_avg_sq) + eps.to(tl.float32))
        param = param - lr * weight_decay.to(tl.float32) * param
    return param, exp_avg, exp_avg_sq


@triton.jit
def zero_blocks(codes_ptr, scales_ptr, rows, row_mask, BITS: tl.constexpr, QBLOCK: tl.constexpr):
    """A reset of quantized blocks: codes 0 and scale 0 (the unsigned maps have no 0; scale 0 makes a block 0)."""
    offs = rows[:, None] * (QBLOCK * BITS // 8) + tl.arange(0, QBLOCK * BITS // 8)[None, :]
    tl.store(codes_ptr + offs, tl.zeros(offs.shape, tl.uint8), mask=row_mask[:, None])
    tl.store(scales_ptr + rows, tl.zeros(rows.shape, tl.float32), mask=row_mask)


# ---- Stable-SPAM's reductions ------------------------------------------------------------------------------------
@triton.jit
def partials_kernel(table_ptr, partial_map_ptr, g_like, grad_scale_ptr, maxes_ptr, sums_ptr, work_ptr,
                    HAS_GRAD_SCALE: tl.constexpr, CLIPPED: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Per block of every tensor: max|g| and Σg²; CLIPPED: Σg² after AdaClip, in the blocks that hold a clipped entry
    only. Entries are indexed by program, the tensors' blocks end to end."""
    pid = tl.program_id(0)
    t, row, n, block = program_tensor(table_ptr, partial_map_ptr, COLUMNS, N, FIRST_PARTIAL)
    g_ptr = column(row, G, g_like, ALIGNED)
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if CLIPPED:
        work = work_ptr + t * 4
        clipped = tl.load(maxes_ptr + pid) > tl.load(work)
        n = tl.where(clipped, n, 0)  # a block without clipped entries loads nothing
        g = adaclip(load_grad(g_ptr, offs, offs < n, grad_scale_ptr, HAS_GRAD_SCALE, False), work)
        tl.store(sums_ptr + pid, tl.sum(g * g, axis=0), mask=clipped)
    else:
        if (block + 1) * BLOCK <= n:  # a whole block: no mask (128-bit loads)
            g = load_grad(g_ptr, offs, offs < n, grad_scale_ptr, HAS_GRAD_SCALE, True)
        else:
            g = load_grad(g_ptr, offs, offs < n, grad_scale_ptr, HAS_GRAD_SCALE, False)
        sum_sq = tl.sum(g * g, axis=0)  # NaN iff g holds a NaN: then so is the max, as torch.amax's
        tl.store(maxes_ptr + pid, tl.where(sum_sq == sum_sq, tl.max(tl.abs(g), axis=0), sum_sq))
        tl.store(sums_ptr + pid, sum_sq)


@triton.jit
def tensor_stats_kernel(table_ptr, values_ptr, out_ptr, MAX: tl.constexpr, R: tl.constexpr):
    """One program per tensor: the max (float32) or sum (float64) of its blocks' entries, into out[tensor] (what
    sharded params all-reduce across their shards)."""
    t = tl.program_id(0)
    row = table_ptr + t.to(tl.int64) * COLUMNS
    first, count = tl.load(row + FIRST_PARTIAL), tl.cdiv(tl.load(row + N), PARTIAL_BLOCK)
    if MAX:
        tl.store(out_ptr + t, block_max(values_ptr, first, count, R))
    else:
        tl.store(out_ptr + t, block_sum(values_ptr, first, count, R))


@triton.jit
def adaclip_kernel(table_ptr, maxes_ptr, work_ptr, found_inf_ptr, hp_ptr, HAS_FOUND_INF: tl.constexpr,
                   OFFICIAL: tl.constexpr, REDUCED: tl.constexpr, R: tl.constexpr):
    """One program per tensor: M (its blocks' maxima, or REDUCED: maxes[tensor], the whole tensor's), the running max
    m_max, AdaClip's threshold thr and thr/M (into the tensor's workspace)."""
    t = tl.program_id(0)
    row = table_ptr + t.to(tl.int64) * COLUMNS
    if REDUCED:
        M = tl.load(maxes_ptr + t)
    else:
        M = block_max(maxes_ptr, tl.load(row + FIRST_PARTIAL), tl.cdiv(tl.load(row + N), PARTIAL_BLOCK), R)
    theta = tl.load(hp_ptr + 7)  # gamma3
    m_max_ptr = f32_column(row, M_MAX)
    m_max = theta.to(tl.float32) * tl.load(m_max_ptr) + (1.0 - theta).to(tl.float32) * M  # fp32, as the reference
    u = tl.load(f32_column(row, STEP if OFFICIAL else STATS_STEP)).to(tl.float64)  # official: Adam's t (quirk (b))
    thr = (m_max.to(tl.float64) / one_minus_power(theta, u)).to(tl.float32)
    keep = keep_step(found_inf_ptr, HAS_FOUND_INF)
    tl.debug_barrier()  # every thread has read m_max before one of them overwrites it
    work = work_ptr + t * 4
    tl.store(work, thr)
    tl.store(work + 1, tl.where(M > 0, thr, 1.0) / tl.where(M > 0, M, 1.0))  # 1 when M = 0
    tl.store(m_max_ptr, m_max, mask=keep)


@triton.jit
def adagn_kernel(table_ptr, sums_ptr, reduced_ptr, work_ptr, found_inf_ptr, hp_ptr, HAS_FOUND_INF: tl.constexpr,
                 OFFICIAL: tl.constexpr, REDUCED: tl.constexpr, R: tl.constexpr):
    """One program per tensor: the clipped norm n (its blocks' sums, or REDUCED: the whole tensor's sum of squares,
    float64), the running norm statistics, AdaGN's factor c/n; t ← 1 on a reset."""
    t = tl.program_id(0)
    row = table_ptr + t.to(tl.int64) * COLUMNS
    if REDUCED:
        total = tl.load(reduced_ptr + t)
    else:
        total = block_sum(sums_ptr, tl.load(row + FIRST_PARTIAL), tl.cdiv(tl.load(row + N), PARTIAL_BLOCK), R)
    norm = tl.sqrt(total)
    eps = tl.load(hp_ptr + 3).to(tl.float32)
    gamma1 = tl.load(hp_ptr + 5) * tl.load(hp_ptr + 8)  # γ1·s
    gamma2 = tl.load(hp_ptr + 6)
    step_ptr = f32_column(row, STEP)
    m_norm_ptr, v_norm_ptr = f32_column(row, M_NORM), f32_column(row, V_NORM)
    u = tl.load(f32_column(row, STEP if OFFICIAL else STATS_STEP)).to(tl.float64)
    m_norm = gamma1 * tl.load(m_norm_ptr).to(tl.float64) + (1.0 - gamma1) * norm
    v_norm = gamma2 * tl.load(v_norm_ptr).to(tl.float64) + (1.0 - gamma2) * norm * norm
    c = (m_norm / one_minus_power(gamma1, u)) / (tl.sqrt(v_norm / one_minus_power(gamma2, u)) + eps)
    keep = keep_step(found_inf_ptr, HAS_FOUND_INF)
    tl.debug_barrier()  # every thread has read the statistics (and u, which may be t) before they are overwritten
    tl.store(work_ptr + t * 4 + 2, (tl.where(norm > 0, c, 1.0) / tl.where(norm > 0, norm, 1.0)).to(tl.float32))
    tl.store(m_norm_ptr, m_norm.to(tl.float32), mask=keep)
    tl.store(v_norm_ptr, v_norm.to(tl.float32), mask=keep)
    tl.store(step_ptr, 1.0, mask=keep & (tl.load(hp_ptr + 9) != 0))  # a reset: Adam's count starts over


# ---- the fused update ------------------------------------------------------------------------------------------------
@triton.jit
def spam_program(row, n, program, p_like, m_like, m_map_ptr, v_map_ptr, work, hp_ptr, grad_scale_ptr, read_old,
                 store_zeros, bias_correction1, bias_correction2, STABLE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                 BITS: tl.constexpr, QBLOCK: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr,
                 ALIGNED: tl.constexpr, FULL: tl.constexpr):
    """One program's elements of the tensor in table row ``row`` (FULL: all inside it, no masks); the old moments
    count as 0 unless ``read_old``, and zeros are stored when ``store_zeros``."""
    p_ptr, g_ptr = column(row, P, p_like, ALIGNED), column(row, G, p_like, ALIGNED)
    if BITS == 0:
        offs = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        m_ptr, v_ptr = column(row, M, m_like, ALIGNED), column(row, V, m_like, ALIGNED)
        param, exp_avg, exp_avg_sq = spam_update(
            load(p_ptr + offs, mask, FULL).to(tl.float32), load_grad(g_ptr, offs, mask, grad_scale_ptr, HAS_GRAD_SCALE,
                                                                     FULL),
            tl.where(read_old, load(m_ptr + offs, mask, FULL).to(tl.float32), 0.0),
            tl.where(read_old, load(v_ptr + offs, mask, FULL).to(tl.float32), 0.0), bias_correction1,
            bias_correction2, hp_ptr, work, STABLE)
        store_rounded(p_ptr + offs, param, mask, FULL)
        store_rounded(m_ptr + offs, tl.where(store_zeros, 0.0, exp_avg), mask, FULL)
        store_rounded(v_ptr + offs, tl.where(store_zeros, 0.0, exp_avg_sq), mask, FULL)
    else:
        rows, row_mask, offs, mask = block_tile(n, program, BITS, QBLOCK, NB)
        mc_ptr, vc_ptr = column(row, M, m_like, ALIGNED), column(row, V, m_like, ALIGNED)
        ms_ptr, vs_ptr = f32_column(row, M_SCALES), f32_column(row, V_SCALES)
        param, exp_avg, exp_avg_sq = spam_update(
            load(p_ptr + offs, mask, FULL).to(tl.float32), load_grad(g_ptr, offs, mask, grad_scale_ptr, HAS_GRAD_SCALE,
                                                                     FULL),
            tl.where(read_old, decode(mc_ptr, ms_ptr, m_map_ptr, rows, row_mask, BITS, QBLOCK, FULL), 0.0),
            tl.where(read_old, decode(vc_ptr, vs_ptr, v_map_ptr, rows, row_mask, BITS, QBLOCK, FULL), 0.0),
            bias_correction1, bias_correction2, hp_ptr, work, STABLE)
        store_rounded(p_ptr + offs, param, mask, FULL)
        if store_zeros:
            zero_blocks(mc_ptr, ms_ptr, rows, row_mask, BITS, QBLOCK)
            zero_blocks(vc_ptr, vs_ptr, rows, row_mask, BITS, QBLOCK)
        else:
            encode_moments(exp_avg, exp_avg_sq, mask, mc_ptr, ms_ptr, vc_ptr, vs_ptr, m_map_ptr, v_map_ptr, rows,
                           row_mask, BITS, QBLOCK, FULL)


@triton.jit
def spam_kernel(table_ptr, block_map_ptr, p_like, m_like, m_map_ptr, v_map_ptr, work_ptr, hp_ptr, grad_scale_ptr,
                found_inf_ptr, STABLE: tl.constexpr, OFFICIAL: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                HAS_FOUND_INF: tl.constexpr, BITS: tl.constexpr, QBLOCK: tl.constexpr, NB: tl.constexpr,
                BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """The update of every tensor of the group, with float moments (BITS 0, m_like's dtype, BLOCK elements a program)
    or codes + scales (BITS 4 / 8, NB quantization blocks of QBLOCK a program). A reset that this update sees (SPAM's,
    Stable-SPAM's corrected one) takes the old moments as 0; Stable-SPAM's official reset
    updates with the old ones and stores zeros (quirk (a)). ALIGNED: the streamed tensors are 16-byte aligned."""
    t, row, n, program = program_tensor(table_ptr, block_map_ptr, COLUMNS, N, FIRST)
    if STABLE:
        beta1 = tl.load(hp_ptr + 1) * tl.load(hp_ptr + 8)
        reset = tl.load(hp_ptr + 9) != 0
    else:
        beta1 = tl.load(hp_ptr + 1)
        reset = tl.load(hp_ptr + 7) != 0
    if OFFICIAL:  # the official reset: the update uses the old moments, zeros are stored after it
        read_old, store_zeros = tl.full((), 1, tl.int1), reset
    else:  # a reset this update sees: the old moments count as 0
        read_old, store_zeros = reset == 0, tl.full((), 0, tl.int1)
    n, bias_correction1, bias_correction2 = step_scalars(n, f32_column(row, STEP), found_inf_ptr, beta1,
                                                         tl.load(hp_ptr + 2), HAS_FOUND_INF)
    work = work_ptr + t * 4
    if (program + 1) * BLOCK <= n:
        spam_program(row, n, program, p_like, m_like, m_map_ptr, v_map_ptr, work, hp_ptr, grad_scale_ptr, read_old,
                     store_zeros, bias_correction1, bias_correction2, STABLE, HAS_GRAD_SCALE, BITS, QBLOCK, NB, BLOCK,
                     ALIGNED, True)
    else:
        spam_program(row, n, program, p_like, m_like, m_map_ptr, v_map_ptr, work, hp_ptr, grad_scale_ptr, read_old,
                     store_zeros, bias_correction1, bias_correction2, STABLE, HAS_GRAD_SCALE, BITS, QBLOCK, NB, BLOCK,
                     ALIGNED, False)


# ---- launchers ------------------------------------------------------------------------------------------------------
_LAYOUT = dict(blocks=(BLOCK, PARTIAL_BLOCK.value), streams=V_SCALES.value + 1)  # update and reduction programs


def _launches(kept, op, device, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, exp_avg_map,
              exp_avg_sq_map, bits, counters: dict[str, list]) -> list:
    """This call's launch groups (fastopt/kernels/triton/_common.py), their tables set up for ``grads``, with the
    table's columns (above) over all the op's tensors; SPAM's table has no statistics columns."""
    scales = [exp_avg_scales, exp_avg_sq_scales] if bits else [[], []]
    columns = [params, grads, exp_avgs, exp_avg_sqs, *scales, *counters.values()]
    columns += [[]] * (N.value - len(columns))  # pointer columns up to the element count's
    return checked_launches(kept, columns, _LAYOUT, op, device, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales,
                            exp_avg_sq_scales, exp_avg_map, exp_avg_sq_map, bits, counters)


def _update(launch: Launch, p_like, m_like, maps, work, hp, grad_scale, found_inf, bits, **modes) -> None:
    if launch.programs[0]:
        spam_kernel[(launch.programs[0],)](
            launch.table, launch.maps[0], p_like, m_like, *maps, work, hp, hp if grad_scale is None else grad_scale,
            hp if found_inf is None else found_inf, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, BITS=bits, QBLOCK=256 if bits == 8 else 128,
            NB=blocks_per_program(bits) if bits else 1, BLOCK=BLOCK, ALIGNED=launch.aligned, num_warps=NUM_WARPS,
            **modes)


def stable_spam_step(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, steps, stats_steps,
                     m_norms, v_norms, m_maxes, exp_avg_map, exp_avg_sq_map, bits, hp, *, official, grad_stats=None,
                     grad_scale=None, found_inf=None, all_reduce=None, kept=None) -> None:
    """torch.ops.fastopt.stable_spam_step on Triton (same arguments; contiguous tensors on one device): six launches
    per group of tensors with the same dtypes (the module docstring). ``all_reduce(values, "MAX" | "SUM")``: for
    tensors that are shards of larger ones, reduces every tensor's statistic across the ranks, in place, on the
    device (fastopt/ops/spam.py). ``grad_stats`` (statistics reduced elsewhere) is the C++ kernels' route to that."""
    if grad_stats is not None:
        raise NotImplementedError("fastopt.stable_spam_step on Triton takes no grad_stats: it reduces across shards "
                                  "itself (all_reduce)")
    if not params:
        return
    device = params[0].device
    counters = [steps, stats_steps, m_norms, v_norms, m_maxes]
    checks.hyperparameters(hp, "stable_spam_step", device)
    groups = _launches(kept, "stable_spam_step", device, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales,
                       exp_avg_sq_scales, exp_avg_map, exp_avg_sq_map, bits,
                       dict(zip(("steps", "stats_steps", "m_norms", "v_norms", "m_maxes"), counters)))
    hp = device_hp(hp, device)
    maps = [exp_avg_map, exp_avg_sq_map] if bits else [hp, hp]
    has = dict(HAS_FOUND_INF=found_inf is not None, OFFICIAL=official, num_warps=NUM_WARPS)
    fi = hp if found_inf is None else found_inf
    for p_like, m_like, launch in groups:
        advance(launch, STEP, STATS_STEP, found_inf)
        partials = launch.programs[1]
        work = torch.empty(4 * launch.count + 2 * partials, dtype=torch.float32, device=device)
        maxes, sums = work[4 * launch.count:4 * launch.count + partials], work[4 * launch.count + partials:]

        def reduce(clipped: bool) -> None:
            if partials:
                partials_kernel[(partials,)](launch.table, launch.maps[1], p_like,
                                             hp if grad_scale is None else grad_scale, maxes, sums, work,
                                             HAS_GRAD_SCALE=grad_scale is not None, CLIPPED=clipped,
                                             BLOCK=PARTIAL_BLOCK, ALIGNED=launch.aligned, num_warps=NUM_WARPS)

        def whole(values: torch.Tensor, op: str) -> torch.Tensor:
            """Every tensor's statistic of its local blocks, all-reduced across the shards: one launch, one collective."""
            out = torch.empty(launch.count, dtype=torch.float32 if op == "MAX" else torch.float64, device=device)
            tensor_stats_kernel[(launch.count,)](launch.table, values, out, MAX=op == "MAX", R=STATS_BLOCK,
                                                 num_warps=NUM_WARPS)
            all_reduce(out, op)
            return out

        reduce(False)
        reduced = all_reduce is not None
        adaclip_kernel[(launch.count,)](launch.table, whole(maxes, "MAX") if reduced else maxes, work, fi, hp,
                                        REDUCED=reduced, R=STATS_BLOCK, **has)
        reduce(True)
        total = whole(sums, "SUM") if reduced else hp
        adagn_kernel[(launch.count,)](launch.table, sums, total, work, fi, hp, REDUCED=reduced, R=STATS_BLOCK, **has)
        _update(launch, p_like, m_like, maps, work, hp, grad_scale, found_inf, bits, STABLE=True,
                OFFICIAL=official)


def spam_step(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, steps, exp_avg_map,
              exp_avg_sq_map, bits, hp, *, grad_scale=None, found_inf=None, kept=None) -> None:
    """torch.ops.fastopt.spam_step on Triton (same arguments): two launches per group of tensors with the same
    dtypes, one for the step counts, one for the update."""
    if not params:
        return
    device = params[0].device
    checks.hyperparameters(hp, "spam_step", device)
    groups = _launches(kept, "spam_step", device, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales,
                       exp_avg_sq_scales, exp_avg_map, exp_avg_sq_map, bits, {"steps": steps})
    hp = device_hp(hp, device)
    maps = [exp_avg_map, exp_avg_sq_map] if bits else [hp, hp]
    for p_like, m_like, launch in groups:
        advance(launch, STEP, found_inf=found_inf)
        _update(launch, p_like, m_like, maps, hp, hp, grad_scale, found_inf, bits, STABLE=False,
                OFFICIAL=False)
