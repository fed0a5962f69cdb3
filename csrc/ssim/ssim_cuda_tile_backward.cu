// The CUDA tile backward (ssim_cuda.cuh): one block per tile of gradient pixels, 32 columns
// by 32 or 64 rows (BwdTile; the taller tile for tall images: less halo per pixel). A block
// recomputes the moments of the 42 x (rows + 10) centres that reach its tile from the inputs
// with a 10-pixel halo, turns them into the partials times the upstream gradient, filters
// those horizontally then vertically and combines them with x, y at each pixel. It serves
// every upstream gradient: per image, the map's (read through its strides), and the one-pass
// mode's.
//
// Per block of the 32x32 tile, counted per thread from the passes (256 threads): loads ~330,
// horizontal moments 2 rounds x ~340 (364 runs of 6), moments + partials ~700, filtered
// partials 2 rounds x ~250 (336 runs of 4), vertical + combine ~260: ~2,470, i.e. ~20 K warp
// instructions a block. The halo costs the 32x32 tile 2.6x on inputs and 1.7x on centres,
// the 32x64 tile 2.1x and 1.5x.
#include "ssim/ssim_cuda.cuh"

#include <atomic>

namespace epban {
namespace ssim {
namespace {

// A tile is 32 gradient columns by kRows rows (BwdTile below). Shared-memory pitches are odd
// where a warp's lanes walk down rows: no bank conflicts. Region A: inputs 2 x (kRows + 20) x
// 52 (pitch 53), then partials 4 x (kRows + 10) x 42 (pitch 43). Region B: horizontal moment
// sums 4 x (kRows + 20) rows x 42 (pitch 43), then horizontally filtered partials
// 4 x (kRows + 10) rows x 32 (pitch 33).
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
// 74 rows only. 64 rows divide the heights of SR training crops (128 to 512, 1024).
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
                "shared memory per SM (sm_90)");
};
using ShortTile = BwdTile<32>;
using TallTile = BwdTile<64>;

template <typename Tile, typename scalar_t, int kWanted, bool kLuminance>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kMinBlocks)
    ssim_backward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, Args a,
                         GradView grad, bool map_grad, float pixel_share, int64_t channels,
                         scalar_t* __restrict__ gx, scalar_t* __restrict__ gy, float* __restrict__ partial,
                         float l1_share, float* __restrict__ l1_partial) {
  // partial != nullptr: the one-pass mode of ssim_per_image_and_grad. The upstream gradient
  // is the op's scale per image (in pixel_share; grad is not read) and the block also sums
  // the SSIM values of the centres inside its own tile (tiles partition the image, so each
  // centre is summed once) into partial[blockIdx.x], which ssim_finish_kernel turns into the
  // per-image mean.
  // l1_partial != nullptr (one-pass mode with an L1 term): l1_share sign(x - y) is added to the
  // x gradient (minus, to y's) of each pixel, and the block's sum of |x - y| over its own
  // pixels goes to l1_partial[blockIdx.x].
  // kWanted: the gradients written (gx, gy or both; the others' pointers are not read).
  // Partial planes: both: d_mx, d_my, d_e2, d_exy; one: d_mx or d_my, then d_e2, d_exy.
  constexpr int kPlanes = kWanted == kWantBoth ? 4 : 3;
  constexpr int kNT = Tile::kThreads;
  constexpr int kRows = Tile::kRows;
  SSIM_DYNAMIC_SHARED(float, smem);
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
        d = ssim_partials<kLuminance>(acc[o][0], acc[o][1], acc[o][2], acc[o][3], a.c1, a.c2, g);
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
  float l1_sum = 0.f;
#pragma unroll
  for (int o = 0; o < 4; ++o) {
    const int r = row0 + ty * 4 + o;
    if (c >= width || r >= height) break;
    const int64_t idx = plane * n + r * width + c;
    const float xv = static_cast<float>(x[idx]);
    const float yv = static_cast<float>(y[idx]);
    float lx = 0.f;  // the L1 term's gradient of x (minus that of y)
    if (l1_partial) {  // block-uniform
      const float dv = xv - yv;
      lx = dv > 0.f ? l1_share : (dv < 0.f ? -l1_share : 0.f);
      l1_sum += fabsf(dv);
    }
    if (kWanted == kWantBoth) {
      gx[idx] = static_cast<scalar_t>(acc[o][0] + 2.f * xv * acc[o][2] + yv * acc[o][3] + lx);
      gy[idx] = static_cast<scalar_t>(acc[o][1] + 2.f * yv * acc[o][2] + xv * acc[o][3] - lx);
    } else if (kWanted == kWantX) {
      gx[idx] = static_cast<scalar_t>(acc[o][0] + 2.f * xv * acc[o][1] + yv * acc[o][kPlanes - 1] + lx);
    } else {
      gy[idx] = static_cast<scalar_t>(acc[o][0] + 2.f * yv * acc[o][1] + xv * acc[o][kPlanes - 1] - lx);
    }
  }
  if (l1_partial) {  // block-uniform; every lane is here (no early return above)
#pragma unroll
    for (int off = 16; off > 0; off /= 2) l1_sum += __shfl_down_sync(0xffffffffu, l1_sum, off);
    if (threadIdx.x % 32 == 0) s_warp[threadIdx.x / 32] = l1_sum;  // free since step 4's sync
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < kNT / 32; ++w) total += s_warp[w];
      l1_partial[blockIdx.x] = total;
    }
  }
}

// Lifts the backward kernel's dynamic shared-memory limit to Tile::kSmemBytes, once per
// device and kernel instance (a driver call per launch costs microseconds of host time).
template <typename Tile, typename scalar_t, int kWanted, bool kLuminance>
void allow_backward_smem(int device) {
  static std::atomic<uint64_t> done{0};  // one bit per device index < 64
  const uint64_t bit = device >= 0 && device < 64 ? uint64_t(1) << device : 0;
  if (bit && (done.load(std::memory_order_acquire) & bit)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(ssim_backward_kernel<Tile, scalar_t, kWanted, kLuminance>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(Tile::kSmemBytes)));
  done.fetch_or(bit, std::memory_order_release);
}

}  // namespace

// The tile with the fewer warp instructions in all, from the count per tile (~15 K warp
// instructions for 32x32, ~26 K for 32x64, scaled from the count above by each step's runs).
int tile_rows_for(int64_t height) {
  const int64_t short_cost = 15 * ((height + ShortTile::kRows - 1) / ShortTile::kRows);
  const int64_t tall_cost = 26 * ((height + TallTile::kRows - 1) / TallTile::kRows);
  return tall_cost < short_cost ? TallTile::kRows : ShortTile::kRows;
}

void launch_tile_backward(const BackwardLaunch& l) {
  const auto launch = [&](auto tile, auto tag, auto wanted, auto luminance) {
    using Tile = decltype(tile);
    using scalar_t = decltype(tag);
    constexpr int kWanted = decltype(wanted)::value;
    constexpr bool kLuminance = decltype(luminance)::value;
    allow_backward_smem<Tile, scalar_t, kWanted, kLuminance>(l.x.get_device());
    scalar_t* gx = l.grad_x ? l.gx.data_ptr<scalar_t>() : nullptr;
    scalar_t* gy = l.grad_y ? l.gy.data_ptr<scalar_t>() : nullptr;
    SSIM_LAUNCH(static_cast<unsigned>(l.blocks), Tile::kThreads, Tile::kSmemBytes, l.stream,
                ssim_backward_kernel<Tile, scalar_t, kWanted, kLuminance>)(
        l.x.data_ptr<scalar_t>(), l.y.data_ptr<scalar_t>(), l.a, l.grad, l.map_grad, l.pixel_share, l.channels, gx,
        gy, l.partial, l.l1_share, l.l1_partial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  TORCH_CHECK(l.a.block_rows == ShortTile::kRows || l.a.block_rows == TallTile::kRows,
              "ssim (CUDA kernel): tiles have 32 or 64 rows, got ", l.a.block_rows);
  dispatch_input_dtype(l.x.scalar_type(), [&](auto tag) {
    dispatch_wanted(l.grad_x, l.grad_y, [&](auto wanted) {
      dispatch_luminance(l.luminance, tag, [&](auto luminance) {
        if (l.a.block_rows == TallTile::kRows) {
          launch(TallTile{}, tag, wanted, luminance);
        } else {
          launch(ShortTile{}, tag, wanted, luminance);
        }
      });
    });
  });
}

}  // namespace ssim
}  // namespace epban
