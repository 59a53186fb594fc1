// CPU kernel of lfr_ext::ascent_step: one pass over the inputs, parallel over samples.
//
// Rounding follows PyTorch's own CPU elementwise chain step for step (scalars are
// rounded to the storage type, each intermediate is computed in the op-math type and
// rounded to the storage type), so the result is bitwise equal to
// lfr_ext.reference.ascent_step_reference in every dtype. Norms accumulate in
// the accumulation type (float for half/bfloat16/float, double for double), in the cascade
// of per_sample_norm.h.

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "per_sample_norm.h"

#include <cmath>
#include <limits>
#include <tuple>

namespace lfr_ext {
namespace {

template <typename T>
inline T sign_of(T v) {
  // torch.sign: (0 < v) - (v < 0), so -1, 0 or 1, and 0 for NaN (measured: torch.sign(nan) == 0).
  using opmath_t = at::opmath_type<T>;
  const opmath_t o = static_cast<opmath_t>(v);
  return static_cast<T>((o > opmath_t(0)) - (o < opmath_t(0)));
}

template <typename opmath_t>
inline opmath_t nan_max(opmath_t a, opmath_t b) {
  // torch.maximum propagates NaN.
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<opmath_t>::quiet_NaN();
  return a > b ? a : b;
}

template <typename opmath_t>
inline opmath_t nan_min(opmath_t a, opmath_t b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<opmath_t>::quiet_NaN();
  return a < b ? a : b;
}

template <typename scalar_t>
void ascent_step_kernel(const scalar_t* x, const scalar_t* x_adv, const scalar_t* h, const scalar_t* g,
                        scalar_t* x_new, scalar_t* g_norm, scalar_t* sign_g, int64_t batch, int64_t numel_per_sample,
                        double eps, double step_size, double lo, double hi, int64_t q) {
  using opmath_t = at::opmath_type<scalar_t>;
  // PyTorch's CPU binary ops round a Python scalar to the tensor's dtype before computing in
  // op-math (measured: `bf16_tensor - 0.03` uses bf16(0.03)); do the same to stay bitwise equal.
  const opmath_t eps_o = static_cast<opmath_t>(static_cast<scalar_t>(eps));
  const opmath_t step_o = static_cast<opmath_t>(static_cast<scalar_t>(step_size));
  const opmath_t lo_o = static_cast<opmath_t>(static_cast<scalar_t>(lo));
  const opmath_t hi_o = static_cast<opmath_t>(static_cast<scalar_t>(hi));

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t base = b * numel_per_sample;
      for (int64_t i = base; i < base + numel_per_sample; ++i) {
        // x_adv + step_size * sign(h), each product/sum rounded as PyTorch does.
        const scalar_t step_term = static_cast<scalar_t>(step_o * static_cast<opmath_t>(sign_of(h[i])));
        const scalar_t moved = static_cast<scalar_t>(static_cast<opmath_t>(x_adv[i]) + static_cast<opmath_t>(step_term));
        // Projection onto the eps-ball around x: min(max(moved, x - eps), x + eps).
        const scalar_t lower = static_cast<scalar_t>(static_cast<opmath_t>(x[i]) - eps_o);
        const scalar_t upper = static_cast<scalar_t>(static_cast<opmath_t>(x[i]) + eps_o);
        const opmath_t projected = nan_min<opmath_t>(nan_max<opmath_t>(moved, lower), upper);
        // Box clip to [lo, hi] (torch.clamp propagates NaN).
        x_new[i] = static_cast<scalar_t>(nan_min<opmath_t>(nan_max<opmath_t>(projected, lo_o), hi_o));
      }
      // g is read once more only for this sample, while it is still in cache.
      g_norm[b] = static_cast<scalar_t>(per_sample_norm_cpu(g + base, numel_per_sample, q));
      if (sign_g != nullptr) {
        for (int64_t i = base; i < base + numel_per_sample; ++i) sign_g[i] = sign_of(g[i]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ascent_step_cpu(const at::Tensor& x, const at::Tensor& x_adv,
                                                               const at::Tensor& h, const at::Tensor& g, double eps,
                                                               double step_size, double lo, double hi, int64_t q,
                                                               bool return_sign_g) {
  TORCH_CHECK(x.dim() >= 1, "ascent_step: x must have a batch dimension, got a 0-dim tensor");
  TORCH_CHECK(x.sizes() == x_adv.sizes() && x.sizes() == h.sizes() && x.sizes() == g.sizes(),
              "ascent_step: x, x_adv, h and g must have one shape, got ", x.sizes(), ", ", x_adv.sizes(), ", ",
              h.sizes(), ", ", g.sizes());
  TORCH_CHECK(x.scalar_type() == x_adv.scalar_type() && x.scalar_type() == h.scalar_type() &&
                  x.scalar_type() == g.scalar_type(),
              "ascent_step: x, x_adv, h and g must have one dtype");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "ascent_step: inputs must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(q == 1 || q == 2 || q == -1, "ascent_step: q must be 1, 2 or -1 (inf), got ", q);
  for (const auto* t : {&x, &x_adv, &h, &g}) {
    TORCH_CHECK(t->device().is_cpu(), "ascent_step: the CPU kernel got a tensor on ", t->device());
  }

  // Kernels index densely; a non-contiguous input is copied once here.
  const at::Tensor xc = x.contiguous(), xac = x_adv.contiguous(), hc = h.contiguous(), gc = g.contiguous();
  const int64_t batch = x.size(0);
  const int64_t per_sample = batch == 0 ? 0 : x.numel() / batch;

  at::Tensor x_new = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor g_norm = at::empty({batch}, x.options());
  at::Tensor sign_g = return_sign_g ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                                    : at::empty({0}, x.options());
  if (batch == 0) return {x_new, g_norm, sign_g};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ascent_step_cpu", [&] {
    ascent_step_kernel<scalar_t>(xc.const_data_ptr<scalar_t>(), xac.const_data_ptr<scalar_t>(),
                                 hc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
                                 x_new.mutable_data_ptr<scalar_t>(), g_norm.mutable_data_ptr<scalar_t>(),
                                 return_sign_g ? sign_g.mutable_data_ptr<scalar_t>() : nullptr, batch, per_sample, eps,
                                 step_size, lo, hi, q);
  });
  return {x_new, g_norm, sign_g};
}

}  // namespace

TORCH_LIBRARY_IMPL(lfr_ext, CPU, m) { m.impl("ascent_step", &ascent_step_cpu); }

}  // namespace lfr_ext
