// torch-facing layer: the CPU implementations of the fastopt ops (schemas in fastopt/ops/library.py), argument
// checks, the work split across threads, and dispatch to the torch-free kernels by ISA and dtype. The only
// translation unit that includes torch.
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

// A step's hyperparameters: the float64 CPU tensor `hp` of the op's schema, in the order of HP_LAYOUTS in
// fastopt/ops/library.py, read here (on the host, where the per-tensor constants are folded in double).
std::vector<double> read_hyperparameters(const at::Tensor& hp, int64_t count, const char* op, const char* layout) {
  TORCH_CHECK(hp.device().is_cpu() && hp.scalar_type() == at::kDouble && hp.dim() == 1 && hp.numel() == count &&
                  hp.is_contiguous(),
              op, ": hp must be a contiguous float64 CPU tensor of ", count, " values (", layout, "), got ",
              hp.scalar_type(), " of shape ", hp.sizes(), " on ", hp.device());
  const double* values = hp.data_ptr<double>();
  return std::vector<double>(values, values + count);
}

// Adds 1 to a tensor's float32 step counter and returns its new value.
double advance(const at::Tensor& step) {
  float* t = step.data_ptr<float>();
  *t += 1.0f;
  return *t;
}

// The Adam part of one tensor's constants, the only place they are built: moments with rates beta1 / beta2,
// p ← decay·p − step_size · m / (sqrt(v)·inv_bc2_sqrt + eps). Each op sets the rest (coupled decay, taming, resets).
AdamConsts adam_consts(double grad_mul, double beta1, double beta2, double eps, double step_size, double inv_bc2_sqrt,
                       double decay = 1.0) {
  AdamConsts k{};
  k.grad_mul = float(grad_mul);
  k.l2 = 0.0f;
  k.decay = float(decay);
  k.beta1 = float(beta1), k.one_minus_beta1 = float(1.0 - beta1);
  k.beta2 = float(beta2), k.one_minus_beta2 = float(1.0 - beta2);
  k.step_size = float(step_size);
  k.inv_bc2_sqrt = float(inv_bc2_sqrt);
  k.eps = float(eps);
  return k;
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

// ---- what every step op shares: its moments (float or quantized), checks, encoders, and the fused pass ----------
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
  TORCH_CHECK(a.vmax.empty() || a.bits == 0, a.op, ": max_exp_avg_sqs (amsgrad) needs float moments (bits 0), got bits ",
              a.bits);
  if (!a.vmax.empty()) same = same && int64_t(a.vmax.size()) == n;
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

// ---- Adam / AdamW ------------------------------------------------------------------------------------------------
// hp = [lr, beta1, beta2, eps, weight_decay]. Moments as in MomentArgs: float tensors (bits 0) or codes + scales.
void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales, at::TensorList max_exp_avg_sqs,
               at::TensorList steps, const std::optional<at::Tensor>& exp_avg_map,
               const std::optional<at::Tensor>& exp_avg_sq_map, int64_t bits, const at::Tensor& hp, bool decoupled,
               bool maximize, bool independent_decay, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  const char* op = "fastopt.adam_step";
  const std::vector<double> h = read_hyperparameters(hp, 5, op, "lr, beta1, beta2, eps, weight_decay");
  const double lr = h[0], beta1 = h[1], beta2 = h[2], eps = h[3], weight_decay = h[4];
  const MomentArgs a{op, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, exp_avg_map,
                     exp_avg_sq_map, bits, max_exp_avg_sqs};
  const std::vector<int64_t> sizes = check_moments(a, {{steps, "steps"}});
  if (skip_step(found_inf)) return;
  const double grad_mul = (maximize ? -1.0 : 1.0) * grad_multiplier(grad_scale);
  const double decay = decoupled ? 1.0 - (independent_decay ? 1.0 : lr) * weight_decay : 1.0;
  std::vector<AdamConsts> consts(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const double t = advance(steps[i]);
    const double bc1 = 1.0 - std::pow(beta1, t), bc2 = 1.0 - std::pow(beta2, t);
    consts[i] = adam_consts(grad_mul, beta1, beta2, eps, lr / bc1, 1.0 / std::sqrt(bc2), decay);
    if (!decoupled) consts[i].l2 = float(weight_decay);
  }
  fused_update(a, Encoders(a), Tame::none, sizes, consts);
}

// ---- Stable-SPAM -------------------------------------------------------------------------------------------------
// hp = [lr, beta1, beta2, eps, weight_decay, gamma1, gamma2, gamma3, scale, reset]: scale is s (it multiplies beta1
// and gamma1), reset is 1 on a step that resets the moments.
//
// Tensors go in groups of about kGroupBytes of gradient (one tensor if larger). Per group: the reductions (max|g| and
// Σg² per chunk), AdaClip's constants, a second reduction over the chunks holding clipped entries, AdaGN's and
// Adam's constants, then the update. The first reduction of the next group runs inside this group's update: with
// low-bit moments (a compute-bound update) each update chunk prefetches the next group's gradient chunks that its
// thread reduces right after it, so the reduction reads the cache; otherwise the two kinds of chunks interleave.
// With `grad_stats` (each tensor's max|g| and clipped Σg², reduced across the shards of sharded params by the caller,
// fastopt/ops/spam.py) there is nothing to reduce: AdaClip and AdaGN take them, and one update pass follows.
class StableSpamStep {
 public:
  StableSpamStep(const MomentArgs& a, at::TensorList steps, at::TensorList stats_steps, at::TensorList m_norms,
                 at::TensorList v_norms, at::TensorList m_maxes, const std::vector<double>& h, bool official,
                 double grad_mul, std::vector<int64_t> sizes, const double* given_stats)
      : a_(a), steps_(steps), stats_steps_(stats_steps), m_norms_(m_norms), v_norms_(v_norms), m_maxes_(m_maxes),
        given_stats_(given_stats),
        lr_(h[0]), beta1_(h[1] * h[8]), beta2_(h[2]), eps_(h[3]), weight_decay_(h[4]), gamma1_(h[5] * h[8]),
        gamma2_(h[6]), theta_(h[7]), reset_(h[9] != 0.0), official_(official), grad_mul_(grad_mul),
        sizes_(std::move(sizes)), encoders_(a), consts_(a.params.size()), stats_counter_(a.params.size()) {
    const int64_t n = int64_t(sizes_.size());
    group_bounds_.push_back(0);
    for (int64_t lo = 0, hi = 0; lo < n; lo = hi) {
      for (int64_t bytes = 0; hi < n && (hi == lo || bytes + gradient_bytes(hi) <= kGroupBytes); ++hi)
        bytes += gradient_bytes(hi);
      group_bounds_.push_back(hi);
    }
  }

  void run() {
    const size_t groups = group_bounds_.size() - 1;
    if (groups == 0) return;  // no tensors
    if (given_stats_ != nullptr) return run_with_given_stats();
    Reduction current(group_sizes(0));
    parallel_each(int64_t(current.chunks.size()), [&](int64_t c) { reduce(current, c, INFINITY, 1.0f); });
    for (size_t group = 0; group < groups; ++group) {
      const int64_t first = group_bounds_[group], end = group_bounds_[group + 1];
      adaclip(tensor_maxes(current), first, end);
      reduce_clipped(current);
      adagn_and_adam(tensor_sumsqs(current), first, end);
      Reduction next(group_sizes(group + 1));
      update(current, next);
      current = std::move(next);
    }
  }

  // The statistics come reduced from elsewhere (across the shards of sharded params: fastopt/ops/spam.py), so there is
  // nothing to reduce here: one update pass, in which every chunk takes the clipping test (its own max is unknown).
  void run_with_given_stats() {
    const int64_t n = int64_t(sizes_.size());
    std::vector<float> maxes(n);
    std::vector<double> sumsqs(n);
    for (int64_t i = 0; i < n; ++i) {
      maxes[i] = float(given_stats_[2 * i]);
      sumsqs[i] = given_stats_[2 * i + 1];
    }
    adaclip(maxes, 0, n);
    adagn_and_adam(sumsqs, 0, n);
    Reduction all(sizes_), none(std::vector<int64_t>(sizes_.size(), 0));
    std::fill(all.max.begin(), all.max.end(), INFINITY);
    update(all, none);
  }

 private:
  static constexpr int64_t kGroupBytes = int64_t(8) << 20;

  // max|g| and Σg² per chunk of one group's tensors; `sumsq` is redone over clipped chunks once AdaClip is known.
  struct Reduction {
    std::vector<Chunk> chunks;
    std::vector<float> max;
    std::vector<double> sumsq;
    explicit Reduction(const std::vector<int64_t>& sizes) : chunks(split(sizes)), max(chunks.size()), sumsq(chunks.size()) {}
  };

  int64_t gradient_bytes(int64_t i) const { return sizes_[i] * a_.grads[i].element_size(); }

  // Element counts of group g's tensors, 0 for the others (and for every tensor past the last group).
  std::vector<int64_t> group_sizes(size_t g) const {
    std::vector<int64_t> sizes(sizes_.size(), 0);
    if (g + 1 < group_bounds_.size())
      std::copy(sizes_.begin() + group_bounds_[g], sizes_.begin() + group_bounds_[g + 1], sizes.begin() + group_bounds_[g]);
    return sizes;
  }

  void reduce(Reduction& r, int64_t c, float clip_thr, float clip_mul) const {
    const Chunk& chunk = r.chunks[c];
    const at::Tensor& g = a_.grads[chunk.tensor];
    grad_stats_kernel(current_isa(), dtype_of(g, "grads"))(
        static_cast<const char*>(g.data_ptr()) + chunk.begin * g.element_size(), chunk.end - chunk.begin,
        float(grad_mul_), clip_thr, clip_mul, &r.max[c], &r.sumsq[c]);
  }

  // AdaClip per tensor: advance both counters, update the running max of max|g|, set the clip threshold. Empty tensors
  // of the group advance too. Host math in double, statistics stored as float32 like the reference.
  std::vector<float> tensor_maxes(const Reduction& r) const {
    std::vector<float> tensor_max(sizes_.size(), 0.0f);
    for (size_t c = 0; c < r.chunks.size(); ++c) {  // a max that keeps a NaN
      float& m = tensor_max[r.chunks[c].tensor];
      m = f32_to_bits(r.max[c]) > f32_to_bits(m) ? r.max[c] : m;
    }
    return tensor_max;
  }

  std::vector<double> tensor_sumsqs(const Reduction& r) const {
    std::vector<double> sumsq(sizes_.size(), 0.0);
    for (size_t c = 0; c < r.chunks.size(); ++c) sumsq[r.chunks[c].tensor] += r.sumsq[c];
    return sumsq;
  }

  void adaclip(const std::vector<float>& tensor_max, int64_t first, int64_t end) {
    for (int64_t i = first; i < end; ++i) {
      const double t = advance(steps_[i]), stats_t = advance(stats_steps_[i]);
      stats_counter_[i] = official_ ? t : stats_t;  // official: Adam's t, which restarts at each reset (quirk (b))
      float& m_max = *m_maxes_[i].data_ptr<float>();
      const double max_abs = tensor_max[i];
      m_max = float(theta_ * m_max + (1.0 - theta_) * max_abs);
      const float threshold = float(m_max / (1.0 - std::pow(theta_, stats_counter_[i])));
      consts_[i].clip_thr = threshold;
      consts_[i].clip_mul = max_abs > 0.0 ? float(threshold / max_abs) : 1.0f;
    }
  }

  // The sum of squares after AdaClip, re-read only over the chunks holding clipped entries.
  void reduce_clipped(Reduction& r) const {
    std::vector<int64_t> clipped;
    for (size_t c = 0; c < r.chunks.size(); ++c)
      if (!(r.max[c] <= consts_[r.chunks[c].tensor].clip_thr)) clipped.push_back(int64_t(c));
    parallel_each(int64_t(clipped.size()), [&](int64_t k) {
      const int64_t c = clipped[k];
      reduce(r, c, consts_[r.chunks[c].tensor].clip_thr, consts_[r.chunks[c].tensor].clip_mul);
    });
  }

  // AdaGN per tensor (the running norm statistics and the gradient's scale), then Adam's constants.
  void adagn_and_adam(const std::vector<double>& sumsq, int64_t first, int64_t end) {
    for (int64_t i = first; i < end; ++i) {
      const double norm = std::sqrt(sumsq[i]), u = stats_counter_[i];
      float& m_norm = *m_norms_[i].data_ptr<float>();
      float& v_norm = *v_norms_[i].data_ptr<float>();
      m_norm = float(gamma1_ * m_norm + (1.0 - gamma1_) * norm);
      v_norm = float(gamma2_ * v_norm + (1.0 - gamma2_) * norm * norm);
      const double target = (m_norm / (1.0 - std::pow(gamma1_, u))) /
                            (std::sqrt(v_norm / (1.0 - std::pow(gamma2_, u))) + eps_);
      float& t = *steps_[i].data_ptr<float>();
      if (reset_) t = 1.0f;
      const double bc1 = 1.0 - std::pow(beta1_, double(t)), bc2 = 1.0 - std::pow(beta2_, double(t));
      AdamConsts k = adam_consts(grad_mul_, beta1_, beta2_, eps_, lr_ / bc1, 1.0 / std::sqrt(bc2),
                                 1.0 - lr_ * weight_decay_);
      k.clip_thr = consts_[i].clip_thr;
      k.clip_mul = consts_[i].clip_mul;
      k.norm_mul = norm > 0.0 ? float(target / norm) : 1.0f;
      k.keep_old = !(reset_ && !official_);  // corrected: the reset acts on its own step
      k.keep_new = !(reset_ && official_);   // official: this update uses the old moments, zeros are stored (quirk (a))
      consts_[i] = k;
    }
  }

  void update_chunk_of(const Reduction& r, int64_t u, const AdamConsts& k) const {
    const Chunk& c = r.chunks[u];
    const Tame tame = r.max[u] <= k.clip_thr ? Tame::normalize : Tame::clip_normalize;  // nothing to clip: no test
    update_chunk(a_, encoders_, tame, k, c.tensor, c.begin, c.end - c.begin);
  }

  // This group's update with the next group's first reduction spread among its chunks.
  void update(const Reduction& current, Reduction& next) const {
    const int64_t U = int64_t(current.chunks.size()), R = int64_t(next.chunks.size());
    if (a_.bits != 0 && R <= 2 * U) {
      // Compute-bound update: chunk u prefetches reduction chunks [r_begin, r_end) (at most two, spread evenly;
      // those of r_begin's tensor, which are contiguous), and the same thread then reduces them from its cache.
      parallel_each(U, [&](int64_t u) {
        const int64_t r_begin = (u * R + U - 1) / U, r_end = ((u + 1) * R + U - 1) / U;
        AdamConsts k = consts_[current.chunks[u].tensor];
        if (r_begin < r_end) {
          const Chunk& first = next.chunks[r_begin];
          const Chunk& last = next.chunks[next.chunks[r_end - 1].tensor == first.tensor ? r_end - 1 : r_begin];
          const at::Tensor& g = a_.grads[first.tensor];
          k.warm = static_cast<const char*>(g.data_ptr()) + first.begin * g.element_size();
          k.warm_bytes = (last.end - first.begin) * g.element_size();
        }
        update_chunk_of(current, u, k);
        for (int64_t r = r_begin; r < r_end; ++r) reduce(next, r, INFINITY, 1.0f);
      });
      return;
    }
    // Float moments (a memory-bound update, nothing to hide under: this order measured faster for them), or many
    // more reductions than updates (pairing would pile them onto few threads, or none: a group without chunks):
    // reductions and updates as separate slots, evenly interleaved.
    const int64_t total = U + R;
    parallel_each(total, [&](int64_t slot) {
      const int64_t reductions_before = slot * R / total;  // slot is a reduction when this count steps up
      if ((slot + 1) * R / total > reductions_before) return reduce(next, reductions_before, INFINITY, 1.0f);
      const int64_t u = slot - reductions_before;
      update_chunk_of(current, u, consts_[current.chunks[u].tensor]);
    });
  }

  const MomentArgs& a_;
  at::TensorList steps_, stats_steps_, m_norms_, v_norms_, m_maxes_;
  const double* given_stats_;           // per tensor (max|g|, Σ clipped g²) reduced elsewhere, or null
  const double lr_, beta1_, beta2_, eps_, weight_decay_, gamma1_, gamma2_, theta_;  // beta1_, gamma1_: times s
  const bool reset_, official_;
  const double grad_mul_;
  const std::vector<int64_t> sizes_;
  const Encoders encoders_;
  std::vector<int64_t> group_bounds_;   // group g: tensors [group_bounds_[g], group_bounds_[g + 1])
  std::vector<AdamConsts> consts_;      // per tensor: AdaClip's threshold first, then everything
  std::vector<double> stats_counter_;   // per tensor: the counter AdaClip and AdaGN bias-correct with
};

void stable_spam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales, at::TensorList steps,
                      at::TensorList stats_steps, at::TensorList m_norms, at::TensorList v_norms,
                      at::TensorList m_maxes, const std::optional<at::Tensor>& exp_avg_map,
                      const std::optional<at::Tensor>& exp_avg_sq_map, int64_t bits, const at::Tensor& hp,
                      bool official, const std::optional<at::Tensor>& grad_stats,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const char* op = "fastopt.stable_spam_step";
  const std::vector<double> h = read_hyperparameters(
      hp, 10, op, "lr, beta1, beta2, eps, weight_decay, gamma1, gamma2, gamma3, scale, reset");
  const MomentArgs a{op, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, exp_avg_map,
                     exp_avg_sq_map, bits};
  std::vector<int64_t> sizes = check_moments(a, {{steps, "steps"}, {stats_steps, "stats_steps"},
                                                 {m_norms, "m_norms"}, {v_norms, "v_norms"}, {m_maxes, "m_maxes"}});
  if (grad_stats.has_value())
    TORCH_CHECK(grad_stats->device().is_cpu() && grad_stats->scalar_type() == at::kDouble && grad_stats->dim() == 2 &&
                    grad_stats->size(0) == int64_t(params.size()) && grad_stats->size(1) == 2 &&
                    grad_stats->is_contiguous(),
                op, ": grad_stats must be a contiguous float64 CPU tensor of shape (", params.size(),
                ", 2), got ", grad_stats->scalar_type(), " of shape ", grad_stats->sizes());
  if (skip_step(found_inf)) return;
  StableSpamStep(a, steps, stats_steps, m_norms, v_norms, m_maxes, h, official, grad_multiplier(grad_scale),
                 std::move(sizes), grad_stats.has_value() ? grad_stats->data_ptr<double>() : nullptr)
      .run();
}

// Per tensor, (max|g·grad_mul|, Σ of its squares after AdaClip's `clip` (float32 (threshold, multiplier) per tensor;
// none: no clipping)), as float64 (n, 2): the statistics that sharded params reduce across their shards.
at::Tensor grad_stats(at::TensorList grads, const std::optional<at::Tensor>& clip,
                      const std::optional<at::Tensor>& grad_scale) {
  const int64_t n = int64_t(grads.size());
  if (clip.has_value())
    TORCH_CHECK(clip->device().is_cpu() && clip->scalar_type() == at::kFloat && clip->dim() == 2 &&
                    clip->size(0) == n && clip->size(1) == 2 && clip->is_contiguous(),
                "fastopt.grad_stats: clip must be a contiguous float32 CPU tensor of shape (", n, ", 2)");
  std::vector<int64_t> sizes(n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(grads[i].device().is_cpu() && grads[i].is_contiguous(), "fastopt.grad_stats: grads[", i,
                "] must be a contiguous CPU tensor");
    dtype_of(grads[i], "grads");
    sizes[i] = grads[i].numel();
  }
  const std::vector<Chunk> chunks = split(sizes);
  std::vector<float> maxes(chunks.size(), 0.0f);
  std::vector<double> sumsqs(chunks.size(), 0.0);
  const float grad_mul = float(grad_multiplier(grad_scale));
  const float* limits = clip.has_value() ? clip->data_ptr<float>() : nullptr;
  parallel_each(int64_t(chunks.size()), [&](int64_t c) {
    const Chunk& chunk = chunks[c];
    const at::Tensor& g = grads[chunk.tensor];
    grad_stats_kernel(current_isa(), dtype_of(g, "grads"))(
        static_cast<const char*>(g.data_ptr()) + chunk.begin * g.element_size(), chunk.end - chunk.begin, grad_mul,
        limits ? limits[2 * chunk.tensor] : INFINITY, limits ? limits[2 * chunk.tensor + 1] : 1.0f, &maxes[c],
        &sumsqs[c]);
  });
  at::Tensor out = at::empty({n, 2}, at::TensorOptions().dtype(at::kDouble));
  double* stats = out.data_ptr<double>();
  std::fill(stats, stats + 2 * n, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) {  // a max that keeps a NaN, as the step's own reduction
    double& m = stats[2 * chunks[c].tensor];
    m = f32_to_bits(maxes[c]) > f32_to_bits(float(m)) ? double(maxes[c]) : m;
    stats[2 * chunks[c].tensor + 1] += sumsqs[c];
  }
  return out;
}

// ---- SPAM --------------------------------------------------------------------------------------------------------
// hp = [lr, beta1, beta2, eps, weight_decay, threshold, scale, reset, clip].
void spam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales, at::TensorList steps,
               const std::optional<at::Tensor>& exp_avg_map, const std::optional<at::Tensor>& exp_avg_sq_map,
               int64_t bits, const at::Tensor& hp, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  const char* op = "fastopt.spam_step";
  const std::vector<double> h =
      read_hyperparameters(hp, 9, op, "lr, beta1, beta2, eps, weight_decay, threshold, scale, reset, clip");
  const double lr = h[0], beta1 = h[1], beta2 = h[2], eps = h[3], weight_decay = h[4], threshold = h[5],
               scale = h[6];
  const bool reset = h[7] != 0.0, clip = h[8] != 0.0;
  const MomentArgs a{op, params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales, exp_avg_map,
                     exp_avg_sq_map, bits};
  const std::vector<int64_t> sizes = check_moments(a, {{steps, "steps"}});
  if (skip_step(found_inf)) return;
  std::vector<AdamConsts> consts(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const double t = advance(steps[i]);  // keeps counting through resets: no fresh bias correction
    const double bc1 = 1.0 - std::pow(beta1, t), bc2 = 1.0 - std::pow(beta2, t);
    // SPAM's eps is added to sqrt(v) itself (inv_bc2_sqrt 1), its bias correction folded into the step size
    AdamConsts& k = consts[i] = adam_consts(grad_multiplier(grad_scale), beta1, beta2, eps,
                                            scale * lr * std::sqrt(bc2) / bc1, 1.0);
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

// The op schemas, their fake kernels and the other backends are defined in Python (fastopt/ops/library.py), at
// import; this library adds the CPU kernels, and two ops of its own that choose the SIMD code.
TORCH_LIBRARY_FRAGMENT(fastopt, m) {
  m.def("cpu_isa() -> str", &get_isa);
  m.def("set_cpu_isa(str isa) -> str", &set_isa);
}

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("adam_step", &adam_step);
  m.impl("stable_spam_step", &stable_spam_step);
  m.impl("spam_step", &spam_step);
  m.impl("grad_stats", &grad_stats);
  m.impl("quantize_blockwise", &quantize_blockwise);
  m.impl("dequantize_blockwise", &dequantize_blockwise);
}

}  // namespace fastopt

// Lets `import fastopt._C` load this library (and so register the ops); the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastopt's compiled CPU kernels (ops live in torch.ops.fastopt)", -1, nullptr};
  return PyModule_Create(&module);
}
