// The fused SSIM op (window 11, sigma 1.5): the C++ signatures behind the schemas in
// bindings.cpp, and the geometry both devices share.
//
// Window centres live on the image grid. padding "same" (zero padding): every pixel is a
// centre and the map is H x W. padding "valid": only centres whose window lies inside
// the image, rows and columns [5, H-5) x [5, W-5); the map is (H-10) x (W-10).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "ssim/ssim_math.h"

namespace epban {
namespace ssim {

struct Geometry {
  int64_t batch, channels, height, width;
  int64_t offset;            // first centre row / column (0 or kHalo)
  int64_t out_h, out_w;      // the map's size
  int64_t planes() const { return batch * channels; }
  int64_t count() const { return channels * out_h * out_w; }  // map pixels per image
};

Geometry make_geometry(const at::Tensor& x, const at::Tensor& y, bool same_padding);

// Checks the upstream gradient's shape: (B,) for the per-image op, the map's for the map op.
// Returns true for a map gradient.
bool check_grad_shape(const at::Tensor& grad, const Geometry& g);

// Checks ssim_scale_gradient_'s arguments; the upstream factors shaped to broadcast over grad.
at::Tensor upstream_factors(const at::Tensor& grad, const at::Tensor& upstream);

at::Tensor ssim_per_image_cpu(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding);
at::Tensor ssim_map_cpu(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding);
// The backward pass over every gradient pixel (ssim_cpu.cpp, ssim_cuda.cu). grad: the upstream
// gradient, (B,) or the map's; undefined means an upstream gradient of 1 per image, and the
// per-image SSIM, summed from the same moments, is returned first (else an undefined tensor).
// batch_mean (with grad undefined only): the value and gradients of the batch mean instead,
// a 0-dim value and an upstream gradient of 1 / B per image, from the same single pass.
// scale (with grad undefined only): the value and its gradients are those of scale x the SSIM,
// so that a loss w (1 - SSIM) = w + (-w SSIM) reaches the op with an upstream gradient of 1,
// whose in-place scaling ssim_scale_gradient_ skips (see ssim_autograd.cpp).
// An input whose grad_* is false gets an empty (0,) tensor.
using GradientPass = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const at::Tensor& grad, const at::Tensor& x,
                                                                         const at::Tensor& y, double c1, double c2,
                                                                         bool same_padding, bool grad_x, bool grad_y,
                                                                         bool batch_mean, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gradient_pass_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& y, double c1, double c2,
                                                                 bool same_padding, bool grad_x, bool grad_y,
                                                                 bool batch_mean, double scale);
// gradient_pass_cpu with an L1 term (ssim_l1_and_grad; grad undefined only unless l1 is 0): the
// value and gradients of scale x the SSIM + l1 x mean |x - y| (per image, or over the batch with
// batch_mean), in the same pass (the L1 gradient l1 sign(x - y) / pixels is added where the
// gradients are combined, sign(0) = 0), and second the L1 mean alone, for logging ((0,) when
// l1 is 0). Returns value, L1 mean, grad x, grad y. luminance = false: the contrast-structure
// term alone in place of the SSIM (ssim_math.h), for MS-SSIM.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradient_pass_l1_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding,
    bool grad_x, bool grad_y, bool batch_mean, double scale, double l1, bool luminance = true);
// The op ssim_l1_and_grad: gradient_pass_l1_cpu without an upstream gradient.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ssim_l1_and_grad_cpu(
    const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding, bool grad_x, bool grad_y,
    bool batch_mean, double scale, double l1) {
  return gradient_pass_l1_cpu(at::Tensor(), x, y, c1, c2, same_padding, grad_x, grad_y, batch_mean, scale, l1);
}
// mean |x - y| per image (B,), or over the whole batch (0-dim), in float32 (float64 for float64).
inline at::Tensor l1_mean(const at::Tensor& x, const at::Tensor& y, bool batch_mean) {
  const auto type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor d = x.to(type).sub(y.to(type)).abs_();
  return batch_mean ? d.mean() : d.flatten(1).mean(1);
}
// The value of ssim_l1_one_pass below autograd (no gradient wanted): scale x the SSIM + l1 x the
// L1 mean, and the L1 mean alone.
std::tuple<at::Tensor, at::Tensor> ssim_l1_value_cpu(const at::Tensor& x, const at::Tensor& y, double c1, double c2,
                                                     bool same_padding, bool batch_mean, double scale, double l1);
// grad *= upstream, in place: upstream is (B,) (one factor per image, any strides) or 0-dim.
// Nothing is written where a factor is exactly 1 (a multiply by 1 changes no bit): on CUDA
// each block reads its factor on the device and returns, so no host sync and a CUDA graph
// re-reads it on each replay; on the CPU the factors are read on the host.
void scale_gradient_cpu(at::Tensor& grad, const at::Tensor& upstream);

#ifdef WITH_CUDA
// The CUDA kernels (ssim_cuda*.cu; ssim_cuda.cuh describes them).
at::Tensor ssim_per_image_cuda(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding);
at::Tensor ssim_map_cuda(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gradient_pass_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                                  const at::Tensor& y, double c1, double c2,
                                                                  bool same_padding, bool grad_x, bool grad_y,
                                                                  bool batch_mean, double scale);
void scale_gradient_cuda(at::Tensor& grad, const at::Tensor& upstream);
// gradient_pass_cuda with an L1 term, as gradient_pass_l1_cpu (the tile and strip kernels add
// its gradient where they combine, and sum |x - y| per block).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradient_pass_l1_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding,
    bool grad_x, bool grad_y, bool batch_mean, double scale, double l1, bool luminance = true);
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ssim_l1_and_grad_cuda(
    const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding, bool grad_x, bool grad_y,
    bool batch_mean, double scale, double l1) {
  return gradient_pass_l1_cuda(at::Tensor(), x, y, c1, c2, same_padding, grad_x, grad_y, batch_mean, scale, l1);
}
// The value of ssim_l1_one_pass below autograd on CUDA, as ssim_l1_value_cpu.
std::tuple<at::Tensor, at::Tensor> ssim_l1_value_cuda(const at::Tensor& x, const at::Tensor& y, double c1, double c2,
                                                      bool same_padding, bool batch_mean, double scale, double l1);
// The CUDA backward kernel of every later gradient pass (epban/ops/ssim.py hands over the
// setting EPBAN_SSIM_CUDA_BACKWARD at each call on CUDA tensors): "auto" (the strip kernel for
// per-image upstream gradients on images of at least 512 x 512, the tiles below, 32 or 64 rows
// by tile_rows_for), "tile32" or "tile64" (those tiles for every gradient), "strip" (the strip
// kernel for every per-image gradient). Map gradients always take the tiles.
void set_cuda_backward(const std::string& kernel);
// For checks and tests: forces the strip kernel's plan of every later launch, centre columns a
// thread (1 or 2), threads a block and rows a band; 0 leaves each to the planner.
void force_strip_plan(int64_t columns, int64_t threads, int64_t rows);
#endif

// The ops ssim_backward and ssim_per_image_and_grad of one device, from its gradient pass.
template <GradientPass Pass>
std::tuple<at::Tensor, at::Tensor> ssim_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                                 double c1, double c2, bool same_padding, bool grad_x, bool grad_y) {
  TORCH_CHECK(grad.defined(), "ssim_backward: grad must be a tensor");
  auto [value, gx, gy] = Pass(grad, x, y, c1, c2, same_padding, grad_x, grad_y, /*batch_mean=*/false, /*scale=*/1.0);
  return {gx, gy};
}

template <GradientPass Pass>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ssim_per_image_and_grad(const at::Tensor& x, const at::Tensor& y,
                                                                       double c1, double c2, bool same_padding,
                                                                       bool grad_x, bool grad_y, bool batch_mean,
                                                                       double scale) {
  return Pass(at::Tensor(), x, y, c1, c2, same_padding, grad_x, grad_y, batch_mean, scale);
}

// The op ssim_level_and_grad of one device, from its gradient pass with an L1 term (l1 0): MS-SSIM's
// pass at one scale (valid padding), per image the mean SSIM (luminance) or the mean
// contrast-structure term, and its gradients for an upstream gradient of 1 per image.
// epban/ops/ms_ssim.py passes the (B*C, 1, H, W) view, so that each "image" is one channel plane.
using GradientPassL1 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding,
    bool grad_x, bool grad_y, bool batch_mean, double scale, double l1, bool luminance);
template <GradientPassL1 Pass>
std::tuple<at::Tensor, at::Tensor, at::Tensor> ssim_level_and_grad(const at::Tensor& x, const at::Tensor& y, double c1,
                                                                   double c2, bool luminance, bool grad_x,
                                                                   bool grad_y) {
  auto [value, l1_value, gx, gy] = Pass(at::Tensor(), x, y, c1, c2, /*same_padding=*/false, grad_x, grad_y,
                                        /*batch_mean=*/false, /*scale=*/1.0, /*l1=*/0.0, luminance);
  return {value, gx, gy};
}

// scale x the per-image SSIM of a device's forward F, or scale x their batch mean: the value of
// the one-pass ops when no gradient is wanted (below autograd, or no input requires grad).
using PerImage = at::Tensor (*)(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding);
template <PerImage F>
at::Tensor scaled_value(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding,
                        bool batch_mean, double scale) {
  at::Tensor value = F(x, y, c1, c2, same_padding);
  if (batch_mean) value = value.mean();
  return scale == 1.0 ? value : value.mul_(scale);
}

// The one-pass ops below autograd: ssim_per_image_one_pass, ssim_mean_one_pass (kBatchMean).
template <PerImage F, bool kBatchMean>
at::Tensor ssim_one_pass_value(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding,
                               double scale) {
  return scaled_value<F>(x, y, c1, c2, same_padding, kBatchMean, scale);
}

}  // namespace ssim
}  // namespace epban
