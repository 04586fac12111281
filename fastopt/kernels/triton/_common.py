"""Device helpers shared by fastopt's Triton kernels."""
import triton
import triton.language as tl


@triton.jit
def store_rounded(ptr, x, mask):
    """Stores fp32 ``x`` in ``ptr``'s dtype, rounding to nearest even. bf16 is rounded explicitly (NaN stays
    NaN): Triton's interpreter truncates fp32→bf16, so this keeps interpreter and GPU results identical."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)
        tl.store(ptr, rounded.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)
