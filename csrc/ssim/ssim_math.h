// Per-pixel SSIM and its partial derivatives, shared by the CPU and CUDA kernels so that
// the math the CPU tests check is the math the GPU runs.
//
// The five local moments at a window centre (G * . is the 11x11 Gaussian, sigma 1.5):
//   mx = G*x, my = G*y, exx = G*(x^2), eyy = G*(y^2), exy = G*(xy)
// SSIM in terms of them:
//   A1 = 2 mx my + C1,  B1 = mx^2 + my^2 + C1,
//   A2 = 2 (exy - mx my) + C2,  B2 = (exx - mx^2) + (eyy - my^2) + C2,
//   S  = A1 A2 / (B1 B2)
// Its partial derivatives, the five moments taken as independent variables:
//   dS/dmx  = 2 my (dS/dA1 - dS/dA2) + 2 mx (dS/dB1 - dS/dB2)
//   dS/dmy  = 2 mx (dS/dA1 - dS/dA2) + 2 my (dS/dB1 - dS/dB2)
//   dS/dexx = dS/deyy = dS/dB2 = -S / B2
//   dS/dexy = 2 dS/dA2 = 2 A1 / (B1 B2)
// with dS/dA1 = A2 / (B1 B2), dS/dB1 = -S / B1.
// Chain rule through the filters (G is symmetric, so G^T = G), g the upstream gradient
// per window centre (zero where a centre gives no output):
//   dL/dx = G*(g dS/dmx) + 2 x G*(g dS/dexx) + y G*(g dS/dexy)
//   dL/dy = G*(g dS/dmy) + 2 y G*(g dS/dexx) + x G*(g dS/dexy)
// C1, C2 > 0 keep B1, B2 > 0: constant images (zero variance) give finite values.
#pragma once

#include <c10/macros/Macros.h>

namespace epban {
namespace ssim {

constexpr int kWin = 11;         // window size of the fused kernels
constexpr int kHalo = kWin / 2;  // 5
constexpr double kSigma = 1.5;

// The normalised 1-D Gaussian (win 11, sigma 1.5) in double, as the reference's
// gaussian_window_1d computes it before casting to the compute dtype. A macro so that
// the CUDA kernels can put the same literals in __constant__ memory.
#define EPBAN_SSIM_GAUSS_11                                                            \
  0.00102838008447911, 0.007598758135239185, 0.03600077212843083, 0.10936068950970002, \
      0.2130055377112537, 0.26601172486179436, 0.2130055377112537, 0.10936068950970002, \
      0.03600077212843083, 0.007598758135239185, 0.00102838008447911
constexpr double kGauss[kWin] = {EPBAN_SSIM_GAUSS_11};

// The four terms of S = A1 A2 / (B1 B2).
template <typename T>
struct SsimTerms {
  T a1, b1, a2, b2;
};

template <typename T>
C10_HOST_DEVICE inline SsimTerms<T> ssim_terms(T mx, T my, T exx, T eyy, T exy, T c1, T c2) {
  const T mxy = mx * my;
  const T mxx = mx * mx;
  const T myy = my * my;
  SsimTerms<T> t;
  t.a1 = T(2) * mxy + c1;
  t.b1 = mxx + myy + c1;
  t.a2 = T(2) * (exy - mxy) + c2;
  t.b2 = (exx - mxx) + (eyy - myy) + c2;
  return t;
}

template <typename T>
C10_HOST_DEVICE inline T ssim_value(T mx, T my, T exx, T eyy, T exy, T c1, T c2) {
  const SsimTerms<T> t = ssim_terms(mx, my, exx, eyy, exy, c1, c2);
  return (t.a1 * t.a2) / (t.b1 * t.b2);
}

// The partial derivatives of S, each multiplied by the upstream gradient g, and S itself
// (for the kernels that compute the value and the gradient in one pass; where it is not
// used the compiler drops it).
template <typename T>
struct SsimPartials {
  T d_mx;   // g dS/dmx
  T d_my;   // g dS/dmy
  T d_e2;   // g dS/dexx (= g dS/deyy)
  T d_exy;  // g dS/dexy
  T s;      // S
};

template <typename T>
C10_HOST_DEVICE inline SsimPartials<T> ssim_partials(T mx, T my, T exx, T eyy, T exy, T c1, T c2, T g) {
  const SsimTerms<T> t = ssim_terms(mx, my, exx, eyy, exy, c1, c2);
  const T a1 = t.a1, b1 = t.b1, a2 = t.a2, b2 = t.b2;
  const T inv_b1 = T(1) / b1;
  const T inv_b2 = T(1) / b2;
  const T g_inv = g * inv_b1 * inv_b2;  // g / (B1 B2)
  const T g_s = g_inv * a1 * a2;        // g S
  const T d_a1 = g_inv * a2;
  const T d_a2 = g_inv * a1;
  const T d_b1 = -g_s * inv_b1;
  const T d_b2 = -g_s * inv_b2;
  const T da = T(2) * (d_a1 - d_a2);
  const T db = T(2) * (d_b1 - d_b2);
  SsimPartials<T> p;
  p.d_mx = my * da + mx * db;
  p.d_my = mx * da + my * db;
  p.d_e2 = d_b2;
  p.d_exy = T(2) * d_a2;
  p.s = a1 * a2 * inv_b1 * inv_b2;
  return p;
}

}  // namespace ssim
}  // namespace epban
