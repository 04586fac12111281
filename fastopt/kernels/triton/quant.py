"""Triton block codecs for fastopt.quant formats: device helpers shared with the fused optimizer kernels, and
standalone quantize / dequantize kernels. Same arithmetic as the reference (fastopt/quant/formats.py): codes
are equal bit for bit. A program handles NB whole quantization blocks as an [NB, QBLOCK] tile, so a block's
absmax is a row reduction in registers."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastopt.kernels.triton._common import BLOCK, NUM_WARPS, load, store
from fastopt.kernels import checks


def blocks_per_program(bits: int) -> int:
    """Quantization blocks per program: BLOCK elements, as a float-moment program steps."""
    return BLOCK // (128 if bits == 4 else 256)


@triton.jit
def block_tile(n, program, BITS: tl.constexpr, QBLOCK: tl.constexpr, NB: tl.constexpr):
    """The NB whole quantization blocks of a tensor's ``program``-th program: (rows = block indices, row_mask,
    offs = element offsets [NB, QBLOCK], mask = offs < n). Every kernel over quantized tensors works on this tile, so
    codes and scales of a block are read and written by one program."""
    rows = program.to(tl.int64) * NB + tl.arange(0, NB)
    offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    return rows, rows < tl.cdiv(n, QBLOCK), offs, offs < n


@triton.jit
def load_codes(codes_ptr, rows, row_mask, BITS: tl.constexpr, QBLOCK: tl.constexpr, FULL: tl.constexpr):
    """The [NB, QBLOCK] int32 codes of blocks ``rows``; 4-bit codes are unpacked (even element = low nibble).
    FULL: every row is the tensor's (no mask)."""
    if BITS == 4:
        offs = rows[:, None] * (QBLOCK // 2) + tl.arange(0, QBLOCK // 2)[None, :]
        packed = load(codes_ptr + offs, row_mask[:, None], FULL).to(tl.int32)
        codes = tl.reshape(tl.join(packed & 15, packed >> 4), (rows.shape[0], QBLOCK))
    else:
        offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
        codes = load(codes_ptr + offs, row_mask[:, None], FULL).to(tl.int32)
    return codes


@triton.jit
def decode(codes_ptr, scales_ptr, map_ptr, rows, row_mask, BITS: tl.constexpr, QBLOCK: tl.constexpr,
           FULL: tl.constexpr):
    """fp32 values of blocks ``rows`` as an [NB, QBLOCK] tile: map[code] · scale (0 in rows off the mask)."""
    codes = load_codes(codes_ptr, rows, row_mask, BITS, QBLOCK, FULL)
    scales = load(scales_ptr + rows, row_mask, FULL)
    return tl.load(map_ptr + codes) * scales[:, None]


@triton.jit
def encode_store(x, codes_ptr, scales_ptr, map_ptr, rows, row_mask, BITS: tl.constexpr, QBLOCK: tl.constexpr,
                 FULL: tl.constexpr):
    """Quantizes an [NB, QBLOCK] fp32 tile (padding already zero) and stores its codes and scales.
    Nearest map entry as torchao finds it: binary search, then up when the residual is >= half the gap."""
    scale = tl.max(tl.abs(x), axis=1)
    y = tl.math.div_rn(x, tl.where(scale > 0, scale, 1.0)[:, None])  # IEEE division: codes must match exactly
    code = tl.zeros(x.shape, dtype=tl.int32)
    for i in tl.static_range(BITS):
        step = 1 << (BITS - 1 - i)
        code += tl.where(y >= tl.load(map_ptr + code + step), step, 0)
    up = tl.minimum(code + 1, (1 << BITS) - 1)
    low = tl.load(map_ptr + code)
    high = tl.load(map_ptr + up)
    code = tl.where(y - low >= (high - low) * 0.5, up, code)
    if BITS == 4:
        pairs = tl.reshape(code, (x.shape[0], QBLOCK // 2, 2))
        even, odd = tl.split(pairs)
        offs = rows[:, None] * (QBLOCK // 2) + tl.arange(0, QBLOCK // 2)[None, :]
        store(codes_ptr + offs, (even | (odd << 4)).to(tl.uint8), row_mask[:, None], FULL)
    else:
        offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
        store(codes_ptr + offs, code.to(tl.uint8), row_mask[:, None], FULL)
    store(scales_ptr + rows, scale, row_mask, FULL)


@triton.jit
def encode_moments(exp_avg, exp_avg_sq, mask, mc_ptr, ms_ptr, vc_ptr, vs_ptr, m_map_ptr, v_map_ptr, rows, row_mask,
                   BITS: tl.constexpr, QBLOCK: tl.constexpr, FULL: tl.constexpr):
    """Both moments of an optimizer step's tile, encoded and stored (the tail block's padding as 0)."""
    if not FULL:
        exp_avg, exp_avg_sq = tl.where(mask, exp_avg, 0.0), tl.where(mask, exp_avg_sq, 0.0)
    encode_store(exp_avg, mc_ptr, ms_ptr, m_map_ptr, rows, row_mask, BITS, QBLOCK, FULL)
    encode_store(exp_avg_sq, vc_ptr, vs_ptr, v_map_ptr, rows, row_mask, BITS, QBLOCK, FULL)


@triton.jit
def quantize_kernel(x_ptr, codes_ptr, scales_ptr, map_ptr, n, BITS: tl.constexpr, QBLOCK: tl.constexpr,
                    NB: tl.constexpr):
    rows, row_mask, offs, mask = block_tile(n, tl.program_id(0), BITS, QBLOCK, NB)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    encode_store(x, codes_ptr, scales_ptr, map_ptr, rows, row_mask, BITS, QBLOCK, False)


@triton.jit
def dequantize_kernel(codes_ptr, scales_ptr, map_ptr, out_ptr, n, BITS: tl.constexpr, QBLOCK: tl.constexpr,
                      NB: tl.constexpr):
    rows, row_mask, offs, mask = block_tile(n, tl.program_id(0), BITS, QBLOCK, NB)
    x = decode(codes_ptr, scales_ptr, map_ptr, rows, row_mask, BITS, QBLOCK, False)
    tl.store(out_ptr + offs, x, mask=mask)


def quantize_blockwise(x: torch.Tensor, table: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.ops.fastopt.quantize_blockwise on Triton: (packed codes, per-block scales) of float32 ``x``."""
    op = "quantize_blockwise"
    checks.check_bits(bits, op)
    checks.check_map(table, bits, op, "map", x.device)
    checks.check_codec_input(x, op, x.device)
    x = x.reshape(-1).contiguous()
    n, block = x.numel(), 128 if bits == 4 else 256
    blocks = triton.cdiv(n, block)
    codes = torch.empty(blocks * block * bits // 8, dtype=torch.uint8, device=x.device)
    scales = torch.empty(blocks, dtype=torch.float32, device=x.device)
    nb = blocks_per_program(bits)
    if blocks:
        quantize_kernel[(triton.cdiv(blocks, nb),)](x, codes, scales, table, n, BITS=bits, QBLOCK=block, NB=nb,
                                                    num_warps=NUM_WARPS)
    return codes, scales


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, bits: int,
                         n: int) -> torch.Tensor:
    """torch.ops.fastopt.dequantize_blockwise on Triton: the float32 values of ``n`` quantized elements."""
    op = "dequantize_blockwise"
    checks.check_bits(bits, op)
    checks.check_map(table, bits, op, "map", codes.device)
    checks.check_quantized(codes, scales, n, bits, op, "x", 0, codes.device)
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    block, nb = 128 if bits == 4 else 256, blocks_per_program(bits)
    if n:
        dequantize_kernel[(triton.cdiv(triton.cdiv(n, block), nb),)](codes, scales, table, out, n, BITS=bits,
                                                                     QBLOCK=block, NB=nb, num_warps=NUM_WARPS)
    return out
