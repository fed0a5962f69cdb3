// epban's CUDA SSIM kernels (csrc/ssim/ssim_cuda*.cu, the files themselves) built for the CPU
// with cuda_emu.h, registered as torch.ops.epban_cuda_emu.* on CPU tensors. tests/test_ssim_cuda_emu.py
// builds this with torch.utils.cpp_extension.load and checks it against the reference. One
// translation unit: g++ takes no .cu file, so each is included here.
#include <torch/library.h>

#include "ssim/ssim_cuda.cu"
#include "ssim/ssim_cuda_forward.cu"
#include "ssim/ssim_cuda_strip_backward.cu"
#include "ssim/ssim_cuda_tile_backward.cu"

namespace {

void set_schedule(int64_t order, int64_t seed) {
  TORCH_CHECK(order >= 0 && order <= 2, "set_schedule: order must be 0 (lane order), 1 (reverse) or 2 (shuffle)");
  epban_emu::settings().schedule = static_cast<epban_emu::Schedule>(order);
  epban_emu::settings().seed = static_cast<uint64_t>(seed);
}

// grad None: the one-pass mode (upstream gradient 1 per image; the per-image SSIM comes first;
// with batch_mean, their batch mean and its gradients; both times scale).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gradient_pass(const std::optional<at::Tensor>& grad, const at::Tensor& x,
                                                             const at::Tensor& y, double c1, double c2,
                                                             bool same_padding, bool grad_x, bool grad_y,
                                                             bool batch_mean, double scale) {
  return epban::ssim::gradient_pass_cuda(grad.value_or(at::Tensor()), x, y, c1, c2, same_padding, grad_x, grad_y,
                                         batch_mean, scale);
}

// gradient_pass with an L1 term (one-pass mode only): value, L1 mean, grad x, grad y.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradient_pass_l1(const at::Tensor& x, const at::Tensor& y,
                                                                            double c1, double c2, bool same_padding,
                                                                            bool grad_x, bool grad_y, bool batch_mean,
                                                                            double scale, double l1) {
  return epban::ssim::gradient_pass_l1_cuda(at::Tensor(), x, y, c1, c2, same_padding, grad_x, grad_y, batch_mean,
                                            scale, l1);
}

int64_t launches() { return epban_emu::settings().launches; }

// The block sizes (threads) of the launches since the last call, in order, and a reset.
std::vector<int64_t> take_block_sizes() { return std::exchange(epban_emu::settings().block_sizes, {}); }

// The strip kernel's plan (csrc/ssim/ssim_cuda_strip_backward.cu plan_strips) for a geometry and a count of
// SMs: columns a thread, threads, rows a band, strips, bands.
std::vector<int64_t> strip_plan(int64_t planes, int64_t height, int64_t width, int64_t sms) {
  const auto p = epban::ssim::plan_strips(planes, height, width, static_cast<int>(sms));
  return {p.columns, p.threads, p.rows, p.strips, p.bands};
}

}  // namespace

TORCH_LIBRARY(epban_cuda_emu, m) {
  m.def("ssim_per_image", &epban::ssim::ssim_per_image_cuda);
  m.def("ssim_map", &epban::ssim::ssim_map_cuda);
  m.def("gradient_pass(Tensor? grad, Tensor x, Tensor y, float c1, float c2, bool same_padding, bool grad_x, "
        "bool grad_y, bool batch_mean=False, float scale=1.0) -> (Tensor, Tensor, Tensor)",
        &gradient_pass);
  m.def("gradient_pass_l1(Tensor x, Tensor y, float c1, float c2, bool same_padding, bool grad_x, bool grad_y, "
        "bool batch_mean, float scale, float l1) -> (Tensor, Tensor, Tensor, Tensor)",
        &gradient_pass_l1);
  m.def("level_and_grad(Tensor x, Tensor y, float c1, float c2, bool luminance, bool grad_x, bool grad_y) -> "
        "(Tensor, Tensor, Tensor)",
        &epban::ssim::ssim_level_and_grad<epban::ssim::gradient_pass_l1_cuda>);
  m.def("scale_gradient_(Tensor(a!) grad, Tensor upstream) -> ()", &epban::ssim::scale_gradient_cuda);
  m.def("set_schedule", &set_schedule);
  m.def("launches", &launches);
  m.def("take_block_sizes", &take_block_sizes);
  m.def("strip_plan", &strip_plan);
  m.def("set_cuda_backward(str kernel) -> ()", &epban::ssim::set_cuda_backward);
  m.def("force_strip_plan(int columns, int threads, int rows) -> ()", &epban::ssim::force_strip_plan);
}
