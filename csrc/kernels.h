// The seam between the torch-facing op layer (ops.cpp) and the torch-free kernels (cpu_kernels.cpp).
// Kernels see raw pointers and a few fp32 scalars; nothing here includes torch headers, so the kernel
// translation unit compiles in seconds and can be built once per ISA.
#pragma once
#include <cstdint>
#include "dtypes.h"

namespace fastopt {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };
Isa best_isa();                 // widest ISA this CPU (and OS) supports
const char* isa_name(Isa isa);

// Per-tensor constants of one Adam step, folded on the host in double and handed over as fp32.
struct AdamConsts {
  float grad_mul;      // 1/grad_scale, negated when maximizing
  float l2;            // Adam's coupled weight decay: g += l2 * p
  float decay;         // AdamW's decoupled weight decay: p *= decay (= 1 - lr*wd)
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float step_size;     // lr / (1 - beta1^t)
  float inv_bc2_sqrt;  // 1 / sqrt(1 - beta2^t)
  float eps;
};

// One pass over n elements: reads p, g, m, v (and vmax), writes p, m, v (and vmax).
// p and g share the param dtype; m, v and vmax share the state dtype. vmax is null unless amsgrad.
using AdamFn = void (*)(void* p, const void* g, void* m, void* v, void* vmax, int64_t n, const AdamConsts& c);
AdamFn adam_kernel(Isa isa, DType param, DType state, bool amsgrad);

// Block-quantized moments (fastopt/quant/formats.py): 4-bit codes packed two per byte (even element in the
// low nibble) with one fp32 scale per 128 elements; 8-bit codes with one scale per 256.
constexpr int block_size(int bits) { return bits == 4 ? 128 : 256; }

// One quantized moment of a chunk: codes and scales start at the chunk's first block; map has 2^bits entries.
struct QState {
  uint8_t* codes;
  float* scales;
  const float* map;         // 2^bits values, for decoding
  const float* thresholds;  // 2^bits code thresholds (code_thresholds), for encoding
};

// Adam with both moments quantized (same bits); the chunk starts on a block boundary.
using AdamQFn = void (*)(void* p, const void* g, QState m, QState v, int64_t n, const AdamConsts& c);
AdamQFn adam_quantized_kernel(Isa isa, DType param, int bits);

// thresholds[k] = the smallest y (= x / scale) whose nearest map entry is above k; computed once per call.
// 8-bit thresholds are followed by the same values in binary-search level order (see code_thresholds).
constexpr int thresholds_size(int bits) { return bits == 4 ? 16 : 256 + 256 + 16; }
void code_thresholds(const float* map, int bits, float* thresholds);
using QuantizeFn = void (*)(const float* x, int64_t n, const float* thresholds, uint8_t* codes, float* scales);
using DequantizeFn = void (*)(const uint8_t* codes, const float* scales, int64_t n, const float* map, float* out);
QuantizeFn quantize_kernel(Isa isa, int bits);
DequantizeFn dequantize_kernel(Isa isa, int bits);

}  // namespace fastopt
