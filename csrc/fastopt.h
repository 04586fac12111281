/* fastopt's C ABI: the CPU kernels as a plain shared library (libfastopt_cpu.so) that links neither torch nor Python.
 * fastopt/ops/cpu.py calls it through ctypes after checking every argument, so a build of this library serves every
 * torch and Python version that fastopt's Python code supports. Nothing here validates its input: the caller has.
 *
 * Tensors are raw pointers to contiguous storage. Entry i of every array of a fastopt_moments belongs to tensor i.
 * Functions return 0, or -1 after a failure inside the library (fastopt_last_error() says which); threads: the most
 * threads to run on (the caller passes torch.get_num_threads()), on the OpenMP runtime given to fastopt_set_parallel.
 * FASTOPT_ABI_VERSION changes with any change below; the Python side refuses a library of another version. */
#ifndef FASTOPT_H
#define FASTOPT_H
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FASTOPT_ABI_VERSION 1

/* Element types of params, grads and float moments (the values of fastopt::DType). */
enum { FASTOPT_F32 = 0, FASTOPT_BF16 = 1, FASTOPT_F16 = 2 };

/* One step op's tensors: params, grads and both Adam moments, as float tensors (bits 0) or block-quantized codes +
 * scales (bits 4 or 8, with the two maps). */
typedef struct {
  int64_t count;                    /* tensors */
  const int64_t* numel;             /* elements of params[i] */
  const int32_t* param_dtype;       /* of params[i] and grads[i] */
  const int32_t* state_dtype;       /* of exp_avg[i], exp_avg_sq[i] (and max_exp_avg_sq[i]) when bits is 0 */
  void* const* param;
  const void* const* grad;
  void* const* exp_avg;             /* bits 0: float moments; bits 4 / 8: uint8 codes */
  void* const* exp_avg_sq;
  float* const* exp_avg_scale;      /* bits 4 / 8: one fp32 scale per block; else NULL */
  float* const* exp_avg_sq_scale;
  void* const* max_exp_avg_sq;      /* amsgrad (bits 0 only), else NULL */
  int32_t bits;                     /* 0, 4 or 8 */
  const float* exp_avg_map;         /* bits 4 / 8: 2^bits fp32 entries; else NULL */
  const float* exp_avg_sq_map;
} fastopt_moments;

int fastopt_abi_version(void);
const char* fastopt_last_error(void);

/* The SIMD code the kernels run: 0 scalar (baseline x86-64), 1 AVX2 + FMA, 2 AVX-512, 3 AVX-512 with VBMI. */
int fastopt_best_isa(void);
int fastopt_isa(void);
void fastopt_set_isa(int isa); /* at most fastopt_best_isa() */

/* The threads the kernels run on: the GOMP_parallel entry point of the process's OpenMP runtime (torch's), called as
 * gomp_parallel(fn, data, num_threads, 0). NULL (the default): the kernels run on the calling thread alone. */
void fastopt_set_parallel(void* gomp_parallel);

/* hp: lr, beta1, beta2, eps, weight_decay. grad_mul: 1 / GradScaler's scale (1 without). steps: float32 counters. */
int fastopt_adam_step(const fastopt_moments* tensors, float* const* steps, const double* hp, int decoupled,
                      int maximize, int independent_decay, double grad_mul, int threads);

/* hp: lr, beta1, beta2, eps, weight_decay, gamma1, gamma2, gamma3, scale, reset. grad_stats: per tensor (max|g|,
 * Σ of clipped g²) reduced elsewhere (count × 2 doubles), or NULL to reduce here. */
int fastopt_stable_spam_step(const fastopt_moments* tensors, float* const* steps, float* const* stats_steps,
                             float* const* m_norms, float* const* v_norms, float* const* m_maxes, const double* hp,
                             int official, double grad_mul, const double* grad_stats, int threads);

/* hp: lr, beta1, beta2, eps, weight_decay, threshold, scale, reset, clip. */
int fastopt_spam_step(const fastopt_moments* tensors, float* const* steps, const double* hp, double grad_mul,
                      int threads);

/* Per gradient (max|g·grad_mul|, Σ of its squares after AdaClip) into out (count × 2 doubles); clip: per tensor
 * (threshold, multiplier) as count × 2 floats, or NULL for none. */
int fastopt_grad_stats(int64_t count, const void* const* grads, const int64_t* numel, const int32_t* dtype,
                       const float* clip, double grad_mul, double* out, int threads);

/* Block codecs: codes hold ceil(n / block) · block · bits / 8 bytes, scales ceil(n / block) floats. */
int fastopt_quantize_blockwise(const float* x, int64_t n, const float* map, int bits, uint8_t* codes, float* scales);
int fastopt_dequantize_blockwise(const uint8_t* codes, const float* scales, int64_t n, const float* map, int bits,
                                 float* out);

#ifdef __cplusplus
}
#endif
#endif
