// Fused SSIM on CUDA (window 11, sigma 1.5): forward (per-image sums or the map) and
// backward (both inputs), float32 accumulation, inputs float32/float16/bfloat16. The
// per-pixel math is ssim_math.h, shared with the CPU kernels.
//
// Forward: one block (256 threads) per 32x32 tile of window centres. The tile's inputs
// plus a 5-pixel halo go to shared memory as float; a horizontal 11-tap pass writes the
// four moment sums (u, v, u^2, v^2 of u = x + y, v = x - y: ssim_math.h) of every halo
// row; a vertical pass finishes them and applies ssim_value. The map is written only for
// reduction "map"; otherwise each block writes one partial sum and ssim_finish_kernel sums
// them per image in a fixed order (deterministic). No full-size buffer.
// Backward: one block per tile of gradient pixels, 32 columns by 32 or 64 rows (BwdTile;
// the taller tile for tall images: less halo per pixel). It recomputes the moments of the
// 42 x (rows + 10) centres that reach the tile (inputs with a 10-pixel halo), turns them into the
// four partials of ssim_math.h times the upstream gradient (zero at centres that give no
// output; three when only one input's gradient is wanted, as in SR training), filters
// those horizontally then vertically, and combines them with x, y at each pixel. Nothing
// but the inputs is kept from the forward; the gradients are the only full-size buffers.
// One pass (ssim_per_image_and_grad, training with reduction mean/none): the backward
// kernel with an upstream gradient of 1 per image also sums the SSIM values of the
// centres inside its own tile (tiles partition the image) into one partial per block, and
// ssim_finish_kernel makes the per-image means: the forward kernel is not run at all.
// The strip backward (ssim_strip_kernel below; the default for images of 512 x 512 and more,
// strip_backward_selected) serves per-image upstream gradients without the tiles' vertical
// halo: blocks stream down column strips with register windows.
// Every pass is register-blocked along its filter direction (a thread makes 4-7 adjacent
// outputs from inputs held in registers, each product formed once), and the shared-memory
// pitches are odd where lanes walk down rows, so the passes are free of bank conflicts.
//
// Floor, per pixel of one plane, float32: forward reads 8 B; backward reads 8 B (+4 B of a
// map gradient) and writes 4 B per gradient: 20 B for forward+backward of one gradient
// (12 B if the inputs were read once, the issue's floor). Arithmetic, counted from the
// passes above: forward ~180 FP32 instructions (2 x 44 multiply-adds for the separable
// four moments, 4 to form u, v, u^2, v^2, 1.3x rows for the halo, ~20 for the formula),
// backward ~440 (the moments again on 1.7x the centres, partials ~35, 2 x 44 multiply-adds
// to filter them), and ~80 shared loads in all. At 1x3x1080x1920 that is ~3.9 G
// instructions: ~0.12 ms at an H100's 33.5 T FP32 instructions/s, against 0.025-0.041 ms of
// memory traffic. Compute-bound.
// Per backward block, counted per thread from the passes (256 threads): loads ~330,
// horizontal moments 2 rounds x ~340 (364 runs of 6), moments + partials ~700, filtered
// partials 2 rounds x ~250 (336 runs of 4), vertical + combine ~260: ~2,470, i.e. ~20 K
// warp instructions a block. Blocks are 48 x 64 = 3,072 at 16x3x256x256 and 3 x 34 x 60 =
// 6,120 at 1x3x1080x1920: ~0.065 and ~0.13 ms at one warp instruction per scheduler cycle
// (132 SMs x 4 x 1.75 GHz). Measured on an H100 with the five moments of x, y (~22 K warp
// instructions a block, 73.6 KB of shared memory): 0.099 and 0.186 ms (ssim_gpu_check.py
// prints the breakdown). The halo costs the 32x32 tile 2.6x on inputs and 1.7x on centres;
// the 32x60 tile (2026-11-27) 2.2x and 1.5x, with the tile's loads in 32-bit index math:
// ~12.7 K warp instructions per 1,024 pixels against ~15 K, and 30 warps per SM against 24
// (H100, 4K: 0.656 ms against 0.695). The 32x64 tile that replaced it (2026-11-27, untimed)
// 2.1x and 1.5x, 32 warps per SM.
// The upstream gradient is read through its strides (GradView): the gradient of a .sum()
// of the map is an expanded, stride-0 tensor, and a contiguous copy of it cost a launch
// plus 8 B per map pixel (4 read, 4 written) and a full-size float buffer; the per-image
// gradient (B,) is read directly too. The shared-memory opt-in is set once per device.
#include "ssim/ssim.h"

#include <ATen/ops/empty.h>

#ifdef EPBAN_CUDA_EMULATION
// tests/cuda_emu builds this file with g++ and runs its kernels on the CPU (a fiber per CUDA
// thread), so that CI checks the CUDA code itself. cuda_emu.h defines the CUDA built-ins and
// the few c10::cuda calls used below, and the two macros that follow.
#include "cuda_emu.h"
constexpr bool kEmulated = true;  // the kernels take CPU tensors
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
// kernel<<<grid, block, smem, stream>>>(args), written EPBAN_LAUNCH(grid, block, smem, stream, kernel)(args)
// so that the emulator can run the same line (a template kernel's name may hold commas).
#define EPBAN_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
// 16-byte aligned: the strip kernel reads it in 16-byte loads
#define EPBAN_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
constexpr bool kEmulated = false;
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

namespace epban {
namespace ssim {
namespace {

__constant__ float c_gauss[kWin] = {EPBAN_SSIM_GAUSS_11};

constexpr int kThreads = 256;
constexpr int kTile = 32;  // tile side (centres in the forward, gradient pixels in the backward)

// Shared-memory pitches are odd where a warp's lanes walk down rows: no bank conflicts.
// Forward: inputs 42x42 (pitch 43), horizontal moment sums 4 x 42 rows x 32 (pitch 33).
constexpr int kFwdIn = kTile + 2 * kHalo;  // 42
constexpr int kFwdInPitch = kFwdIn + 1;
constexpr int kFwdHPitch = kTile + 1;
constexpr int kFwdHStride = kFwdIn * kFwdHPitch;
// Backward: a tile is 32 gradient columns by kRows rows (BwdTile below). Region A: inputs
// 2 x (kRows + 20) x 52 (pitch 53), then partials 4 x (kRows + 10) x 42 (pitch 43). Region B:
// horizontal moment sums 4 x (kRows + 20) rows x 42 (pitch 43), then horizontally filtered
// partials 4 x (kRows + 10) rows x 32 (pitch 33).
constexpr int kBwdIn = kTile + 4 * kHalo;   // 52 input columns
constexpr int kBwdCtr = kTile + 2 * kHalo;  // 42 centre columns reach the tile
constexpr int kBwdInPitch = kBwdIn + 1;
constexpr int kBwdCtrPitch = kBwdCtr + 1;

// The two backward tiles. 32x32 (256 threads, 64.7 KB: 3 blocks per SM) and 32 columns x 64
// rows (512 threads, 110 KB: 2 blocks per SM). The tall tile recomputes less halo per pixel
// (moments of 1.52x the pixels' centres instead of 1.72x, horizontal sums of 1.72x rows
// instead of 2.13x) and holds 32 warps per SM instead of 24; the short one wastes less on
// image heights just above a multiple of 32. tile_rows_for() picks per launch.
// Step 3 gives each thread kCtrRun = 7 centre rows; 74 centre rows (the tall tile's) are not a
// multiple of 7, so it runs over kCtrSlots = 77. The 3 pad rows read rows of region B that no
// pass wrote and make no partials (zeros, skipping the formula's division); step 4 reads the
// 74 rows only. The tall tile had 60 rows (70 centre rows, no pad) until 2026-11-27. 64
// divides the heights of SR training crops (128 to 512, 1024), on which 60 rows put up to 15%
// of the tiles' rows outside the image (5 tiles, 300 rows, for 256); per pixel inside, the
// two cost about the same (64 rows: 4 more pixel rows a tile, 3 pad rows in 77 of step 3).
template <int R>
struct BwdTile {
  static constexpr int kRows = R;                // gradient rows of the tile
  static constexpr int kThreads = 8 * R;         // step 5: 32 columns x R / 4 groups of 4 rows
  static constexpr int kInRows = R + 4 * kHalo;  // input rows (10-pixel halo)
  static constexpr int kCtrRows = R + 2 * kHalo; // centre rows that reach the tile
  static constexpr int kCtrRun = 7;              // centre rows per thread in step 3
  static constexpr int kCtrSlots = (kCtrRows + kCtrRun - 1) / kCtrRun * kCtrRun;  // step 3's rows, pad included
  static constexpr int kHSlots = kCtrSlots + 2 * kHalo;  // rows of horizontal sums step 3 reads
  static constexpr int kHRun = R == 32 ? 6 : 7;  // adjacent centre columns per thread in step 2
  static constexpr int kMinBlocks = R == 32 ? 3 : 2;
  static constexpr int kInStride = kInRows * kBwdInPitch;
  static constexpr int kPStride = kCtrSlots * kBwdCtrPitch;
  static constexpr int kHStride = kHSlots * kBwdCtrPitch;
  static constexpr int kFStride = kCtrRows * (kTile + 1);
  static constexpr int kRegionA = 4 * kPStride;
  static constexpr int kRegionB = 4 * kHStride;
  static constexpr size_t kSmemBytes = sizeof(float) * (kRegionA + kRegionB);
  static_assert(kBwdCtr % kHRun == 0 && R % 4 == 0, "tile runs must divide");
  static_assert(2 * kInStride <= kRegionA, "inputs must fit region A");
  static_assert(4 * kFStride <= kRegionB, "filtered partials must fit region B");
  // 1 KB a block is the system's; s_warp is static shared memory
  static_assert(kMinBlocks * (kSmemBytes + 1024 + sizeof(float) * kThreads / 32) <= 228 * 1024,
                "shared memory per SM (H100)");
};
using ShortTile = BwdTile<32>;
using TallTile = BwdTile<64>;

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
  int tiles_x, tiles_y;
  int block_rows;  // the strip kernel's band of gradient rows (the tile kernels' rows are constants)
  float c1, c2;
};

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
// i -> i / kCols, i % kCols; the backward's phase 1 from ~260 to ~190 a thread).
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

template <typename scalar_t, bool kMap>
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
      const float s = ssim_value(acc[o][0], acc[o][1], acc[o][2], acc[o][3], a.c1, a.c2);
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

// The one-pass backward (ssim_scale_gradient_): grad[image] *= upstream[image * stride],
// in place, blocks_per_image blocks an image, each a grid-stride loop over its image's
// elements (float4 when kVec4: the image's element count is a multiple of 4 and the
// buffer is aligned). Each block reads its factor first and returns when it is exactly 1.
// Why: a loss's .backward() hands this op an upstream of 1 (epban.ssim_loss folds the loss
// weight into the pass), and then the in-place multiply, a full read and write of the
// gradient (8 B a pixel; 0.079 ms at 1x3x2160x3840 on an H100, 12% of the fwd+bwd), is a
// launch of blocks that read one float. The test runs on the device: no host sync, and
// a CUDA graph re-reads the factor on every replay.
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

// Which input gradients the backward kernel writes. With one of them (the SR loss: only the
// network's output requires grad) three partial planes are filtered instead of four.
enum Wanted : int { kWantX = 1, kWantY = 2, kWantBoth = 3 };

template <typename Tile, typename scalar_t, int kWanted>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks)
    ssim_backward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, Args a,
                         GradView grad, bool map_grad, float pixel_share, int64_t channels,
                         scalar_t* __restrict__ gx, scalar_t* __restrict__ gy, float* __restrict__ partial) {
  // partial != nullptr: the one-pass mode of ssim_per_image_and_grad. The upstream gradient
  // is the op's scale per image (in pixel_share; grad is not read) and the block also sums
  // the SSIM values of the centres inside its own tile (tiles partition the image, so each
  // centre is summed once) into partial[blockIdx.x], which ssim_finish_kernel turns into the
  // per-image mean.
  // kWanted: the gradients written (gx, gy or both; the others' pointers are not read).
  // Partial planes: both: d_mx, d_my, d_e2, d_exy; one: d_mx or d_my, then d_e2, d_exy.
  constexpr int kPlanes = kWanted == kWantBoth ? 4 : 3;
  constexpr int kNT = Tile::kThreads;
  constexpr int kRows = Tile::kRows;
  EPBAN_DYNAMIC_SHARED(float, smem);
  __shared__ float s_warp[kNT / 32];
  float* s_a = smem;                   // inputs, then partials
  float* s_b = smem + Tile::kRegionA;  // horizontal moment sums, then filtered partials

  const int tiles = a.tiles_x * a.tiles_y;
  const int64_t plane = blockIdx.x / tiles;
  const int tile = blockIdx.x % tiles;
  // Image coordinates fit in int (make_args checks height * width < 2^31): only the plane
  // offset needs 64 bits.
  const int row0 = (tile / a.tiles_x) * kRows;  // first gradient pixel of the tile
  const int col0 = (tile % a.tiles_x) * kTile;
  const int height = static_cast<int>(a.height);
  const int width = static_cast<int>(a.width);
  const int64_t n = a.height * a.width;
  const scalar_t* xp = x + plane * n;
  const scalar_t* yp = y + plane * n;

  // 1. Inputs with a 10-pixel halo, zero outside the image.
  load_inputs<kBwdIn, kNT>(xp, yp, height, width, row0 - 2 * kHalo, col0 - 2 * kHalo, Tile::kInRows, s_a,
                           s_a + Tile::kInStride, kBwdInPitch);
  __syncthreads();
  // 2. Horizontal moment sums of the input rows at the 42 centre columns.
  horizontal_moments<Tile::kHRun, kNT>(s_a, s_a + Tile::kInStride, kBwdInPitch, Tile::kInRows, kBwdCtr, s_b,
                                        kBwdCtrPitch, Tile::kHStride);
  __syncthreads();
  // 3. Vertical moment sums and the partials (times the upstream gradient) of the centres
  //    that reach the tile, kCtrRun rows per thread; zero at centres that give no output.
  //    Per-image mode: every active centre gets grad[b] / (map pixels per image).
  const int64_t image = plane / channels;
  const float g_scale = partial ? pixel_share : (map_grad ? 0.f : grad.data[image * grad.stride[0]] * pixel_share);
  float value_sum = 0.f;
  const float* g_plane =
      map_grad ? grad.data + image * grad.stride[0] + (plane - image * channels) * grad.stride[1] : nullptr;
  const int first = static_cast<int>(a.first);
  const int last_row = static_cast<int>(a.last_row);
  const int last_col = static_cast<int>(a.last_col);
  constexpr int kRun = Tile::kCtrRun;
  for (int i = threadIdx.x; i < kBwdCtr * (Tile::kCtrSlots / kRun); i += kNT) {
    const int cc = i % kBwdCtr;
    const int cr0 = (i / kBwdCtr) * kRun;
    float acc[kRun][4];
    vertical_window<4, kRun>(s_b, kBwdCtrPitch, Tile::kHStride, cr0, cc, acc);
    const int ic = col0 - kHalo + cc;  // the centre's image column
#pragma unroll
    for (int o = 0; o < kRun; ++o) {
      const int cr = cr0 + o;
      const int ir = row0 - kHalo + cr;
      SsimPartials<float> d{0.f, 0.f, 0.f, 0.f, 0.f};
      if ((Tile::kCtrSlots == Tile::kCtrRows || cr < Tile::kCtrRows) && ir >= first && ir < last_row &&
          ic >= first && ic < last_col) {
        const float g = map_grad ? g_plane[(ir - first) * grad.stride[2] + (ic - first) * grad.stride[3]] : g_scale;
        d = ssim_partials(acc[o][0], acc[o][1], acc[o][2], acc[o][3], a.c1, a.c2, g);
        if (partial && ir >= row0 && ir < row0 + kRows && ic >= col0 && ic < col0 + kTile) value_sum += d.s;
      }
      float* p = s_a + cr * kBwdCtrPitch + cc;
      if (kWanted == kWantBoth) {
        p[0] = d.d_mx;
        p[Tile::kPStride] = d.d_my;
        p[2 * Tile::kPStride] = d.d_e2;
        p[3 * Tile::kPStride] = d.d_exy;
      } else {
        p[0] = kWanted == kWantX ? d.d_mx : d.d_my;
        p[Tile::kPStride] = d.d_e2;
        p[2 * Tile::kPStride] = d.d_exy;
      }
    }
  }
  if (partial) {  // block-uniform; every lane is here (the loop above has no early exit)
#pragma unroll
    for (int off = 16; off > 0; off /= 2) value_sum += __shfl_down_sync(0xffffffffu, value_sum, off);
    if (threadIdx.x % 32 == 0) s_warp[threadIdx.x / 32] = value_sum;
  }
  __syncthreads();
  // 4. Horizontal sums of the partials at the tile's 32 columns, all centre rows.
  horizontal_sums<kPlanes, 4, kNT>(s_a, kBwdCtrPitch, Tile::kPStride, Tile::kCtrRows, kTile, s_b, kTile + 1,
                                   Tile::kFStride);
  if (partial && threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kNT / 32; ++w) total += s_warp[w];
    partial[blockIdx.x] = total;
  }
  __syncthreads();
  // 5. Vertical sums and the gradients of the tile's pixels.
  const int tx = threadIdx.x % kTile;
  const int ty = threadIdx.x / kTile;  // kRows / 4 groups of 4 rows
  float acc[4][kPlanes];
  vertical_window<kPlanes, 4>(s_b, kTile + 1, Tile::kFStride, ty * 4, tx, acc);
  const int c = col0 + tx;
  if (c >= width) return;
#pragma unroll
  for (int o = 0; o < 4; ++o) {
    const int r = row0 + ty * 4 + o;
    if (r >= height) break;
    const int64_t idx = plane * n + r * width + c;
    const float xv = static_cast<float>(x[idx]);
    const float yv = static_cast<float>(y[idx]);
    if (kWanted == kWantBoth) {
      gx[idx] = static_cast<scalar_t>(acc[o][0] + 2.f * xv * acc[o][2] + yv * acc[o][3]);
      gy[idx] = static_cast<scalar_t>(acc[o][1] + 2.f * yv * acc[o][2] + xv * acc[o][3]);
    } else if (kWanted == kWantX) {
      gx[idx] = static_cast<scalar_t>(acc[o][0] + 2.f * xv * acc[o][1] + yv * acc[o][kPlanes - 1]);
    } else {
      gy[idx] = static_cast<scalar_t>(acc[o][0] + 2.f * yv * acc[o][1] + xv * acc[o][kPlanes - 1]);
    }
  }
}

// The strip backward: the outputs of ssim_backward_kernel for a per-image upstream gradient
// (the one pass of training, and ssim_backward with a (B,) gradient; a map gradient takes the
// tiles), with no vertical halo to recompute.
//
// A block owns a strip of image columns and a band of rows and streams down the band one
// input row per step. Thread t owns kC adjacent centre columns from lead = kC t (the strip's
// centre column col0 - 5 + lead + c; kC nt centre columns, 10 fewer gradient columns, 10 more
// input columns), and keeps in registers the horizontal moments of the last 11 input rows
// and the partials of the last 11 centre rows at its columns, so that both vertical filters
// are register sums (pull form: each value is made once, from values made once). Step i
// (input row row0 - 10 + i; slot j = i % 11 of the register windows):
//   (a) the row's u, v go to shared memory (double-buffered) and the next row's loads start;
//   (b) __syncthreads (the only barrier of the step; x, y of the next step's (c) pixels are
//       loaded before it, a step ahead of their use);
//   (c) i >= 21: gradient row row0 + i - 21 from the vertically filtered partials of step
//       i - 1, filtered horizontally (11 taps over shared memory) and combined with x, y;
//   (d) the horizontal moments of this row at the thread's centre columns -> window slot j;
//   (e) i >= 10: the vertical moments of centre row row0 - 15 + i from the 11 slots, its
//       partials (zero where the centre gives no output) -> partial slot j;
//   (f) i >= 20: the vertical sums of the 11 partial slots (gradient row row0 - 20 + i at
//       the thread's centre columns) -> shared memory, for (c) of the next step.
// The step loop is unrolled by 11 so that every window index is a compile-time register, and
// the buffers of a step are picked by the parity of j and of the 11-step round.
//
// Instructions, from the sm_90 SASS of the float, one-gradient kernel, per thread and step
// (scripts/ssim_sass_count.py prints them for every instance):
// with one column ~372 (167 FFMA: 44 horizontal moments, 44 vertical, 33 + 33 for the
// partials' two filters, the formula's and the combine's; 33 FMUL, 11 FADD; 33 shared loads;
// ~117 integer, branch and address); with two columns ~569, 284 a column (the horizontal
// passes read 12 inputs for two outputs, and the step's address and control work is shared).
// A gradient pixel costs (rows + 20) / rows x centres / (centres - 10) column-steps: 1.15 at
// 4K, 1.25 at 1080p, 1.34 at 16x3x256x256 with plan_strips' plans for 132 SMs. The 32x60 tile
// (the tall tile before 32x64) issues ~460 per pixel, from its SASS loop bodies times their
// trip counts: phases 1-5 take ~260, 450, ~780 (on 7 of 8 threads), ~230 and ~200
// instructions a thread for 1,920 pixels by 480 threads (ncu counted 514 a pixel at 4K).
// Measured on an H100 (ncu, 1x3x2160x3840, 2026-11-27): the strip kernel executes 0.67x the
// tall tile's instructions but, at 8 warps an SM, issued on 41% of the cycles against the
// tile's 69%; its warps waited most on the x, y loads of (c), issued just before the barrier.
// Loaded a step ahead, the kernel went from 0.627 to 0.485 ms (128 threads x 64 rows), and
// with plan_strips' plan (128 x 197) takes 0.412 ms against the tall tile's 0.563.
//
// The two builds of the strip kernel: kC adjacent centre columns a thread. One column: up to
// 256 threads of at most 128 registers (16 warps an SM). Two: up to 128 threads of ~240
// registers (8 warps an SM), but the horizontal passes read 12 inputs for 2 outputs instead
// of 11 for 1, and the per-step address and control work is shared by two columns.
template <int kC>
struct StripShape {
  static_assert(kC == 1 || kC == 2, "one or two columns a thread");
  static constexpr int kMaxThreads = 256 / kC;  // blockDim.x: a multiple of 32 in [64 / kC, 256 / kC]
  static constexpr int kMinThreads = 64 / kC;
  static constexpr int kMinBlocks = 2;
  static constexpr int kTaps = kC + 2 * kHalo;  // inputs (or partial columns) a thread's outputs read
};

// Dynamic shared memory of the strip kernel for `centres` centre columns: 2 buffers of (u, v)
// at the input columns, 2 buffers of kPlanes filtered partial planes at the centre columns.
inline size_t strip_smem_bytes(int centres, int planes) {
  return sizeof(float) * (2 * 2 * (centres + 2 * kHalo) + 2 * planes * centres);
}

// Shared-memory access of a thread's kC adjacent columns (lead = kC * t) in rows of float2 or
// float: one access of kC elements (16 or 8 bytes for a pair), and the kTaps elements from
// lead that a thread's outputs read, in pairs.
template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T lo, hi;
};

template <int kC, typename T>
__device__ __forceinline__ void store_columns(T* row, int t, const T (&v)[kC]) {
  if constexpr (kC == 2) {
    reinterpret_cast<Pair<T>*>(row)[t] = Pair<T>{v[0], v[1]};
  } else {
    row[t] = v[0];
  }
}

template <int kC, typename T>
__device__ __forceinline__ void load_taps(const T* row, int t, T (&w)[StripShape<kC>::kTaps]) {
  if constexpr (kC == 2) {
#pragma unroll
    for (int k2 = 0; k2 < StripShape<kC>::kTaps / 2; ++k2) {
      const Pair<T> p = reinterpret_cast<const Pair<T>*>(row)[t + k2];
      w[2 * k2] = p.lo;
      w[2 * k2 + 1] = p.hi;
    }
  } else {
#pragma unroll
    for (int k = 0; k < StripShape<kC>::kTaps; ++k) w[k] = row[t + k];
  }
}

template <typename scalar_t, int kWanted, int kC>
__global__ void __launch_bounds__(StripShape<kC>::kMaxThreads, StripShape<kC>::kMinBlocks)
    ssim_strip_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, Args a,
                      const float* __restrict__ grad, int64_t grad_stride, float pixel_share, int64_t channels,
                      scalar_t* __restrict__ gx, scalar_t* __restrict__ gy, float* __restrict__ partial) {
  // grad: the per-image upstream gradient (stride grad_stride), or nullptr in the one-pass
  // mode (the op's scale per image, in pixel_share; partial then gets each block's sum of
  // SSIM values, as in ssim_backward_kernel). a.tiles_x strips and a.tiles_y bands of
  // a.block_rows rows a plane.
  constexpr int kPlanes = kWanted == kWantBoth ? 4 : 3;
  constexpr int kTaps = StripShape<kC>::kTaps;
  const int nt = static_cast<int>(blockDim.x);
  const int centres = kC * nt;              // centre columns of the strip
  const int cols = centres - 2 * kHalo;     // gradient columns
  const int in_cols = centres + 2 * kHalo;  // input columns
  EPBAN_DYNAMIC_SHARED(float, smem);
  __shared__ float s_warp[StripShape<kC>::kMaxThreads / 32];

  const int per_plane = a.tiles_x * a.tiles_y;
  const int64_t plane = blockIdx.x / per_plane;
  const int block = blockIdx.x % per_plane;
  const int height = static_cast<int>(a.height);  // coordinates fit in int (make_args)
  const int width = static_cast<int>(a.width);
  const int row0 = (block / a.tiles_x) * a.block_rows;  // first gradient row of the band
  const int col0 = (block % a.tiles_x) * cols;          // first gradient column of the strip
  const int rows = a.block_rows < height - row0 ? a.block_rows : height - row0;
  const int steps = rows + 4 * kHalo;  // input rows streamed: row0 - 10 .. row0 + rows + 9
  const int t = static_cast<int>(threadIdx.x);
  const int lead = kC * t;  // index of the thread's first column among the strip's centres

  // The input columns this thread loads: in_cols index lead + c, and centres + lead + c for the
  // first 10 / kC threads (the 10 columns past the centres).
  const bool extra = lead < 2 * kHalo;
  bool load_in[2 * kC];
  const int load_col = col0 - 2 * kHalo + lead;
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    load_in[c] = static_cast<unsigned>(load_col + c) < static_cast<unsigned>(width);
    load_in[kC + c] = extra && static_cast<unsigned>(load_col + centres + c) < static_cast<unsigned>(width);
  }
  const int64_t n = a.height * a.width;
  int load_row = row0 - 2 * kHalo;  // the row the next fetch loads
  int64_t load_idx = plane * n + static_cast<int64_t>(load_row) * width + load_col;
  float xs[2 * kC], ys[2 * kC];  // the next input row's values, loaded ahead
  const auto fetch = [&]() {
    const bool row_in = static_cast<unsigned>(load_row) < static_cast<unsigned>(height);
#pragma unroll
    for (int c = 0; c < 2 * kC; ++c) {
      const int64_t at = load_idx + (c < kC ? c : centres + c - kC);
      xs[c] = row_in && load_in[c] ? static_cast<float>(x[at]) : 0.f;
      ys[c] = row_in && load_in[c] ? static_cast<float>(y[at]) : 0.f;
    }
    ++load_row;
    load_idx += width;
  };

  const int first = static_cast<int>(a.first);
  const int last_row = static_cast<int>(a.last_row);
  bool centre_col[kC], own_col[kC], grad_col[kC];
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    const int cc = col0 - kHalo + lead + c;  // the centre column
    centre_col[c] = cc >= first && cc < static_cast<int>(a.last_col);
    own_col[c] = lead + c >= kHalo && lead + c < kHalo + cols;  // summed into this block's value
    grad_col[c] = lead + c < cols && col0 + lead + c < width;   // gradient column col0 + lead + c
  }
  const float g = grad ? grad[(plane / channels) * grad_stride] * pixel_share : pixel_share;
  // The first gradient pixel of step i (row row0 + i - 21, column col0 + lead).
  int64_t grad_idx = plane * n + static_cast<int64_t>(row0 - 4 * kHalo - 1) * width + col0 + lead;
  int centre_row = row0 - 3 * kHalo;  // of step i: row0 - 15 + i

  // Double buffers: (u, v) of the input row; the vertically filtered partials (planes 0 and 1
  // as float2, then plane 2 as float, or planes 2 and 3 as float2). Step i writes buffer i % 2.
  float2* const uv_buffers = reinterpret_cast<float2*>(smem);  // buffer p at p * in_cols
  float* const f_buffers = smem + 4 * in_cols;                   // buffer p at p * kPlanes * centres

  float hm[kWin][kC][4];        // horizontal moments (mu, mv, euu, evv) of the last 11 input rows
  float pd[kWin][kC][kPlanes];  // partials of the last 11 centre rows at the thread's columns
  float value_sum = 0.f;
  float cx[kC] = {}, cy[kC] = {};  // x, y of (c)'s pixels, loaded by the step before
  fetch();
  for (int base = 0; base <= steps; base += kWin) {
    const int round_parity = base & 1;  // kWin is odd: a round flips the parity of its steps
#pragma unroll
    for (int j = 0; j < kWin; ++j) {
      const int i = base + j;
      if (i <= steps) {  // block-uniform
        const int parity = round_parity ^ (j & 1);
        float2* const uv = uv_buffers + parity * in_cols;
        // (a)
        if (i < steps) {
          float2 own[kC], past[kC];
#pragma unroll
          for (int c = 0; c < kC; ++c) {
            own[c] = make_float2(xs[c] + ys[c], xs[c] - ys[c]);
            past[c] = make_float2(xs[kC + c] + ys[kC + c], xs[kC + c] - ys[kC + c]);
          }
          store_columns<kC>(uv, t, own);
          if (extra) store_columns<kC>(uv + centres, t, past);
          if (i + 1 < steps) fetch();
        }
        // x, y of the next step's (c) pixels (a row further down), loaded a step ahead: loaded
        // just before the barrier, the H100 waited for them after it (8 warps an SM cannot
        // cover a load; ncu: ~30% of the kernel's stall samples on these loads, 2026-11-27)
        float nx[kC], ny[kC];
#pragma unroll
        for (int c = 0; c < kC; ++c) {
          const bool wanted = i >= 4 * kHalo && i < steps && grad_col[c];
          nx[c] = wanted ? static_cast<float>(x[grad_idx + width + c]) : 0.f;
          ny[c] = wanted ? static_cast<float>(y[grad_idx + width + c]) : 0.f;
        }
        __syncthreads();  // (b)
        // (c)
        if (i > 4 * kHalo && grad_col[0]) {
          const float* f = f_buffers + (parity ^ 1) * kPlanes * centres;
          // partial columns lead .. lead + kTaps - 1: planes 0 and 1, then 2 (and 3)
          float2 p01[kTaps], p23[kTaps];
          load_taps<kC>(reinterpret_cast<const float2*>(f), t, p01);
          if (kPlanes == 4) {
            load_taps<kC>(reinterpret_cast<const float2*>(f + 2 * centres), t, p23);
          } else {
            float p2[kTaps];
            load_taps<kC>(f + 2 * centres, t, p2);
#pragma unroll
            for (int k = 0; k < kTaps; ++k) p23[k] = make_float2(p2[k], 0.f);
          }
          float acc[kC][4] = {};
#pragma unroll
          for (int k = 0; k < kTaps; ++k)
#pragma unroll
            for (int c = 0; c < kC; ++c) {
              const int tap = k - c;  // of gradient column lead + c
              if (tap >= 0 && tap < kWin) {
                acc[c][0] = fmaf(c_gauss[tap], p01[k].x, acc[c][0]);
                acc[c][1] = fmaf(c_gauss[tap], p01[k].y, acc[c][1]);
                acc[c][2] = fmaf(c_gauss[tap], p23[k].x, acc[c][2]);
                if (kPlanes == 4) acc[c][3] = fmaf(c_gauss[tap], p23[k].y, acc[c][3]);
              }
            }
#pragma unroll
          for (int c = 0; c < kC; ++c) {
            if (c > 0 && !grad_col[c]) break;
            const int64_t idx = grad_idx + c;
            const float xv = cx[c];
            const float yv = cy[c];
            const float* d = acc[c];
            if (kWanted == kWantBoth) {
              gx[idx] = static_cast<scalar_t>(d[0] + 2.f * xv * d[2] + yv * d[3]);
              gy[idx] = static_cast<scalar_t>(d[1] + 2.f * yv * d[2] + xv * d[3]);
            } else if (kWanted == kWantX) {
              gx[idx] = static_cast<scalar_t>(d[0] + 2.f * xv * d[1] + yv * d[2]);
            } else {
              gy[idx] = static_cast<scalar_t>(d[0] + 2.f * yv * d[1] + xv * d[2]);
            }
          }
        }
        if (i < steps) {
          // (d) the horizontal moments at the thread's columns, from input columns lead .. lead + 11
          float2 w[kTaps];
          load_taps<kC>(uv, t, w);
          float mom[kC][4] = {};
#pragma unroll
          for (int k = 0; k < kTaps; ++k) {
            const float uu = w[k].x * w[k].x;
            const float vv = w[k].y * w[k].y;
#pragma unroll
            for (int c = 0; c < kC; ++c) {
              const int tap = k - c;
              if (tap >= 0 && tap < kWin) {
                mom[c][0] = fmaf(c_gauss[tap], w[k].x, mom[c][0]);
                mom[c][1] = fmaf(c_gauss[tap], w[k].y, mom[c][1]);
                mom[c][2] = fmaf(c_gauss[tap], uu, mom[c][2]);
                mom[c][3] = fmaf(c_gauss[tap], vv, mom[c][3]);
              }
            }
          }
#pragma unroll
          for (int c = 0; c < kC; ++c)
#pragma unroll
            for (int q = 0; q < 4; ++q) hm[j][c][q] = mom[c][q];
          if (i >= 2 * kHalo) {
            // (e) slot (j + 1 + k) % 11 holds input row i - 10 + k
            const bool centre_row_in = centre_row >= first && centre_row < last_row;
            const bool own_row = centre_row >= row0 && centre_row < row0 + rows;
#pragma unroll
            for (int c = 0; c < kC; ++c) {
              float m[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
              for (int k = 0; k < kWin; ++k)
#pragma unroll
                for (int q = 0; q < 4; ++q) m[q] = fmaf(c_gauss[k], hm[(j + 1 + k) % kWin][c][q], m[q]);
              SsimPartials<float> d{0.f, 0.f, 0.f, 0.f, 0.f};
              if (centre_col[c] && centre_row_in) {
                d = ssim_partials(m[0], m[1], m[2], m[3], a.c1, a.c2, g);
                if (partial && own_col[c] && own_row) value_sum += d.s;
              }
              if (kWanted == kWantBoth) {
                pd[j][c][0] = d.d_mx;
                pd[j][c][1] = d.d_my;
                pd[j][c][2] = d.d_e2;
                pd[j][c][3] = d.d_exy;
              } else {
                pd[j][c][0] = kWanted == kWantX ? d.d_mx : d.d_my;
                pd[j][c][1] = d.d_e2;
                pd[j][c][2] = d.d_exy;
              }
            }
            if (i >= 4 * kHalo) {
              // (f) slot (j + 1 + k) % 11 holds centre row row0 - 25 + i + k
              float acc[kC][4] = {};
#pragma unroll
              for (int c = 0; c < kC; ++c)
#pragma unroll
                for (int q = 0; q < kPlanes; ++q)
#pragma unroll
                  for (int k = 0; k < kWin; ++k) acc[c][q] = fmaf(c_gauss[k], pd[(j + 1 + k) % kWin][c][q], acc[c][q]);
              float* const f = f_buffers + parity * kPlanes * centres;
              float2 f01[kC], f23[kC];
              float f2[kC];
#pragma unroll
              for (int c = 0; c < kC; ++c) {
                f01[c] = make_float2(acc[c][0], acc[c][1]);
                f23[c] = make_float2(acc[c][2], acc[c][3]);
                f2[c] = acc[c][2];
              }
              store_columns<kC>(reinterpret_cast<float2*>(f), t, f01);
              if (kPlanes == 4) {
                store_columns<kC>(reinterpret_cast<float2*>(f + 2 * centres), t, f23);
              } else {
                store_columns<kC>(f + 2 * centres, t, f2);
              }
            }
          }
        }
        ++centre_row;
        grad_idx += width;
#pragma unroll
        for (int c = 0; c < kC; ++c) {
          cx[c] = nx[c];
          cy[c] = ny[c];
        }
      }
    }
  }
  if (partial) {  // block-uniform; nt is a multiple of 32
#pragma unroll
    for (int off = 16; off > 0; off /= 2) value_sum += __shfl_down_sync(0xffffffffu, value_sum, off);
    if (t % 32 == 0) s_warp[t / 32] = value_sum;
    __syncthreads();
    if (t == 0) {
      float total = 0.f;
      for (int w = 0; w < nt / 32; ++w) total += s_warp[w];
      partial[blockIdx.x] = total;
    }
  }
}

// Lifts the backward kernel's dynamic shared-memory limit to Tile::kSmemBytes, once per
// device and kernel instance (a driver call per launch costs microseconds of host time).
template <typename Tile, typename scalar_t, int kWanted>
void allow_backward_smem(int device) {
  static std::atomic<uint64_t> done{0};  // one bit per device index < 64
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t(1) << device : 0;
  if (bit && (done.load(std::memory_order_acquire) & bit)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(ssim_backward_kernel<Tile, scalar_t, kWanted>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(Tile::kSmemBytes)));
  done.fetch_or(bit, std::memory_order_release);
}

void check_cuda_inputs(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK((x.is_cuda() && y.is_cuda()) || (kEmulated && x.is_cpu() && y.is_cpu()),
              "ssim (CUDA kernel): inputs must be CUDA tensors");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "ssim (CUDA kernel): dtype must be float32, float16 or bfloat16, got ", t);
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

// tile_rows: of the backward's tiles (the forward's are kTile x kTile).
Args make_args(const Geometry& g, double c1, double c2, bool centre_tiles, int tile_rows = kTile) {
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

// The backward tile's rows for an image height: the tile with the fewer warp instructions in
// all, from the count per tile (~15 K warp instructions for 32x32, ~26 K for 32x64: the
// header's count for 32x60, ~24 K, scaled by each step's runs). EPBAN_SSIM_CUDA_TILE_ROWS=32 or
// 64 forces one (for comparisons and tests).
int tile_rows_for(int64_t height) {
  if (const char* forced = std::getenv("EPBAN_SSIM_CUDA_TILE_ROWS")) {
    const std::string rows(forced);
    if (rows == "32") return ShortTile::kRows;
    if (rows == "64") return TallTile::kRows;
    TORCH_CHECK(rows.empty(), "EPBAN_SSIM_CUDA_TILE_ROWS must be 32 or 64, got '", rows, "'");
  }
  const int64_t short_cost = 15 * ((height + ShortTile::kRows - 1) / ShortTile::kRows);
  const int64_t tall_cost = 26 * ((height + TallTile::kRows - 1) / TallTile::kRows);
  return tall_cost < short_cost ? TallTile::kRows : ShortTile::kRows;
}

// Which backward kernel gradient_pass_cuda runs for a per-image upstream gradient (map
// gradients always take the tiles). EPBAN_SSIM_CUDA_BACKWARD=tile or strip forces one, as does
// EPBAN_SSIM_CUDA_TILE_ROWS (the tiles); unset or auto: the strip kernel for images of at least
// kStripMinSide rows and columns, the tiles below. Measured on an H100 (2026-11-27, the one-pass
// op, float32, its own plan against the tall tile): 1.36x faster at 1x3x1080x1920 (0.111 ms
// against 0.151) and 1.37x at 1x3x2160x3840 (0.412 against 0.563), 0.77x at 16x3x256x256 (0.112
// against 0.086: short bands repeat the 20 halo rows often and the strips are 2 a plane). Sizes
// between 256 and 1080 rows were not measured: the bound sits between them.
constexpr int64_t kStripMinSide = 512;

bool strip_backward_selected(int64_t height, int64_t width) {
  const char* chosen = std::getenv("EPBAN_SSIM_CUDA_BACKWARD");
  const std::string kernel(chosen ? chosen : "");
  TORCH_CHECK(kernel.empty() || kernel == "auto" || kernel == "tile" || kernel == "strip",
              "EPBAN_SSIM_CUDA_BACKWARD must be 'auto', 'tile' or 'strip', got '", kernel, "'");
  if (kernel == "strip") return true;
  if (kernel == "tile") return false;
  const char* tile_rows = std::getenv("EPBAN_SSIM_CUDA_TILE_ROWS");
  if (tile_rows != nullptr && *tile_rows != '\0') return false;
  return height >= kStripMinSide && width >= kStripMinSide;
}

// A positive integer setting, 0 when unset.
int positive_setting(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return 0;
  char* end = nullptr;
  const long parsed = std::strtol(value, &end, 10);
  TORCH_CHECK(*end == '\0' && parsed > 0 && parsed < (1L << 30), name, " must be a positive integer, got '", value,
              "'");
  return static_cast<int>(parsed);
}

// Streaming multiprocessors of a device, asked once per device.
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

// The strip kernel's launch: centre columns a thread (its build), threads a block, gradient
// rows a band, and the strips and bands of a plane.
struct StripPlan {
  int columns, threads, rows, strips, bands;
};

// Picks the plan with the fewest streamed rows on the busiest multiprocessor. A build keeps a
// fixed number of warps resident on an SM, set by its registers: 8 with two columns a thread
// (~230 registers), 16 with one (128). So the planner tries blocks of a quarter or half of
// them (64 or 128 threads with two columns, 128 or 256 with one: whole warps on each of the 4
// schedulers; 32 and 96 threads left schedulers idle, 1.2-1.6x slower on an H100), and a launch
// runs in waves of (resident blocks x SMs) blocks, each as long as its band: rows + 20 input
// rows. Cost = waves x (rows + 20). On the H100 sweep of 2026-11-27 (ssim_gpu_check.py
// --strip-sweep) it picks the fastest of the plans tried at 1x3x1080x1920 (128 threads x 99
// rows, one wave: 0.112 ms) and 1x3x2160x3840 (128 x 197, two waves: 0.412 ms, against 0.426
// to 0.491 for bands of 64 to 432 rows).
// EPBAN_SSIM_CUDA_STRIP_COLUMNS (1 or 2, default 2), EPBAN_SSIM_CUDA_STRIP_THREADS (a multiple
// of 32 in [64, 256] / columns) and EPBAN_SSIM_CUDA_STRIP_ROWS force a choice (for sweeps and
// tests). The plan of the last shape is kept: a training loop asks for the same one each step.
StripPlan plan_strips(int64_t planes, int64_t height, int64_t width, int sms) {
  const int forced_columns = positive_setting("EPBAN_SSIM_CUDA_STRIP_COLUMNS");
  const int forced_threads = positive_setting("EPBAN_SSIM_CUDA_STRIP_THREADS");
  const int forced_rows = positive_setting("EPBAN_SSIM_CUDA_STRIP_ROWS");
  TORCH_CHECK(forced_columns <= 2, "EPBAN_SSIM_CUDA_STRIP_COLUMNS must be 1 or 2, got ", forced_columns);
  const int columns = forced_columns ? forced_columns : 2;
  const int min_threads = columns == 2 ? StripShape<2>::kMinThreads : StripShape<1>::kMinThreads;
  const int max_threads = columns == 2 ? StripShape<2>::kMaxThreads : StripShape<1>::kMaxThreads;
  TORCH_CHECK(forced_threads == 0 || (forced_threads % 32 == 0 && forced_threads >= min_threads &&
                                      forced_threads <= max_threads),
              "EPBAN_SSIM_CUDA_STRIP_THREADS must be a multiple of 32 in [", min_threads, ", ", max_threads,
              "] with ", columns, " column(s) a thread, got ", forced_threads);
  struct Cached {
    int64_t key[7] = {-1, -1, -1, -1, -1, -1, -1};
    StripPlan plan{};
  };
  thread_local Cached cached;
  const int64_t key[7] = {planes, height, width, sms, columns, forced_threads, forced_rows};
  if (std::equal(key, key + 7, cached.key)) return cached.plan;

  constexpr int kMinRows = 4;
  // Warps an SM holds: what __launch_bounds__(kMaxThreads, kMinBlocks) sizes the registers for.
  const int resident_warps = StripShape<2>::kMinBlocks * max_threads / 32;
  // The balanced block sizes, larger first (a tie keeps the wider strip: less horizontal
  // halo), or the forced one.
  const int sizes[2] = {forced_threads ? forced_threads : max_threads, forced_threads ? 0 : max_threads / 2};
  StripPlan best{columns, 0, 0, 0, 0};
  int64_t best_cost = 0;
  for (const int nt : sizes) {
    if (nt == 0) continue;
    const int centres = columns * nt;
    const int64_t strips = (width + centres - 2 * kHalo - 1) / (centres - 2 * kHalo);
    const int64_t per_wave = static_cast<int64_t>(sms) * std::max(1, resident_warps / (nt / 32));
    const int64_t most_bands = forced_rows ? 1 : std::min<int64_t>((height + kMinRows - 1) / kMinRows, 1024);
    for (int64_t tried = 1; tried <= most_bands; ++tried) {
      const int64_t rows = forced_rows ? std::min<int64_t>(forced_rows, height) : (height + tried - 1) / tried;
      const int64_t bands = (height + rows - 1) / rows;
      const int64_t waves = (planes * strips * bands + per_wave - 1) / per_wave;
      const int64_t cost = waves * (rows + 4 * kHalo);
      if (best.threads == 0 || cost < best_cost) {
        best = StripPlan{columns, nt, static_cast<int>(rows), static_cast<int>(strips), static_cast<int>(bands)};
        best_cost = cost;
      }
    }
  }
  std::copy(key, key + 7, cached.key);
  cached.plan = best;
  return best;
}

at::Tensor forward_cuda(const at::Tensor& x_in, const at::Tensor& y_in, double c1, double c2, bool same_padding,
                        bool want_map) {
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
  if (blocks > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_input_dtype(x.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      if (want_map) {
        EPBAN_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, ssim_forward_kernel<scalar_t, true>)(
            x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), a, map.data_ptr<float>(), nullptr);
      } else {
        EPBAN_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, ssim_forward_kernel<scalar_t, false>)(
            x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), a, nullptr, partial.data_ptr<float>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (want_map) return map;
  at::Tensor out = at::empty({g.batch}, fopts);
  if (g.batch > 0) {
    EPBAN_LAUNCH(static_cast<unsigned>(g.batch), kThreads, 0, c10::cuda::getCurrentCUDAStream(), ssim_finish_kernel)(
        partial.data_ptr<float>(), blocks / g.batch, 1.0 / static_cast<double>(g.count()), out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

at::Tensor ssim_per_image_cuda(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding) {
  return forward_cuda(x, y, c1, c2, same_padding, /*want_map=*/false);
}

at::Tensor ssim_map_cuda(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding) {
  return forward_cuda(x, y, c1, c2, same_padding, /*want_map=*/true);
}

// The backward over every gradient pixel: the tile kernel (32 columns by 32 or 64 rows), or the
// strip kernel when selected and the upstream gradient is per image (ssim.h: grad_in
// undefined is the one-pass mode).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gradient_pass_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                  const at::Tensor& y_in, double c1, double c2,
                                                                  bool same_padding, bool grad_x, bool grad_y,
                                                                  bool batch_mean, double scale) {
  const Geometry g = make_geometry(x_in, y_in, same_padding);
  check_cuda_inputs(x_in, y_in);
  const bool with_value = !grad_in.defined();
  TORCH_CHECK(with_value || !batch_mean, "ssim_per_image_and_grad: batch_mean needs no upstream gradient");
  TORCH_CHECK(with_value || scale == 1.0, "ssim_per_image_and_grad: scale needs no upstream gradient");
  const bool map_grad = !with_value && check_grad_shape(grad_in, g);
  TORCH_CHECK(with_value || grad_in.device() == x_in.device(), "ssim_backward: grad must be on the inputs' device");
  // The forward's value when no kernel pass gives it: per image, or their batch mean.
  const auto forward_value = [&]() {
    return scaled_value<ssim_per_image_cuda>(x_in, y_in, c1, c2, same_padding, batch_mean, scale);
  };
  if (with_value && !(grad_x || grad_y)) {
    return {forward_value(), at::empty({0}, x_in.options()), at::empty({0}, y_in.options())};
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  at::Tensor gx = at::empty(grad_x ? x.sizes() : at::IntArrayRef{0}, x.options());
  at::Tensor gy = at::empty(grad_y ? y.sizes() : at::IntArrayRef{0}, y.options());
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor value = with_value ? at::empty(batch_mean ? at::IntArrayRef{} : at::IntArrayRef{g.batch}, fopts)
                                : at::Tensor();
  if (!(grad_x || grad_y)) return {value, gx, gy};
  GradView gv{nullptr, {0, 0, 0, 0}};
  at::Tensor grad;
  if (!with_value) {
    grad = grad_in.to(at::kFloat);  // float32 already for the op's own outputs: no copy
    gv.data = grad.data_ptr<float>();
    for (int64_t d = 0; d < grad.dim(); ++d) gv.stride[d] = grad.stride(d);
  }
  const bool strip = !map_grad && strip_backward_selected(g.height, g.width);  // map gradients: the tiles
  const int tile_rows = strip ? kTile : tile_rows_for(g.height);
  Args a = make_args(g, c1, c2, /*centre_tiles=*/false, tile_rows);
  StripPlan plan{};
  if (strip && g.planes() > 0) {
    plan = plan_strips(g.planes(), g.height, g.width, multiprocessor_count(x.get_device()));
    TORCH_CHECK(g.planes() * plan.strips * plan.bands < (int64_t(1) << 31), "ssim (CUDA kernel): input too large");
    a.tiles_x = plan.strips;
    a.tiles_y = plan.bands;
    a.block_rows = plan.rows;
  }
  const int64_t blocks = g.planes() * a.tiles_x * a.tiles_y;
  if (blocks == 0) {  // no planes: the forward's answer for the value
    if (with_value) value = forward_value();
    return {value, gx, gy};
  }
  at::Tensor partial = with_value ? at::empty({blocks}, fopts) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Each map pixel's share of an image's upstream gradient (1 / count; the batch mean's is 1 / B
  // of it), times scale: in the one-pass mode the gradients and the value are scale x the SSIM's.
  const double count = static_cast<double>(g.count()) * (batch_mean ? static_cast<double>(g.batch) : 1.0);
  const float pixel_share = static_cast<float>(scale / count);
  dispatch_input_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* gx_data = grad_x ? gx.data_ptr<scalar_t>() : nullptr;
    scalar_t* gy_data = grad_y ? gy.data_ptr<scalar_t>() : nullptr;
    float* partial_data = with_value ? partial.data_ptr<float>() : nullptr;
    const auto launch = [&](auto tile, auto wanted) {
      using Tile = decltype(tile);
      constexpr int kWanted = decltype(wanted)::value;
      if constexpr (std::is_same_v<Tile, StripPlan>) {
        constexpr int kPlanes = kWanted == kWantBoth ? 4 : 3;
        const size_t smem = strip_smem_bytes(plan.columns * plan.threads, kPlanes);
        const auto launch_strip = [&](auto kernel) {
          EPBAN_LAUNCH(static_cast<unsigned>(blocks), plan.threads, smem, stream, kernel)(
              x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), a, gv.data, gv.stride[0], pixel_share, g.channels,
              gx_data, gy_data, partial_data);
        };
        if (plan.columns == 2) {
          launch_strip(ssim_strip_kernel<scalar_t, kWanted, 2>);
        } else {
          launch_strip(ssim_strip_kernel<scalar_t, kWanted, 1>);
        }
      } else {
        allow_backward_smem<Tile, scalar_t, kWanted>(x.get_device());
        EPBAN_LAUNCH(static_cast<unsigned>(blocks), Tile::kThreads, Tile::kSmemBytes, stream,
                     ssim_backward_kernel<Tile, scalar_t, kWanted>)(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                                                    a, gv, map_grad, pixel_share, g.channels, gx_data,
                                                                    gy_data, partial_data);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const auto launch_wanted = [&](auto tile) {
      if (grad_x && grad_y) {
        launch(tile, std::integral_constant<int, kWantBoth>{});
      } else if (grad_x) {
        launch(tile, std::integral_constant<int, kWantX>{});
      } else {
        launch(tile, std::integral_constant<int, kWantY>{});
      }
    };
    if (strip) {
      launch_wanted(plan);
    } else if (tile_rows == TallTile::kRows) {
      launch_wanted(TallTile{});
    } else {
      launch_wanted(ShortTile{});
    }
  });
  if (with_value && g.batch > 0) {
    // One sum per image, or one over the batch (the blocks of each image are contiguous).
    const int64_t sums = batch_mean ? 1 : g.batch;
    EPBAN_LAUNCH(static_cast<unsigned>(sums), kThreads, 0, stream, ssim_finish_kernel)(
        partial.data_ptr<float>(), blocks / sums, scale / count, value.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {value, gx, gy};
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
    EPBAN_LAUNCH(static_cast<unsigned>(images * blocks_per_image), kThreads, 0, stream, kernel)(
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
