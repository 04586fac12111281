// torch-facing layer: op schemas (TORCH_LIBRARY(fastopt)), argument checks, the work split across threads,
// and dispatch to the torch-free kernels by ISA and dtype. The only translation unit that includes torch.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <string>
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
  if (name == "avx512") want = Isa::avx512;
  else if (name == "avx2") want = Isa::avx2;
  else if (name == "scalar") want = Isa::scalar;
  else if (name == "auto") want = best;
  else TORCH_CHECK(false, "fastopt: unknown isa '", name, "' (expected avx512, avx2, scalar or auto)");
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

void check_same(const at::Tensor& p, const at::Tensor& t, const char* what, int64_t i) {
  TORCH_CHECK(t.device().is_cpu(), "fastopt.adam_step: ", what, "[", i, "] must be on the CPU");
  TORCH_CHECK(t.numel() == p.numel(), "fastopt.adam_step: ", what, "[", i, "] has ", t.numel(),
              " elements, params[", i, "] has ", p.numel());
  TORCH_CHECK(t.is_contiguous(), "fastopt.adam_step: ", what, "[", i, "] must be contiguous");
}

// Returns true when GradScaler found inf/NaN: then the whole step is skipped, steps included.
bool skip_step(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->defined() && found_inf->item<double>() != 0.0;
}

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList steps, double lr, double beta1, double beta2,
               double eps, double weight_decay, bool decoupled, bool maximize,
               const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const int64_t n = int64_t(params.size());
  const bool amsgrad = !max_exp_avg_sqs.empty();
  TORCH_CHECK(int64_t(grads.size()) == n && int64_t(exp_avgs.size()) == n && int64_t(exp_avg_sqs.size()) == n &&
                  int64_t(steps.size()) == n && (!amsgrad || int64_t(max_exp_avg_sqs.size()) == n),
              "fastopt.adam_step: all tensor lists must have the same length");
  std::vector<AdamFn> fns(n);
  std::vector<int64_t> sizes(n);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), "fastopt.adam_step: params[", i, "] must be a contiguous CPU tensor");
    check_same(p, grads[i], "grads", i);
    check_same(p, exp_avgs[i], "exp_avgs", i);
    check_same(p, exp_avg_sqs[i], "exp_avg_sqs", i);
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), "fastopt.adam_step: grads[", i, "] dtype ",
                grads[i].scalar_type(), " differs from params[", i, "] dtype ", p.scalar_type());
    const DType state = dtype_of(exp_avgs[i], "exp_avgs");
    TORCH_CHECK(exp_avg_sqs[i].scalar_type() == exp_avgs[i].scalar_type(), "fastopt.adam_step: exp_avg_sqs[", i,
                "] dtype differs from exp_avgs[", i, "]");
    if (amsgrad) {
      check_same(p, max_exp_avg_sqs[i], "max_exp_avg_sqs", i);
      TORCH_CHECK(max_exp_avg_sqs[i].scalar_type() == exp_avgs[i].scalar_type(), "fastopt.adam_step: max_exp_avg_sqs[",
                  i, "] dtype differs from exp_avgs[", i, "]");
    }
    TORCH_CHECK(steps[i].device().is_cpu() && steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1,
                "fastopt.adam_step: steps[", i, "] must be a float32 CPU scalar tensor");
    fns[i] = adam_kernel(current_isa(), dtype_of(p, "params"), state, amsgrad);
    sizes[i] = p.numel();
  }
  if (skip_step(found_inf)) return;

  double grad_mul = maximize ? -1.0 : 1.0;
  if (grad_scale.has_value() && grad_scale->defined()) grad_mul /= grad_scale->item<double>();
  std::vector<AdamConsts> consts(n);
  for (int64_t i = 0; i < n; ++i) {
    float* step = steps[i].data_ptr<float>();
    *step += 1.0f;
    const double t = *step;
    const double bc1 = 1.0 - std::pow(beta1, t), bc2 = 1.0 - std::pow(beta2, t);
    consts[i] = AdamConsts{float(grad_mul),
                           float(decoupled ? 0.0 : weight_decay),
                           float(decoupled ? 1.0 - lr * weight_decay : 1.0),
                           float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2),
                           float(lr / bc1), float(1.0 / std::sqrt(bc2)), float(eps)};
  }
  const std::vector<Chunk> chunks = split(sizes);
  at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = chunks[c];
      const int64_t i = ch.tensor, off = ch.begin;
      auto at_ = [off](const at::Tensor& t) { return static_cast<char*>(t.data_ptr()) + off * t.element_size(); };
      fns[i](at_(params[i]), at_(grads[i]), at_(exp_avgs[i]), at_(exp_avg_sqs[i]),
             amsgrad ? at_(max_exp_avg_sqs[i]) : nullptr, ch.end - ch.begin, consts[i]);
    }
  });
}

}  // namespace

TORCH_LIBRARY(fastopt, m) {
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool decoupled, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def("cpu_isa() -> str", &get_isa);
  m.def("set_cpu_isa(str isa) -> str", &set_isa);
}

TORCH_LIBRARY_IMPL(fastopt, CPU, m) { m.impl("adam_step", &adam_step); }

}  // namespace fastopt

// Lets `import fastopt._C` load this library (and so register the ops); the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastopt's compiled CPU kernels (ops live in torch.ops.fastopt)", -1, nullptr};
  return PyModule_Create(&module);
}
