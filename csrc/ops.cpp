// The CPU halves of the fastopt ops behind the C ABI of fastopt.h: the per-tensor constants of a step (folded on the
// host in double), the work split across threads, and dispatch to the torch-free kernels by ISA and dtype. Arguments
// were checked by the caller (fastopt/ops/cpu.py) before anything changes; nothing here includes torch or Python.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

#include "fastopt.h"
#include "kernels.h"

#define FASTOPT_API extern "C" __attribute__((visibility("default")))

// glibc 2.29 gave pow a new symbol version (same values; only its error reporting differs). Binding to the original
// one keeps the library loadable on every glibc that manylinux_2_28 covers, whatever glibc it is built on.
#if defined(__GLIBC__) && defined(__x86_64__)
__asm__(".symver pow,pow@GLIBC_2.2.5");
#endif

namespace fastopt {
namespace {

static_assert(int(DType::f32) == FASTOPT_F32 && int(DType::bf16) == FASTOPT_BF16 && int(DType::f16) == FASTOPT_F16,
              "fastopt.h's dtype codes are fastopt::DType's");

std::atomic<int> g_isa{-1};  // -1: not chosen yet

Isa current_isa() {
  int isa = g_isa.load();
  if (isa < 0) {
    isa = int(best_isa());
    g_isa.store(isa);
  }
  return Isa(isa);
}

int64_t element_size(DType t) { return t == DType::f32 ? 4 : 2; }

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

// The OpenMP runtime torch runs on, by its GOMP_parallel entry point: fn(data) on a team of num_threads threads (the
// caller among them), returning when all are done. fastopt/_ext.py finds it in the process (fastopt_set_parallel).
// Running on torch's own threads, as torch's ops do, keeps one team warm for both: a runtime of our own would have
// its threads fight torch's spinning ones for the cores after every torch op. Without one, the kernels run serially.
using ParallelEntry = void (*)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
std::atomic<ParallelEntry> g_parallel{nullptr};

// Runs fn(k) for every k in [0, n) on up to `threads` threads, each taking the next k as soon as it is free: the
// threads finish together even when one of them is slowed down (by memory, or by another process).
template <typename Fn>
void parallel_each(int64_t n, int threads, const Fn& fn) {
  const int team = int(std::min<int64_t>(n, std::max(threads, 1)));
  const ParallelEntry parallel = g_parallel.load();
  if (team <= 1 || parallel == nullptr) {
    for (int64_t k = 0; k < n; ++k) fn(k);
    return;
  }
  struct Job {
    const Fn& fn;
    const int64_t n;
    std::atomic<int64_t> next{0};
  } job{fn, n};
  parallel(
      [](void* data) {
        Job& job = *static_cast<Job*>(data);
        for (int64_t k; (k = job.next.fetch_add(1, std::memory_order_relaxed)) < job.n;) job.fn(k);
      },
      &job, unsigned(team), 0);
}

// Adds 1 to a float32 step counter and returns its new value.
double advance(float* step) { return *step += 1.0f; }

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

// The Encoder of a map, from a small cache keyed by the map's values: building one for an 8-bit map (bisection for
// 255 thresholds, then the segments' proof) costs far more than a step of a small tensor.
Encoder encoder_for(const float* map, int bits) {
  static std::mutex mutex;
  static std::vector<std::pair<std::vector<float>, Encoder>> cache;  // the most recent last
  std::vector<float> key(map, map + (int64_t(1) << bits));
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& [values, encoder] : cache)
    if (values == key) return encoder;
  if (cache.size() == 16) cache.erase(cache.begin());
  cache.emplace_back(std::move(key), make_encoder(map, bits));
  return cache.back().second;
}

// ---- what every step op shares: its tensors, their encoders, and the fused pass ------------------------------------
struct Moments {
  const fastopt_moments& t;
  int threads;
  Encoder m_encoder{}, v_encoder{};

  Moments(const fastopt_moments& tensors, int threads_) : t(tensors), threads(threads_) {
    if (!t.bits) return;
    m_encoder = encoder_for(t.exp_avg_map, t.bits);
    v_encoder = encoder_for(t.exp_avg_sq_map, t.bits);
  }

  int64_t count() const { return t.count; }
  std::vector<int64_t> sizes() const { return std::vector<int64_t>(t.numel, t.numel + t.count); }
  DType param_dtype(int64_t i) const { return DType(t.param_dtype[i]); }
  // Tensor i's gradient from element off on.
  const char* grad_at(int64_t i, int64_t off) const {
    return static_cast<const char*>(t.grad[i]) + off * element_size(param_dtype(i));
  }
  int64_t grad_bytes(int64_t i) const { return t.numel[i] * element_size(param_dtype(i)); }

  // The fused pass over one chunk (tensor i, elements [off, off + len)) with tensor i's AdamConsts k, taming the
  // gradient as `tame` says. Chunks of quantized moments start on block boundaries.
  void update_chunk(Tame tame, const AdamConsts& k, int64_t i, int64_t off, int64_t len) const {
    const Isa isa = current_isa();
    const DType param = param_dtype(i);
    char* p = static_cast<char*>(t.param[i]) + off * element_size(param);
    if (t.bits == 0) {
      const DType state = DType(t.state_dtype[i]);
      auto at = [&](void* base) { return static_cast<char*>(base) + off * element_size(state); };
      const bool amsgrad = t.max_exp_avg_sq != nullptr;
      adam_kernel(isa, param, state, amsgrad, tame)(p, grad_at(i, off), at(t.exp_avg[i]), at(t.exp_avg_sq[i]),
                                                    amsgrad ? at(t.max_exp_avg_sq[i]) : nullptr, len, k);
      return;
    }
    const int bits = t.bits, block = block_size(bits);
    const int64_t blk = off / block;
    auto state = [&](void* codes, float* scales, const float* map, const Encoder& encoder) {
      return QState{static_cast<uint8_t*>(codes) + blk * block * bits / 8, scales + blk, map, &encoder};
    };
    adam_quantized_kernel(isa, param, bits, tame)(
        p, grad_at(i, off), state(t.exp_avg[i], t.exp_avg_scale[i], t.exp_avg_map, m_encoder),
        state(t.exp_avg_sq[i], t.exp_avg_sq_scale[i], t.exp_avg_sq_map, v_encoder), len, k);
  }

  // The fused pass over every chunk of every tensor.
  void update(Tame tame, const std::vector<AdamConsts>& consts) const {
    const std::vector<Chunk> chunks = split(sizes());
    parallel_each(int64_t(chunks.size()), threads, [&](int64_t c) {
      const Chunk& chunk = chunks[c];
      update_chunk(tame, consts[chunk.tensor], chunk.tensor, chunk.begin, chunk.end - chunk.begin);
    });
  }

  // max|g·grad_mul| and Σ of its squares after AdaClip (|x| > clip_thr → x·clip_mul) over one chunk.
  void reduce(const Chunk& c, float grad_mul, float clip_thr, float clip_mul, float* amax, double* sumsq) const {
    grad_stats_kernel(current_isa(), param_dtype(c.tensor))(grad_at(c.tensor, c.begin), c.end - c.begin, grad_mul,
                                                            clip_thr, clip_mul, amax, sumsq);
  }
};

// ---- Adam / AdamW ------------------------------------------------------------------------------------------------
void adam_step(const Moments& a, float* const* steps, const double* hp, bool decoupled, bool maximize,
               bool independent_decay, double grad_mul) {
  const double lr = hp[0], beta1 = hp[1], beta2 = hp[2], eps = hp[3], weight_decay = hp[4];
  const double signed_grad_mul = (maximize ? -1.0 : 1.0) * grad_mul;
  const double decay = decoupled ? 1.0 - (independent_decay ? 1.0 : lr) * weight_decay : 1.0;
  std::vector<AdamConsts> consts(a.count());
  for (int64_t i = 0; i < a.count(); ++i) {
    const double t = advance(steps[i]);
    const double bc1 = 1.0 - std::pow(beta1, t), bc2 = 1.0 - std::pow(beta2, t);
    consts[i] = adam_consts(signed_grad_mul, beta1, beta2, eps, lr / bc1, 1.0 / std::sqrt(bc2), decay);
    if (!decoupled) consts[i].l2 = float(weight_decay);
  }
  a.update(Tame::none, consts);
}

// ---- Stable-SPAM -------------------------------------------------------------------------------------------------
// The per-tensor statistics and counters of a Stable-SPAM step.
struct SpamStats {
  float* const* steps;        // t: Adam's counter (restarts at each reset)
  float* const* stats_steps;  // u: AdaClip's and AdaGN's counter (never resets)
  float* const* m_norms;
  float* const* v_norms;
  float* const* m_maxes;
};

// Stable-SPAM's hyperparameters, as hp gives them (docs/algorithms.md#stable-spam).
struct SpamHyper {
  double lr, beta1, beta2, eps, weight_decay, gamma1, gamma2, theta;  // beta1 and gamma1 already times s
  bool reset, official;
  SpamHyper(const double* hp, bool official_)
      : lr(hp[0]), beta1(hp[1] * hp[8]), beta2(hp[2]), eps(hp[3]), weight_decay(hp[4]), gamma1(hp[5] * hp[8]),
        gamma2(hp[6]), theta(hp[7]), reset(hp[9] != 0.0), official(official_) {}
};

// Tensors go in groups of about kGroupBytes of gradient (one tensor if larger). Per group: the reductions (max|g| and
// Σg² per chunk), AdaClip's constants, a second reduction over the chunks holding clipped entries, AdaGN's and
// Adam's constants, then the update. The first reduction of the next group runs inside this group's update: with
// low-bit moments (a compute-bound update) each update chunk prefetches the next group's gradient chunks that its
// thread reduces right after it, so the reduction reads the cache; otherwise the two kinds of chunks interleave.
// With `given_stats` (each tensor's max|g| and clipped Σg², reduced across the shards of sharded params by the
// caller, fastopt/ops/spam.py) there is nothing to reduce: AdaClip and AdaGN take them, and one update pass follows.
class StableSpamStep {
 public:
  StableSpamStep(const Moments& a, const SpamStats& stats, const SpamHyper& h, double grad_mul,
                 const double* given_stats)
      : a_(a), stats_(stats), h_(h), grad_mul_(grad_mul), given_stats_(given_stats), sizes_(a.sizes()),
        consts_(a.count()), stats_counter_(a.count()) {
    const int64_t n = a.count();
    group_bounds_.push_back(0);
    for (int64_t lo = 0, hi = 0; lo < n; lo = hi) {
      for (int64_t bytes = 0; hi < n && (hi == lo || bytes + a_.grad_bytes(hi) <= kGroupBytes); ++hi)
        bytes += a_.grad_bytes(hi);
      group_bounds_.push_back(hi);
    }
  }

  void run() {
    const size_t groups = group_bounds_.size() - 1;
    if (groups == 0) return;  // no tensors
    if (given_stats_ != nullptr) return run_with_given_stats();
    Reduction current(group_sizes(0));
    parallel_each(int64_t(current.chunks.size()), a_.threads, [&](int64_t c) { reduce(current, c, INFINITY, 1.0f); });
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

 private:
  static constexpr int64_t kGroupBytes = int64_t(8) << 20;

  // max|g| and Σg² per chunk of one group's tensors; `sumsq` is redone over clipped chunks once AdaClip is known.
  struct Reduction {
    std::vector<Chunk> chunks;
    std::vector<float> max;
    std::vector<double> sumsq;
    explicit Reduction(const std::vector<int64_t>& sizes) : chunks(split(sizes)), max(chunks.size()), sumsq(chunks.size()) {}
  };

  // The statistics come reduced from elsewhere, so there is nothing to reduce here: one update pass, in which every
  // chunk takes the clipping test (its own max is unknown).
  void run_with_given_stats() {
    const int64_t n = a_.count();
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

  // Element counts of group g's tensors, 0 for the others (and for every tensor past the last group).
  std::vector<int64_t> group_sizes(size_t g) const {
    std::vector<int64_t> sizes(sizes_.size(), 0);
    if (g + 1 < group_bounds_.size())
      std::copy(sizes_.begin() + group_bounds_[g], sizes_.begin() + group_bounds_[g + 1], sizes.begin() + group_bounds_[g]);
    return sizes;
  }

  void reduce(Reduction& r, int64_t c, float clip_thr, float clip_mul) const {
    a_.reduce(r.chunks[c], float(grad_mul_), clip_thr, clip_mul, &r.max[c], &r.sumsq[c]);
  }

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

  // AdaClip per tensor: advance both counters, update the running max of max|g|, set the clip threshold. Empty tensors
  // of the group advance too. Host math in double, statistics stored as float32 like the reference.
  void adaclip(const std::vector<float>& tensor_max, int64_t first, int64_t end) {
    for (int64_t i = first; i < end; ++i) {
      const double t = advance(stats_.steps[i]), stats_t = advance(stats_.stats_steps[i]);
      stats_counter_[i] = h_.official ? t : stats_t;  // official: Adam's t, which restarts at each reset (quirk (b))
      float& m_max = *stats_.m_maxes[i];
      const double max_abs = tensor_max[i];
      m_max = float(h_.theta * m_max + (1.0 - h_.theta) * max_abs);
      const float threshold = float(m_max / (1.0 - std::pow(h_.theta, stats_counter_[i])));
      consts_[i].clip_thr = threshold;
      consts_[i].clip_mul = max_abs > 0.0 ? float(threshold / max_abs) : 1.0f;
    }
  }

  // The sum of squares after AdaClip, re-read only over the chunks holding clipped entries.
  void reduce_clipped(Reduction& r) const {
    std::vector<int64_t> clipped;
    for (size_t c = 0; c < r.chunks.size(); ++c)
      if (!(r.max[c] <= consts_[r.chunks[c].tensor].clip_thr)) clipped.push_back(int64_t(c));
    parallel_each(int64_t(clipped.size()), a_.threads, [&](int64_t k) {
      const int64_t c = clipped[k];
      reduce(r, c, consts_[r.chunks[c].tensor].clip_thr, consts_[r.chunks[c].tensor].clip_mul);
    });
  }

  // AdaGN per tensor (the running norm statistics and the gradient's scale), then Adam's constants.
  void adagn_and_adam(const std::vector<double>& sumsq, int64_t first, int64_t end) {
    for (int64_t i = first; i < end; ++i) {
      const double norm = std::sqrt(sumsq[i]), u = stats_counter_[i];
      float& m_norm = *stats_.m_norms[i];
      float& v_norm = *stats_.v_norms[i];
      m_norm = float(h_.gamma1 * m_norm + (1.0 - h_.gamma1) * norm);
      v_norm = float(h_.gamma2 * v_norm + (1.0 - h_.gamma2) * norm * norm);
      const double target = (m_norm / (1.0 - std::pow(h_.gamma1, u))) /
                            (std::sqrt(v_norm / (1.0 - std::pow(h_.gamma2, u))) + h_.eps);
      float& t = *stats_.steps[i];
      if (h_.reset) t = 1.0f;
      const double bc1 = 1.0 - std::pow(h_.beta1, double(t)), bc2 = 1.0 - std::pow(h_.beta2, double(t));
      AdamConsts k = adam_consts(grad_mul_, h_.beta1, h_.beta2, h_.eps, h_.lr / bc1, 1.0 / std::sqrt(bc2),
                                 1.0 - h_.lr * h_.weight_decay);
      k.clip_thr = consts_[i].clip_thr;
      k.clip_mul = consts_[i].clip_mul;
      k.norm_mul = norm > 0.0 ? float(target / norm) : 1.0f;
      k.keep_old = !(h_.reset && !h_.official);  // corrected: the reset acts on its own step
      k.keep_new = !(h_.reset && h_.official);   // official: this update uses the old moments, zeros are stored (quirk (a))
      consts_[i] = k;
    }
  }

  void update_chunk_of(const Reduction& r, int64_t u, const AdamConsts& k) const {
    const Chunk& c = r.chunks[u];
    const Tame tame = r.max[u] <= k.clip_thr ? Tame::normalize : Tame::clip_normalize;  // nothing to clip: no test
    a_.update_chunk(tame, k, c.tensor, c.begin, c.end - c.begin);
  }

  // This group's update with the next group's first reduction spread among its chunks.
  void update(const Reduction& current, Reduction& next) const {
    const int64_t U = int64_t(current.chunks.size()), R = int64_t(next.chunks.size());
    if (a_.t.bits != 0 && R <= 2 * U) {
      // Compute-bound update: chunk u prefetches reduction chunks [r_begin, r_end) (at most two, spread evenly;
      // those of r_begin's tensor, which are contiguous), and the same thread then reduces them from its cache.
      parallel_each(U, a_.threads, [&](int64_t u) {
        const int64_t r_begin = (u * R + U - 1) / U, r_end = ((u + 1) * R + U - 1) / U;
        AdamConsts k = consts_[current.chunks[u].tensor];
        if (r_begin < r_end) {
          const Chunk& first = next.chunks[r_begin];
          const Chunk& last = next.chunks[next.chunks[r_end - 1].tensor == first.tensor ? r_end - 1 : r_begin];
          k.warm = a_.grad_at(first.tensor, first.begin);
          k.warm_bytes = a_.grad_at(first.tensor, last.end) - k.warm;
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
    parallel_each(total, a_.threads, [&](int64_t slot) {
      const int64_t reductions_before = slot * R / total;  // slot is a reduction when this count steps up
      if ((slot + 1) * R / total > reductions_before) return reduce(next, reductions_before, INFINITY, 1.0f);
      const int64_t u = slot - reductions_before;
      update_chunk_of(current, u, consts_[current.chunks[u].tensor]);
    });
  }

  const Moments& a_;
  const SpamStats stats_;
  const SpamHyper h_;
  const double grad_mul_;
  const double* given_stats_;           // per tensor (max|g|, Σ clipped g²) reduced elsewhere, or null
  const std::vector<int64_t> sizes_;
  std::vector<int64_t> group_bounds_;   // group g: tensors [group_bounds_[g], group_bounds_[g + 1])
  std::vector<AdamConsts> consts_;      // per tensor: AdaClip's threshold first, then everything
  std::vector<double> stats_counter_;   // per tensor: the counter AdaClip and AdaGN bias-correct with
};

// ---- SPAM --------------------------------------------------------------------------------------------------------
void spam_step(const Moments& a, float* const* steps, const double* hp, double grad_mul) {
  const double lr = hp[0], beta1 = hp[1], beta2 = hp[2], eps = hp[3], weight_decay = hp[4], threshold = hp[5],
               scale = hp[6];
  const bool reset = hp[7] != 0.0, clip = hp[8] != 0.0;
  std::vector<AdamConsts> consts(a.count());
  for (int64_t i = 0; i < a.count(); ++i) {
    const double t = advance(steps[i]);  // keeps counting through resets: no fresh bias correction
    const double bc1 = 1.0 - std::pow(beta1, t), bc2 = 1.0 - std::pow(beta2, t);
    // SPAM's eps is added to sqrt(v) itself (inv_bc2_sqrt 1), its bias correction folded into the step size
    AdamConsts& k = consts[i] = adam_consts(grad_mul, beta1, beta2, eps, scale * lr * std::sqrt(bc2) / bc1, 1.0);
    k.spike_theta = clip ? float(threshold) : INFINITY;
    k.post_decay = float(1.0 - lr * weight_decay);
    k.keep_old = !reset;
  }
  a.update(Tame::spike, consts);
}

// ---- Stable-SPAM's statistics of sharded gradients ---------------------------------------------------------------
void grad_stats(int64_t count, const void* const* grads, const int64_t* numel, const int32_t* dtype, const float* clip,
                float grad_mul, double* out, int threads) {
  const std::vector<Chunk> chunks = split(std::vector<int64_t>(numel, numel + count));
  std::vector<float> maxes(chunks.size(), 0.0f);
  std::vector<double> sumsqs(chunks.size(), 0.0);
  parallel_each(int64_t(chunks.size()), threads, [&](int64_t c) {
    const Chunk& chunk = chunks[c];
    const DType type = DType(dtype[chunk.tensor]);
    grad_stats_kernel(current_isa(), type)(static_cast<const char*>(grads[chunk.tensor]) + chunk.begin * element_size(type),
                                           chunk.end - chunk.begin, grad_mul, clip ? clip[2 * chunk.tensor] : INFINITY,
                                           clip ? clip[2 * chunk.tensor + 1] : 1.0f, &maxes[c], &sumsqs[c]);
  });
  std::fill(out, out + 2 * count, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) {  // a max that keeps a NaN, as the step's own reduction
    double& m = out[2 * chunks[c].tensor];
    m = f32_to_bits(maxes[c]) > f32_to_bits(float(m)) ? double(maxes[c]) : m;
    out[2 * chunks[c].tensor + 1] += sumsqs[c];
  }
}

// ---- the C ABI: errors never cross it as exceptions --------------------------------------------------------------
thread_local std::string g_last_error;

template <typename Fn>
int guarded(const Fn& fn) {
  try {
    fn();
    return 0;
  } catch (const std::exception& e) {
    g_last_error = e.what();
  } catch (...) {
    g_last_error = "unknown C++ exception";
  }
  return -1;
}

}  // namespace
}  // namespace fastopt

using namespace fastopt;

FASTOPT_API int fastopt_abi_version(void) { return FASTOPT_ABI_VERSION; }
FASTOPT_API const char* fastopt_last_error(void) { return g_last_error.c_str(); }
FASTOPT_API int fastopt_best_isa(void) { return int(best_isa()); }
FASTOPT_API int fastopt_isa(void) { return int(current_isa()); }
FASTOPT_API void fastopt_set_isa(int isa) { g_isa.store(std::min(isa, int(best_isa()))); }
FASTOPT_API void fastopt_set_parallel(void* gomp_parallel) {
  g_parallel.store(reinterpret_cast<ParallelEntry>(gomp_parallel));
}

FASTOPT_API int fastopt_adam_step(const fastopt_moments* tensors, float* const* steps, const double* hp, int decoupled,
                                  int maximize, int independent_decay, double grad_mul, int threads) {
  return guarded([&] {
    adam_step(Moments(*tensors, threads), steps, hp, decoupled, maximize, independent_decay, grad_mul);
  });
}

FASTOPT_API int fastopt_stable_spam_step(const fastopt_moments* tensors, float* const* steps, float* const* stats_steps,
                                         float* const* m_norms, float* const* v_norms, float* const* m_maxes,
                                         const double* hp, int official, double grad_mul, const double* grad_stats,
                                         int threads) {
  return guarded([&] {
    const Moments a(*tensors, threads);
    StableSpamStep(a, {steps, stats_steps, m_norms, v_norms, m_maxes}, SpamHyper(hp, official), grad_mul, grad_stats)
        .run();
  });
}

FASTOPT_API int fastopt_spam_step(const fastopt_moments* tensors, float* const* steps, const double* hp,
                                  double grad_mul, int threads) {
  return guarded([&] { spam_step(Moments(*tensors, threads), steps, hp, grad_mul); });
}

FASTOPT_API int fastopt_grad_stats(int64_t count, const void* const* grads, const int64_t* numel, const int32_t* dtype,
                                   const float* clip, double grad_mul, double* out, int threads) {
  return guarded([&] { grad_stats(count, grads, numel, dtype, clip, float(grad_mul), out, threads); });
}

FASTOPT_API int fastopt_quantize_blockwise(const float* x, int64_t n, const float* map, int bits, uint8_t* codes,
                                           float* scales) {
  return guarded([&] {
    const Encoder encoder = encoder_for(map, bits);
    quantize_kernel(current_isa(), bits)(x, n, encoder, codes, scales);
  });
}

FASTOPT_API int fastopt_dequantize_blockwise(const uint8_t* codes, const float* scales, int64_t n, const float* map,
                                             int bits, float* out) {
  return guarded([&] { dequantize_kernel(current_isa(), bits)(codes, scales, n, map, out); });
}
