// Torch-free CPU kernels. Each *_body.inc is compiled four times: for AVX-512 with and without VBMI, for AVX2+FMA,
// and for baseline x86-64 (scalar/SSE2). The wheel is built without -march=native; the ISA is picked at run time.
#include <algorithm>
#include <type_traits>
#include <cmath>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include "kernels.h"

namespace fastopt {

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's own _mm512_undefined_* in its headers
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace avx512 {
#define FASTOPT_AVX512_REGION
#include "adam_body.inc"
#include "quant_body.inc"
#undef FASTOPT_AVX512_REGION
}
#pragma GCC diagnostic pop
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,fma,f16c,prefer-vector-width=512")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace avx512vbmi {  // the AVX-512 kernels again, with the 8-bit decoder's byte-plane lookups (vpermi2b)
#define FASTOPT_AVX512_REGION
#define FASTOPT_VBMI
#include "adam_body.inc"
#include "quant_body.inc"
#undef FASTOPT_VBMI
#undef FASTOPT_AVX512_REGION
}
#pragma GCC diagnostic pop
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define FASTOPT_AVX2_REGION
#include "adam_body.inc"
#include "quant_body.inc"
#undef FASTOPT_AVX2_REGION
}
#pragma GCC pop_options
#endif

namespace scalar {
#include "adam_body.inc"
#include "quant_body.inc"
}

Isa best_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return __builtin_cpu_supports("avx512vbmi") ? Isa::avx512vbmi : Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::scalar;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512vbmi: return "avx512vbmi";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    case Isa::scalar: return "scalar";
  }
  return "?";
}

AdamFn adam_kernel(Isa isa, DType param, DType state, bool amsgrad, Tame tame) {
  switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::avx512vbmi:  // VBMI changes only the 8-bit decoder
    case Isa::avx512: return avx512::adam_kernel(param, state, amsgrad, tame);
    case Isa::avx2: return avx2::adam_kernel(param, state, amsgrad, tame);
#endif
    default: return scalar::adam_kernel(param, state, amsgrad, tame);
  }
}

GradStatsFn grad_stats_kernel(Isa isa, DType grad) {
  switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::avx512vbmi:  // VBMI changes only the 8-bit decoder
    case Isa::avx512: return avx512::grad_stats_kernel(grad);
    case Isa::avx2: return avx2::grad_stats_kernel(grad);
#endif
    default: return scalar::grad_stats_kernel(grad);
  }
}

AdamQFn adam_quantized_kernel(Isa isa, DType param, int bits, Tame tame) {
  switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::avx512vbmi: return avx512vbmi::adam_quantized_kernel(param, bits, tame);
    case Isa::avx512: return avx512::adam_quantized_kernel(param, bits, tame);
    case Isa::avx2: return avx2::adam_quantized_kernel(param, bits, tame);
#endif
    default: return scalar::adam_quantized_kernel(param, bits, tame);
  }
}

Encoder make_encoder(const float* map, int bits) { return scalar::make_encoder(map, bits); }

QuantizeFn quantize_kernel(Isa isa, int bits) {
  switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::avx512vbmi: return avx512vbmi::quantize_kernel(bits);
    case Isa::avx512: return avx512::quantize_kernel(bits);
    case Isa::avx2: return avx2::quantize_kernel(bits);
#endif
    default: return scalar::quantize_kernel(bits);
  }
}

DequantizeFn dequantize_kernel(Isa isa, int bits) {
  switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::avx512vbmi: return avx512vbmi::dequantize_kernel(bits);
    case Isa::avx512: return avx512::dequantize_kernel(bits);
    case Isa::avx2: return avx2::dequantize_kernel(bits);
#endif
    default: return scalar::dequantize_kernel(bits);
  }
}

}  // namespace fastopt
