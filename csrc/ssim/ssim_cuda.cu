// The host side of the CUDA SSIM op (ssim_cuda.cuh): input checks and launch arguments, the
// choice of backward kernel, the gradient pass (ssim_backward and the one-pass
// ssim_per_image_and_grad) and the one-pass backward's in-place scaling (ssim_scale_gradient_).
#include "ssim/ssim_cuda.cuh"

#include <algorithm>
#include <atomic>
#include <string>

namespace epban {
namespace ssim {
namespace {

// The one-pass backward (ssim_scale_gradient_): grad[image] *= upstream[image * stride],
// in place, blocks_per_image blocks an image, each a grid-stride loop over its image's
// elements (float4 when kVec4: the image's element count is a multiple of 4 and the
// buffer is aligned). Each block reads its factor first and returns when it is exactly 1.
// Why: a loss's .backward() hands this op an upstream of 1 (epban.ssim_loss folds the loss
// weight into the pass), and then the in-place multiply, a full read and write of the
// gradient (8 B a pixel, a noticeable share of a fwd+bwd), is a launch of blocks that read
// one float. The test runs on the device: no host sync, and a CUDA graph re-reads the factor
// on every replay.
template <bool kVec4>
__global__ void __launch_bounds__(kThreads)
    ssim_scale_gradient_kernel(float* __restrict__ grad, const float* __restrict__ upstream,
                               int64_t upstream_stride, int64_t per_image, int64_t blocks_per_image) {
  const int64_t image = blockIdx.x / blocks_per_image;
  const float factor = upstream[image * upstream_stride];
  if (factor == 1.f) return;  // uniform over the block
  const int64_t first = (blockIdx.x % blocks_per_image) * kThreads + threadIdx.x;
  const int64_t step = blocks_per_image * kThreads;
  if constexpr (kVec4) {
    float4* g = reinterpret_cast<float4*>(grad + image * per_image);
    for (int64_t i = first; i < per_image / 4; i += step) {
      float4 v = g[i];
      v.x *= factor;
      v.y *= factor;
      v.z *= factor;
      v.w *= factor;
      g[i] = v;
    }
  } else {
    float* g = grad + image * per_image;
    for (int64_t i = first; i < per_image; i += step) g[i] *= factor;
  }
}

// The backward kernels set_cuda_backward chooses among.
enum class BackwardKernel : int { kAuto = 0, kTile32 = 1, kTile64 = 2, kStrip = 3 };

std::atomic<int>& chosen_backward() {
  static std::atomic<int> chosen{static_cast<int>(BackwardKernel::kAuto)};
  return chosen;
}

// With "auto", per-image upstream gradients take the strip kernel on images of at least
// kStripMinSide rows and columns, and the tiles below: on small images short bands repeat the
// 20 halo rows often and a plane has few strips, so the tall tile is faster there; from full-HD
// frames up the strip kernel is (docs/performance.md has the figures); the bound sits between
// the sizes compared there (256 and 1080 rows).
constexpr int64_t kStripMinSide = 512;

}  // namespace

void set_cuda_backward(const std::string& kernel) {
  BackwardKernel chosen;
  if (kernel == "auto") {
    chosen = BackwardKernel::kAuto;
  } else if (kernel == "tile32") {
    chosen = BackwardKernel::kTile32;
  } else if (kernel == "tile64") {
    chosen = BackwardKernel::kTile64;
  } else if (kernel == "strip") {
    chosen = BackwardKernel::kStrip;
  } else {
    TORCH_CHECK(false, "ssim: the CUDA backward kernel must be one of auto, tile32, tile64, strip; got '", kernel,
                "'");
  }
  chosen_backward().store(static_cast<int>(chosen), std::memory_order_relaxed);
}

void check_cuda_inputs(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK((x.is_cuda() && y.is_cuda()) || (kEmulated && x.is_cpu() && y.is_cpu()),
              "ssim (CUDA kernel): inputs must be CUDA tensors");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "ssim (CUDA kernel): dtype must be float32, float16 or bfloat16, got ", t);
}

Args make_args(const Geometry& g, double c1, double c2, bool centre_tiles, int tile_rows) {
  TORCH_CHECK(g.height * g.width < (int64_t(1) << 31), "ssim (CUDA kernel): images must have fewer than 2^31 pixels");
  Args a;
  a.height = g.height;
  a.width = g.width;
  a.first = g.offset;
  a.last_row = g.height - g.offset;
  a.last_col = g.width - g.offset;
  a.out_h = g.out_h;
  a.out_w = g.out_w;
  const int64_t th = centre_tiles ? g.out_h : g.height;
  const int64_t tw = centre_tiles ? g.out_w : g.width;
  const int64_t ty = (th + tile_rows - 1) / tile_rows;
  const int64_t tx = (tw + kTile - 1) / kTile;
  TORCH_CHECK(g.planes() * tx * ty < (int64_t(1) << 31), "ssim (CUDA kernel): input too large");
  a.tiles_x = static_cast<int>(tx);
  a.tiles_y = static_cast<int>(ty);
  a.block_rows = tile_rows;
  a.c1 = static_cast<float>(c1);
  a.c2 = static_cast<float>(c2);
  return a;
}

int multiprocessor_count(int device) {
  static std::atomic<int> counts[64] = {};
  if (device >= 0 && device < 64) {
    if (const int known = counts[device].load(std::memory_order_relaxed)) return known;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  count = count > 0 ? count : 1;
  if (device >= 0 && device < 64) counts[device].store(count, std::memory_order_relaxed);
  return count;
}

// The backward over every gradient pixel: the tiles (32 columns by 32 or 64 rows), or the
// strip kernel for a per-image upstream gradient where chosen (ssim.h: grad_in undefined is the
// one-pass mode).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gradient_pass_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                  const at::Tensor& y_in, double c1, double c2,
                                                                  bool same_padding, bool grad_x, bool grad_y,
                                                                  bool batch_mean, double scale) {
  auto [value, l1_value, gx, gy] =
      gradient_pass_l1_cuda(grad_in, x_in, y_in, c1, c2, same_padding, grad_x, grad_y, batch_mean, scale, 0.0);
  return {value, gx, gy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradient_pass_l1_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& y_in, double c1, double c2,
    bool same_padding, bool grad_x, bool grad_y, bool batch_mean, double scale, double l1, bool luminance) {
  if (!luminance && x_in.scalar_type() != at::kFloat) {
    // The contrast-structure kernels are built for float32 inputs only (dispatch_luminance).
    auto [value, l1_value, gx, gy] = gradient_pass_l1_cuda(grad_in, x_in.to(at::kFloat), y_in.to(at::kFloat), c1, c2,
                                                           same_padding, grad_x, grad_y, batch_mean, scale, l1, false);
    // A gradient not asked for is an undefined tensor: nothing to convert.
    return {value, l1_value, gx.defined() ? gx.to(x_in.scalar_type()) : gx,
            gy.defined() ? gy.to(y_in.scalar_type()) : gy};
  }
  const Geometry g = make_geometry(x_in, y_in, same_padding);
  check_cuda_inputs(x_in, y_in);
  const bool with_value = !grad_in.defined();
  const bool with_l1 = l1 != 0.0;
  TORCH_CHECK(with_value || !batch_mean, "ssim_per_image_and_grad: batch_mean needs no upstream gradient");
  TORCH_CHECK(with_value || scale == 1.0, "ssim_per_image_and_grad: scale needs no upstream gradient");
  TORCH_CHECK(with_value || !with_l1, "ssim_l1_and_grad: l1 needs no upstream gradient");
  // The L1 mean is over every pixel (of the image, or of the batch), the SSIM's over the centres.
  const double pixels =
      static_cast<double>(g.channels * g.height * g.width) * (batch_mean ? static_cast<double>(g.batch) : 1.0);
  const auto fopts = x_in.options().dtype(at::kFloat);
  at::Tensor l1_value = at::empty({0}, fopts);
  const bool map_grad = !with_value && check_grad_shape(grad_in, g);
  TORCH_CHECK(with_value || grad_in.device() == x_in.device(), "ssim_backward: grad must be on the inputs' device");
  // The forward's value when no kernel pass gives it: per image, or their batch mean.
  const auto forward_value = [&]() {
    at::Tensor v = forward_cuda(x_in, y_in, c1, c2, same_padding, /*want_map=*/false, luminance);
    if (batch_mean) v = v.mean();
    if (scale != 1.0) v.mul_(scale);
    if (with_l1) {
      l1_value = l1_mean(x_in, y_in, batch_mean);
      v.add_(l1_value, l1);
    }
    return v;
  };
  if (with_value && !(grad_x || grad_y)) {
    at::Tensor v = forward_value();
    return {v, l1_value, at::empty({0}, x_in.options()), at::empty({0}, y_in.options())};
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  BackwardLaunch l;
  l.x = x_in.contiguous();
  l.y = y_in.contiguous();
  l.grad_x = grad_x;
  l.grad_y = grad_y;
  l.gx = at::empty(grad_x ? l.x.sizes() : at::IntArrayRef{0}, l.x.options());
  l.gy = at::empty(grad_y ? l.y.sizes() : at::IntArrayRef{0}, l.y.options());
  at::Tensor value = with_value ? at::empty(batch_mean ? at::IntArrayRef{} : at::IntArrayRef{g.batch}, fopts)
                                : at::Tensor();
  if (!(grad_x || grad_y)) return {value, l1_value, l.gx, l.gy};
  l.grad = GradView{nullptr, {0, 0, 0, 0}};
  at::Tensor grad;
  if (!with_value) {
    grad = grad_in.to(at::kFloat);  // float32 already for the op's own outputs: no copy
    l.grad.data = grad.data_ptr<float>();
    for (int64_t d = 0; d < grad.dim(); ++d) l.grad.stride[d] = grad.stride(d);
  }
  l.map_grad = map_grad;
  l.l1_share = static_cast<float>(l1 / pixels);
  l.l1_partial = nullptr;
  // The kernel: map gradients always take the tiles.
  const auto chosen = static_cast<BackwardKernel>(chosen_backward().load(std::memory_order_relaxed));
  const bool strip = !map_grad && (chosen == BackwardKernel::kStrip ||
                                   (chosen == BackwardKernel::kAuto && g.height >= kStripMinSide &&
                                    g.width >= kStripMinSide));
  const int tile_rows = chosen == BackwardKernel::kTile32   ? 32
                        : chosen == BackwardKernel::kTile64 ? 64
                        : strip                             ? kTile
                                                            : tile_rows_for(g.height);
  l.a = make_args(g, c1, c2, /*centre_tiles=*/false, tile_rows);
  l.luminance = luminance;
  StripPlan plan{};
  if (strip && g.planes() > 0) {
    plan = plan_strips(g.planes(), g.height, g.width, multiprocessor_count(l.x.get_device()));
    TORCH_CHECK(g.planes() * plan.strips * plan.bands < (int64_t(1) << 31), "ssim (CUDA kernel): input too large");
    l.a.tiles_x = plan.strips;
    l.a.tiles_y = plan.bands;
    l.a.block_rows = plan.rows;
  }
  l.blocks = g.planes() * l.a.tiles_x * l.a.tiles_y;
  if (l.blocks == 0) {  // no planes: the forward's answer for the value
    if (with_value) value = forward_value();
    return {value, l1_value, l.gx, l.gy};
  }
  at::Tensor partial = with_value ? at::empty({l.blocks}, fopts) : at::Tensor();
  l.partial = with_value ? partial.data_ptr<float>() : nullptr;
  at::Tensor l1_partial = with_l1 ? at::empty({l.blocks}, fopts) : at::Tensor();
  l.l1_partial = with_l1 ? l1_partial.data_ptr<float>() : nullptr;
  l.stream = c10::cuda::getCurrentCUDAStream();
  l.channels = g.channels;
  // Each map pixel's share of an image's upstream gradient (1 / count; the batch mean's is 1 / B
  // of it), times scale: in the one-pass mode the gradients and the value are scale x the SSIM's.
  const double count = static_cast<double>(g.count()) * (batch_mean ? static_cast<double>(g.batch) : 1.0);
  l.pixel_share = static_cast<float>(scale / count);
  if (strip) {
    launch_strip_backward(l, plan);
  } else {
    launch_tile_backward(l);
  }
  if (with_value && g.batch > 0) {
    // One sum per image, or one over the batch (the blocks of each image are contiguous).
    launch_finish(partial, batch_mean ? 1 : g.batch, scale / count, value, l.stream);
    if (with_l1) {
      l1_value = at::empty(value.sizes(), fopts);
      launch_finish(l1_partial, batch_mean ? 1 : g.batch, 1.0 / pixels, l1_value, l.stream);
      value.add_(l1_value, l1);
    }
  }
  return {value, l1_value, l.gx, l.gy};
}

std::tuple<at::Tensor, at::Tensor> ssim_l1_value_cuda(const at::Tensor& x, const at::Tensor& y, double c1, double c2,
                                                      bool same_padding, bool batch_mean, double scale, double l1) {
  at::Tensor value = scaled_value<ssim_per_image_cuda>(x, y, c1, c2, same_padding, batch_mean, scale);
  if (l1 == 0.0) return {value, at::empty({0}, value.options())};
  at::Tensor l1_value = l1_mean(x, y, batch_mean);
  return {value.add_(l1_value, l1), l1_value};
}

void scale_gradient_cuda(at::Tensor& grad, const at::Tensor& upstream_in) {
  TORCH_CHECK(grad.is_cuda() || (kEmulated && grad.is_cpu()), "ssim_scale_gradient_ (CUDA kernel): grad must be a CUDA tensor");
  const at::Tensor factors = upstream_factors(grad, upstream_in);
  if (grad.numel() == 0) return;
  const int64_t images = upstream_in.dim() == 0 ? 1 : grad.size(0);
  const int64_t per_image = grad.numel() / images;
  // The kernel's layout: float32, the batch outermost and each image one dense run (NCHW or
  // channels_last; the one-pass gradients are contiguous). Anything else multiplies in ATen.
  const bool dense = grad.is_non_overlapping_and_dense() && (images == 1 || grad.stride(0) == per_image);
  if (grad.scalar_type() != at::kFloat || !dense) {
    grad.mul_(factors.to(grad.scalar_type()));
    return;
  }
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor upstream = upstream_in.to(at::kFloat);  // the op's own outputs are float32: no copy
  // Element [0, ...] starts the dense run: strides are never negative.
  float* base = grad.data_ptr<float>();
  const bool vec4 = per_image % 4 == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0;
  // About 8 blocks an SM in all, and no more than an image has work for.
  const int64_t per_block = kThreads * (vec4 ? 4 : 1);
  const int64_t wanted = std::max<int64_t>(1, 8 * multiprocessor_count(grad.get_device()) / images);
  const int64_t blocks_per_image = std::min<int64_t>(wanted, (per_image + per_block - 1) / per_block);
  TORCH_CHECK(images * blocks_per_image < (int64_t(1) << 31), "ssim_scale_gradient_: batch too large");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t stride = upstream.dim() == 0 ? 0 : upstream.stride(0);
  const auto launch = [&](auto kernel) {
    SSIM_LAUNCH(static_cast<unsigned>(images * blocks_per_image), kThreads, 0, stream, kernel)(
        base, upstream.data_ptr<float>(), stride, per_image, blocks_per_image);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (vec4) {
    launch(ssim_scale_gradient_kernel<true>);
  } else {
    launch(ssim_scale_gradient_kernel<false>);
  }
}

}  // namespace ssim
}  // namespace epban
