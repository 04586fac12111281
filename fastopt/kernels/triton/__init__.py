"""fastopt's Triton kernels, one kernel family per file, each with a launcher that takes its op's arguments
(fastopt/ops/library.py): ``KERNELS`` are the ops' GPU kernels, and what the tests run in Triton's interpreter."""
from fastopt.kernels.triton import adam, quant, spam

KERNELS = {"adam_step": adam.adam_step, "stable_spam_step": spam.stable_spam_step, "spam_step": spam.spam_step,
           "quantize_blockwise": quant.quantize_blockwise, "dequantize_blockwise": quant.dequantize_blockwise}
