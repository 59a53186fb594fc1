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

namespace lfr_ext {

// Norm order codes shared with the Python side (reference.q_code): 1, 2, or -1 for inf.
constexpr int64_t kQInf = -1;

template <typename scalar_t>
using cpu_acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;

// ||g||_q of the n contiguous elements at g, in the accumulation type. NaN propagates
// (also for q = inf, as torch.amax does); an empty sample has norm 0.
template <typename scalar_t>
cpu_acc_t<scalar_t> per_sample_norm_cpu(const scalar_t* g, int64_t n, int64_t q) {
  using acc_t = cpu_acc_t<scalar_t>;
  constexpr int64_t kLanes = 16;
  constexpr int64_t kBlock = 4096;
  if (q == kQInf) {
    acc_t m = acc_t(0);
    bool saw_nan = false;
    for (int64_t i = 0; i < n; ++i) {
      const acc_t a = std::abs(static_cast<acc_t>(g[i]));
      saw_nan |= std::isnan(a);
      m = a > m ? a : m;
    }
    return saw_nan ? std::numeric_limits<acc_t>::quiet_NaN() : m;
  }
  acc_t total = acc_t(0);
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t stop = start + kBlock < n ? start + kBlock : n;
    acc_t lanes[kLanes] = {};
    int64_t i = start;
    for (; i + kLanes <= stop; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const acc_t a = static_cast<acc_t>(g[i + l]);
        lanes[l] += q == 1 ? std::abs(a) : a * a;
      }
    }
    for (; i < stop; ++i) {
      const acc_t a = static_cast<acc_t>(g[i]);
      lanes[0] += q == 1 ? std::abs(a) : a * a;
    }
    acc_t block_sum = acc_t(0);
    for (int64_t l = 0; l < kLanes; ++l) block_sum += lanes[l];
    total += block_sum;
  }
  return q == 2 ? std::sqrt(total) : total;
}

}  // namespace lfr_ext
