// The CUDA forward (ssim_cuda.cuh): the per-image SSIM or the map, one block per 32x32 tile
// of window centres, and the sum of the blocks' partial sums per image (ssim_finish_kernel),
// which the one-pass backward uses too.
#include "ssim/ssim_cuda.cuh"

namespace epban {
namespace ssim {
namespace {

// Shared-memory pitches are odd where a warp's lanes walk down rows: no bank conflicts.
// Inputs 42x42 (pitch 43), horizontal moment sums 4 x 42 rows x 32 (pitch 33).
constexpr int kFwdIn = kTile + 2 * kHalo;  // 42
constexpr int kFwdInPitch = kFwdIn + 1;
constexpr int kFwdHPitch = kTile + 1;
constexpr int kFwdHStride = kFwdIn * kFwdHPitch;

template <typename scalar_t, bool kMap, bool kLuminance>
__global__ void __launch_bounds__(kThreads)
    ssim_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, Args a,
                        float* __restrict__ map, float* __restrict__ partial) {
  __shared__ float s_in[2][kFwdIn * kFwdInPitch];
  __shared__ float s_h[4 * kFwdHStride];
  __shared__ float s_warp[kThreads / 32];

  const int tiles = a.tiles_x * a.tiles_y;
  const int64_t plane = blockIdx.x / tiles;
  const int tile = blockIdx.x % tiles;
  const int64_t row0 = a.first + static_cast<int64_t>(tile / a.tiles_x) * kTile;  // first centre of the tile
  const int64_t col0 = a.first + static_cast<int64_t>(tile % a.tiles_x) * kTile;
  const int64_t n = a.height * a.width;
  const scalar_t* xp = x + plane * n;
  const scalar_t* yp = y + plane * n;

  load_inputs<kFwdIn, kThreads>(xp, yp, static_cast<int>(a.height), static_cast<int>(a.width),
                                 static_cast<int>(row0 - kHalo), static_cast<int>(col0 - kHalo), kFwdIn, s_in[0],
                                 s_in[1], kFwdInPitch);
  __syncthreads();
  horizontal_moments<4>(s_in[0], s_in[1], kFwdInPitch, kFwdIn, kTile, s_h, kFwdHPitch, kFwdHStride);
  __syncthreads();

  const int tx = threadIdx.x % kTile;
  const int ty = threadIdx.x / kTile;  // 8 groups of 4 rows
  float acc[4][4];
  vertical_window<4, 4>(s_h, kFwdHPitch, kFwdHStride, ty * 4, tx, acc);
  const int64_t c = col0 + tx;
  float sum = 0.f;
#pragma unroll
  for (int o = 0; o < 4; ++o) {
    const int64_t r = row0 + ty * 4 + o;
    if (r < a.last_row && c < a.last_col) {
      const float s = ssim_value<kLuminance>(acc[o][0], acc[o][1], acc[o][2], acc[o][3], a.c1, a.c2);
      if (kMap) {
        map[plane * a.out_h * a.out_w + (r - a.first) * a.out_w + (c - a.first)] = s;
      } else {
        sum += s;
      }
    }
  }
  if (!kMap) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_down_sync(0xffffffffu, sum, off);
    if (threadIdx.x % 32 == 0) s_warp[threadIdx.x / 32] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < kThreads / 32; ++w) total += s_warp[w];
      partial[blockIdx.x] = total;
    }
  }
}

// The per-image mean from the forward's per-block sums: one block per image, a fixed
// summation order (deterministic), double accumulation. factor: 1 / count, or scale / count
// in the one-pass mode.
__global__ void __launch_bounds__(kThreads)
    ssim_finish_kernel(const float* __restrict__ partial, int64_t per_image, double factor, float* __restrict__ out) {
  __shared__ double s_warp[kThreads / 32];
  const float* p = partial + blockIdx.x * per_image;
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < per_image; i += kThreads) sum += p[i];
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_down_sync(0xffffffffu, sum, off);
  if (threadIdx.x % 32 == 0) s_warp[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += s_warp[w];
    out[blockIdx.x] = static_cast<float>(total * factor);
  }
}

}  // namespace

at::Tensor forward_cuda(const at::Tensor& x_in, const at::Tensor& y_in, double c1, double c2, bool same_padding,
                        bool want_map, bool luminance) {
  const Geometry g = make_geometry(x_in, y_in, same_padding);
  check_cuda_inputs(x_in, y_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const Args a = make_args(g, c1, c2, /*centre_tiles=*/true);
  const int64_t blocks = g.planes() * a.tiles_x * a.tiles_y;
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor map = want_map ? at::empty({g.batch, g.channels, g.out_h, g.out_w}, fopts) : at::Tensor();
  at::Tensor partial = want_map ? at::Tensor() : at::empty({blocks}, fopts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (blocks > 0) {
    dispatch_input_dtype(x.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      if (want_map) {
        TORCH_CHECK(luminance, "ssim (CUDA kernel): the map is the SSIM's");
        SSIM_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, ssim_forward_kernel<scalar_t, true, true>)(
            x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), a, map.data_ptr<float>(), nullptr);
      } else {
        dispatch_luminance(luminance, tag, [&](auto lum) {
          SSIM_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream,
                      ssim_forward_kernel<scalar_t, false, decltype(lum)::value>)(
              x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), a, nullptr, partial.data_ptr<float>());
        });
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (want_map) return map;
  at::Tensor out = at::empty({g.batch}, fopts);
  if (g.batch > 0) launch_finish(partial, g.batch, 1.0 / static_cast<double>(g.count()), out, stream);
  return out;
}

void launch_finish(const at::Tensor& partial, int64_t sums, double factor, at::Tensor& out, cudaStream_t stream) {
  SSIM_LAUNCH(static_cast<unsigned>(sums), kThreads, 0, stream, ssim_finish_kernel)(
      partial.data_ptr<float>(), partial.numel() / sums, factor, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor ssim_per_image_cuda(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding) {
  return forward_cuda(x, y, c1, c2, same_padding, /*want_map=*/false, /*luminance=*/true);
}

at::Tensor ssim_map_cuda(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding) {
  return forward_cuda(x, y, c1, c2, same_padding, /*want_map=*/true, /*luminance=*/true);
}

}  // namespace ssim
}  // namespace epban
