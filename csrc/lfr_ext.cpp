// Operator schemas of the lfr_ext namespace.
//
// The schemas live here, once; each backend registers its kernels with
// TORCH_LIBRARY_IMPL in its own translation unit (cpu/*.cpp, cuda/*.cu), so the
// dispatcher picks the kernel from the tensors' device with no Python `if`.
// Fake (meta) kernels and autograd formulas are registered from Python
// (lfr_ext/ops.py), as pytorch/extension-cpp does.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import lfr_ext._C` is never used: the library is loaded with
// torch.ops.load_library, which only needs the static initialisers below. The
// module init exists so the file is also a valid Python extension module.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lfr_ext, m) {
  // One projected sign-ascent step of the LFR inner maximisation, fused:
  //   x_new   = clip_[lo, hi]( proj_{|x_new - x|_inf <= eps}( x_adv + step_size * sign(h) ) )
  //   g_norm  = ||g_i||_q per sample (q = 1, 2, or -1 for inf)
  //   sign_g  = sign(g) if return_sign_g else an empty tensor
  // x, x_adv, h, g: (B, ...) of one shape and dtype. g_norm: (B,) in g's dtype.
  m.def(
      "ascent_step(Tensor x, Tensor x_adv, Tensor h, Tensor g, float eps, float step_size, "
      "float lo, float hi, int q, bool return_sign_g) -> (Tensor, Tensor, Tensor)");
  // Per-sample norm: out_i = ||g_i||_q, g: (B, ...) -> out: (B,) in g's dtype, accumulated in
  // float (double for double). q = 1, 2, or -1 for inf. Autograd is registered from Python.
  m.def("grad_norm(Tensor g, int q) -> Tensor");
}
