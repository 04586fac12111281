"""Block-quantized formats for optimizer moments (docs/algorithms.md#low-bit-optimizer-states; Dettmers et al. 2021, Li et al. 2023).

A moment of n elements is cut into blocks of B; each block stores one fp32 scale (its max |x|) and one code per
element: ``x = qmap[code] · scale``. Codes are the nearest map entry to ``x / scale`` found as torchao and
bitsandbytes do (a branch-free binary search, then round up when the residual is at least half the gap), so
codes agree with theirs bit for bit. 4-bit codes are packed two per byte, the even element in the low nibble.
The tail block is padded with zeros. An all-zero block has scale 0 (it decodes to 0 whatever its codes).

This module holds the formats and the reference (pure torch) encode/decode; the fused kernels implement the
same arithmetic in csrc/ and fastopt/kernels/triton/.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


def dynamic_map(signed: bool, max_exponent_bits: int, total_bits: int) -> list[float]:
    """The dynamic-exponent map of bitsandbytes (``create_dynamic_map``), computed with the same float32
    arithmetic so that the values are identical: for each exponent e, the midpoints of a linear split of
    [0.1, 1] scaled by 10^(e − (max_exponent_bits − 1)); plus 0 and 1."""
    values: list[float] = []
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1

    def midpoints(count: int) -> torch.Tensor:
        edges = torch.linspace(0.1, 1, count)  # float32 throughout, as in the original
        return (edges[:-1] + edges[1:]) / 2.0

    for i in range(max_exponent_bits):
        count = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else \
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        values += (scale * midpoints(count)).tolist()
        if signed:
            values += (-scale * midpoints(count)).tolist()
    if extra > 0:
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        values += (scale * midpoints(extra + 1)).tolist()
        if signed:
            values += (-scale * midpoints(extra + 1)).tolist()
    values += [0.0, 1.0]
    assert len(values) == 2**total_bits
    return sorted(values)


@dataclass(frozen=True)
class QuantFormat:
    name: str
    bits: int            # 4 or 8 bits per code
    block: int           # elements per fp32 scale
    qmap: tuple          # 2**bits sorted values in [-1, 1]

    # the map as an fp32 tensor per device, made once (a plain dict, which torch.compile reads as it traces)
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        key = str(device)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = torch.tensor(self.qmap, dtype=torch.float32, device=device)
        return table

    def num_blocks(self, n: int) -> int:
        return -(-n // self.block)

    def code_bytes(self, n: int) -> int:
        return self.num_blocks(n) * self.block * self.bits // 8

    def bytes_per_element(self) -> float:
        return self.bits / 8 + 4 / self.block


SIGNED_4BIT = QuantFormat("4bit-signed", 4, 128, tuple(dynamic_map(True, 3, 4)))
UNSIGNED_4BIT = QuantFormat("4bit-unsigned", 4, 128, tuple((i + 1) / 16 for i in range(16)))  # no zero
SIGNED_8BIT = QuantFormat("8bit-signed", 8, 256, tuple(dynamic_map(True, 7, 8)))
UNSIGNED_8BIT = QuantFormat("8bit-unsigned", 8, 256, tuple(dynamic_map(False, 7, 8)))

# (bits, signed) -> format: the first moment is signed, the second unsigned.
FORMATS = {(4, True): SIGNED_4BIT, (4, False): UNSIGNED_4BIT, (8, True): SIGNED_8BIT, (8, False): UNSIGNED_8BIT}
BY_NAME = {f.name: f for f in FORMATS.values()}


def nearest_codes(y: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry to each element of y (already divided by its scale)."""
    size = table.numel()
    codes = torch.zeros_like(y, dtype=torch.int64)
    step = size // 2
    while step >= 1:
        codes += torch.where(y >= table[codes + step], step, 0)
        step //= 2
    up = (codes + 1).clamp(max=size - 1)
    low_value, up_value = table[codes], table[up]
    return torch.where(y - low_value >= (up_value - low_value) * 0.5, up, codes)


def encode(x: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes x (any shape; flattened) into (packed uint8 codes, fp32 scales per block)."""
    n = x.numel()
    blocks = torch.zeros(fmt.num_blocks(n) * fmt.block, dtype=torch.float32, device=x.device)
    blocks[:n] = x.reshape(-1).float()
    blocks = blocks.view(-1, fmt.block)
    scales = blocks.abs().amax(dim=1)
    y = torch.where(scales[:, None] > 0, blocks / scales[:, None], torch.zeros_like(blocks))
    codes = nearest_codes(y, fmt.table(x.device)).to(torch.uint8).reshape(-1)
    if fmt.bits == 4:
        codes = codes[0::2] | (codes[1::2] << 4)
    return codes, scales


def decode(codes: torch.Tensor, scales: torch.Tensor, fmt: QuantFormat, n: int) -> torch.Tensor:
    """The fp32 values of the first n elements of a quantized tensor."""
    if fmt.bits == 4:
        codes = torch.stack([codes & 15, codes >> 4], dim=1).reshape(-1)
    values = fmt.table(codes.device)[codes.long()].view(-1, fmt.block) * scales[:, None]
    return values.reshape(-1)[:n]


class Quantized(NamedTuple):
    """A block-quantized moment as kernels see it: packed codes, per-block scales, and their format."""
    codes: torch.Tensor
    scales: torch.Tensor
    fmt: QuantFormat

    def dequantize(self, n: int) -> torch.Tensor:
        return decode(self.codes, self.scales, self.fmt, n)

    def assign(self, x: torch.Tensor) -> None:
        """Stores x (fp32 values) in place."""
        codes, scales = encode(x, self.fmt)
        self.codes.copy_(codes)
        self.scales.copy_(scales)


def zeros(n: int, fmt: QuantFormat, device) -> Quantized:
    """A quantized tensor of n zeros: scale 0 makes every code mean 0 (the unsigned 4-bit map has no 0)."""
    return Quantized(torch.zeros(fmt.code_bytes(n), dtype=torch.uint8, device=device),
                     torch.zeros(fmt.num_blocks(n), dtype=torch.float32, device=device), fmt)
