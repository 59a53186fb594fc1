// CUDA kernel of lfr_ext::grad_norm: out_b = ||g_b||_q, g (B, ...) -> (B,).
//
// Same launch plan, vector loads and block reduction as ascent_step (per_sample_norm.cuh), so
// on a given device and shape both ops report bitwise the same norms. Float accumulation
// (double for double); current stream, no host sync, int64 offsets.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../op_args.h"
#include "per_sample_norm.cuh"

namespace lfr_ext {
namespace cuda {
namespace {

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    grad_norm_kernel(const scalar_t* __restrict__ g, scalar_t* __restrict__ out,
                     at::acc_type<scalar_t, true>* __restrict__ partial, int64_t per_sample, int64_t chunk_len,
                     int64_t q) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t sample = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t chunk_begin = chunk * chunk_len;
  const int64_t chunk_end = chunk_begin + chunk_len < per_sample ? chunk_begin + chunk_len : per_sample;
  const int64_t base = sample * per_sample;

  acc_t acc = acc_t(0);
  for (int64_t i = base + chunk_begin + int64_t(threadIdx.x) * VEC; i < base + chunk_end;
       i += int64_t(blockDim.x) * VEC) {
    const Vec<scalar_t, VEC> gv = load_vec<scalar_t, VEC>(g, i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc = combine_norm(acc, norm_term(static_cast<acc_t>(gv.v[k]), q), q);
  }
  acc = block_reduce_norm(acc, q);
  if (threadIdx.x == 0) {
    if (partial == nullptr) {
      out[sample] = static_cast<scalar_t>(finish_norm(acc, q));
    } else {
      partial[sample * gridDim.y + chunk] = acc;
    }
  }
}

at::Tensor grad_norm_cuda(const at::Tensor& g, int64_t q) {
  check_grad_norm_args(g, q, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(g.device());

  const at::Tensor gc = g.contiguous();
  const int64_t batch = g.size(0);
  const int64_t per_sample = batch == 0 ? 0 : g.numel() / batch;
  at::Tensor out = at::empty({batch}, g.options());
  if (batch == 0) return out;

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "grad_norm_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    scalar_t* outp = out.mutable_data_ptr<scalar_t>();
    const LaunchPlan plan = plan_launch(batch, per_sample, sizeof(scalar_t), {gp});
    at::Tensor partial;
    acc_t* partial_p = nullptr;
    if (plan.chunks > 1) {
      partial = at::empty({batch, plan.chunks}, g.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      partial_p = partial.mutable_data_ptr<acc_t>();
    }
    const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(plan.chunks));
    if (plan.vec == 16 / static_cast<int>(sizeof(scalar_t))) {
      grad_norm_kernel<scalar_t, 16 / sizeof(scalar_t)>
          <<<grid, plan.threads, 0, stream>>>(gp, outp, partial_p, per_sample, plan.chunk_len, q);
    } else {
      grad_norm_kernel<scalar_t, 1><<<grid, plan.threads, 0, stream>>>(gp, outp, partial_p, per_sample, plan.chunk_len, q);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (plan.chunks > 1) launch_fold_partial_norms<scalar_t, acc_t>(partial_p, outp, batch, plan.chunks, q, stream);
  });
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(lfr_ext, CUDA, m) { m.impl("grad_norm", &cuda::grad_norm_cuda); }

}  // namespace lfr_ext
