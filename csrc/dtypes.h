// Element types the CPU kernels load and store. Math is always fp32; these convert at the edges.
// Written as branch-free scalar code so that GCC vectorizes it inside each ISA region.
#pragma once
#include <cstdint>
#include <cstring>

namespace fastopt {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };
constexpr int kNumDTypes = 3;

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
// Branch-free select (cond ? a : b), so that loops using it stay vectorizable on every ISA.
inline uint32_t select(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - uint32_t(cond);
  return (a & mask) | (b & ~mask);
}

inline float to_f32(float x) { return x; }
inline float to_f32(bf16_t x) { return bits_to_f32(uint32_t(x.bits) << 16); }
// IEEE half -> float, exact, including subnormals, inf and NaN (exponent rebias by multiplication).
inline float to_f32(f16_t x) {
  const uint32_t w = uint32_t(x.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = select(two_w < (1u << 27), f32_to_bits(denormalized), f32_to_bits(normalized));
  return bits_to_f32(sign | result);
}

template <typename T> T from_f32(float x);
template <> inline float from_f32<float>(float x) { return x; }
// float -> bfloat16, round to nearest even; NaN stays a (quiet) NaN.
template <> inline bf16_t from_f32<bf16_t>(float x) {
  const uint32_t u = f32_to_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return bf16_t{uint16_t(select(x != x, 0x7FC0u, rounded))};
}
// float -> IEEE half, round to nearest even, overflow to inf, NaN to NaN (rounding done by the FPU).
template <> inline f16_t from_f32<f16_t>(float x) {
  const uint32_t w = f32_to_bits(x);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  float base = (bits_to_f32(f32_to_bits(x) & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = select(bias < 0x71000000u, 0x71000000u, bias);
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return f16_t{uint16_t((sign >> 16) | select(shl1_w > 0xFF000000u, 0x7E00u, nonsign))};
}

}  // namespace fastopt
