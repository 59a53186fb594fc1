// Building blocks shared by the CUDA kernels of lfr_ext: the launch plan (how many blocks
// per sample), vectorised loads, and the block reduction of a per-sample norm.
//
// Work split. Block (b, c) of a grid (B, C) owns chunk c of sample b. When the batch alone
// fills the GPU (B >= number of SMs) C = 1: one launch, each block reduces its own sample and
// writes ||g_b||_q directly. With fewer, larger samples C > 1 blocks share a sample; each
// writes its partial (in the accumulation type) to a (B, C) buffer and a second, tiny launch
// folds the C partials of each sample in a fixed order, so results are deterministic (no
// atomics).

#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "../op_args.h"  // kQInf

namespace lfr_ext {
namespace cuda {

constexpr int kMaxThreads = 512;
constexpr int kWarp = 32;

// -- launch plan ---------------------------------------------------------------------------
struct LaunchPlan {
  int vec;            // elements per vector load: 16 bytes' worth, or 1 when not aligned
  int threads;        // threads per block, a multiple of the warp size
  int64_t chunks;     // blocks per sample (grid.y)
  int64_t chunk_len;  // elements per chunk, a multiple of vec
};

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// `pointers` are the dense buffers the kernel will read and write; vectorised access needs
// each of them 16-byte aligned and every sample to start on a vector boundary.
inline LaunchPlan plan_launch(int64_t batch, int64_t per_sample, int64_t elem_size,
                              std::initializer_list<const void*> pointers) {
  LaunchPlan plan{};
  plan.vec = static_cast<int>(16 / elem_size);
  bool can_vectorise = per_sample % plan.vec == 0;
  for (const void* p : pointers) can_vectorise = can_vectorise && (p == nullptr || aligned16(p));
  if (!can_vectorise) plan.vec = 1;

  // No host synchronisation: the SM count is a cached device property.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // A block should loop at least a few times over kMaxThreads vectors before splitting a sample.
  const int64_t min_chunk = int64_t(kMaxThreads) * plan.vec * 4;
  int64_t chunks = 1;
  if (batch < sms && per_sample > min_chunk) {
    const int64_t wanted = (2 * sms + batch - 1) / batch;  // about two blocks per SM in total
    const int64_t most = (per_sample + min_chunk - 1) / min_chunk;
    chunks = std::min<int64_t>(std::min(wanted, most), 65535);  // grid.y limit
  }
  int64_t chunk_len = (per_sample + chunks - 1) / chunks;
  chunk_len = (chunk_len + plan.vec - 1) / plan.vec * plan.vec;
  plan.chunk_len = std::max<int64_t>(chunk_len, plan.vec);
  plan.chunks = std::max<int64_t>((per_sample + plan.chunk_len - 1) / plan.chunk_len, 1);

  const int64_t vectors = (plan.chunk_len + plan.vec - 1) / plan.vec;
  const int64_t threads = (std::min<int64_t>(vectors, kMaxThreads) + kWarp - 1) / kWarp * kWarp;
  plan.threads = static_cast<int>(std::max<int64_t>(threads, kWarp));
  return plan;
}

// -- vector loads ----------------------------------------------------------------------------
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* __restrict__ p, int64_t i) {
  return *reinterpret_cast<const Vec<T, N>*>(p + i);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* __restrict__ p, int64_t i, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p + i) = v;
}

// -- norm accumulation -----------------------------------------------------------------------
// Sum of |a| (q = 1) or a^2 (q = 2), or the max of |a| (q = inf) with NaN kept, as torch.amax.
template <typename acc_t>
__device__ __forceinline__ acc_t combine_norm(acc_t acc, acc_t v, int64_t q) {
  if (q == kQInf) return (v != v || v > acc) ? v : acc;  // NaN sticks: NaN > x is false
  return acc + v;
}

// Overloads, so float stays float (a plain ::fabs/::sqrt would go through double).
__device__ __forceinline__ float abs_of(float a) { return fabsf(a); }
__device__ __forceinline__ double abs_of(double a) { return fabs(a); }
__device__ __forceinline__ float sqrt_of(float a) { return sqrtf(a); }  // IEEE-rounded: no --use_fast_math
__device__ __forceinline__ double sqrt_of(double a) { return sqrt(a); }

// The per-element contribution of a (already |a| for q = 1 and inf).
template <typename acc_t>
__device__ __forceinline__ acc_t norm_term(acc_t a, int64_t q) {
  return q == 2 ? a * a : abs_of(a);
}

template <typename acc_t>
__device__ __forceinline__ acc_t finish_norm(acc_t acc, int64_t q) {
  return q == 2 ? sqrt_of(acc) : acc;
}

// Reduce one value per thread to thread 0 of the block. blockDim.x is a multiple of 32.
template <typename acc_t>
__device__ acc_t block_reduce_norm(acc_t v, int64_t q) {
  __shared__ acc_t warp_results[kMaxThreads / kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v = combine_norm(v, __shfl_down_sync(0xffffffffu, v, offset), q);
  }
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / kWarp;
  if (warp == 0) {
    v = lane < warps ? warp_results[lane] : acc_t(0);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      v = combine_norm(v, __shfl_down_sync(0xffffffffu, v, offset), q);
    }
  }
  return v;
}

// Second pass when a sample was split over C blocks: out[b] = finish(fold_c partial[b, c]).
template <typename scalar_t, typename acc_t>
__global__ void fold_partial_norms_kernel(const acc_t* __restrict__ partial, scalar_t* __restrict__ out,
                                          int64_t batch, int64_t chunks, int64_t q) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  acc_t acc = acc_t(0);
  for (int64_t c = 0; c < chunks; ++c) acc = combine_norm(acc, partial[b * chunks + c], q);
  out[b] = static_cast<scalar_t>(finish_norm(acc, q));
}

template <typename scalar_t, typename acc_t>
void launch_fold_partial_norms(const acc_t* partial, scalar_t* out, int64_t batch, int64_t chunks, int64_t q,
                               cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = (batch + kThreads - 1) / kThreads;
  fold_partial_norms_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      partial, out, batch, chunks, q);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace lfr_ext
