// Fused SSIM on CUDA (window 11, sigma 1.5): what the kernel files share. Inputs float32,
// float16 or bfloat16, float32 accumulation; the per-pixel math is ssim_math.h, shared with
// the CPU kernels. One file per kernel family:
//   ssim_cuda_forward.cu         the forward: per-image sums or the map
//   ssim_cuda_tile_backward.cu   the backward in tiles of 32 columns by 32 or 64 rows
//   ssim_cuda_strip_backward.cu  the backward in column strips streamed down row bands, and
//                                the planner of its launch
//   ssim_cuda.cu                 the host side: checks, the choice of backward kernel, the
//                                gradient pass, and the one-pass backward's in-place scaling
//
// Forward: one block (256 threads) per 32x32 tile of window centres. The tile's inputs plus a
// 5-pixel halo go to shared memory as float; a horizontal 11-tap pass writes the four moment
// sums (u, v, u^2, v^2 of u = x + y, v = x - y: ssim_math.h) of every halo row; a vertical
// pass finishes them and applies ssim_value. The map is written only for reduction "map";
// otherwise each block writes one partial sum and ssim_finish_kernel sums them per image in a
// fixed order (deterministic). No full-size buffer.
// Backward: one block per tile of gradient pixels. It recomputes the moments of the centres
// that reach the tile (inputs with a 10-pixel halo), turns them into the four partials of
// ssim_math.h times the upstream gradient (zero at centres that give no output; three when
// only one input's gradient is wanted, as in SR training), filters those horizontally then
// vertically, and combines them with x, y at each pixel. Nothing but the inputs is kept from
// the forward; the gradients are the only full-size buffers. The strip backward serves
// per-image upstream gradients without the tiles' vertical halo: blocks stream down column
// strips with register windows (the default for images of 512 x 512 and more).
// One pass (ssim_per_image_and_grad, training with reduction mean/none): the backward kernel
// with an upstream gradient of 1 per image also sums the SSIM values of the centres it owns
// (blocks partition the image) into one partial per block, and ssim_finish_kernel makes the
// per-image means: the forward kernel is not run at all.
// Every pass is register-blocked along its filter direction (a thread makes 4-7 adjacent
// outputs from inputs held in registers, each product formed once), and the shared-memory
// pitches are odd where lanes walk down rows, so the passes are free of bank conflicts.
//
// Floor, per pixel of one plane, float32: forward reads 8 B; backward reads 8 B (+4 B of a
// map gradient) and writes 4 B per gradient: 20 B for forward+backward of one gradient (12 B
// if the inputs were read once). Arithmetic, counted from the passes above: forward ~180 FP32
// instructions (2 x 44 multiply-adds for the separable four moments, 4 to form u, v, u^2, v^2,
// 1.3x rows for the halo, ~20 for the formula), backward ~440 (the moments again on 1.7x the
// centres, partials ~35, 2 x 44 multiply-adds to filter them), and ~80 shared loads in all:
// several times the time of the memory traffic on a current GPU, so the kernels are
// compute-bound and their instruction counts are what the tile shapes and the strip kernel
// cut.
// The upstream gradient is read through its strides (GradView): the gradient of a .sum() of
// the map is an expanded, stride-0 tensor, and a contiguous copy of it would cost a launch
// plus 8 B per map pixel and a full-size float buffer; the per-image gradient (B,) is read
// directly too.
#pragma once

#include "ssim/ssim.h"

#include <ATen/ops/empty.h>

#ifdef SSIM_CUDA_EMULATION
// tests/cuda_emu builds these files with g++ and runs their kernels on the CPU (a fiber per
// CUDA thread), so that CI checks the CUDA code itself. cuda_emu.h defines the CUDA built-ins
// and the few c10::cuda calls used, and the two macros that follow.
#include "cuda_emu.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
// kernel<<<grid, block, smem, stream>>>(args), written SSIM_LAUNCH(grid, block, smem, stream, kernel)(args)
// so that the emulator can run the same line (a template kernel's name may hold commas).
#define SSIM_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
// 16-byte aligned: the strip kernel reads it in 16-byte loads
#define SSIM_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

#include <cstdint>
#include <type_traits>

namespace epban {
namespace ssim {

#ifdef SSIM_CUDA_EMULATION
constexpr bool kEmulated = true;  // the kernels take CPU tensors
#else
constexpr bool kEmulated = false;
#endif

// One copy per file (internal linkage): each file's kernels read their own.
static __constant__ float c_gauss[kWin] = {SSIM_GAUSS_11};

constexpr int kThreads = 256;  // the forward's and the small kernels' blocks
constexpr int kTile = 32;      // tile side (centres in the forward, gradient columns in the backward)

// The upstream gradient as given (no contiguous copy: the gradient of a .sum() is an
// expanded, stride-0 tensor): the map's (B, C, H', W') or the per-image (B,), with strides.
struct GradView {
  const float* data;
  int64_t stride[4];  // per-image: stride[0] only
};

struct Args {
  int64_t height, width;
  int64_t first, last_row, last_col;  // active centres: [first, last_row) x [first, last_col)
  int64_t out_h, out_w;
  int tiles_x, tiles_y;  // blocks a plane: tiles (or strips) across, tiles (or bands) down
  int block_rows;        // gradient rows a block: the tile's, or the strip kernel's band
  float c1, c2;
};

// Which input gradients a backward kernel writes. With one of them (the SR loss: only the
// network's output requires grad) three partial planes are filtered instead of four.
enum Wanted : int { kWantX = 1, kWantY = 2, kWantBoth = 3 };

// Calls f(std::integral_constant<int, kWanted>{}) for the gradients wanted (one at least).
template <typename F>
void dispatch_wanted(bool grad_x, bool grad_y, F&& f) {
  if (grad_x && grad_y) {
    f(std::integral_constant<int, kWantBoth>{});
  } else if (grad_x) {
    f(std::integral_constant<int, kWantX>{});
  } else {
    f(std::integral_constant<int, kWantY>{});
  }
}

// Calls f(std::integral_constant<bool, kLuminance>{}): the SSIM instances for every input dtype,
// the contrast-structure ones (MS-SSIM) for float32 inputs only (gradient_pass_l1_cuda converts
// half inputs), which keeps the number of kernel instances down.
template <typename scalar_t, typename F>
void dispatch_luminance(bool luminance, scalar_t, F&& f) {
  if (luminance) return f(std::integral_constant<bool, true>{});
  if constexpr (std::is_same_v<scalar_t, float>) {
    return f(std::integral_constant<bool, false>{});
  } else {
    TORCH_CHECK(false, "ssim (CUDA kernel): the contrast-structure term takes float32 inputs");
  }
}

// Calls f(scalar_t{}) for the three input dtypes of the CUDA kernels (no float64 instance).
template <typename F>
void dispatch_input_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(c10::Half{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    default:
      TORCH_CHECK(false, "ssim (CUDA kernel): unsupported dtype ", t);
  }
}

// ---------------------------------------------------------------- device helpers (forward, tiles)

// Horizontal 11-tap sums of u, v, u^2, v^2 (u = x + y, v = x - y): rows x cols outputs into
// four planes (out_pitch, out_stride). Each thread makes R adjacent outputs of one row from R + 10
// inputs held in registers (each product formed once); lanes take consecutive rows.
template <int R, int NT = kThreads>
__device__ __forceinline__ void horizontal_moments(const float* sx, const float* sy, int in_pitch, int rows, int cols,
                                                   float* out, int out_pitch, int out_stride) {
  const int runs = cols / R;
  for (int i = threadIdx.x; i < rows * runs; i += NT) {
    const int r = i % rows;
    const int c0 = (i / rows) * R;
    const float* px = sx + r * in_pitch + c0;
    const float* py = sy + r * in_pitch + c0;
    float acc[R][4];
#pragma unroll
    for (int o = 0; o < R; ++o)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[o][q] = 0.f;
#pragma unroll
    for (int t = 0; t < R + 2 * kHalo; ++t) {
      const float u = px[t] + py[t];
      const float d = px[t] - py[t];
      const float v[4] = {u, d, u * u, d * d};
#pragma unroll
      for (int o = 0; o < R; ++o) {
        const int k = t - o;
        if (k >= 0 && k < kWin) {
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[o][q] = fmaf(c_gauss[k], v[q], acc[o][q]);
        }
      }
    }
#pragma unroll
    for (int o = 0; o < R; ++o)
#pragma unroll
      for (int q = 0; q < 4; ++q) out[q * out_stride + r * out_pitch + c0 + o] = acc[o][q];
  }
}

// Horizontal 11-tap sums of NQ planes, R adjacent outputs per thread as above.
template <int NQ, int R, int NT = kThreads>
__device__ __forceinline__ void horizontal_sums(const float* in, int in_pitch, int in_stride, int rows, int cols,
                                                float* out, int out_pitch, int out_stride) {
  const int runs = cols / R;
  for (int i = threadIdx.x; i < rows * runs; i += NT) {
    const int r = i % rows;
    const int c0 = (i / rows) * R;
    float acc[R][NQ];
#pragma unroll
    for (int o = 0; o < R; ++o)
#pragma unroll
      for (int q = 0; q < NQ; ++q) acc[o][q] = 0.f;
#pragma unroll
    for (int t = 0; t < R + 2 * kHalo; ++t) {
      float v[NQ];
#pragma unroll
      for (int q = 0; q < NQ; ++q) v[q] = in[q * in_stride + r * in_pitch + c0 + t];
#pragma unroll
      for (int o = 0; o < R; ++o) {
        const int k = t - o;
        if (k >= 0 && k < kWin) {
#pragma unroll
          for (int q = 0; q < NQ; ++q) acc[o][q] = fmaf(c_gauss[k], v[q], acc[o][q]);
        }
      }
    }
#pragma unroll
    for (int o = 0; o < R; ++o)
#pragma unroll
      for (int q = 0; q < NQ; ++q) out[q * out_stride + r * out_pitch + c0 + o] = acc[o][q];
  }
}

// Vertical 11-tap sums of NQ planes (pitch, stride) for R consecutive output rows from
// row0 in column col, sliding down R + 10 rows held in registers: acc[o][q].
template <int NQ, int R>
__device__ __forceinline__ void vertical_window(const float* in, int pitch, int stride, int row0, int col,
                                                float (&acc)[R][NQ]) {
#pragma unroll
  for (int o = 0; o < R; ++o)
#pragma unroll
    for (int q = 0; q < NQ; ++q) acc[o][q] = 0.f;
#pragma unroll
  for (int t = 0; t < R + 2 * kHalo; ++t) {
    float v[NQ];
#pragma unroll
    for (int q = 0; q < NQ; ++q) v[q] = in[q * stride + (row0 + t) * pitch + col];
#pragma unroll
    for (int o = 0; o < R; ++o) {
      const int k = t - o;
      if (k >= 0 && k < kWin) {
#pragma unroll
        for (int q = 0; q < NQ; ++q) acc[o][q] = fmaf(c_gauss[k], v[q], acc[o][q]);
      }
    }
  }
}

// Loads `rows` x kCols inputs of x and y (image rows r0.., columns c0..; zero outside the
// image) into two shared arrays of row pitch `pitch`. Thread t takes column t % kCols of every
// (NT / kCols)-th row from t / kCols: the column test is made once and no element pays a
// division (sm_90 SASS: ~21 instructions an element, against ~30 with a flat index
// i -> i / kCols, i % kCols).
template <int kCols, int NT, typename scalar_t>
__device__ __forceinline__ void load_inputs(const scalar_t* xp, const scalar_t* yp, int height, int width, int r0,
                                            int c0, int rows, float* sx, float* sy, int pitch) {
  constexpr int kRowsPerPass = NT / kCols;
  const int t = static_cast<int>(threadIdx.x);
  if (t >= kRowsPerPass * kCols) return;  // the few threads past the last full row of columns
  const int c = t % kCols;
  const int ic = c0 + c;
  const bool col_in = static_cast<unsigned>(ic) < static_cast<unsigned>(width);
  for (int r = t / kCols; r < rows; r += kRowsPerPass) {
    const int ir = r0 + r;
    const bool inside = col_in && static_cast<unsigned>(ir) < static_cast<unsigned>(height);
    const int off = inside ? ir * width + ic : 0;
    sx[r * pitch + c] = inside ? static_cast<float>(xp[off]) : 0.f;
    sy[r * pitch + c] = inside ? static_cast<float>(yp[off]) : 0.f;
  }
}

// ---------------------------------------------------------------- host side, across the files

// ssim_cuda.cu
void check_cuda_inputs(const at::Tensor& x, const at::Tensor& y);
// The launch arguments of a geometry: blocks of kTile columns by tile_rows rows over the map's
// centres (centre_tiles, the forward) or over the image's pixels (the backward).
Args make_args(const Geometry& g, double c1, double c2, bool centre_tiles, int tile_rows = kTile);
int multiprocessor_count(int device);  // streaming multiprocessors of a device, asked once per device

// ssim_cuda_forward.cu: the forward, per image (B,) or the map; luminance = false gives the
// contrast-structure term alone (ssim_math.h).
at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding,
                        bool want_map, bool luminance);
// ssim_cuda_forward.cu: out[i] = factor x the sum of partial[i * per_image ..][:per_image], for
// the `sums` outputs, in a fixed order (deterministic).
void launch_finish(const at::Tensor& partial, int64_t sums, double factor, at::Tensor& out, cudaStream_t stream);

// What a backward launch of either family reads and writes.
struct BackwardLaunch {
  at::Tensor x, y;    // contiguous inputs
  at::Tensor gx, gy;  // the gradients, of the inputs' dtype ((0,) where not wanted)
  bool grad_x, grad_y;
  bool luminance;  // false: the kernel instances of the contrast-structure term (MS-SSIM)
  Args a;          // the family's blocks: tiles_x x tiles_y a plane, block_rows rows each
  int64_t blocks;  // planes x tiles_x x tiles_y
  GradView grad;   // the upstream gradient (data nullptr in the one-pass mode)
  bool map_grad;   // a map gradient (else per image)
  float pixel_share;  // each map pixel's share of an image's upstream gradient, times scale
  int64_t channels;
  float* partial;  // one-pass mode: each block's sum of SSIM values; else nullptr
  float l1_share;     // one-pass mode with an L1 term: its gradient's size, l1 / pixels
  float* l1_partial;  // then each block's sum of |x - y| over its own pixels; else nullptr
  cudaStream_t stream;
};

// ssim_cuda_tile_backward.cu: the tile rows for an image height when not forced (32 or 64), and
// the launch with tiles of a.block_rows rows.
int tile_rows_for(int64_t height);
void launch_tile_backward(const BackwardLaunch& l);

// ssim_cuda_strip_backward.cu: the strip kernel's launch: centre columns a thread (its build),
// threads a block, gradient rows a band, and the strips and bands of a plane.
struct StripPlan {
  int columns, threads, rows, strips, bands;
};
StripPlan plan_strips(int64_t planes, int64_t height, int64_t width, int sms);
// The launch of `plan` (a.tiles_x, a.tiles_y, a.block_rows set from it); per-image gradients only.
void launch_strip_backward(const BackwardLaunch& l, const StripPlan& plan);

}  // namespace ssim
}  // namespace epban
