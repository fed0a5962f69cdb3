// The CUDA strip backward (ssim_cuda.cuh) and the planner of its launch: the outputs of the
// tile kernel (ssim_backward_kernel) for a per-image upstream gradient (the one pass of
// training, and ssim_backward with a (B,) gradient; a map gradient takes the tiles), with no
// vertical halo to recompute.
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
// (scripts/dev/ssim_sass_count.py prints them for every instance): with one column ~372 (167
// FFMA: 44 horizontal moments, 44 vertical, 33 + 33 for the partials' two filters, the
// formula's and the combine's; 33 FMUL, 11 FADD; 33 shared loads; ~117 integer, branch and
// address); with two columns ~569, 284 a column (the horizontal passes read 12 inputs for two
// outputs, and the step's address and control work is shared). A gradient pixel costs
// (rows + 20) / rows x centres / (centres - 10) column-steps: 1.15 at 1x3x2160x3840, 1.25 at
// 1x3x1080x1920, 1.34 at 16x3x256x256 with plan_strips' plans for 132 SMs; the tall tile issues
// about 1.5x the strip kernel's instructions per pixel. The strip kernel holds fewer warps an
// SM (8 with two columns a thread), so it cannot hide a load issued just before its barrier:
// the x, y of step (c) are loaded a step ahead.
//
// The two builds of the strip kernel: kC adjacent centre columns a thread. One column: up to
// 256 threads of at most 128 registers (16 warps an SM). Two: up to 128 threads of ~240
// registers (8 warps an SM), but the horizontal passes read 12 inputs for 2 outputs instead
// of 11 for 1, and the per-step address and control work is shared by two columns.
#include "ssim/ssim_cuda.cuh"

#include <algorithm>
#include <atomic>

namespace epban {
namespace ssim {
namespace {

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

template <typename scalar_t, int kWanted, int kC, bool kLuminance>
__global__ void __launch_bounds__(StripShape<kC>::kMaxThreads, StripShape<kC>::kMinBlocks)
    ssim_strip_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, Args a,
                      const float* __restrict__ grad, int64_t grad_stride, float pixel_share, int64_t channels,
                      scalar_t* __restrict__ gx, scalar_t* __restrict__ gy, float* __restrict__ partial,
                      float l1_share, float* __restrict__ l1_partial) {
  // grad: the per-image upstream gradient (stride grad_stride), or nullptr in the one-pass
  // mode (the op's scale per image, in pixel_share; partial then gets each block's sum of
  // SSIM values, as in ssim_backward_kernel). a.tiles_x strips and a.tiles_y bands of
  // a.block_rows rows a plane. l1_partial != nullptr: the L1 term, as in ssim_backward_kernel
  // (l1_share sign(x - y) added to the gradients, each block's sum of |x - y| over the pixels
  // it writes into l1_partial[blockIdx.x]).
  constexpr int kPlanes = kWanted == kWantBoth ? 4 : 3;
  constexpr int kTaps = StripShape<kC>::kTaps;
  const int nt = static_cast<int>(blockDim.x);
  const int centres = kC * nt;              // centre columns of the strip
  const int cols = centres - 2 * kHalo;     // gradient columns
  const int in_cols = centres + 2 * kHalo;  // input columns
  SSIM_DYNAMIC_SHARED(float, smem);
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
  float l1_sum = 0.f;
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
        // just before the barrier, the warps would wait for them after it (8 warps an SM
        // cannot cover a load)
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
            float lx = 0.f;  // the L1 term's gradient of x (minus that of y)
            if (l1_partial) {  // block-uniform
              const float dv = xv - yv;
              lx = dv > 0.f ? l1_share : (dv < 0.f ? -l1_share : 0.f);
              l1_sum += fabsf(dv);
            }
            if (kWanted == kWantBoth) {
              gx[idx] = static_cast<scalar_t>(d[0] + 2.f * xv * d[2] + yv * d[3] + lx);
              gy[idx] = static_cast<scalar_t>(d[1] + 2.f * yv * d[2] + xv * d[3] - lx);
            } else if (kWanted == kWantX) {
              gx[idx] = static_cast<scalar_t>(d[0] + 2.f * xv * d[1] + yv * d[2] + lx);
            } else {
              gy[idx] = static_cast<scalar_t>(d[0] + 2.f * yv * d[1] + xv * d[2] - lx);
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
                d = ssim_partials<kLuminance>(m[0], m[1], m[2], m[3], a.c1, a.c2, g);
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
  if (l1_partial) {  // block-uniform
#pragma unroll
    for (int off = 16; off > 0; off /= 2) l1_sum += __shfl_down_sync(0xffffffffu, l1_sum, off);
    __syncthreads();  // s_warp may still be read by thread 0 above
    if (t % 32 == 0) s_warp[t / 32] = l1_sum;
    __syncthreads();
    if (t == 0) {
      float total = 0.f;
      for (int w = 0; w < nt / 32; ++w) total += s_warp[w];
      l1_partial[blockIdx.x] = total;
    }
  }
}

// The plan forced by force_strip_plan (0: the planner's choice), for every later launch.
struct ForcedPlan {
  std::atomic<int> columns{0}, threads{0}, rows{0};
};

ForcedPlan& forced_plan() {
  static ForcedPlan forced;
  return forced;
}

}  // namespace

void force_strip_plan(int64_t columns, int64_t threads, int64_t rows) {
  TORCH_CHECK(columns >= 0 && columns <= 2, "force_strip_plan: columns must be 0 (the planner's), 1 or 2, got ",
              columns);
  const int build = columns ? static_cast<int>(columns) : 2;
  const int min_threads = build == 2 ? StripShape<2>::kMinThreads : StripShape<1>::kMinThreads;
  const int max_threads = build == 2 ? StripShape<2>::kMaxThreads : StripShape<1>::kMaxThreads;
  TORCH_CHECK(threads == 0 || (threads % 32 == 0 && threads >= min_threads && threads <= max_threads),
              "force_strip_plan: threads must be 0 (the planner's) or a multiple of 32 in [", min_threads, ", ",
              max_threads, "] with ", build, " column(s) a thread, got ", threads);
  TORCH_CHECK(rows >= 0 && rows < (int64_t(1) << 30), "force_strip_plan: rows must be 0 (the planner's) or positive, got ",
              rows);
  ForcedPlan& forced = forced_plan();
  forced.columns.store(static_cast<int>(columns), std::memory_order_relaxed);
  forced.threads.store(static_cast<int>(threads), std::memory_order_relaxed);
  forced.rows.store(static_cast<int>(rows), std::memory_order_relaxed);
}

// Picks the plan with the fewest streamed rows on the busiest multiprocessor. A build keeps a
// fixed number of warps resident on an SM, set by its registers: 8 with two columns a thread
// (~230 registers), 16 with one (128). So the planner tries blocks of a quarter or half of
// them (64 or 128 threads with two columns, 128 or 256 with one: whole warps on each of the 4
// schedulers; blocks of 32 and 96 threads leave schedulers idle), and a launch runs in waves of
// (resident blocks x SMs) blocks, each as long as its band: rows + 20 input rows. Cost = waves x
// (rows + 20). For 132 SMs it picks 128 threads x 99 rows (one wave) at 1x3x1080x1920 and
// 128 x 197 (two waves) at 1x3x2160x3840; scripts/dev/ssim_gpu_check.py --strip-sweep times
// these against forced plans. force_strip_plan overrides any part of the choice. The plan of
// the last shape is kept: a training loop asks for the same one each step.
StripPlan plan_strips(int64_t planes, int64_t height, int64_t width, int sms) {
  const ForcedPlan& forced = forced_plan();
  const int forced_columns = forced.columns.load(std::memory_order_relaxed);
  const int forced_threads = forced.threads.load(std::memory_order_relaxed);
  const int forced_rows = forced.rows.load(std::memory_order_relaxed);
  const int columns = forced_columns ? forced_columns : 2;
  const int max_threads = columns == 2 ? StripShape<2>::kMaxThreads : StripShape<1>::kMaxThreads;
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

void launch_strip_backward(const BackwardLaunch& l, const StripPlan& plan) {
  TORCH_CHECK(!l.map_grad, "ssim (CUDA kernel): the strip backward takes per-image gradients only");
  dispatch_input_dtype(l.x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* gx = l.grad_x ? l.gx.data_ptr<scalar_t>() : nullptr;
    scalar_t* gy = l.grad_y ? l.gy.data_ptr<scalar_t>() : nullptr;
    dispatch_wanted(l.grad_x, l.grad_y, [&](auto wanted) {
      constexpr int kWanted = decltype(wanted)::value;
      constexpr int kPlanes = kWanted == kWantBoth ? 4 : 3;
      const size_t smem = strip_smem_bytes(plan.columns * plan.threads, kPlanes);
      const auto launch = [&](auto kernel) {
        SSIM_LAUNCH(static_cast<unsigned>(l.blocks), plan.threads, smem, l.stream, kernel)(
            l.x.data_ptr<scalar_t>(), l.y.data_ptr<scalar_t>(), l.a, l.grad.data, l.grad.stride[0], l.pixel_share,
            l.channels, gx, gy, l.partial, l.l1_share, l.l1_partial);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      dispatch_luminance(l.luminance, tag, [&](auto luminance) {
        constexpr bool kLuminance = decltype(luminance)::value;
        if (plan.columns == 2) {
          launch(ssim_strip_kernel<scalar_t, kWanted, 2, kLuminance>);
        } else {
          launch(ssim_strip_kernel<scalar_t, kWanted, 1, kLuminance>);
        }
      });
    });
  });
}

}  // namespace ssim
}  // namespace epban
