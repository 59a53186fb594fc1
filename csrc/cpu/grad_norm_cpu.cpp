// CPU kernel of lfr_ext::grad_norm: out_i = ||g_i||_q, g (B, ...) -> (B,), parallel over samples.
//
// The accumulation (float for half/bfloat16/float, double for double; two-level cascade) is
// per_sample_norm.h's, the same as the g_norm output of ascent_step, so both ops report
// bitwise the same norms on the CPU.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../op_args.h"
#include "per_sample_norm.h"

namespace lfr_ext {
namespace {

at::Tensor grad_norm_cpu(const at::Tensor& g, int64_t q) {
  check_grad_norm_args(g, q, c10::DeviceType::CPU);

  const at::Tensor gc = g.contiguous();  // one copy for a non-contiguous input, then dense indexing
  const int64_t batch = g.size(0);
  const int64_t per_sample = batch == 0 ? 0 : g.numel() / batch;
  at::Tensor out = at::empty({batch}, g.options());
  if (batch == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "grad_norm_cpu", [&] {
    const scalar_t* src = gc.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        dst[b] = static_cast<scalar_t>(per_sample_norm_cpu(src + b * per_sample, per_sample, q));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lfr_ext, CPU, m) { m.impl("grad_norm", &grad_norm_cpu); }

}  // namespace lfr_ext
