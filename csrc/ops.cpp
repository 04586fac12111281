// torch-facing layer: op schemas (TORCH_LIBRARY(fastopt)), argument checks, the work split across threads,
// and dispatch to the torch-free kernels by ISA and dtype. The only translation unit that includes torch.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace fastopt {
namespace {

std::atomic<int> g_isa{-1};  // -1: not chosen yet

Isa current_isa() {
  int isa = g_isa.load();
  if (isa < 0) {
    isa = int(best_isa());
    g_isa.store(isa);
  }
  return Isa(isa);
}

std::string get_isa() { return isa_name(current_isa()); }

std::string set_isa(const std::string& name) {
  const Isa best = best_isa();
  Isa want;
  if (name == "avx512vbmi") want = Isa::avx512vbmi;
  else if (name == "avx512") want = Isa::avx512;
  else if (name == "avx2") want = Isa::avx2;
  else if (name == "scalar") want = Isa::scalar;
  else if (name == "auto") want = best;
  else TORCH_CHECK(false, "fastopt: unknown isa '", name, "' (expected avx512vbmi, avx512, avx2, scalar or auto)");
  TORCH_CHECK(int(want) <= int(best), "fastopt: isa '", name, "' is not supported by this CPU (best: ", isa_name(best), ")");
  g_isa.store(int(want));
  return isa_name(want);
}

DType dtype_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: TORCH_CHECK(false, "fastopt: ", what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

// A contiguous slice [begin, end) of one tensor: the unit of parallel work.
struct Chunk {
  int64_t tensor, begin, end;
};
constexpr int64_t kChunk = 1 << 16;  // elements; a multiple of every SIMD width and of 64-byte lines

std::vector<Chunk> split(const std::vector<int64_t>& sizes) {
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < int64_t(sizes.size()); ++i)
    for (int64_t b = 0; b < sizes[i]; b += kChunk) chunks.push_back({i, b, std::min(sizes[i], b + kChunk)});
  return chunks;
}

void check_same(const at::Tensor& p, const at::Tensor& t, const char* what, int64_t i, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", what, "[", i, "] must be on the CPU");
  TORCH_CHECK(t.numel() == p.numel(), op, ": ", what, "[", i, "] has ", t.numel(), " elements, params[", i, "] has ",
              p.numel());
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, "[", i, "] must be contiguous");
}

// Runs fn(k) for every k in [0, n) on torch's thread pool, each thread taking the next k as soon as it is free:
// the threads finish together even when one of them is slowed down (by memory, or by another process).
template <typename Fn>
void parallel_each(int64_t n, const Fn& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < n;) fn(k);
  });
}

// Runs fn(tensor, offset, length) over all chunks of all tensors, in parallel.
template <typename Fn>
void for_each_chunk(const std::vector<int64_t>& sizes, const Fn& fn) {
  const std::vector<Chunk> chunks = split(sizes);
  parallel_each(int64_t(chunks.size()), [&](int64_t c) {
    fn(chunks[c].tensor, chunks[c].begin, chunks[c].end - chunks[c].begin);
  });
}

// Runs fn(c) for the given chunk indices, in parallel.
template <typename Fn>
void for_chunks(const std::vector<int64_t>& which, const Fn& fn) {
  parallel_each(int64_t(which.size()), [&](int64_t k) { fn(which[k]); });
}

// Increments each step and folds this step's per-tensor constants on the host, in double.
std::vector<AdamConsts> step_consts(at::TensorList steps, double lr, double beta1, double beta2, double eps,
                                    double weight_decay, bool decoupled, bool maximize,
                                    const std::optional<at::Tensor>& grad_scale, bool independent_decay) {
  const double decay = 1.0 - (independent_decay ? 1.0 : lr) * weight_decay;
  double grad_mul = maximize ? -1.0 : 1.0;
  if (grad_scale.has_value() && grad_scale->defined()) grad_mul /= grad_scale->item<double>();
  std::vector<AdamConsts> consts(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    float* step = steps[i].data_ptr<float>();
    *step += 1.0f;
    const double t = *step;
    const double bc1 = 1.0 - std::pow(beta1, t), bc2 = 1.0 - std::pow(beta2, t);
    consts[i] = AdamConsts{float(grad_mul),
                           float(decoupled ? 0.0 : weight_decay),
                           float(decoupled ? decay : 1.0),
                           float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2),
                           float(lr / bc1), float(1.0 / std::sqrt(bc2)), float(eps)};
  }
  return consts;
}

// Returns true when GradScaler found inf/NaN: then the whole step is skipped, steps included.
bool skip_step(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->defined() && found_inf->item<double>() != 0.0;
}

double grad_multiplier(const std::optional<at::Tensor>& grad_scale) {
  return grad_scale.has_value() && grad_scale->defined() ? 1.0 / grad_scale->item<double>() : 1.0;
}

int64_t bits_of(int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "fastopt: bits must be 4 or 8, got ", bits);
  return bits;
}

void check_map(const at::Tensor& map, int64_t bits, const char* what) {
  TORCH_CHECK(map.device().is_cpu() && map.scalar_type() == at::kFloat && map.is_contiguous() &&
                  map.numel() == (int64_t(1) << bits),
              "fastopt: ", what, " must be a contiguous float32 CPU tensor of ", (1 << bits), " entries");
}

void check_quantized(const at::Tensor& codes, const at::Tensor& scales, int64_t n, int64_t bits, const char* what,
                     int64_t i) {
  const int64_t blocks = (n + block_size(int(bits)) - 1) / block_size(int(bits));
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.numel() == blocks * block_size(int(bits)) * bits / 8,
              "fastopt: ", what, "_codes[", i, "] must be a contiguous uint8 CPU tensor of ",
              blocks * block_size(int(bits)) * bits / 8, " bytes for ", n, " elements at ", bits, " bits");
  TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.numel() == blocks,
              "fastopt: ", what, "_scales[", i, "] must be a contiguous float32 CPU tensor of ", blocks, " blocks");
}

// ---- the steps over float or quantized moments (the quantized Adam step, the SPAM family) -----------------------
// Moments are float tensors (bits 0) or block-quantized codes + scales (bits 4 or 8, with the two maps);
// vmax (amsgrad's running max of v, float moments only) is empty unless amsgrad.
struct MomentArgs {
  const char* op;
  at::TensorList params, grads, m, v, m_scales, v_scales;
  const std::optional<at::Tensor>& m_map;
  const std::optional<at::Tensor>& v_map;
  int64_t bits;
  at::TensorList vmax = {};
};

float& scalar_ref(const at::Tensor& t, const char* op, const char* what, int64_t i) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == 1, op, ": ", what, "[", i,
              "] must be a float32 CPU scalar tensor");
  return *t.data_ptr<float>();
}

// Checks every tensor before anything changes; returns the element counts.
std::vector<int64_t> check_moments(const MomentArgs& a, std::initializer_list<std::pair<at::TensorList, const char*>> scalars) {
  const int64_t n = int64_t(a.params.size());
  TORCH_CHECK(a.bits == 0 || a.bits == 4 || a.bits == 8, a.op, ": bits must be 0 (float moments), 4 or 8, got ", a.bits);
  bool same = int64_t(a.grads.size()) == n && int64_t(a.m.size()) == n && int64_t(a.v.size()) == n;
  if (a.bits) same = same && int64_t(a.m_scales.size()) == n && int64_t(a.v_scales.size()) == n;
  for (const auto& [list, what] : scalars) same = same && int64_t(list.size()) == n;
  if (!a.vmax.empty()) same = same && a.bits == 0 && int64_t(a.vmax.size()) == n;
  TORCH_CHECK(same, a.op, ": all tensor lists must have the same length");
  if (a.bits) {
    TORCH_CHECK(a.m_map.has_value() && a.v_map.has_value(), a.op, ": quantized moments need exp_avg_map and exp_avg_sq_map");
    check_map(*a.m_map, a.bits, "exp_avg_map");
    check_map(*a.v_map, a.bits, "exp_avg_sq_map");
  }
  std::vector<int64_t> sizes(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = a.params[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), a.op, ": params[", i, "] must be a contiguous CPU tensor");
    dtype_of(p, "params");
    check_same(p, a.grads[i], "grads", i, a.op);
    TORCH_CHECK(a.grads[i].scalar_type() == p.scalar_type(), a.op, ": grads[", i, "] dtype differs from params[", i, "]");
    if (a.bits) {
      check_quantized(a.m[i], a.m_scales[i], p.numel(), a.bits, "exp_avg", i);
      check_quantized(a.v[i], a.v_scales[i], p.numel(), a.bits, "exp_avg_sq", i);
    } else {
      check_same(p, a.m[i], "exp_avgs", i, a.op);
      check_same(p, a.v[i], "exp_avg_sqs", i, a.op);
      dtype_of(a.m[i], "exp_avgs");
      TORCH_CHECK(a.v[i].scalar_type() == a.m[i].scalar_type(), a.op, ": exp_avg_sqs[", i,
                  "] dtype differs from exp_avgs[", i, "]");
      if (!a.vmax.empty()) {
        check_same(p, a.vmax[i], "max_exp_avg_sqs", i, a.op);
        TORCH_CHECK(a.vmax[i].scalar_type() == a.m[i].scalar_type(), a.op, ": max_exp_avg_sqs[", i,
                    "] dtype differs from exp_avgs[", i, "]");
      }
    }
    for (const auto& [list, what] : scalars) scalar_ref(list[i], a.op, what, i);
    sizes[i] = p.numel();
  }
  return sizes;
}

// The Encoder of a map, from a small cache keyed by the map's values: building one for an 8-bit map (bisection for
// 255 thresholds, then the segments' proof) costs far more than a step of a small tensor.
Encoder encoder_for(const at::Tensor& map, int bits) {
  static std::mutex mutex;
  static std::vector<std::pair<std::vector<float>, Encoder>> cache;  // the most recent last
  const float* q = map.data_ptr<float>();
  std::vector<float> key(q, q + (int64_t(1) << bits));
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& [values, encoder] : cache)
    if (values == key) return encoder;
  if (cache.size() == 16) cache.erase(cache.begin());
  cache.emplace_back(std::move(key), make_encoder(q, bits));
  return cache.back().second;
}

// The encoders of both moments.
struct Encoders {
  Encoder m{}, v{};
  explicit Encoders(const MomentArgs& a) {
    if (!a.bits) return;
    m = encoder_for(*a.m_map, int(a.bits));
    v = encoder_for(*a.v_map, int(a.bits));
  }
};

// The fused pass over one chunk (tensor i, elements [off, off + len)) with tensor i's AdamConsts k, taming the
// gradient as `tame` says. Chunks of quantized moments start on block boundaries.
void update_chunk(const MomentArgs& a, const Encoders& encoders, Tame tame, const AdamConsts& k, int64_t i,
                  int64_t off, int64_t len) {
  const Isa isa = current_isa();
  auto at_ = [off](const at::Tensor& t) { return static_cast<char*>(t.data_ptr()) + off * t.element_size(); };
  if (a.bits == 0) {
    const bool amsgrad = !a.vmax.empty();
    adam_kernel(isa, dtype_of(a.params[i], "params"), dtype_of(a.m[i], "exp_avgs"), amsgrad, tame)(
        at_(a.params[i]), at_(a.grads[i]), at_(a.m[i]), at_(a.v[i]), amsgrad ? at_(a.vmax[i]) : nullptr, len,
        k);
    return;
  }
  const int bits = int(a.bits), block = block_size(bits);
  const int64_t blk = off / block;
  auto state = [&](const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& map, const Encoder& encoder) {
    return QState{codes.data_ptr<uint8_t>() + blk * block * bits / 8, scales.data_ptr<float>() + blk,
                  map.data_ptr<float>(), &encoder};
  };
  adam_quantized_kernel(isa, dtype_of(a.params[i], "params"), bits, tame)(
      at_(a.params[i]), at_(a.grads[i]), state(a.m[i], a.m_scales[i], *a.m_map, encoders.m),
      state(a.v[i], a.v_scales[i], *a.v_map, encoders.v), len, k);
}

// The fused pass over every chunk of the tensors whose entry in `sizes` is not 0.
void fused_update(const MomentArgs& a, const Encoders& encoders, Tame tame, const std::vector<int64_t>& sizes,
                  const std::vector<AdamConsts>& consts) {
  for_each_chunk(sizes, [&](int64_t i, int64_t off, int64_t len) {
    update_chunk(a, encoders, tame, consts[i], i, off, len);
  });
}

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList steps, double lr, double beta1, double beta2,
               double eps, double weight_decay, bool decoupled, bool maximize,
               const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
               bool independent_decay) {
  const std::optional<at::Tensor> no_map;
  const MomentArgs a{"fastopt.adam_step", params, grads, exp_avgs, exp_avg_sqs, {}, {}, no_map, no_map, 0,
                     max_exp_avg_sqs};
  const std::vector<int64_t> sizes = check_moments(a, {{steps, "steps"}});
  if (skip_step(found_inf)) return;
  fused_update(a, Encoders(a), Tame::none, sizes,
               step_consts(steps, lr, beta1, beta2, eps, weight_decay, decoupled, maximize, grad_scale, independent_decay));
}

void adam_step_quantized(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_codes,
                         at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_codes,
                         at::TensorList exp_avg_sq_scales, at::TensorList steps, const at::Tensor& exp_avg_map,
                         const at::Tensor& exp_avg_sq_map, int64_t bits, double lr, double beta1, double beta2,
                         double eps, double weight_decay, bool decoupled, bool maximize,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                         bool independent_decay) {
  bits_of(bits);
  const std::optional<at::Tensor> m_map = exp_avg_map, v_map = exp_avg_sq_map;
  const MomentArgs a{"fastopt.adam_step_quantized", params, grads, exp_avg_codes, exp_avg_sq_codes, exp_avg_scales,
                     exp_avg_sq_scales, m_map, v_map, bits};
  const std::vector<int64_t> sizes = check_moments(a, {{steps, "steps"}});
  if (skip_step(found_inf)) return;
  fused_update(a, Encoders(a), Tame::none, sizes,
               step_consts(steps, lr, beta1, beta2, eps, weight_decay, decoupled, maximize, grad_scale, independent_decay));
}

void stable_spam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales, at::TensorList steps,
                      at::TensorList stats_steps, at::TensorList m_norms, at::TensorList v_norms,
                      at::TensorList m_maxes, const std::optional<at::Tensor>& exp_avg_map,
                      const std::optional<at::Tensor>& exp_avg_sq_map, int64_t bits, double lr, double beta1,
                      double beta2, double eps, double weight_decay, double gamma1, double gamma2, double gamma3,
                      double scale, bool reset, bool official, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf) {
  const MomentArgs a{"fastopt.stable_spam_step", params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales,
                   exp_avg_sq_scales, exp_avg_map, exp_avg_sq_map, bits};
  const std::vector<int64_t> sizes = check_moments(a, {{steps, "steps"}, {stats_steps, "stats_steps"},
                                                    {m_norms, "m_norms"}, {v_norms, "v_norms"}, {m_maxes, "m_maxes"}});
  if (skip_step(found_inf)) return;
  const double grad_mul = grad_multiplier(grad_scale), theta = gamma3, g1 = gamma1 * scale, b1 = beta1 * scale;
  const int64_t n = int64_t(params.size());
  const Isa isa = current_isa();
  const Encoders encoders(a);
  std::vector<AdamConsts> consts(n);

  // One group of tensors at a time, about kGroupBytes of gradient each (one tensor if larger). The first reduction
  // of the next group runs inside the update pass of this one. With low-bit moments the update is compute-bound
  // and the reduction memory-bound: a thread reduces a chunk of the next group's gradient right after updating a
  // chunk that prefetched it as it went (AdamConsts::warm), so the update hides the reduction's memory traffic.
  // The update of the next group then re-reads gradients that the reduction has just brought into the cache.
  constexpr int64_t kGroupBytes = int64_t(8) << 20;
  std::vector<int64_t> bounds{0};  // group g: tensors [bounds[g], bounds[g + 1])
  for (int64_t lo = 0, hi = 0; lo < n; lo = hi) {
    for (int64_t bytes = 0; hi < n && (hi == lo || bytes + sizes[hi] * grads[hi].element_size() <= kGroupBytes); ++hi)
      bytes += sizes[hi] * grads[hi].element_size();
    bounds.push_back(hi);
  }
  const size_t num_groups = bounds.size() - 1;
  if (num_groups == 0) return;  // no tensors
  auto group_sizes = [&](size_t g) {  // the element count of group g's tensors, 0 for the others (and past the end)
    std::vector<int64_t> group(n, 0);
    if (g < num_groups) std::copy(sizes.begin() + bounds[g], sizes.begin() + bounds[g + 1], group.begin() + bounds[g]);
    return group;
  };

  // max|g| and the sum of g² per chunk of a group; `sum` is redone over clipped chunks once AdaClip is known.
  struct Stats {
    std::vector<Chunk> chunks;
    std::vector<float> max;
    std::vector<double> sum;
    explicit Stats(const std::vector<int64_t>& group) : chunks(split(group)), max(chunks.size()), sum(chunks.size()) {}
  };
  auto reduce = [&](Stats& s, int64_t c, float thr, float mul) {
    const Chunk& k = s.chunks[c];
    const at::Tensor& g = grads[k.tensor];
    grad_stats_kernel(isa, dtype_of(g, "grads"))(static_cast<const char*>(g.data_ptr()) + k.begin * g.element_size(),
                                                  k.end - k.begin, float(grad_mul), thr, mul, &s.max[c], &s.sum[c]);
  };
  Stats stats(group_sizes(0));
  parallel_each(int64_t(stats.chunks.size()), [&](int64_t c) { reduce(stats, c, INFINITY, 1.0f); });

  for (size_t group = 0; group < num_groups; ++group) {
    const std::vector<Chunk>& chunks = stats.chunks;
    // AdaClip per tensor (host math in double, statistics stored as float32 like the reference).
    std::vector<float> tensor_max(n, 0.0f);
    for (size_t c = 0; c < chunks.size(); ++c)  // max that keeps a NaN
      tensor_max[chunks[c].tensor] = f32_to_bits(stats.max[c]) > f32_to_bits(tensor_max[chunks[c].tensor])
                                         ? stats.max[c] : tensor_max[chunks[c].tensor];
    std::vector<double> u(n);
    const int64_t first = bounds[group], end = bounds[group + 1];  // empty tensors too: their counters advance
    for (int64_t i = first; i < end; ++i) {
      float& t = *steps[i].data_ptr<float>();
      float& stats_t = *stats_steps[i].data_ptr<float>();
      t += 1.0f;
      stats_t += 1.0f;
      u[i] = official ? t : stats_t;  // official: Adam's t, which restarts at each reset (quirk (b))
      float& m_max = *m_maxes[i].data_ptr<float>();
      const double M = tensor_max[i];
      m_max = float(theta * m_max + (1.0 - theta) * M);
      const float thr = float(m_max / (1.0 - std::pow(theta, u[i])));
      consts[i].clip_thr = thr;
      consts[i].clip_mul = M > 0.0 ? float(thr / M) : 1.0f;
    }
    // Pass 2, only over chunks holding clipped entries: their sum of squares after AdaClip.
    std::vector<int64_t> clipped;
    for (size_t c = 0; c < chunks.size(); ++c)
      if (!(stats.max[c] <= consts[chunks[c].tensor].clip_thr)) clipped.push_back(int64_t(c));
    for_chunks(clipped, [&](int64_t c) {
      reduce(stats, c, consts[chunks[c].tensor].clip_thr, consts[chunks[c].tensor].clip_mul);
    });
    std::vector<double> sumsq(n, 0.0);
    for (size_t c = 0; c < chunks.size(); ++c) sumsq[chunks[c].tensor] += stats.sum[c];

    // AdaGN and the Adam constants per tensor.
    for (int64_t i = first; i < end; ++i) {
      const double norm = std::sqrt(sumsq[i]);
      float& m_norm = *m_norms[i].data_ptr<float>();
      float& v_norm = *v_norms[i].data_ptr<float>();
      m_norm = float(g1 * m_norm + (1.0 - g1) * norm);
      v_norm = float(gamma2 * v_norm + (1.0 - gamma2) * norm * norm);
      const double c =
          (m_norm / (1.0 - std::pow(g1, u[i]))) / (std::sqrt(v_norm / (1.0 - std::pow(gamma2, u[i]))) + eps);
      float& t = *steps[i].data_ptr<float>();
      if (reset) t = 1.0f;
      const double bc1 = 1.0 - std::pow(b1, double(t)), bc2 = 1.0 - std::pow(beta2, double(t));
      AdamConsts& k = consts[i];
      k.grad_mul = float(grad_mul);
      k.l2 = 0.0f;
      k.decay = float(1.0 - lr * weight_decay);
      k.beta1 = float(b1), k.one_minus_beta1 = float(1.0 - b1), k.beta2 = float(beta2),
      k.one_minus_beta2 = float(1.0 - beta2);
      k.step_size = float(lr / bc1);
      k.inv_bc2_sqrt = float(1.0 / std::sqrt(bc2));
      k.eps = float(eps);
      k.norm_mul = norm > 0.0 ? float(c / norm) : 1.0f;
      k.keep_old = !(reset && !official);  // corrected: the reset acts on its own step
      k.keep_new = !(reset && official);   // official: this update uses the old moments, zeros are stored (quirk (a))
    }

    // This group's update, with the next group's first reduction spread evenly among its chunks. Chunks with
    // nothing to clip (most of them) skip AdaClip's per-element test.
    Stats next(group_sizes(group + 1));
    const int64_t U = int64_t(chunks.size()), R = int64_t(next.chunks.size());
    auto update = [&](int64_t u, const AdamConsts& k) {
      const Chunk& c = chunks[u];
      const Tame tame = stats.max[u] <= k.clip_thr ? Tame::normalize : Tame::clip_normalize;
      update_chunk(a, encoders, tame, k, c.tensor, c.begin, c.end - c.begin);
    };
    if (a.bits != 0 && R <= 2 * U) {
      // Quantized moments (a compute-bound update): update chunk u prefetches reduction chunks [r_begin, r_end)
      // (at most two, spread evenly; those of r_begin's tensor, which are contiguous), and the same thread then
      // reduces them from its cache.
      parallel_each(U, [&](int64_t u) {
        const int64_t r_begin = (u * R + U - 1) / U, r_end = ((u + 1) * R + U - 1) / U;
        AdamConsts k = consts[chunks[u].tensor];
        if (r_begin < r_end) {
          const Chunk& first = next.chunks[r_begin];
          const Chunk& last = next.chunks[next.chunks[r_end - 1].tensor == first.tensor ? r_end - 1 : r_begin];
          const at::Tensor& g = grads[first.tensor];
          k.warm = static_cast<const char*>(g.data_ptr()) + first.begin * g.element_size();
          k.warm_bytes = (last.end - first.begin) * g.element_size();
        }
        update(u, k);
        for (int64_t r = r_begin; r < r_end; ++r) reduce(next, r, INFINITY, 1.0f);
      });
    } else {
      // Float moments (a memory-bound update, nothing to hide under: this order measured faster for them), or many
      // more reductions than updates (pairing would pile them onto few threads, or none: a group without chunks):
      // reductions and updates as separate slots, evenly interleaved.
      const int64_t total = U + R;
      parallel_each(total, [&](int64_t slot) {
        const int64_t reductions_before = slot * R / total;  // slot is a reduction when this count steps up
        if ((slot + 1) * R / total > reductions_before) return reduce(next, reductions_before, INFINITY, 1.0f);
        const int64_t u = slot - reductions_before;
        update(u, consts[chunks[u].tensor]);
      });
    }
    stats = std::move(next);
  }
}

void spam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales, at::TensorList steps,
               const std::optional<at::Tensor>& exp_avg_map, const std::optional<at::Tensor>& exp_avg_sq_map,
               int64_t bits, double lr, double beta1, double beta2, double eps, double weight_decay, double threshold,
               double scale, bool reset, bool clip, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  const MomentArgs a{"fastopt.spam_step", params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,
                   exp_avg_map, exp_avg_sq_map, bits};
  const std::vector<int64_t> sizes = check_moments(a, {{steps, "steps"}});
  if (skip_step(found_inf)) return;
  std::vector<AdamConsts> consts(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    float& t = *steps[i].data_ptr<float>();
    t += 1.0f;  // keeps counting through resets: no fresh bias correction
    const double bc1 = 1.0 - std::pow(beta1, double(t)), bc2 = 1.0 - std::pow(beta2, double(t));
    AdamConsts& k = consts[i];
    k.grad_mul = float(grad_multiplier(grad_scale));
    k.l2 = 0.0f;
    k.decay = 1.0f;
    k.beta1 = float(beta1), k.one_minus_beta1 = float(1.0 - beta1), k.beta2 = float(beta2), k.one_minus_beta2 = float(1.0 - beta2);
    k.step_size = float(scale * lr * std::sqrt(bc2) / bc1);
    k.inv_bc2_sqrt = 1.0f;  // SPAM's eps is added to sqrt(v) itself
    k.eps = float(eps);
    k.spike_theta = clip ? float(threshold) : INFINITY;
    k.post_decay = float(1.0 - lr * weight_decay);
    k.keep_old = !reset;
  }
  fused_update(a, Encoders(a), Tame::spike, sizes, consts);
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& x, const at::Tensor& map, int64_t bits) {
  bits_of(bits);
  check_map(map, bits, "map");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "fastopt.quantize_blockwise: x must be a float32 CPU tensor");
  const at::Tensor flat = x.contiguous().view(-1);
  const int64_t n = flat.numel(), block = block_size(int(bits)), blocks = (n + block - 1) / block;
  at::Tensor codes = at::empty({blocks * block * bits / 8}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({blocks}, x.options());
  const Encoder encoder = encoder_for(map, int(bits));
  quantize_kernel(current_isa(), int(bits))(flat.data_ptr<float>(), n, encoder, codes.data_ptr<uint8_t>(),
                                            scales.data_ptr<float>());
  return {codes, scales};
}

at::Tensor dequantize_blockwise(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& map, int64_t bits,
                                int64_t n) {
  bits_of(bits);
  check_map(map, bits, "map");
  check_quantized(codes, scales, n, bits, "x", 0);
  at::Tensor out = at::empty({n}, scales.options());
  dequantize_kernel(current_isa(), int(bits))(codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), n,
                                              map.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY(fastopt, m) {
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool decoupled, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "bool independent_decay=False) -> ()");
  m.def(
      "adam_step_quantized(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg_codes, "
      "Tensor(c!)[] exp_avg_scales, Tensor(d!)[] exp_avg_sq_codes, Tensor(e!)[] exp_avg_sq_scales, "
      "Tensor(f!)[] steps, Tensor exp_avg_map, Tensor exp_avg_sq_map, int bits, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool decoupled, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, bool independent_decay=False) -> ()");
  m.def(
      "stable_spam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] exp_avg_scales, Tensor(e!)[] exp_avg_sq_scales, Tensor(f!)[] steps, Tensor(g!)[] stats_steps, "
      "Tensor(h!)[] m_norms, Tensor(i!)[] v_norms, Tensor(j!)[] m_maxes, Tensor? exp_avg_map, Tensor? exp_avg_sq_map, "
      "int bits, *, float lr, float beta1, float beta2, float eps, float weight_decay, float gamma1, float gamma2, "
      "float gamma3, float scale, bool reset, bool official, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "spam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] exp_avg_scales, Tensor(e!)[] exp_avg_sq_scales, Tensor(f!)[] steps, Tensor? exp_avg_map, "
      "Tensor? exp_avg_sq_map, int bits, *, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "float threshold, float scale, bool reset, bool clip, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def("quantize_blockwise(Tensor x, Tensor map, int bits) -> (Tensor codes, Tensor scales)");
  m.def("dequantize_blockwise(Tensor codes, Tensor scales, Tensor map, int bits, int n) -> Tensor");
  m.def("cpu_isa() -> str", &get_isa);
  m.def("set_cpu_isa(str isa) -> str", &set_isa);
}

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("adam_step", &adam_step);
  m.impl("adam_step_quantized", &adam_step_quantized);
  m.impl("stable_spam_step", &stable_spam_step);
  m.impl("spam_step", &spam_step);
  m.impl("quantize_blockwise", &quantize_blockwise);
  m.impl("dequantize_blockwise", &dequantize_blockwise);
}

}  // namespace fastopt

// Lets `import fastopt._C` load this library (and so register the ops); the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastopt's compiled CPU kernels (ops live in torch.ops.fastopt)", -1, nullptr};
  return PyModule_Create(&module);
}
