// Per-element time of the CPU kernels on data that stays in L2, so that memory bandwidth (which swings on a
// shared machine) does not enter: what each kernel costs in compute. Built by `python -m bench.kernels` against the
// compiled extension (only csrc/kernels.h is included: no torch headers) and run with the quantization maps of
// fastopt/quant/formats.py as arguments.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

using namespace fastopt;

namespace {

constexpr int64_t kElements = 16384;  // p, g, m and v in fp32: 256 KB together, well inside a 1 MB L2

// Best of five rounds of `reps` calls, in ns per element.
template <typename Fn>
double ns_per_element(Fn fn, int reps) {
  fn();
  double best = 1e30;
  for (int round = 0; round < 5; ++round) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) fn();
    const std::chrono::duration<double, std::nano> took = std::chrono::steady_clock::now() - start;
    best = std::min(best, took.count() / reps / kElements);
  }
  return best;
}

// Page-aligned arrays, as torch's allocator hands out large tensors: the layout (and so the cache and 4K-aliasing
// behaviour) is the same in every run, whatever else the process allocated.
template <typename T>
struct PageArray {
  T* data;
  explicit PageArray(int64_t n, T fill = T()) : data(static_cast<T*>(std::aligned_alloc(4096, bytes(n)))) {
    std::fill(data, data + n, fill);
  }
  ~PageArray() { std::free(data); }
  PageArray(const PageArray&) = delete;
  PageArray& operator=(const PageArray&) = delete;
  static size_t bytes(int64_t n) { return (size_t(n) * sizeof(T) + 4095) / 4096 * 4096; }
};

std::vector<float> parse_map(const char* text, int bits) {
  std::vector<float> map;
  for (char* end = nullptr;; text = end) {
    const float x = std::strtof(text, &end);
    if (end == text) break;
    map.push_back(x);
    if (*end == ',') ++end;
  }
  if (int(map.size()) != (1 << bits)) {
    std::fprintf(stderr, "a %d-bit map needs %d values, got %zu\n", bits, 1 << bits, map.size());
    std::exit(2);
  }
  return map;
}

const char* tame_name(Tame tame) {
  switch (tame) {
    case Tame::none: return "AdamW";
    case Tame::clip_normalize: return "Stable-SPAM (AdaClip + AdaGN)";
    case Tame::normalize: return "Stable-SPAM (AdaGN only)";
    case Tame::spike: return "SPAM";
  }
  return "?";
}

}  // namespace

// argv: the signed and unsigned 4-bit maps, then the signed and unsigned 8-bit maps (comma-separated values);
// then optionally "quick" (one call per round: checks that everything runs, times nothing reliably) and
// "isa=NAME" (a narrower ISA than the CPU's best, e.g. to see what AVX2-only machines get).
int main(int argc, char** argv) {
  int reps = 4000;
  const Isa best = best_isa();
  Isa isa = best;
  bool usage = argc < 5;
  for (int i = 5; i < argc && !usage; ++i) {
    const std::string arg = argv[i];
    if (arg == "quick") {
      reps = 1;
    } else if (arg.rfind("isa=", 0) == 0) {
      bool known = false;
      for (Isa candidate : {Isa::scalar, Isa::avx2, Isa::avx512, Isa::avx512vbmi})
        if (arg.substr(4) == isa_name(candidate)) isa = candidate, known = true;
      if (!known || int(isa) > int(best)) {
        std::fprintf(stderr, "%s: unknown, or not supported by this CPU (best: %s)\n", arg.c_str(), isa_name(best));
        return 2;
      }
    } else {
      usage = true;
    }
  }
  if (usage) {
    std::fprintf(stderr, "usage: %s MAP4_SIGNED MAP4_UNSIGNED MAP8_SIGNED MAP8_UNSIGNED [quick] [isa=NAME]\n", argv[0]);
    return 2;
  }
  bool failed = false;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  PageArray<float> p(kElements), g(kElements);
  for (int64_t i = 0; i < kElements; ++i) p.data[i] = 0.02f * normal(rng), g.data[i] = 1e-3f * normal(rng);
  PageArray<bf16_t> p_bf16(kElements), g_bf16(kElements);
  for (int64_t i = 0; i < kElements; ++i) p_bf16.data[i] = from_f32<bf16_t>(p.data[i]), g_bf16.data[i] = from_f32<bf16_t>(g.data[i]);

  AdamConsts c{};
  c.grad_mul = 1.0f, c.l2 = 0.0f, c.decay = 1.0f - 1e-5f, c.beta1 = 0.9f, c.one_minus_beta1 = 0.1f;
  c.beta2 = 0.999f, c.one_minus_beta2 = 0.001f, c.step_size = 1e-3f, c.inv_bc2_sqrt = 1.0f, c.eps = 1e-8f;
  c.clip_thr = 3e-3f, c.clip_mul = 0.9f, c.norm_mul = 1.1f, c.spike_theta = 5000.0f;

  std::printf("CPU kernels on %lld fp32 elements (L2-resident), ISA %s, one thread: ns per element\n\n",
              (long long)kElements, isa_name(isa));
  std::printf("| kernel | moments | ns/element |\n|---|---|---:|\n");
  const Tame tames[] = {Tame::none, Tame::normalize, Tame::clip_normalize, Tame::spike};
  PageArray<float> m(kElements), v(kElements, 1e-6f);
  for (Tame tame : tames) {
    AdamFn fn = adam_kernel(isa, DType::f32, DType::f32, false, tame);
    std::printf("| %s step | fp32 | %.3f |\n", tame_name(tame),
                ns_per_element([&] { fn(p.data, g.data, m.data, v.data, nullptr, kElements, c); }, 2 * reps));
  }
  for (int bits : {4, 8}) {
    const std::vector<float> m_map = parse_map(argv[bits == 4 ? 1 : 3], bits),
                             v_map = parse_map(argv[bits == 4 ? 2 : 4], bits);
    const Encoder m_encoder = make_encoder(m_map.data(), bits), v_encoder = make_encoder(v_map.data(), bits);
    const int64_t blocks = kElements / block_size(bits), bytes = kElements * bits / 8;
    PageArray<uint8_t> m_codes(bytes), v_codes(bytes);
    PageArray<float> m_scales(blocks), v_scales(blocks);
    const QState mq{m_codes.data, m_scales.data, m_map.data(), &m_encoder};
    const QState vq{v_codes.data, v_scales.data, v_map.data(), &v_encoder};
    for (Tame tame : tames) {
      AdamQFn fn = adam_quantized_kernel(isa, DType::f32, bits, tame);
      std::printf("| %s step | %d-bit | %.3f |\n", tame_name(tame), bits,
                  ns_per_element([&] { fn(p.data, g.data, mq, vq, kElements, c); }, reps));
    }
    AdamQFn bf16_step = adam_quantized_kernel(isa, DType::bf16, bits, Tame::none);
    std::printf("| AdamW step, bf16 params | %d-bit | %.3f |\n", bits,
                ns_per_element([&] { bf16_step(p_bf16.data, g_bf16.data, mq, vq, kElements, c); }, reps));
    const QuantizeFn quantize = quantize_kernel(isa, bits);
    const DequantizeFn dequantize = dequantize_kernel(isa, bits);
    PageArray<float> x(kElements), out(kElements);
    for (const auto& [name, encoder, map, signed_] :
         {std::tuple{"first moment (signed", &m_encoder, &m_map, true}, std::tuple{"second moment (unsigned", &v_encoder, &v_map, false}}) {
      for (int64_t i = 0; i < kElements; ++i)
        x.data[i] = signed_ ? 0.1f * normal(rng) : 1e-2f * std::abs(normal(rng) * normal(rng));
      std::printf("| encode, %s%s) | %d-bit | %.3f |\n", name, encoder->linear ? ", linear: arithmetic" : "", bits,
                  ns_per_element([&] { quantize(x.data, kElements, *encoder, m_codes.data, m_scales.data); }, reps));
      std::printf("| decode, %s) | %d-bit | %.3f |\n", name, bits,
                  ns_per_element([&] { dequantize(m_codes.data, m_scales.data, kElements, map->data(), out.data); }, reps));
      // What was timed must also be right: nearest-entry codes decode to within half the widest gap of the map.
      float gap = 0.0f;
      for (size_t k = 1; k < map->size(); ++k) gap = std::max(gap, (*map)[k] - (*map)[k - 1]);
      gap = std::max(gap, 1.0f - (*map).back()) + (signed_ ? 0.0f : (*map).front());
      for (int64_t i = 0; i < kElements; ++i)
        if (!(std::abs(out.data[i] - x.data[i]) <= 0.5f * gap * m_scales.data[i / block_size(bits)] * 1.0001f)) {
          std::fprintf(stderr, "check failed: %d-bit %s) element %lld decodes to %g, was %g\n", bits, name,
                       (long long)i, out.data[i], x.data[i]);
          failed = true;
          break;
        }
    }
  }
  std::vector<float> amax(1);
  std::vector<double> sumsq(1);
  GradStatsFn stats = grad_stats_kernel(isa, DType::f32);
  std::printf("| Stable-SPAM gradient reduction, first pass (max, sum of squares) | - | %.3f |\n",
              ns_per_element([&] { stats(g.data, kElements, 1.0f, INFINITY, 1.0f, amax.data(), sumsq.data()); }, 4 * reps));
  std::printf("| Stable-SPAM gradient reduction, clipped pass | - | %.3f |\n",
              ns_per_element([&] { stats(g.data, kElements, 1.0f, 2e-3f, 0.5f, amax.data(), sumsq.data()); }, 4 * reps));
  // The reduction's first pass against a plain loop in double.
  stats(g.data, kElements, 1.0f, INFINITY, 1.0f, amax.data(), sumsq.data());
  double want_max = 0.0, want_sum = 0.0;
  for (int64_t i = 0; i < kElements; ++i) want_max = std::max(want_max, double(std::abs(g.data[i]))), want_sum += double(g.data[i]) * g.data[i];
  if (amax[0] != float(want_max) || std::abs(sumsq[0] - want_sum) > 1e-6 * want_sum) {
    std::fprintf(stderr, "check failed: reduction gives max %g, sum of squares %g; a plain loop %g, %g\n", amax[0],
                 sumsq[0], want_max, want_sum);
    failed = true;
  }
  if (failed) return 1;
  std::printf("\nChecked: every codec's round trip is within half a map step of its input, and the reduction equals a "
              "plain loop.\n");
  return 0;
}
