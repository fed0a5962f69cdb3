// Per-pixel SSIM and its partial derivatives, shared by the CPU and CUDA kernels so that
// the math the CPU tests check is the math the GPU runs.
//
// The kernels filter the sum and the difference of the images, u = x + y and v = x - y,
// not x and y: four local moments (G * . is the 11x11 Gaussian, sigma 1.5)
//   mu = G*u, mv = G*v, euu = G*(u^2), evv = G*(v^2)
// instead of the five of x and y (G*x, G*y, G*x^2, G*y^2, G*xy): a fifth fewer multiply-adds
// in every moment pass. With P = mu^2, Q = mv^2 and the local variances su = euu - P,
// sv = evv - Q (in x, y terms: mx = (mu + mv) / 2, my = (mu - mv) / 2, sigma_x^2 + sigma_y^2
// = (su + sv) / 2, sigma_xy = (su - sv) / 4):
//   A1 = 2 mx my + C1             = (mu + mv)(mu - mv) / 2 + C1,  B1 = (P + Q) / 2 + C1,
//   A2 = 2 sigma_xy + C2          = (su - sv) / 2 + C2,            B2 = (su + sv) / 2 + C2,
//   S  = A1 A2 / (B1 B2)
// It is also the more accurate form in float32. The variances cancel (E[u^2] - E[u]^2), and
// where x ~ y (an SR output near its target, flat or textured) v and sv are small and exact
// enough, and the rounding of su enters A2 and B2 alike, so S keeps its accuracy: measured
// against float64 on 128x128 crops of scikit-image photos and noisy, blurred or near-equal
// copies, the largest float32 error per pixel is 5-10x smaller than with the five moments of
// x, y (e.g. 7e-5 vs 4e-4), and 300x smaller for near-equal images (1e-6 vs 4e-4). Only
// flat regions of unequal constant values can come out slightly worse (~1e-4, both forms
// being ill-conditioned there: B2 ~ C2).
//
// The partial derivatives are returned in x, y terms (the chain rule through u, v is linear,
// so it commutes with the filters): with dS/dA1 = A2 / (B1 B2), dS/dA2 = A1 / (B1 B2),
// dS/dB1 = -S / B1, dS/dB2 = -S / B2, alpha = dS/dA1 - dS/dA2, beta = dS/dB1 - dS/dB2,
//   d_mx  = alpha (mu - mv) + beta (mu + mv)    (= dS/dmx of the five-moment form)
//   d_my  = alpha (mu + mv) + beta (mu - mv)
//   d_e2  = dS/dB2                               (the coefficient of G*(x^2) and G*(y^2))
//   d_exy = 2 dS/dA2                             (the coefficient of G*(xy))
// Chain rule through the filters (G is symmetric, so G^T = G), g the upstream gradient
// per window centre (zero where a centre gives no output):
//   dL/dx = G*(g d_mx) + 2 x G*(g d_e2) + y G*(g d_exy)
//   dL/dy = G*(g d_my) + 2 y G*(g d_e2) + x G*(g d_exy)
// C1, C2 > 0 keep B1, B2 > 0: constant images (zero variance) give finite values.
//
// MS-SSIM needs the contrast-structure term alone, CS = A2 / B2, at all scales but the last:
// with kLuminance = false, A1 = B1 = 1 (constants, so dS/dA1 = dS/dB1 = 0) and the same
// formulas give CS and its partials. A template parameter, not a run-time flag: the SSIM
// instances compile to the same instructions as without the option (a per-pixel select kept
// the CPU loops from vectorising).
#pragma once

#include <c10/macros/Macros.h>

// Forced inline on the host: the CPU row loops vectorise only where these calls are inlined
// (a returned struct left in memory stops the vectoriser). nvcc inlines them by itself.
#if defined(__GNUC__) && !defined(__CUDACC__)
#define SSIM_MATH_INLINE __attribute__((always_inline)) inline
#else
#define SSIM_MATH_INLINE inline
#endif

namespace epban {
namespace ssim {

constexpr int kWin = 11;         // window size of the fused kernels
constexpr int kHalo = kWin / 2;  // 5
constexpr double kSigma = 1.5;

// The normalised 1-D Gaussian (win 11, sigma 1.5) in double, as the reference's
// gaussian_window_1d computes it before casting to the compute dtype. A macro so that
// the CUDA kernels can put the same literals in __constant__ memory.
#define SSIM_GAUSS_11                                                            \
  0.00102838008447911, 0.007598758135239185, 0.03600077212843083, 0.10936068950970002, \
      0.2130055377112537, 0.26601172486179436, 0.2130055377112537, 0.10936068950970002, \
      0.03600077212843083, 0.007598758135239185, 0.00102838008447911
constexpr double kGauss[kWin] = {SSIM_GAUSS_11};

// The four terms of S = A1 A2 / (B1 B2) from the moments of u = x + y and v = x - y.
template <typename T>
struct SsimTerms {
  T a1, b1, a2, b2;
};

template <bool kLuminance = true, typename T>
C10_HOST_DEVICE SSIM_MATH_INLINE SsimTerms<T> ssim_terms(T mu, T mv, T euu, T evv, T c1, T c2) {
  const T p = mu * mu;
  const T q = mv * mv;
  const T su = euu - p;
  const T sv = evv - q;
  SsimTerms<T> t;
  t.a1 = kLuminance ? T(0.5) * ((mu + mv) * (mu - mv)) + c1 : T(1);  // not (p - q): no cancellation near 0
  t.b1 = kLuminance ? T(0.5) * (p + q) + c1 : T(1);
  t.a2 = T(0.5) * (su - sv) + c2;
  t.b2 = T(0.5) * (su + sv) + c2;
  return t;
}

template <bool kLuminance = true, typename T>
C10_HOST_DEVICE SSIM_MATH_INLINE T ssim_value(T mu, T mv, T euu, T evv, T c1, T c2) {
  const SsimTerms<T> t = ssim_terms<kLuminance>(mu, mv, euu, evv, c1, c2);
  return (t.a1 * t.a2) / (t.b1 * t.b2);
}

// The partial derivatives of S in x, y terms (see the top of this file), each multiplied by
// the upstream gradient g, and S itself (for the kernels that compute the value and the
// gradient in one pass; where it is not used the compiler drops it).
template <typename T>
struct SsimPartials {
  T d_mx;   // g dS/dmx
  T d_my;   // g dS/dmy
  T d_e2;   // g dS/dexx (= g dS/deyy)
  T d_exy;  // g dS/dexy
  T s;      // S
};

template <bool kLuminance = true, typename T>
C10_HOST_DEVICE SSIM_MATH_INLINE SsimPartials<T> ssim_partials(T mu, T mv, T euu, T evv, T c1, T c2, T g) {
  const SsimTerms<T> t = ssim_terms<kLuminance>(mu, mv, euu, evv, c1, c2);
  const T a1 = t.a1, b1 = t.b1, a2 = t.a2, b2 = t.b2;
  const T inv_b1b2 = T(1) / (b1 * b2);  // one division for both: B1 B2 > 0 and at most ~4 R^4
  const T inv_b1 = b2 * inv_b1b2;
  const T inv_b2 = b1 * inv_b1b2;
  const T g_inv = g * inv_b1b2;  // g / (B1 B2)
  const T g_s = g_inv * a1 * a2;        // g S
  const T d_a1 = kLuminance ? g_inv * a2 : T(0);
  const T d_a2 = g_inv * a1;
  const T d_b1 = kLuminance ? -g_s * inv_b1 : T(0);
  const T d_b2 = -g_s * inv_b2;
  const T alpha = d_a1 - d_a2;
  const T beta = d_b1 - d_b2;
  const T sum = mu + mv;   // 2 mx
  const T diff = mu - mv;  // 2 my
  SsimPartials<T> p;
  p.d_mx = alpha * diff + beta * sum;
  p.d_my = alpha * sum + beta * diff;
  p.d_e2 = d_b2;
  p.d_exy = T(2) * d_a2;
  p.s = a1 * a2 * inv_b1b2;
  return p;
}

}  // namespace ssim
}  // namespace epban
