// The arguments of the lfr_ext ops as the host wrappers see them: the norm order codes, and
// the checks that the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels of an op both run first, so
// that both backends refuse the same calls with the same messages.
//
// Schemas: csrc/lfr_ext.cpp. The Triton launchers (kernels/) check the same conditions in Python.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>

namespace lfr_ext {

// Norm order codes of the ops' `int q` argument: 1, 2, or kQInf for inf; Q_CODES, Q_INF and q_code in
// lfr_ext/_op_specs.py declare the same codes for Python (the entry points and the Triton kernels).
constexpr int64_t kQInf = -1;

inline void check_q(const char* op, int64_t q) {
  TORCH_CHECK(q == 1 || q == 2 || q == kQInf, op, ": q must be 1, 2 or ", kQInf, " (inf), got ", q);
}

// Every tensor on one device, of the type the kernel runs on. The dispatcher picks the kernel
// from the union of the arguments' devices, so a mixed call reaches the kernel of the "highest"
// device type and is refused here.
inline void check_devices(const char* op, c10::DeviceType kernel, std::initializer_list<const at::Tensor*> tensors) {
  const at::Device device = (*tensors.begin())->device();
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->device().type() == kernel, op, ": the ", c10::DeviceTypeName(kernel), " kernel got a tensor on ",
                t->device());
    TORCH_CHECK(t->device() == device, op, ": all tensors must be on ", device, ", got ", t->device());
  }
}

// grad_norm(g (B, ...), q) -> (B,).
inline void check_grad_norm_args(const at::Tensor& g, int64_t q, c10::DeviceType kernel) {
  TORCH_CHECK(g.dim() >= 1, "grad_norm: g must have a batch dimension, got a 0-dim tensor");
  TORCH_CHECK(at::isFloatingType(g.scalar_type()), "grad_norm: g must be floating point, got ", g.scalar_type());
  check_q("grad_norm", q);
  check_devices("grad_norm", kernel, {&g});
}

// ascent_step(x, x_adv, h, g, ...): four (B, ...) tensors of one shape and one floating dtype.
inline void check_ascent_step_args(const at::Tensor& x, const at::Tensor& x_adv, const at::Tensor& h,
                                   const at::Tensor& g, int64_t q, c10::DeviceType kernel) {
  TORCH_CHECK(x.dim() >= 1, "ascent_step: x must have a batch dimension, got a 0-dim tensor");
  TORCH_CHECK(x.sizes() == x_adv.sizes() && x.sizes() == h.sizes() && x.sizes() == g.sizes(),
              "ascent_step: x, x_adv, h and g must have one shape, got ", x.sizes(), ", ", x_adv.sizes(), ", ",
              h.sizes(), ", ", g.sizes());
  TORCH_CHECK(x.scalar_type() == x_adv.scalar_type() && x.scalar_type() == h.scalar_type() &&
                  x.scalar_type() == g.scalar_type(),
              "ascent_step: x, x_adv, h and g must have one dtype");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "ascent_step: inputs must be floating point, got ",
              x.scalar_type());
  check_q("ascent_step", q);
  check_devices("ascent_step", kernel, {&x, &x_adv, &h, &g});
}

}  // namespace lfr_ext
