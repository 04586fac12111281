"""Block-quantized (4-bit, 8-bit) formats for optimizer states, as plain tensors: packed codes + fp32 scales."""
from fastopt.quant.formats import (BY_NAME, FORMATS, SIGNED_4BIT, SIGNED_8BIT, UNSIGNED_4BIT, UNSIGNED_8BIT,
                                   QuantFormat, Quantized, decode, dynamic_map, encode, zeros)

__all__ = ["BY_NAME", "FORMATS", "QuantFormat", "Quantized", "SIGNED_4BIT", "SIGNED_8BIT", "UNSIGNED_4BIT", "UNSIGNED_8BIT",
           "decode", "dynamic_map", "encode", "zeros"]
