// The operator table of epban._C: every TORCH_LIBRARY schema, the kernels registered for
// each dispatch key, and the Python module. Autograd kernels live beside each op
// (csrc/ssim/ssim_autograd.cpp); fake (meta) kernels are registered from Python, beside
// each op's reference (epban/ops/*.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "ssim/ssim.h"

TORCH_LIBRARY(epban, m) {
  // SSIM, window 11, sigma 1.5; c1 = (k1 R)^2, c2 = (k2 R)^2. Outputs are float32 for
  // float32/half inputs, float64 for float64.
  // The mean SSIM of each image, shape (B,).
  m.def("ssim_per_image(Tensor x, Tensor y, float c1, float c2, bool same_padding) -> Tensor");
  // The SSIM map, (B, C, H, W) for same padding, (B, C, H - 10, W - 10) for valid.
  m.def("ssim_map(Tensor x, Tensor y, float c1, float c2, bool same_padding) -> Tensor");
  // Gradients of both inputs from the gradient of either output above (shape (B,) or the
  // map's). An input whose grad_* is false gets an empty (0,) tensor instead.
  m.def(
      "ssim_backward(Tensor grad, Tensor x, Tensor y, float c1, float c2, bool same_padding, bool grad_x, "
      "bool grad_y) -> (Tensor, Tensor)");
  // One pass for training with reduction mean/none: the per-image SSIM and, from the same
  // moments, its gradients for an upstream gradient of 1 per image (d value[b] / d x[b]);
  // with batch_mean, the batch mean (0-dim) and its gradients (upstream 1 / B per image).
  // scale: the value and gradients of scale x the SSIM (a loss's weight, folded in).
  // An input whose grad_* is false gets an empty (0,) tensor.
  m.def(
      "ssim_per_image_and_grad(Tensor x, Tensor y, float c1, float c2, bool same_padding, bool grad_x, "
      "bool grad_y, bool batch_mean=False, float scale=1.0) -> (Tensor, Tensor, Tensor)");
  // scale x ssim_per_image, whose autograd computes the gradients in the forward, with
  // ssim_per_image_and_grad, and only scales them by the upstream gradient in the backward.
  m.def(
      "ssim_per_image_one_pass(Tensor x, Tensor y, float c1, float c2, bool same_padding, float scale=1.0) -> "
      "Tensor");
  // scale x the batch mean of ssim_per_image (a 0-dim tensor; reduction "mean"), one pass as
  // above with batch_mean: one autograd node instead of two, no mean or division launched.
  m.def("ssim_mean_one_pass(Tensor x, Tensor y, float c1, float c2, bool same_padding, float scale=1.0) -> Tensor");
  // The one-pass ops with an L1 term: the value and gradients of scale x the SSIM +
  // l1 x mean |x - y| (per image, or over the whole batch with batch_mean) from one pass, and
  // second the L1 mean alone (no gradient), for logging. The L1 gradient at x == y is 0.
  m.def(
      "ssim_l1_and_grad(Tensor x, Tensor y, float c1, float c2, bool same_padding, bool grad_x, bool grad_y, "
      "bool batch_mean, float scale, float l1) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ssim_l1_one_pass(Tensor x, Tensor y, float c1, float c2, bool same_padding, bool batch_mean, float scale, "
      "float l1) -> (Tensor, Tensor)");
  // MS-SSIM's pass at one scale (valid padding): the mean SSIM of each image (luminance) or the
  // mean contrast-structure term alone, shape (B,), and with grad_x / grad_y its gradients for an
  // upstream gradient of 1 per image, from one pass ((0,) tensors for gradients not wanted).
  m.def(
      "ssim_level_and_grad(Tensor x, Tensor y, float c1, float c2, bool luminance, bool grad_x, bool grad_y) -> "
      "(Tensor, Tensor, Tensor)");
  // The one-pass backward: grad *= upstream in place, upstream (B,) or 0-dim; images whose
  // factor is exactly 1 are not touched (on CUDA the factor is tested on the device).
  m.def("ssim_scale_gradient_(Tensor(a!) grad, Tensor upstream) -> ()");
}

TORCH_LIBRARY_IMPL(epban, CPU, m) {
  m.impl("ssim_per_image", &epban::ssim::ssim_per_image_cpu);
  m.impl("ssim_map", &epban::ssim::ssim_map_cpu);
  m.impl("ssim_backward", &epban::ssim::ssim_backward<epban::ssim::gradient_pass_cpu>);
  m.impl("ssim_per_image_and_grad", &epban::ssim::ssim_per_image_and_grad<epban::ssim::gradient_pass_cpu>);
  m.impl("ssim_per_image_one_pass", &epban::ssim::ssim_one_pass_value<epban::ssim::ssim_per_image_cpu, false>);
  m.impl("ssim_mean_one_pass", &epban::ssim::ssim_one_pass_value<epban::ssim::ssim_per_image_cpu, true>);
  m.impl("ssim_scale_gradient_", &epban::ssim::scale_gradient_cpu);
  m.impl("ssim_l1_and_grad", &epban::ssim::ssim_l1_and_grad_cpu);
  m.impl("ssim_l1_one_pass", &epban::ssim::ssim_l1_value_cpu);
  m.impl("ssim_level_and_grad", &epban::ssim::ssim_level_and_grad<epban::ssim::gradient_pass_l1_cpu>);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(epban, CUDA, m) {
  m.impl("ssim_per_image", &epban::ssim::ssim_per_image_cuda);
  m.impl("ssim_map", &epban::ssim::ssim_map_cuda);
  m.impl("ssim_backward", &epban::ssim::ssim_backward<epban::ssim::gradient_pass_cuda>);
  m.impl("ssim_per_image_and_grad", &epban::ssim::ssim_per_image_and_grad<epban::ssim::gradient_pass_cuda>);
  m.impl("ssim_per_image_one_pass", &epban::ssim::ssim_one_pass_value<epban::ssim::ssim_per_image_cuda, false>);
  m.impl("ssim_mean_one_pass", &epban::ssim::ssim_one_pass_value<epban::ssim::ssim_per_image_cuda, true>);
  m.impl("ssim_scale_gradient_", &epban::ssim::scale_gradient_cuda);
  m.impl("ssim_l1_and_grad", &epban::ssim::ssim_l1_and_grad_cuda);
  m.impl("ssim_l1_one_pass", &epban::ssim::ssim_l1_value_cuda);
  m.impl("ssim_level_and_grad", &epban::ssim::ssim_level_and_grad<epban::ssim::gradient_pass_l1_cuda>);
}
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "epban's compiled kernels; the operators live in torch.ops.epban";
  m.attr("WITH_CUDA") = kWithCuda;
#ifdef WITH_CUDA
  m.def("ssim_set_cuda_backward", &epban::ssim::set_cuda_backward,
        "The SSIM CUDA backward kernel of later calls: auto, tile32, tile64 or strip (EPBAN_SSIM_CUDA_BACKWARD, "
        "handed over by epban.ops.ssim)");
  m.def("ssim_force_strip_plan", &epban::ssim::force_strip_plan,
        "For checks and tests: the SSIM strip backward's plan (centre columns a thread, threads, rows a band; 0: the "
        "planner's)");
#endif
}
