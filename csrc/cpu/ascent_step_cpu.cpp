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

#include "../op_args.h"
#include "per_sample_norm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

namespace lfr_ext {
namespace {

// Storage <-> op-math conversions, written so that GCC vectorises the element loop (SSE2 is
// enough; no -march flags). bf16 goes through its raw bits, exactly as c10::BFloat16 converts
// (widening is a 16-bit shift; narrowing rounds to nearest even, NaN -> 0x7FC0); the other
// types use their C++ conversions.
template <typename scalar_t>
struct Codec {
  using opmath_t = at::opmath_type<scalar_t>;
  static opmath_t widen(scalar_t v) { return static_cast<opmath_t>(v); }
  static scalar_t narrow(opmath_t v) { return static_cast<scalar_t>(v); }
};

template <>
struct Codec<c10::BFloat16> {
  using opmath_t = float;
  static float widen(c10::BFloat16 v) {
    const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  static c10::BFloat16 narrow(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    return c10::BFloat16(f != f ? uint16_t(0x7FC0) : rounded, c10::BFloat16::from_bits());
  }
};

// Round an op-math value to the storage type and back: what storing an intermediate tensor does.
template <typename scalar_t>
inline at::opmath_type<scalar_t> through_storage(at::opmath_type<scalar_t> v) {
  return Codec<scalar_t>::widen(Codec<scalar_t>::narrow(v));
}

// torch.sign: (0 < v) - (v < 0), so -1, 0 or 1, and 0 for NaN (measured: torch.sign(nan) == 0).
template <typename opmath_t>
inline opmath_t sign_of(opmath_t v) {
  return static_cast<opmath_t>((v > opmath_t(0)) - (v < opmath_t(0)));
}

// torch.maximum / torch.minimum propagate NaN. Written as a chain of selects between values
// that are already computed: that is the form GCC if-converts and vectorises (a conditional
// `a + b` arm or `||` leaves control flow in the loop, measured with -fopt-info-vec).
template <typename opmath_t>
inline opmath_t nan_max(opmath_t a, opmath_t b) {
  opmath_t r = a > b ? a : b;
  r = (a != a) ? a : r;
  return (b != b) ? b : r;
}

template <typename opmath_t>
inline opmath_t nan_min(opmath_t a, opmath_t b) {
  opmath_t r = a < b ? a : b;
  r = (a != a) ? a : r;
  return (b != b) ? b : r;
}

// x_new[i] for i in [0, n): the chain x_adv + step * sign(h), max(., x - eps), min(., x + eps),
// clamp(., lo, hi), with every intermediate tensor's rounding reproduced.
template <typename scalar_t>
inline void update_range(const scalar_t* __restrict__ x, const scalar_t* __restrict__ x_adv,
                  const scalar_t* __restrict__ h, scalar_t* __restrict__ x_new, int64_t n,
                  at::opmath_type<scalar_t> eps, at::opmath_type<scalar_t> step, at::opmath_type<scalar_t> lo,
                  at::opmath_type<scalar_t> hi) {
  using C = Codec<scalar_t>;
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    const opmath_t xi = C::widen(x[i]);
    const opmath_t step_term = through_storage<scalar_t>(step * sign_of(C::widen(h[i])));
    const opmath_t moved = through_storage<scalar_t>(C::widen(x_adv[i]) + step_term);
    const opmath_t lower = through_storage<scalar_t>(xi - eps);
    const opmath_t upper = through_storage<scalar_t>(xi + eps);
    const opmath_t projected = nan_min(nan_max(moved, lower), upper);
    // torch.clamp keeps NaN and is min(max(v, lo), hi) otherwise.
    const opmath_t bounded = std::min(std::max(projected, lo), hi);
    const opmath_t clipped = projected != projected ? projected : bounded;
    x_new[i] = C::narrow(clipped);
  }
}

// The element loop is the CPU kernel's hot spot: also compiled for AVX-512 and AVX2
// (LFR_EXT_SIMD_CLONES, per_sample_norm.h) for fp32 and bf16.
LFR_EXT_SIMD_CLONES void update_range_f32(const float* x, const float* x_adv, const float* h, float* x_new, int64_t n,
                                          float eps, float step, float lo, float hi) {
  update_range<float>(x, x_adv, h, x_new, n, eps, step, lo, hi);
}

LFR_EXT_SIMD_CLONES void update_range_bf16(const c10::BFloat16* x, const c10::BFloat16* x_adv, const c10::BFloat16* h,
                                           c10::BFloat16* x_new, int64_t n, float eps, float step, float lo,
                                           float hi) {
  update_range<c10::BFloat16>(x, x_adv, h, x_new, n, eps, step, lo, hi);
}

template <typename scalar_t>
void update_sample(const scalar_t* x, const scalar_t* x_adv, const scalar_t* h, scalar_t* x_new, int64_t n,
                   at::opmath_type<scalar_t> eps, at::opmath_type<scalar_t> step, at::opmath_type<scalar_t> lo,
                   at::opmath_type<scalar_t> hi) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    update_range_f32(x, x_adv, h, x_new, n, eps, step, lo, hi);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    update_range_bf16(x, x_adv, h, x_new, n, eps, step, lo, hi);
  } else {
    update_range<scalar_t>(x, x_adv, h, x_new, n, eps, step, lo, hi);
  }
}

template <typename scalar_t>
void sign_range(const scalar_t* __restrict__ g, scalar_t* __restrict__ out, int64_t n) {
  using C = Codec<scalar_t>;
  for (int64_t i = 0; i < n; ++i) out[i] = C::narrow(sign_of(C::widen(g[i])));
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
      update_sample(x + base, x_adv + base, h + base, x_new + base, numel_per_sample, eps_o, step_o, lo_o, hi_o);
      // g is read once more only for this sample, while it is still in cache.
      g_norm[b] = static_cast<scalar_t>(per_sample_norm_cpu(g + base, numel_per_sample, q));
      if (sign_g != nullptr) sign_range(g + base, sign_g + base, numel_per_sample);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ascent_step_cpu(const at::Tensor& x, const at::Tensor& x_adv,
                                                               const at::Tensor& h, const at::Tensor& g, double eps,
                                                               double step_size, double lo, double hi, int64_t q,
                                                               bool return_sign_g) {
  check_ascent_step_args(x, x_adv, h, g, q, c10::DeviceType::CPU);

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
