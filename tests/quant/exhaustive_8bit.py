"""Every float32 in [-1, 1] through the 8-bit CPU encoders: the segmented encoders of the AVX2 and AVX-512 ISAs
(arithmetic codes, proven exact when the Encoder is built) against the scalar build's plain threshold search, which
the tests check against the reference. Each value sits in a block whose scale is 1, so it is encoded as y = x exactly.

    python -m tests.quant.exhaustive_8bit   # not part of `make test`: minutes per map on one core
"""
from __future__ import annotations

import sys
import time

import torch

import fastopt
from fastopt import _ext
from fastopt.quant import FORMATS
from tests.conftest import cpu_isas

ONE = 0x3F800000  # float32 bits of 1.0


def blocks(first: int, last: int, negative: bool) -> torch.Tensor:
    """The floats with bit patterns first..last (negated if asked), 255 per 256-element block after a 1.0."""
    bits = torch.arange(first, last + 1, dtype=torch.int64)
    if negative:  # the sign bit set, as an int32 value
        bits = (bits | 0x80000000) - 2**32
    values = bits.int().view(torch.float32)
    padded = torch.zeros(-(-values.numel() // 255) * 255)
    padded[: values.numel()] = values
    return torch.cat([torch.ones(padded.numel() // 255, 1), padded.view(-1, 255)], dim=1).view(-1)


def main() -> int:
    if _ext.load() != "installed":
        print("needs the built extension (make build)", file=sys.stderr)
        return 2
    ops = torch.ops.fastopt
    isas = [isa for isa in cpu_isas() if isa != "scalar"]
    if not isas:
        print(f"this CPU has no AVX2 (best: {fastopt.cpu_isa()}): only the threshold search runs here", file=sys.stderr)
        return 2
    chunk = 255 << 16
    failures = 0
    try:
        for isa in isas:
            for signed in (True, False):
                fmt = FORMATS[(8, signed)]
                table = fmt.table()
                start, mismatches = time.time(), 0
                for negative in (False, True):
                    for first in range(0, ONE + 1, chunk):
                        x = blocks(first, min(first + chunk, ONE + 1) - 1, negative)
                        fastopt.set_cpu_isa(isa)
                        codes, scales = ops.quantize_blockwise(x, table, 8)
                        fastopt.set_cpu_isa("scalar")
                        want_codes, want_scales = ops.quantize_blockwise(x, table, 8)
                        assert torch.equal(scales, want_scales)
                        mismatches += int((codes != want_codes).sum())
                print(f"{isa} {fmt.name}: {2 * (ONE + 1)} floats, {mismatches} codes differ "
                      f"({time.time() - start:.0f} s)", flush=True)
                failures += mismatches
    finally:
        fastopt.set_cpu_isa("auto")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
