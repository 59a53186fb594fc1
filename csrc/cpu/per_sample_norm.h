// Per-sample ||g_i||_q on the CPU, shared by the grad_norm and ascent_step kernels.
//
// The sum is a two-level cascade, as PyTorch's own CPU reductions are: kLanes independent
// partial sums run over blocks of kBlock elements (the lanes let the compiler vectorise
// without reassociating a single chain), each block's total is added to a running sum.
// Rounding error therefore grows with n / kBlock, not with n, which keeps a 150k-element
// CIFAR/ImageNet sample (and a 2^31-element one) within the flash-attention rule of the
// tests. Accumulation type: float for half/bfloat16/float, double for double.

#pragma once

#include <ATen/AccumulateType.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <c10/util/BFloat16.h>

#include "../op_args.h"  // kQInf

namespace lfr_ext {

template <typename scalar_t>
using cpu_acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;

// The CPU kernels' hot loops are also compiled for AVX-512 and AVX2 and picked at load time
// (GCC function multi-versioning, an ifunc): an extension is otherwise built for baseline
// x86-64 (SSE2), while PyTorch's own kernels use the widest vectors the CPU has.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LFR_EXT_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LFR_EXT_SIMD_CLONES
#endif

namespace detail {

// sum_i |g_i| (Q = 1) or sum_i g_i^2 (Q = 2), cascaded: kLanes partial sums per kBlock block.
template <typename scalar_t, int Q>
inline cpu_acc_t<scalar_t> sum_of_terms(const scalar_t* g, int64_t n) {
  using acc_t = cpu_acc_t<scalar_t>;
  constexpr int64_t kLanes = 16;
  constexpr int64_t kBlock = 4096;
  acc_t total = acc_t(0);
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t stop = start + kBlock < n ? start + kBlock : n;
    acc_t lanes[kLanes] = {};
    int64_t i = start;
    for (; i + kLanes <= stop; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const acc_t a = static_cast<acc_t>(g[i + l]);
        lanes[l] += Q == 1 ? std::abs(a) : a * a;
      }
    }
    for (; i < stop; ++i) {
      const acc_t a = static_cast<acc_t>(g[i]);
      lanes[0] += Q == 1 ? std::abs(a) : a * a;
    }
    acc_t block_sum = acc_t(0);
    for (int64_t l = 0; l < kLanes; ++l) block_sum += lanes[l];
    total += block_sum;
  }
  return total;
}

// max_i |g_i|, NaN if any g_i is NaN (as torch.amax).
template <typename scalar_t>
inline cpu_acc_t<scalar_t> max_abs(const scalar_t* g, int64_t n) {
  using acc_t = cpu_acc_t<scalar_t>;
  acc_t m = acc_t(0);
  bool saw_nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t a = std::abs(static_cast<acc_t>(g[i]));
    saw_nan |= a != a;
    m = a > m ? a : m;
  }
  return saw_nan ? std::numeric_limits<acc_t>::quiet_NaN() : m;
}

template <typename scalar_t>
inline cpu_acc_t<scalar_t> norm(const scalar_t* g, int64_t n, int64_t q) {
  if (q == kQInf) return max_abs(g, n);
  if (q == 1) return sum_of_terms<scalar_t, 1>(g, n);
  return std::sqrt(sum_of_terms<scalar_t, 2>(g, n));
}

LFR_EXT_SIMD_CLONES static float norm_f32(const float* g, int64_t n, int64_t q) { return norm(g, n, q); }
LFR_EXT_SIMD_CLONES static float norm_bf16(const c10::BFloat16* g, int64_t n, int64_t q) { return norm(g, n, q); }

}  // namespace detail

// ||g||_q of the n contiguous elements at g, in the accumulation type. NaN propagates
// (also for q = inf, as torch.amax does); an empty sample has norm 0.
template <typename scalar_t>
cpu_acc_t<scalar_t> per_sample_norm_cpu(const scalar_t* g, int64_t n, int64_t q) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return detail::norm_f32(g, n, q);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return detail::norm_bf16(g, n, q);
  } else {
    return detail::norm(g, n, q);
  }
}

}  // namespace lfr_ext
