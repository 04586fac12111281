"""Triton Adam/AdamW step: the kernel of ``torch.ops.fastopt.adam_step`` on GPUs (math: fastopt/ops/adam.py,
docs/algorithms.md#adamw-and-adam).

One launch advances every tensor's step count, then one launch per group of tensors with the same dtypes steps all
of them (fastopt/kernels/triton/_common.py: a table of pointers and a block map); moments are float tensors (BITS 0)
or block-quantized codes + scales (BITS 4 or 8): a program then decodes its tile of whole quantization blocks in
registers, updates them and the parameter in fp32, and re-encodes them (codecs: quant.py). Bias corrections are
computed in the kernel from the on-device step count, in float64. With GradScaler's ``found_inf`` set, the counts
advance by 1 − found_inf and every store is masked off: no host synchronization.

Bytes moved per parameter (the floor on any GPU): read p, g, m, v and write p, m, v — fp32 params and states 28;
bf16 params and states 14; bf16 params, fp32 states 20; +2·state bytes with amsgrad; fp32 params with 4-bit states
14.125 (codes read+written 2·2·0.5, scales 2·2·4/128), 8-bit 16.06; bf16 params 6 fewer.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastopt.kernels.triton._common import (BLOCK, NUM_WARPS, advance, checked_launches, column, device_hp,
                                            f32_column, load, program_tensor, store_rounded)
from fastopt.kernels.triton.quant import block_tile, blocks_per_program, decode, encode_moments
from fastopt.kernels import checks

# The table's columns (then the element count and the first program): pointers to the param, its grad, both moments
# (float, or codes), both moments' scales (quantized), amsgrad's running max, the step count.
P, G, M, V = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
M_SCALES, V_SCALES, VMAX, STEP = tl.constexpr(4), tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
COLUMNS, N, FIRST = tl.constexpr(10), tl.constexpr(8), tl.constexpr(9)  # Launch's layout


@triton.jit
def one_minus_power(beta, t):
    """1 − β^t in float64 (β >= 0; β = 0 gives 1 without taking log 0)."""
    positive = beta > 0
    return tl.where(positive, 1.0 - tl.exp(t * tl.log(tl.where(positive, beta, 1.0))), 1.0)


@triton.jit
def step_scalars(n, step_ptr, found_inf_ptr, beta1, beta2, HAS_FOUND_INF: tl.constexpr):
    """(n, bias_correction1, bias_correction2) for this step, read on the device: nothing reaches the host.
    GradScaler's found_inf turns n into 0 so the step touches nothing. The betas are float64."""
    if HAS_FOUND_INF:
        n = tl.where(tl.load(found_inf_ptr) == 0, n, 0)
    t = tl.load(step_ptr).to(tl.float64)
    return n, one_minus_power(beta1, t).to(tl.float32), one_minus_power(beta2, t).to(tl.float32)


@triton.jit
def adam_moments(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, weight_decay, grad_scale_ptr,
                 MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, INDEPENDENT_DECAY: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr):
    """Weight decay and the new moments (fp32): returns (param, exp_avg, exp_avg_sq). The betas are float64 scalars:
    1 − β is taken before rounding to fp32 (1 − β2 in fp32 from a rounded β2 = 0.99 would be off by 1e-6)."""
    one_minus_beta1, one_minus_beta2 = (1.0 - beta1).to(tl.float32), (1.0 - beta2).to(tl.float32)
    beta1, beta2 = beta1.to(tl.float32), beta2.to(tl.float32)
    if MAXIMIZE:
        grad = -grad
    if HAS_GRAD_SCALE:
        grad = grad / tl.load(grad_scale_ptr).to(tl.float32)
    if DECOUPLED:
        if INDEPENDENT_DECAY:
            param = param * (1.0 - weight_decay)
        else:
            param = param * (1.0 - lr * weight_decay)
    else:
        grad = grad + weight_decay * param
    exp_avg = beta1 * exp_avg + one_minus_beta1 * grad
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * grad * grad
    return param, exp_avg, exp_avg_sq


@triton.jit
def adam_param(param, exp_avg, exp_avg_sq, lr, bias_correction1, bias_correction2, eps):
    denom = tl.sqrt(exp_avg_sq) / tl.sqrt(bias_correction2) + eps
    return param - (lr / bias_correction1) * exp_avg / denom


@triton.jit
def adam_program(row, n, program, p_like, m_like, m_map_ptr, v_map_ptr, hp_ptr, grad_scale_ptr, bias_correction1,
                 bias_correction2, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, INDEPENDENT_DECAY: tl.constexpr,
                 AMSGRAD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, BITS: tl.constexpr, QBLOCK: tl.constexpr,
                 NB: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, FULL: tl.constexpr):
    """One program's elements of the tensor in table row ``row``; FULL: all of them lie inside it (no masks)."""
    lr, beta1, beta2 = tl.load(hp_ptr).to(tl.float32), tl.load(hp_ptr + 1), tl.load(hp_ptr + 2)
    eps, weight_decay = tl.load(hp_ptr + 3).to(tl.float32), tl.load(hp_ptr + 4).to(tl.float32)
    p_ptr, g_ptr = column(row, P, p_like, ALIGNED), column(row, G, p_like, ALIGNED)
    if BITS == 0:
        offs = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        m_ptr, v_ptr = column(row, M, m_like, ALIGNED), column(row, V, m_like, ALIGNED)
        param, exp_avg, exp_avg_sq = adam_moments(
            load(p_ptr + offs, mask, FULL).to(tl.float32), load(g_ptr + offs, mask, FULL).to(tl.float32),
            load(m_ptr + offs, mask, FULL).to(tl.float32), load(v_ptr + offs, mask, FULL).to(tl.float32),
            lr, beta1, beta2, weight_decay, grad_scale_ptr, MAXIMIZE, DECOUPLED, INDEPENDENT_DECAY, HAS_GRAD_SCALE)
        store_rounded(m_ptr + offs, exp_avg, mask, FULL)
        store_rounded(v_ptr + offs, exp_avg_sq, mask, FULL)
        if AMSGRAD:
            vmax_ptr = column(row, VMAX, m_like, ALIGNED)
            exp_avg_sq = tl.maximum(exp_avg_sq, load(vmax_ptr + offs, mask, FULL).to(tl.float32))
            store_rounded(vmax_ptr + offs, exp_avg_sq, mask, FULL)
        param = adam_param(param, exp_avg, exp_avg_sq, lr, bias_correction1, bias_correction2, eps)
        store_rounded(p_ptr + offs, param, mask, FULL)
    else:
        rows, row_mask, offs, mask = block_tile(n, program, BITS, QBLOCK, NB)
        mc_ptr, vc_ptr = column(row, M, m_like, ALIGNED), column(row, V, m_like, ALIGNED)
        ms_ptr, vs_ptr = f32_column(row, M_SCALES), f32_column(row, V_SCALES)
        param, exp_avg, exp_avg_sq = adam_moments(
            load(p_ptr + offs, mask, FULL).to(tl.float32), load(g_ptr + offs, mask, FULL).to(tl.float32),
            decode(mc_ptr, ms_ptr, m_map_ptr, rows, row_mask, BITS, QBLOCK, FULL),
            decode(vc_ptr, vs_ptr, v_map_ptr, rows, row_mask, BITS, QBLOCK, FULL),
            lr, beta1, beta2, weight_decay, grad_scale_ptr, MAXIMIZE, DECOUPLED, INDEPENDENT_DECAY, HAS_GRAD_SCALE)
        param = adam_param(param, exp_avg, exp_avg_sq, lr, bias_correction1, bias_correction2, eps)
        store_rounded(p_ptr + offs, param, mask, FULL)
        encode_moments(exp_avg, exp_avg_sq, mask, mc_ptr, ms_ptr, vc_ptr, vs_ptr, m_map_ptr, v_map_ptr, rows, row_mask,
                       BITS, QBLOCK, FULL)


@triton.jit
def adam_kernel(table_ptr, block_map_ptr, p_like, m_like, m_map_ptr, v_map_ptr, hp_ptr, grad_scale_ptr, found_inf_ptr,
                MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, INDEPENDENT_DECAY: tl.constexpr,
                AMSGRAD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, BITS: tl.constexpr,
                QBLOCK: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """hp = [lr, beta1, beta2, eps, weight_decay]. BITS 0: float moments (m_like's dtype), BLOCK elements a program;
    BITS 4 / 8: codes (m_like: uint8) and scales, NB quantization blocks of QBLOCK (BLOCK elements) a program.
    ALIGNED: the launch checked that the streamed tensors are 16-byte aligned."""
    t, row, n, program = program_tensor(table_ptr, block_map_ptr, COLUMNS, N, FIRST)
    n, bias_correction1, bias_correction2 = step_scalars(n, f32_column(row, STEP), found_inf_ptr, tl.load(hp_ptr + 1),
                                                         tl.load(hp_ptr + 2), HAS_FOUND_INF)
    if (program + 1) * BLOCK <= n:
        adam_program(row, n, program, p_like, m_like, m_map_ptr, v_map_ptr, hp_ptr, grad_scale_ptr, bias_correction1,
                     bias_correction2, MAXIMIZE, DECOUPLED, INDEPENDENT_DECAY, AMSGRAD, HAS_GRAD_SCALE, BITS, QBLOCK,
                     NB, BLOCK, ALIGNED, True)
    else:
        adam_program(row, n, program, p_like, m_like, m_map_ptr, v_map_ptr, hp_ptr, grad_scale_ptr, bias_correction1,
                     bias_correction2, MAXIMIZE, DECOUPLED, INDEPENDENT_DECAY, AMSGRAD, HAS_GRAD_SCALE, BITS, QBLOCK,
                     NB, BLOCK, ALIGNED, False)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, max_exp_avg_sqs, steps,
              exp_avg_map, exp_avg_sq_map, bits, hp, *, decoupled, maximize, independent_decay, grad_scale=None,
              found_inf=None, kept=None) -> None:
    """torch.ops.fastopt.adam_step on Triton (same arguments; contiguous tensors on one device): per group of tensors
    with the same dtypes, one launch for the step counts and one for the update. ``kept``: fastopt.kernels.checks.Kept."""
    if not params:
        return
    device = params[0].device
    checks.hyperparameters(hp, "adam_step", device)
    amsgrad = len(max_exp_avg_sqs) > 0
    scales = [exp_avg_scales, exp_avg_sq_scales] if bits else [[], []]
    columns = [params, grads, exp_avgs, exp_avg_sqs, *scales, max_exp_avg_sqs, steps]
    groups = checked_launches(kept, columns, dict(streams=VMAX.value + 1), "adam_step", device, params, grads,
                              exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, exp_avg_map, exp_avg_sq_map,
                              bits, {"steps": steps}, max_exp_avg_sqs)
    hp = device_hp(hp, device)
    any_ptr = hp  # stands in for the pointers a mode does not read
    for p_like, m_like, launch in groups:
        advance(launch, STEP, found_inf=found_inf)
        if not launch.programs[0]:
            continue
        adam_kernel[(launch.programs[0],)](
            launch.table, launch.maps[0], p_like, m_like,
            exp_avg_map if bits else any_ptr, exp_avg_sq_map if bits else any_ptr, hp,
            any_ptr if grad_scale is None else grad_scale, any_ptr if found_inf is None else found_inf,
            MAXIMIZE=maximize, DECOUPLED=decoupled, INDEPENDENT_DECAY=independent_decay, AMSGRAD=amsgrad,
            HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, BITS=bits,
            QBLOCK=256 if bits == 8 else 128, NB=blocks_per_program(bits) if bits else 1, BLOCK=BLOCK,
            ALIGNED=launch.aligned, num_warps=NUM_WARPS)
