// The seam between the torch-facing op layer (ops.cpp) and the torch-free kernels (cpu_kernels.cpp).
// Kernels see raw pointers and a few fp32 scalars; nothing here includes torch headers, so the kernel
// translation unit compiles in seconds and can be built once per ISA.
#pragma once
#include <cmath>
#include <cstdint>
#include "dtypes.h"

namespace fastopt {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2, avx512vbmi = 3 };  // avx512vbmi: + byte permutes (Ice Lake, Zen 4)
Isa best_isa();                 // widest ISA this CPU (and OS) supports
const char* isa_name(Isa isa);

// Per-tensor constants of one Adam step, folded on the host in double and handed over as fp32 (and what one call
// of a kernel should prefetch).
struct AdamConsts {
  float grad_mul;      // 1/grad_scale, negated when maximizing
  float l2;            // Adam's coupled weight decay: g += l2 * p
  float decay;         // AdamW's decoupled weight decay: p *= decay (= 1 - lr*wd)
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float step_size;     // lr / (1 - beta1^t)
  float inv_bc2_sqrt;  // 1 / sqrt(1 - beta2^t)
  float eps;
  // The SPAM family's gradient taming and resets, read only by the kernels built with a Tame other than none:
  float clip_thr = INFINITY;  // Stable-SPAM's AdaClip: |g| > clip_thr → g *= clip_mul (= thr / max|g|)
  float clip_mul = 1.0f;
  float norm_mul = 1.0f;      // Stable-SPAM's AdaGN: g *= norm_mul (= c / ||clipped g||)
  float spike_theta = INFINITY;  // SPAM: g² > θ·v_old → g = sign(g)·sqrt(θ·v_old)  (+inf: off)
  float post_decay = 1.0f;    // SPAM's weight decay after the update: p *= post_decay
  bool keep_old = true;       // false: the old moments count as zero (a reset that acts on this step)
  bool keep_new = true;       // false: store zeros instead of the new moments (Stable-SPAM's official late reset)
  // Bytes a quantized-moment kernel prefetches as it goes, spread evenly over its pass (Warmer): Stable-SPAM's next
  // gradient slice to reduce, whose memory traffic then hides under the compute-bound update. Only a hint.
  const char* warm = nullptr;
  int64_t warm_bytes = 0;
};

// One pass over n elements: reads p, g, m, v (and vmax), writes p, m, v (and vmax).
// p and g share the param dtype; m, v and vmax share the state dtype. vmax is null unless amsgrad.
// How a kernel of the SPAM family tames the gradient before Adam: Stable-SPAM's AdaClip + AdaGN (clip_thr,
// clip_mul, norm_mul), AdaGN alone (for chunks with nothing above the AdaClip threshold: no per-element test), or
// SPAM's spike clipping (spike_theta, post_decay); all honour keep_old / keep_new.
enum class Tame : int { none = 0, clip_normalize = 1, spike = 2, normalize = 3 };
using AdamFn = void (*)(void* p, const void* g, void* m, void* v, void* vmax, int64_t n, const AdamConsts& c);
AdamFn adam_kernel(Isa isa, DType param, DType state, bool amsgrad, Tame tame = Tame::none);  // amsgrad: Tame::none

// max |g·grad_mul| and the sum of squares of g·grad_mul after AdaClip (|x| > clip_thr → x·clip_mul) over n
// elements of a gradient of dtype `grad`: Stable-SPAM's per-tensor reductions, one chunk at a time.
using GradStatsFn = void (*)(const void* g, int64_t n, float grad_mul, float clip_thr, float clip_mul, float* amax,
                             double* sumsq);
GradStatsFn grad_stats_kernel(Isa isa, DType grad);

// Block-quantized moments (fastopt/quant/formats.py): 4-bit codes packed two per byte (even element in the
// low nibble) with one fp32 scale per 128 elements; 8-bit codes with one scale per 256.
constexpr int block_size(int bits) { return bits == 4 ? 128 : 256; }

// How the kernels encode y = x / scale for one map, built once per op call by make_encoder. The code of y is
// #{k : y >= thresholds[k]}, which is exactly the reference's nearest-entry rule (thresholds[k] = the smallest y
// whose nearest entry is above k, found by bisection; +inf past the last code).
struct Encoder {
  // For 8 bits the 256 thresholds are followed by the same values in binary-search level order (AVX-512 encoder).
  float thresholds[256 + 256 + 16];
  // The thresholds are (2k+3)/32, as for the 4-bit map (k+1)/16: then code = clamp(trunc(16y − 1/2), 0, 15) exactly
  // (16y − 1/2 is exact in fp32 wherever it matters), no search needed.
  bool linear;
  // 8 bits: the dynamic maps are linear within each decade, so on each of a few segments of y (a decade's run of
  // codes, or a single code between decades) the code is trunc(fma(y, a, b)). make_encoder proves, threshold by
  // threshold, that this equals the search wherever fma(y, a, b) lies at least kSegmentMargin from an integer; the
  // encoder searches exactly for the rare lanes closer than that. `segmented` is false if a map needs > 32 segments.
  struct Segments {
    int levels;         // of the search: 4 for up to 16 segments, else 5
    // By the reversed path r of the search (bit L−1 = whether y passed level L's start): level L's starts at
    // [2^(L-1) - 1, 2^L - 1), and each segment's affine map (make_segments).
    float starts[32];
    float a[32], b[32];
  } segments;
  bool segmented;
};
// 8 ulps of z near 255: far above the fma's rounding. The SIMD encoders test a window twice as wide (their
// fixed-point test, kCodeShift8 in quant_body.inc); ~2·10^-4 of the lanes fall within that (measured on
// bench.kernels' data) and take the exact search.
constexpr float kSegmentMargin = 0x1p-13f;
static_assert(kSegmentMargin > 0.0f && kSegmentMargin < 0.5f, "a margin must leave room between integers");
Encoder make_encoder(const float* map, int bits);

// One quantized moment of a chunk: codes and scales start at the chunk's first block; map has 2^bits entries.
struct QState {
  uint8_t* codes;
  float* scales;
  const float* map;         // 2^bits values, for decoding
  const Encoder* encoder;   // for encoding
};

// Adam with both moments quantized (same bits); the chunk starts on a block boundary.
using AdamQFn = void (*)(void* p, const void* g, QState m, QState v, int64_t n, const AdamConsts& c);
AdamQFn adam_quantized_kernel(Isa isa, DType param, int bits, Tame tame = Tame::none);

using QuantizeFn = void (*)(const float* x, int64_t n, const Encoder& encoder, uint8_t* codes, float* scales);
using DequantizeFn = void (*)(const uint8_t* codes, const float* scales, int64_t n, const float* map, float* out);
QuantizeFn quantize_kernel(Isa isa, int bits);
DequantizeFn dequantize_kernel(Isa isa, int bits);

}  // namespace fastopt
