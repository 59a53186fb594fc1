// CUDA kernel of lfr_ext::ascent_step: the projected sign-ascent update and the per-sample
// norm of g in one pass over memory (each input read once, each output written once).
//
//   x_new  = clamp(min(max(x_adv + step_size * sign(h), x - eps), x + eps), lo, hi)
//   g_norm = ||g_b||_q per sample, accumulated in float (double for double)
//   sign_g = sign(g)            (only when return_sign_g)
//
// Rounding mirrors PyTorch's CUDA chain (lfr_ext.reference.ascent_step_reference on CUDA):
// every intermediate is computed in op-math (float for half/bfloat16) and rounded to the
// storage type, Python scalars stay in op-math (CUDA's binary ops take them as opmath_t,
// unlike the CPU ops that round them to the storage type first), and clamp's bounds are
// converted to the storage type (clamp_scalar_kernel_impl does `min.to<scalar_t>()`).
// torch.sign is (0 < v) - (v < 0), hence 0 for NaN; max/min/clamp propagate NaN.
//
// Launch: grid (B, C), see per_sample_norm.cuh; on the current stream, no host sync, int64
// offsets, 16-byte vector loads when every buffer is aligned and samples are a multiple of
// the vector width.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../op_args.h"
#include "per_sample_norm.cuh"

namespace lfr_ext {
namespace cuda {
namespace {

template <typename opmath_t>
__device__ __forceinline__ opmath_t sign_op(opmath_t v) {
  return static_cast<opmath_t>((opmath_t(0) < v) - (v < opmath_t(0)));
}

template <typename opmath_t>
__device__ __forceinline__ opmath_t nan_max(opmath_t a, opmath_t b) {
  return (a != a || b != b) ? (a + b) : (a > b ? a : b);  // a + b is NaN when either is
}

template <typename opmath_t>
__device__ __forceinline__ opmath_t nan_min(opmath_t a, opmath_t b) {
  return (a != a || b != b) ? (a + b) : (a < b ? a : b);
}

template <typename scalar_t>
struct StepParams {
  using opmath_t = at::opmath_type<scalar_t>;
  opmath_t eps, step_size;  // kept in op-math, as CUDA's tensor-scalar ops do
  scalar_t lo, hi;          // rounded to the storage type, as CUDA's clamp does
};

template <typename scalar_t>
__device__ __forceinline__ scalar_t update_one(scalar_t x, scalar_t x_adv, scalar_t h, const StepParams<scalar_t>& p) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t step_term = static_cast<scalar_t>(p.step_size * sign_op(static_cast<opmath_t>(h)));
  const scalar_t moved = static_cast<scalar_t>(static_cast<opmath_t>(x_adv) + static_cast<opmath_t>(step_term));
  const scalar_t lower = static_cast<scalar_t>(static_cast<opmath_t>(x) - p.eps);
  const scalar_t upper = static_cast<scalar_t>(static_cast<opmath_t>(x) + p.eps);
  const opmath_t projected = nan_min<opmath_t>(nan_max<opmath_t>(moved, lower), upper);
  const scalar_t projected_s = static_cast<scalar_t>(projected);  // torch.min's output tensor
  const opmath_t clipped =
      nan_min<opmath_t>(nan_max<opmath_t>(projected_s, static_cast<opmath_t>(p.lo)), static_cast<opmath_t>(p.hi));
  return static_cast<scalar_t>(clipped);
}

template <typename scalar_t, int VEC, bool kSignG>
__global__ void __launch_bounds__(kMaxThreads)
    ascent_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ x_adv,
                       const scalar_t* __restrict__ h, const scalar_t* __restrict__ g, scalar_t* __restrict__ x_new,
                       scalar_t* __restrict__ sign_g, scalar_t* __restrict__ g_norm,
                       at::acc_type<scalar_t, true>* __restrict__ partial, int64_t per_sample, int64_t chunk_len,
                       StepParams<scalar_t> params, int64_t q) {
  using acc_t = at::acc_type<scalar_t, true>;
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t sample = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t chunk_begin = chunk * chunk_len;
  const int64_t chunk_end = chunk_begin + chunk_len < per_sample ? chunk_begin + chunk_len : per_sample;
  const int64_t base = sample * per_sample;  // int64: B * per_sample may exceed 2^31

  acc_t acc = acc_t(0);
  for (int64_t i = base + chunk_begin + int64_t(threadIdx.x) * VEC; i < base + chunk_end;
       i += int64_t(blockDim.x) * VEC) {
    const Vec<scalar_t, VEC> xv = load_vec<scalar_t, VEC>(x, i);
    const Vec<scalar_t, VEC> av = load_vec<scalar_t, VEC>(x_adv, i);
    const Vec<scalar_t, VEC> hv = load_vec<scalar_t, VEC>(h, i);
    const Vec<scalar_t, VEC> gv = load_vec<scalar_t, VEC>(g, i);
    Vec<scalar_t, VEC> out, sg;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      out.v[k] = update_one(xv.v[k], av.v[k], hv.v[k], params);
      const acc_t gk = static_cast<acc_t>(gv.v[k]);
      acc = combine_norm(acc, norm_term(gk, q), q);
      if (kSignG) sg.v[k] = static_cast<scalar_t>(sign_op(static_cast<opmath_t>(gv.v[k])));
    }
    store_vec<scalar_t, VEC>(x_new, i, out);
    if (kSignG) store_vec<scalar_t, VEC>(sign_g, i, sg);
  }

  acc = block_reduce_norm(acc, q);
  if (threadIdx.x == 0) {
    if (partial == nullptr) {
      g_norm[sample] = static_cast<scalar_t>(finish_norm(acc, q));
    } else {
      partial[sample * gridDim.y + chunk] = acc;
    }
  }
}

template <typename scalar_t, int VEC>
void launch_ascent_step(const LaunchPlan& plan, int64_t batch, int64_t per_sample, const scalar_t* x,
                        const scalar_t* x_adv, const scalar_t* h, const scalar_t* g, scalar_t* x_new, scalar_t* sign_g,
                        scalar_t* g_norm, at::acc_type<scalar_t, true>* partial, const StepParams<scalar_t>& params,
                        int64_t q, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(plan.chunks));
  if (sign_g != nullptr) {
    ascent_step_kernel<scalar_t, VEC, true><<<grid, plan.threads, 0, stream>>>(
        x, x_adv, h, g, x_new, sign_g, g_norm, partial, per_sample, plan.chunk_len, params, q);
  } else {
    ascent_step_kernel<scalar_t, VEC, false><<<grid, plan.threads, 0, stream>>>(
        x, x_adv, h, g, x_new, sign_g, g_norm, partial, per_sample, plan.chunk_len, params, q);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ascent_step_cuda(const at::Tensor& x, const at::Tensor& x_adv,
                                                                const at::Tensor& h, const at::Tensor& g, double eps,
                                                                double step_size, double lo, double hi, int64_t q,
                                                                bool return_sign_g) {
  check_ascent_step_args(x, x_adv, h, g, q, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(x.device());

  const at::Tensor xc = x.contiguous(), xac = x_adv.contiguous(), hc = h.contiguous(), gc = g.contiguous();
  const int64_t batch = x.size(0);
  const int64_t per_sample = batch == 0 ? 0 : x.numel() / batch;
  const auto dense = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor x_new = at::empty(x.sizes(), dense);
  at::Tensor g_norm = at::empty({batch}, x.options());
  at::Tensor sign_g = return_sign_g ? at::empty(x.sizes(), dense) : at::empty({0}, x.options());
  if (batch == 0) return {x_new, g_norm, sign_g};

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ascent_step_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    using opmath_t = at::opmath_type<scalar_t>;
    const StepParams<scalar_t> params{static_cast<opmath_t>(eps), static_cast<opmath_t>(step_size),
                                      static_cast<scalar_t>(lo), static_cast<scalar_t>(hi)};
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* ap = xac.const_data_ptr<scalar_t>();
    const scalar_t* hp = hc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    scalar_t* outp = x_new.mutable_data_ptr<scalar_t>();
    scalar_t* sgp = return_sign_g ? sign_g.mutable_data_ptr<scalar_t>() : nullptr;
    const LaunchPlan plan = plan_launch(batch, per_sample, sizeof(scalar_t), {xp, ap, hp, gp, outp, sgp});
    at::Tensor partial;
    acc_t* partial_p = nullptr;
    if (plan.chunks > 1) {
      partial = at::empty({batch, plan.chunks}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      partial_p = partial.mutable_data_ptr<acc_t>();
    }
    scalar_t* normp = g_norm.mutable_data_ptr<scalar_t>();
    if (plan.vec == 16 / static_cast<int>(sizeof(scalar_t))) {
      launch_ascent_step<scalar_t, 16 / sizeof(scalar_t)>(plan, batch, per_sample, xp, ap, hp, gp, outp, sgp, normp,
                                                          partial_p, params, q, stream);
    } else {
      launch_ascent_step<scalar_t, 1>(plan, batch, per_sample, xp, ap, hp, gp, outp, sgp, normp, partial_p, params, q,
                                      stream);
    }
    if (plan.chunks > 1) launch_fold_partial_norms<scalar_t, acc_t>(partial_p, normp, batch, plan.chunks, q, stream);
  });
  return {x_new, g_norm, sign_g};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(lfr_ext, CUDA, m) { m.impl("ascent_step", &cuda::ascent_step_cuda); }

}  // namespace lfr_ext
