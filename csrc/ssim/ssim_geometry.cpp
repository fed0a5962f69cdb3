// The geometry and argument checks both devices' SSIM kernels share (ssim.h). A file of its
// own, without the kernels, so that tests/cuda_emu can build the CUDA kernels for the CPU
// beside it.
#include "ssim/ssim.h"

#include <vector>

namespace epban {
namespace ssim {

Geometry make_geometry(const at::Tensor& x, const at::Tensor& y, bool same_padding) {
  TORCH_CHECK(x.dim() == 4, "ssim: x must be 4-D (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(x.sizes() == y.sizes(), "ssim: x and y must have the same shape, got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "ssim: x and y must have the same dtype");
  TORCH_CHECK(x.device() == y.device(), "ssim: x and y must be on the same device");
  Geometry g;
  g.batch = x.size(0);
  g.channels = x.size(1);
  g.height = x.size(2);
  g.width = x.size(3);
  TORCH_CHECK(g.height >= kWin && g.width >= kWin, "ssim: images must be at least ", kWin, "x", kWin,
              " (the SSIM window), got ", g.height, "x", g.width);
  g.offset = same_padding ? 0 : kHalo;
  g.out_h = g.height - 2 * g.offset;
  g.out_w = g.width - 2 * g.offset;
  return g;
}

bool check_grad_shape(const at::Tensor& grad, const Geometry& g) {
  if (grad.dim() == 1) {
    TORCH_CHECK(grad.size(0) == g.batch, "ssim_backward: per-image gradient must have shape (", g.batch, ",), got ",
                grad.sizes());
    return false;
  }
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == g.batch && grad.size(1) == g.channels && grad.size(2) == g.out_h &&
                  grad.size(3) == g.out_w,
              "ssim_backward: map gradient must have shape (", g.batch, ", ", g.channels, ", ", g.out_h, ", ", g.out_w,
              "), got ", grad.sizes());
  return true;
}

at::Tensor upstream_factors(const at::Tensor& grad, const at::Tensor& upstream) {
  TORCH_CHECK(grad.dim() >= 1, "ssim_scale_gradient_: grad must have a batch dimension, got ", grad.sizes());
  TORCH_CHECK(upstream.dim() == 0 || (upstream.dim() == 1 && upstream.size(0) == grad.size(0)),
              "ssim_scale_gradient_: upstream must be 0-dim or (", grad.size(0), ",), got ", upstream.sizes());
  TORCH_CHECK(upstream.device() == grad.device(), "ssim_scale_gradient_: upstream must be on grad's device");
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), "ssim_scale_gradient_: grad must be floating point");
  // Broadcast over an image without a copy: (B, 1, ..., 1), or the 0-dim factor itself.
  std::vector<int64_t> shape(grad.dim(), 1);
  if (upstream.dim() == 1) shape[0] = upstream.size(0);
  return upstream.dim() == 0 ? upstream : upstream.view(shape);
}

}  // namespace ssim
}  // namespace epban
