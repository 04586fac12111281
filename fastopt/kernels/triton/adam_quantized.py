"""Triton Adam/AdamW step with block-quantized moments (fastopt.quant formats, 4- or 8-bit): one pass that
decodes a tile of whole quantization blocks of m and v in registers, updates them and the parameter in fp32,
and re-encodes them. Math shared with adam.py; codecs with quant.py.

Bytes moved per parameter: fp32 params with 4-bit states 14.125 (p read+write 8, g 4, both moments' codes
read+written 2·2·0.5, scales 2·2·4/128); with 8-bit states 16.06; bf16 params: 6 fewer.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastopt.kernels.triton._common import store_rounded
from fastopt.kernels.triton.adam import (adam_hyperparameters, adam_moments, adam_param, advance_steps,
                                         device_hyperparameters, step_scalars)
from fastopt.kernels.triton.quant import NUM_WARPS, block_tile, blocks_per_program, decode, encode_store


@triton.jit
def adam_quantized_kernel(p_ptr, g_ptr, mc_ptr, ms_ptr, vc_ptr, vs_ptr, m_map_ptr, v_map_ptr, step_ptr, lr_ptr,
                          grad_scale_ptr, found_inf_ptr, hp_ptr, n, lr, beta1, beta2, log_beta1, log_beta2, eps,
                          weight_decay, grad_sign, DECOUPLED: tl.constexpr, INDEPENDENT_DECAY: tl.constexpr,
                          LR_IS_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                          HP_IS_TENSOR: tl.constexpr, BITS: tl.constexpr, QBLOCK: tl.constexpr, NB: tl.constexpr):
    beta1, beta2, eps, weight_decay, log_beta1, log_beta2 = adam_hyperparameters(
        beta1, beta2, eps, weight_decay, log_beta1, log_beta2, hp_ptr, HP_IS_TENSOR)
    n, lr, bias_correction1, bias_correction2 = step_scalars(n, lr, lr_ptr, step_ptr, found_inf_ptr, log_beta1,
                                                             log_beta2, LR_IS_TENSOR, HAS_FOUND_INF)
    rows, row_mask, offs, mask = block_tile(n, BITS, QBLOCK, NB)
    param, exp_avg, exp_avg_sq = adam_moments(
        tl.load(p_ptr + offs, mask=mask).to(tl.float32), tl.load(g_ptr + offs, mask=mask).to(tl.float32),
        decode(mc_ptr, ms_ptr, m_map_ptr, rows, row_mask, BITS, QBLOCK),
        decode(vc_ptr, vs_ptr, v_map_ptr, rows, row_mask, BITS, QBLOCK),
        lr, beta1, beta2, weight_decay, grad_sign, grad_scale_ptr, DECOUPLED, INDEPENDENT_DECAY, HAS_GRAD_SCALE)
    param = adam_param(param, exp_avg, exp_avg_sq, lr, bias_correction1, bias_correction2, eps)
    store_rounded(p_ptr + offs, param, mask)
    encode_store(tl.where(mask, exp_avg, 0.0), mc_ptr, ms_ptr, m_map_ptr, rows, row_mask, BITS, QBLOCK)
    encode_store(tl.where(mask, exp_avg_sq, 0.0), vc_ptr, vs_ptr, v_map_ptr, rows, row_mask, BITS, QBLOCK)


def adam_step_quantized(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
                        decoupled, maximize, independent_decay=False, grad_scale=None, found_inf=None) -> None:
    """One kernel per tensor; exp_avgs / exp_avg_sqs are fastopt.quant.Quantized. See fastopt.ops.adam."""
    import torch

    found_inf = advance_steps(steps, found_inf)
    hp, (beta1, beta2, eps, weight_decay, log_beta1, log_beta2) = device_hyperparameters(
        steps[0].device, beta1, beta2, eps, weight_decay)
    lr_is_tensor = isinstance(lr, torch.Tensor)
    for i, p in enumerate(params):
        m, v = exp_avgs[i], exp_avg_sqs[i]
        n, fmt, nb = p.numel(), m.fmt, blocks_per_program(m.fmt.bits)
        any_ptr = steps[i]  # stands in for the pointers a mode does not read
        adam_quantized_kernel[(triton.cdiv(fmt.num_blocks(n), nb),)](
            p, grads[i], m.codes, m.scales, v.codes, v.scales, m.fmt.table(p.device), v.fmt.table(p.device),
            steps[i], lr if lr_is_tensor else any_ptr, any_ptr if grad_scale is None else grad_scale,
            any_ptr if found_inf is None else found_inf, any_ptr if hp is None else hp, n,
            0.0 if lr_is_tensor else float(lr), beta1, beta2, log_beta1, log_beta2, eps, weight_decay,
            -1.0 if maximize else 1.0, DECOUPLED=decoupled, INDEPENDENT_DECAY=independent_decay,
            LR_IS_TENSOR=lr_is_tensor, HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            HP_IS_TENSOR=hp is not None, BITS=fmt.bits,
            QBLOCK=fmt.block, NB=nb, num_warps=NUM_WARPS)
