// Fused SSIM on the CPU: forward (per-image sums or the map) and backward (both inputs).
//
// Work is split into (plane, row band) tasks run by at::parallel_for (OpenMP). Within a
// task the image is streamed one row at a time; every inner loop runs along a row and is
// vectorised (`omp simd`), and each row kernel is built for the baseline x86-64 ISA, for
// AVX2+FMA and for AVX-512, picked at run time: the default build stays portable.
//
// Forward, per centre row: the vertical 11-tap sums of u, v, u^2, v^2 (u = x + y,
// v = x - y: ssim_math.h) over all columns into four row buffers, then the horizontal
// 11-tap sums and the SSIM formula per centre. (4 + 4) x 11 multiply-adds + 4 x 11 for
// forming u, v and their weighted values + ~20 for the formula, about 150 FLOPs per pixel;
// the rows it reads stay in L2. No full-size buffer.
// Backward, per gradient row p: the partials of the centre rows p-5..p+5 (a ring of 11
// rows, each computed once per band: its moments as in the forward, then ssim_partials),
// their vertical then horizontal 11-tap sums, and the combination of ssim_math.h.
// About 2.5x the forward's FLOPs; the only full-size buffers are the gradients.
// One pass (ssim_per_image_and_grad, training with reduction mean/none): the backward with
// an upstream gradient of 1 per image also sums the SSIM values of the centre rows each
// band owns, from the moments it computes anyway: the forward's work is saved.
// Half inputs are converted to float32 first; float32 accumulates in float32 (rows are
// summed in double for the per-image mean), float64 in float64.
#include "ssim/ssim.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace epban {
namespace ssim {

namespace {

#if defined(__GNUC__)
#define SSIM_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define SSIM_ALWAYS_INLINE inline
#endif

#if defined(__GNUC__) && defined(__x86_64__)
#define SSIM_CPU_DISPATCH_AVX2 1
#define SSIM_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define SSIM_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
#endif

template <typename T>
struct Taps {
  T w[kWin];
  Taps() {
    for (int k = 0; k < kWin; ++k) w[k] = static_cast<T>(kGauss[k]);
  }
};

// Everything one (plane, row band) task needs. Row buffers have pitch width + 2 kHalo:
// column j of the image sits at index j + kHalo, the pads stay zero (zero padding).
template <typename T>
struct Plane {
  const T* x;
  const T* y;
  int64_t height, width, pitch;
  int64_t first, last_row, last_col;  // active centres: [first, last_row) x [first, last_col)
  T c1, c2;
  bool luminance;  // false: the contrast-structure term alone (MS-SSIM; ssim_math.h)
};

// Vertical 11-tap sums of u, v, u^2, v^2 (u = x + y, v = x - y) for centre row r, all columns.
template <typename T>
SSIM_ALWAYS_INLINE void vertical_moments(const Plane<T>& p, int64_t r, const T* zero_row, const Taps<T>& taps,
                                          T* __restrict vu, T* __restrict vv, T* __restrict vuu, T* __restrict vvv) {
  const T* xr[kWin];
  const T* yr[kWin];
  for (int k = 0; k < kWin; ++k) {
    const int64_t row = r - kHalo + k;
    const bool inside = row >= 0 && row < p.height;
    xr[k] = inside ? p.x + row * p.width : zero_row;
    yr[k] = inside ? p.y + row * p.width : zero_row;
  }
  const int64_t w = p.width;
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) {
    T su = 0, sv = 0, suu = 0, svv = 0;
#pragma GCC unroll 11
    for (int k = 0; k < kWin; ++k) {
      const T u = xr[k][j] + yr[k][j];
      const T v = xr[k][j] - yr[k][j];
      const T gu = taps.w[k] * u;
      const T gv = taps.w[k] * v;
      su += gu;
      sv += gv;
      suu += gu * u;
      svv += gv * v;
    }
    vu[kHalo + j] = su;
    vv[kHalo + j] = sv;
    vuu[kHalo + j] = suu;
    vvv[kHalo + j] = svv;
  }
}

// Horizontal 11-tap sum at centre column c of a padded row buffer.
template <typename T>
SSIM_ALWAYS_INLINE T horizontal_tap(const T* v, int64_t c, const Taps<T>& taps) {
  T s = 0;
#pragma GCC unroll 11
  for (int k = 0; k < kWin; ++k) s += taps.w[k] * v[c + k];
  return s;
}

template <typename T>
struct ForwardBuffers {
  std::vector<T> v, zero;
  explicit ForwardBuffers(int64_t pitch, int64_t width) : v(4 * pitch, T(0)), zero(width, T(0)) {}
};

// The SSIM (kLuminance) or contrast-structure values of one centre row from its vertical sums:
// written to out (non-null) or summed.
template <bool kLuminance, typename T>
SSIM_ALWAYS_INLINE T forward_row(const Plane<T>& p, const T* vu, const T* vv, const T* vuu, const T* vvv,
                                 const Taps<T>& taps, T* out) {
  const int64_t c0 = p.first, c1 = p.last_col;
  T row_sum = 0;
  if (out) {
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) {
      out[c] = ssim_value<kLuminance>(horizontal_tap(vu, c, taps), horizontal_tap(vv, c, taps),
                                      horizontal_tap(vuu, c, taps), horizontal_tap(vvv, c, taps), p.c1, p.c2);
    }
  } else {
#pragma omp simd reduction(+ : row_sum)
    for (int64_t c = c0; c < c1; ++c) {
      row_sum += ssim_value<kLuminance>(horizontal_tap(vu, c, taps), horizontal_tap(vv, c, taps),
                                        horizontal_tap(vuu, c, taps), horizontal_tap(vvv, c, taps), p.c1, p.c2);
    }
  }
  return row_sum;
}

// Centre rows [r0, r1) of one plane. Writes the map rows (map != nullptr) or returns the sum.
template <bool kLuminance, typename T>
SSIM_ALWAYS_INLINE double forward_rows_impl(const Plane<T>& p, int64_t r0, int64_t r1, T* map, int64_t map_w,
                                             ForwardBuffers<T>& buf) {
  const Taps<T> taps;
  T* vu = buf.v.data();
  T* vv = vu + p.pitch;
  T* vuu = vv + p.pitch;
  T* vvv = vuu + p.pitch;
  double total = 0;
  for (int64_t r = r0; r < r1; ++r) {
    vertical_moments(p, r, buf.zero.data(), taps, vu, vv, vuu, vvv);
    T* out = map ? map + (r - p.first) * map_w - p.first : nullptr;
    total += static_cast<double>(forward_row<kLuminance>(p, vu, vv, vuu, vvv, taps, out));
  }
  return total;
}

template <typename T>
struct BackwardBuffers {
  std::vector<T> v;     // four moment rows
  std::vector<T> ring;  // 11 slots x 4 partial rows (d_mx, d_my, d_e2, d_exy)
  std::vector<T> acc;   // four vertically filtered partial rows
  std::vector<T> zero;  // a zero partial row, pitch long
  std::vector<T> gconst;  // the per-image upstream gradient, one row
  BackwardBuffers(int64_t pitch, int64_t width)
      : v(4 * pitch, T(0)), ring(kWin * 4 * pitch, T(0)), acc(4 * pitch, T(0)), zero(pitch, T(0)), gconst(width) {}
};

// The partials (times the upstream gradient) of centre row r into its ring slot; inactive
// columns stay zero. grow[c]: the upstream gradient at centre column c. With kValue, also
// returns the row's sum of SSIM values (the forward's work, from the same moments).
// (A function, not a lambda: lambdas do not inherit the caller's target ISA.)
template <bool kValue, bool kLuminance, typename T>
SSIM_ALWAYS_INLINE T partials_row(const Plane<T>& p, int64_t r, const T* grow, const Taps<T>& taps,
                                   BackwardBuffers<T>& buf) {
  const int64_t pitch = p.pitch;
  T* vu = buf.v.data();
  T* vv = vu + pitch;
  T* vuu = vv + pitch;
  T* vvv = vuu + pitch;
  vertical_moments(p, r, buf.zero.data(), taps, vu, vv, vuu, vvv);
  T* slot = buf.ring.data() + (r % kWin) * 4 * pitch;
  T* __restrict pmx = slot;
  T* __restrict pmy = slot + pitch;
  T* __restrict pe2 = slot + 2 * pitch;
  T* __restrict pexy = slot + 3 * pitch;
  const int64_t c0 = p.first, c1 = p.last_col;
  T row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
  for (int64_t c = c0; c < c1; ++c) {
    const SsimPartials<T> d =
        ssim_partials<kLuminance>(horizontal_tap(vu, c, taps), horizontal_tap(vv, c, taps),
                                  horizontal_tap(vuu, c, taps), horizontal_tap(vvv, c, taps), p.c1, p.c2, grow[c]);
    pmx[kHalo + c] = d.d_mx;
    pmy[kHalo + c] = d.d_my;
    pe2[kHalo + c] = d.d_e2;
    pexy[kHalo + c] = d.d_exy;
    if (kValue) row_sum += d.s;
  }
  return row_sum;
}

// Centre row r's partials and, when the band owns the row (with_value), its SSIM values
// added to `values`. A function, not a lambda, for the reason above.
template <bool kLuminance, typename T>
SSIM_ALWAYS_INLINE void centre_row(const Plane<T>& p, int64_t r, const T* grow, const Taps<T>& taps,
                                    BackwardBuffers<T>& buf, bool with_value, double& values) {
  if (with_value) {
    values += static_cast<double>(partials_row<true, kLuminance>(p, r, grow, taps, buf));
  } else {
    partials_row<false, kLuminance>(p, r, grow, taps, buf);
  }
}

// One gradient row with the L1 term: the SSIM combination plus l1_grad sign(x - y) (minus for
// y; sign(0) = 0, as PyTorch's), and the row's sum of |x - y| added to l1_sum. A function, not
// a lambda, for the reason above.
template <typename T>
SSIM_ALWAYS_INLINE void l1_rows(const T* xrow, const T* yrow, int64_t w, T l1_grad, T* gxr, T* gyr, const Taps<T>& taps,
                                const T* amx, const T* amy, const T* ae2, const T* aexy, double& l1_sum) {
  T row_abs = 0;
  if (gxr) {
#pragma omp simd reduction(+ : row_abs)
    for (int64_t j = 0; j < w; ++j) {
      const T d = xrow[j] - yrow[j];
      const T s = (d > T(0) ? T(1) : T(0)) - (d < T(0) ? T(1) : T(0));
      gxr[j] = horizontal_tap(amx, j, taps) + T(2) * xrow[j] * horizontal_tap(ae2, j, taps) +
               yrow[j] * horizontal_tap(aexy, j, taps) + l1_grad * s;
      row_abs += d < T(0) ? -d : d;
    }
  }
  if (gyr) {
    T row_abs_y = 0;
#pragma omp simd reduction(+ : row_abs_y)
    for (int64_t j = 0; j < w; ++j) {
      const T d = xrow[j] - yrow[j];
      const T s = (d > T(0) ? T(1) : T(0)) - (d < T(0) ? T(1) : T(0));
      gyr[j] = horizontal_tap(amy, j, taps) + T(2) * yrow[j] * horizontal_tap(ae2, j, taps) +
               xrow[j] * horizontal_tap(aexy, j, taps) - l1_grad * s;
      row_abs_y += d < T(0) ? -d : d;
    }
    if (!gxr) row_abs = row_abs_y;
  }
  l1_sum += static_cast<double>(row_abs);
}

// Gradient rows [p0, p1) of one plane. g_map: the upstream map gradient of this plane
// (map coordinates), or nullptr with g_scalar the gradient of every centre. value_sum
// (nullable): receives the sum of the SSIM values of the centre rows in [p0, p1), so that
// one pass gives the per-image value and its gradient (bands partition the rows: every
// centre is summed once).
template <bool kLuminance, typename T>
SSIM_ALWAYS_INLINE void backward_rows_impl(const Plane<T>& p, int64_t p0, int64_t p1, const T* g_map, int64_t map_w,
                                            T g_scalar, T* gx, T* gy, BackwardBuffers<T>& buf, double* value_sum,
                                            T l1_grad, double* l1_sum) {
  const Taps<T> taps;
  const int64_t pitch = p.pitch;
  std::fill(buf.gconst.begin(), buf.gconst.end(), g_scalar);
  const auto grow = [&](int64_t r) -> const T* {
    return g_map ? g_map + (r - p.first) * map_w - p.first : buf.gconst.data() - p.first;
  };
  const auto active = [&](int64_t r) { return r >= p.first && r < p.last_row; };
  double values = 0;
  for (int64_t r = std::max(p0 - kHalo, p.first); r < std::min(p0 + kHalo, p.last_row); ++r) {
    centre_row<kLuminance>(p, r, grow(r), taps, buf, value_sum && r >= p0, values);
  }
  T* amx = buf.acc.data();
  T* amy = amx + pitch;
  T* ae2 = amy + pitch;
  T* aexy = ae2 + pitch;
  for (int64_t row = p0; row < p1; ++row) {
    if (active(row + kHalo)) centre_row<kLuminance>(p, row + kHalo, grow(row + kHalo), taps, buf, value_sum && row + kHalo < p1, values);
    const T* rows[kWin];
    for (int k = 0; k < kWin; ++k) {
      const int64_t r = row - kHalo + k;
      rows[k] = active(r) ? buf.ring.data() + (r % kWin) * 4 * pitch : nullptr;
    }
    // Vertical sums of the four partial rows over the padded width.
    for (int q = 0; q < 4; ++q) {
      if ((q == 0 && !gx) || (q == 1 && !gy)) continue;
      const T* pr[kWin];
      for (int k = 0; k < kWin; ++k) pr[k] = rows[k] ? rows[k] + q * pitch : buf.zero.data();
      T* __restrict out = buf.acc.data() + q * pitch;
#pragma omp simd
      for (int64_t j = 0; j < pitch; ++j) {
        T s = 0;
#pragma GCC unroll 11
        for (int k = 0; k < kWin; ++k) s += taps.w[k] * pr[k][j];
        out[j] = s;
      }
    }
    const T* xrow = p.x + row * p.width;
    const T* yrow = p.y + row * p.width;
    const int64_t w = p.width;
    if (l1_sum) {
      l1_rows(xrow, yrow, w, l1_grad, gx ? gx + row * p.width : nullptr, gy ? gy + row * p.width : nullptr, taps, amx,
              amy, ae2, aexy, *l1_sum);
      continue;
    }
    if (gx) {
      T* __restrict gxr = gx + row * p.width;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        gxr[j] = horizontal_tap(amx, j, taps) + T(2) * xrow[j] * horizontal_tap(ae2, j, taps) +
                 yrow[j] * horizontal_tap(aexy, j, taps);
      }
    }
    if (gy) {
      T* __restrict gyr = gy + row * p.width;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        gyr[j] = horizontal_tap(amy, j, taps) + T(2) * yrow[j] * horizontal_tap(ae2, j, taps) +
                 xrow[j] * horizontal_tap(aexy, j, taps);
      }
    }
  }
  if (value_sum) *value_sum = values;
}

// Each row kernel compiled for the baseline ISA and, on x86-64, for AVX2+FMA and AVX-512.
template <bool kLuminance, typename T>
double forward_rows_base(const Plane<T>& p, int64_t r0, int64_t r1, T* map, int64_t map_w, ForwardBuffers<T>& buf) {
  return forward_rows_impl<kLuminance>(p, r0, r1, map, map_w, buf);
}
template <bool kLuminance, typename T>
void backward_rows_base(const Plane<T>& p, int64_t p0, int64_t p1, const T* g_map, int64_t map_w, T g_scalar, T* gx,
                        T* gy, BackwardBuffers<T>& buf, double* value_sum, T l1_grad, double* l1_sum) {
  backward_rows_impl<kLuminance>(p, p0, p1, g_map, map_w, g_scalar, gx, gy, buf, value_sum, l1_grad, l1_sum);
}
#ifdef SSIM_CPU_DISPATCH_AVX2
template <bool kLuminance, typename T>
SSIM_TARGET_AVX2 double forward_rows_avx2(const Plane<T>& p, int64_t r0, int64_t r1, T* map, int64_t map_w,
                                           ForwardBuffers<T>& buf) {
  return forward_rows_impl<kLuminance>(p, r0, r1, map, map_w, buf);
}
template <bool kLuminance, typename T>
SSIM_TARGET_AVX2 void backward_rows_avx2(const Plane<T>& p, int64_t p0, int64_t p1, const T* g_map, int64_t map_w,
                                          T g_scalar, T* gx, T* gy, BackwardBuffers<T>& buf, double* value_sum, T l1_grad,
                                          double* l1_sum) {
  backward_rows_impl<kLuminance>(p, p0, p1, g_map, map_w, g_scalar, gx, gy, buf, value_sum, l1_grad, l1_sum);
}
template <bool kLuminance, typename T>
SSIM_TARGET_AVX512 double forward_rows_avx512(const Plane<T>& p, int64_t r0, int64_t r1, T* map, int64_t map_w,
                                               ForwardBuffers<T>& buf) {
  return forward_rows_impl<kLuminance>(p, r0, r1, map, map_w, buf);
}
template <bool kLuminance, typename T>
SSIM_TARGET_AVX512 void backward_rows_avx512(const Plane<T>& p, int64_t p0, int64_t p1, const T* g_map,
                                              int64_t map_w, T g_scalar, T* gx, T* gy, BackwardBuffers<T>& buf,
                                              double* value_sum, T l1_grad, double* l1_sum) {
  backward_rows_impl<kLuminance>(p, p0, p1, g_map, map_w, g_scalar, gx, gy, buf, value_sum, l1_grad, l1_sum);
}
bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  return has;
}
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

// The row kernels of the instruction set and of the term (p.luminance) at hand. The term is a
// template parameter down to here, so each instance's loops are those of one formula (a branch
// per row between the two, inside one function, made the SSIM's backward ~10% slower).
template <bool kLuminance, typename T>
double forward_rows_isa(const Plane<T>& p, int64_t r0, int64_t r1, T* map, int64_t map_w, ForwardBuffers<T>& buf) {
#ifdef SSIM_CPU_DISPATCH_AVX2
  if (cpu_has_avx512()) return forward_rows_avx512<kLuminance>(p, r0, r1, map, map_w, buf);
  if (cpu_has_avx2()) return forward_rows_avx2<kLuminance>(p, r0, r1, map, map_w, buf);
#endif
  return forward_rows_base<kLuminance>(p, r0, r1, map, map_w, buf);
}

template <typename T>
double forward_rows(const Plane<T>& p, int64_t r0, int64_t r1, T* map, int64_t map_w, ForwardBuffers<T>& buf) {
  return p.luminance ? forward_rows_isa<true>(p, r0, r1, map, map_w, buf)
                     : forward_rows_isa<false>(p, r0, r1, map, map_w, buf);
}

template <bool kLuminance, typename T>
void backward_rows_isa(const Plane<T>& p, int64_t p0, int64_t p1, const T* g_map, int64_t map_w, T g_scalar, T* gx,
                       T* gy, BackwardBuffers<T>& buf, double* value_sum, T l1_grad, double* l1_sum) {
#ifdef SSIM_CPU_DISPATCH_AVX2
  if (cpu_has_avx512())
    return backward_rows_avx512<kLuminance>(p, p0, p1, g_map, map_w, g_scalar, gx, gy, buf, value_sum, l1_grad,
                                            l1_sum);
  if (cpu_has_avx2())
    return backward_rows_avx2<kLuminance>(p, p0, p1, g_map, map_w, g_scalar, gx, gy, buf, value_sum, l1_grad, l1_sum);
#endif
  backward_rows_base<kLuminance>(p, p0, p1, g_map, map_w, g_scalar, gx, gy, buf, value_sum, l1_grad, l1_sum);
}

template <typename T>
void backward_rows(const Plane<T>& p, int64_t p0, int64_t p1, const T* g_map, int64_t map_w, T g_scalar, T* gx, T* gy,
                   BackwardBuffers<T>& buf, double* value_sum, T l1_grad, double* l1_sum) {
  if (p.luminance) {
    backward_rows_isa<true>(p, p0, p1, g_map, map_w, g_scalar, gx, gy, buf, value_sum, l1_grad, l1_sum);
  } else {
    backward_rows_isa<false>(p, p0, p1, g_map, map_w, g_scalar, gx, gy, buf, value_sum, l1_grad, l1_sum);
  }
}

template <typename T>
Plane<T> make_plane(const Geometry& g, const T* x, const T* y, int64_t plane, double c1, double c2, bool luminance) {
  Plane<T> p;
  const int64_t n = g.height * g.width;
  p.x = x + plane * n;
  p.y = y + plane * n;
  p.height = g.height;
  p.width = g.width;
  p.pitch = g.width + 2 * kHalo;
  p.first = g.offset;
  p.last_row = g.height - g.offset;
  p.last_col = g.width - g.offset;
  p.c1 = static_cast<T>(c1);
  p.c2 = static_cast<T>(c2);
  p.luminance = luminance;
  return p;
}

// Forward bands are fixed-height (the forward has no halo cost), so the per-image sum
// does not depend on the thread count.
constexpr int64_t kForwardBand = 32;

// Half types run in float32; everything is made contiguous.
at::Tensor as_compute(const at::Tensor& t) {
  if (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16) return t.to(at::kFloat).contiguous();
  return t.contiguous();
}

void check_cpu_inputs(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "ssim (CPU kernel): inputs must be CPU tensors");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "ssim (CPU kernel): dtype must be float32, float64, float16 or bfloat16, got ", t);
}

at::Tensor forward_cpu(const at::Tensor& x_in, const at::Tensor& y_in, double c1, double c2, bool same_padding,
                       bool want_map, bool luminance = true) {
  const Geometry g = make_geometry(x_in, y_in, same_padding);
  check_cpu_inputs(x_in, y_in);
  const at::Tensor x = as_compute(x_in);
  const at::Tensor y = as_compute(y_in);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssim_forward_cpu", [&] {
    using T = scalar_t;
    const int64_t bands = (g.out_h + kForwardBand - 1) / kForwardBand;
    const int64_t tasks = g.planes() * bands;
    const T* xp = x.data_ptr<T>();
    const T* yp = y.data_ptr<T>();
    T* map = nullptr;
    at::Tensor sums;
    if (want_map) {
      out = at::empty({g.batch, g.channels, g.out_h, g.out_w}, x.options());
      map = out.data_ptr<T>();
    } else {
      sums = at::empty({tasks}, x.options().dtype(at::kDouble));
    }
    double* sums_p = want_map ? nullptr : sums.data_ptr<double>();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      ForwardBuffers<T> buf(g.width + 2 * kHalo, g.width);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t plane = t / bands;
        const int64_t band = t % bands;
        const Plane<T> p = make_plane(g, xp, yp, plane, c1, c2, luminance);
        const int64_t r0 = p.first + band * kForwardBand;
        const int64_t r1 = std::min(r0 + kForwardBand, p.last_row);
        T* plane_map = map ? map + plane * g.out_h * g.out_w : nullptr;
        const double s = forward_rows(p, r0, r1, plane_map, g.out_w, buf);
        if (sums_p) sums_p[t] = s;
      }
    });
    if (!want_map) out = sums.view({g.batch, g.channels * bands}).sum(1).div_(static_cast<double>(g.count())).to(x.scalar_type());
  });
  return out;
}

}  // namespace

at::Tensor ssim_per_image_cpu(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding) {
  return forward_cpu(x, y, c1, c2, same_padding, /*want_map=*/false);
}

at::Tensor ssim_map_cpu(const at::Tensor& x, const at::Tensor& y, double c1, double c2, bool same_padding) {
  return forward_cpu(x, y, c1, c2, same_padding, /*want_map=*/true);
}

// The backward pass (see the top of this file and ssim.h) over every (plane, row band).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gradient_pass_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                 const at::Tensor& y_in, double c1, double c2,
                                                                 bool same_padding, bool grad_x, bool grad_y,
                                                                 bool batch_mean, double scale) {
  auto [value, l1_value, gx, gy] =
      gradient_pass_l1_cpu(grad_in, x_in, y_in, c1, c2, same_padding, grad_x, grad_y, batch_mean, scale, 0.0);
  return {value, gx, gy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradient_pass_l1_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& y_in, double c1, double c2,
    bool same_padding, bool grad_x, bool grad_y, bool batch_mean, double scale, double l1, bool luminance) {
  const Geometry g = make_geometry(x_in, y_in, same_padding);
  check_cpu_inputs(x_in, y_in);
  const bool with_value = !grad_in.defined();
  const bool with_l1 = l1 != 0.0;
  TORCH_CHECK(with_value || !batch_mean, "ssim_per_image_and_grad: batch_mean needs no upstream gradient");
  TORCH_CHECK(with_value || scale == 1.0, "ssim_per_image_and_grad: scale needs no upstream gradient");
  TORCH_CHECK(with_value || !with_l1, "ssim_l1_and_grad: l1 needs no upstream gradient");
  // The L1 mean is over every pixel of the image (of the batch, for batch_mean), the SSIM mean
  // over the valid centres: each term is divided by its own count.
  const double pixels =
      static_cast<double>(g.channels * g.height * g.width) * (batch_mean ? static_cast<double>(g.batch) : 1.0);
  // Per image: the upstream gradient's share of each map pixel; the batch mean's is 1 / B of it.
  const double count = static_cast<double>(g.count()) * (batch_mean ? static_cast<double>(g.batch) : 1.0);
  const bool map_grad = !with_value && check_grad_shape(grad_in, g);
  const at::Tensor x = as_compute(x_in);
  const at::Tensor y = as_compute(y_in);
  at::Tensor gx = grad_x ? at::empty(x.sizes(), x.options()) : at::Tensor();
  at::Tensor gy = grad_y ? at::empty(y.sizes(), y.options()) : at::Tensor();
  at::Tensor value, l1_value;
  if (grad_x || grad_y) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssim_backward_cpu", [&] {
      using T = scalar_t;
      const at::Tensor grad = with_value ? at::Tensor() : grad_in.to(x.scalar_type()).contiguous();
      std::vector<T> g_scalar(g.batch, static_cast<T>(scale / count));
      if (!with_value && !map_grad) {
        const at::Tensor gd = grad.to(at::kDouble);
        const double* gp = gd.data_ptr<double>();
        for (int64_t b = 0; b < g.batch; ++b) g_scalar[b] = static_cast<T>(gp[b] / static_cast<double>(g.count()));
      }
      // Bands amortise the 10 halo rows of partials; enough of them to feed every thread.
      const int64_t want = std::max<int64_t>(1, (8 * at::get_num_threads() + g.planes() - 1) / g.planes());
      const int64_t bands = std::min(want, std::max<int64_t>(1, g.height / 48));
      const int64_t band_h = (g.height + bands - 1) / bands;
      const int64_t tasks = g.planes() * bands;
      const T* xp = x.data_ptr<T>();
      const T* yp = y.data_ptr<T>();
      const T* gmap = map_grad ? grad.data_ptr<T>() : nullptr;
      T* gxp = grad_x ? gx.data_ptr<T>() : nullptr;
      T* gyp = grad_y ? gy.data_ptr<T>() : nullptr;
      at::Tensor sums = with_value ? at::zeros({tasks}, x.options().dtype(at::kDouble)) : at::Tensor();
      double* sums_p = with_value ? sums.data_ptr<double>() : nullptr;
      at::Tensor l1_sums = with_l1 ? at::zeros({tasks}, x.options().dtype(at::kDouble)) : at::Tensor();
      double* l1_sums_p = with_l1 ? l1_sums.data_ptr<double>() : nullptr;
      const T l1_grad = static_cast<T>(l1 / pixels);
      const int64_t n = g.height * g.width;
      at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        BackwardBuffers<T> buf(g.width + 2 * kHalo, g.width);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t plane = t / bands;
          const int64_t band = t % bands;
          const Plane<T> p = make_plane(g, xp, yp, plane, c1, c2, luminance);
          const int64_t p0 = band * band_h;
          const int64_t p1 = std::min(p0 + band_h, g.height);
          if (p0 >= p1) continue;
          std::fill(buf.ring.begin(), buf.ring.end(), T(0));
          backward_rows(p, p0, p1, gmap ? gmap + plane * g.out_h * g.out_w : nullptr, g.out_w,
                        g_scalar[plane / g.channels], gxp ? gxp + plane * n : nullptr, gyp ? gyp + plane * n : nullptr,
                        buf, sums_p ? sums_p + t : nullptr, l1_grad, l1_sums_p ? l1_sums_p + t : nullptr);
        }
      });
      if (with_value) {
        const at::Tensor per_image_sums = sums.view({g.batch, g.channels * bands}).sum(1);
        value = (batch_mean ? per_image_sums.sum() : per_image_sums).div_(count);
        if (scale != 1.0) value.mul_(scale);
        if (with_l1) {
          const at::Tensor per_image_l1 = l1_sums.view({g.batch, g.channels * bands}).sum(1);
          l1_value = (batch_mean ? per_image_l1.sum() : per_image_l1).div_(pixels);
          value.add_(l1_value, l1);
          l1_value = l1_value.to(x.scalar_type());
        }
        value = value.to(x.scalar_type());
      }
    });
  } else if (with_value) {
    value = forward_cpu(x_in, y_in, c1, c2, same_padding, /*want_map=*/false, luminance);
    if (batch_mean) value = value.mean();
    if (scale != 1.0) value.mul_(scale);
    if (with_l1) {
      l1_value = l1_mean(x, y, batch_mean).to(value.scalar_type());
      value.add_(l1_value, l1);
    }
  }
  const auto placeholder = [&](const at::Tensor& t) { return at::empty({0}, t.options()); };
  gx = grad_x ? gx.to(x_in.scalar_type()) : placeholder(x_in);
  gy = grad_y ? gy.to(y_in.scalar_type()) : placeholder(y_in);
  if (with_value && !with_l1) l1_value = at::empty({0}, value.options());
  return {value, l1_value, gx, gy};
}

void scale_gradient_cpu(at::Tensor& grad, const at::Tensor& upstream) {
  TORCH_CHECK(grad.device().is_cpu(), "ssim_scale_gradient_ (CPU kernel): grad must be a CPU tensor");
  const at::Tensor factors = upstream_factors(grad, upstream);
  // Read on the host (free on the CPU): the usual upstream of a loss's backward is 1.
  if (grad.numel() == 0 || upstream.eq(1).all().item<bool>()) return;
  grad.mul_(factors.to(grad.scalar_type()));
}

std::tuple<at::Tensor, at::Tensor> ssim_l1_value_cpu(const at::Tensor& x, const at::Tensor& y, double c1, double c2,
                                                     bool same_padding, bool batch_mean, double scale, double l1) {
  at::Tensor value = scaled_value<ssim_per_image_cpu>(x, y, c1, c2, same_padding, batch_mean, scale);
  if (l1 == 0.0) return {value, at::empty({0}, value.options())};
  at::Tensor l1_value = l1_mean(x, y, batch_mean).to(value.scalar_type());
  return {value.add_(l1_value, l1), l1_value};
}

}  // namespace ssim
}  // namespace epban
