// The one Gram–Schmidt plan of lanczos_step_ and reorthogonalize_, for both backends.
//
// cpu/lanczos_cpu.cpp and cuda/lanczos_kernels.cu implement the same sequence of sweeps
// over the basis and assemble every per-run scalar with the functions below (host and
// device), so the two backends differ only in the order in which the float64 sums are
// added up (fixed on both; see each kernel file), never in the formulas.
//
// Notation, for one run i (all b runs at once, independently): the rows R the op works
// against are q_0..q_j for lanczos_step_ (rows = j + 1) and q_0..q_{j-1} for
// reorthogonalize_ (rows = j); T is the storage dtype (float or double) and eps its
// machine epsilon; every inner product, norm and correction sum_r c_r q_r is formed in
// float64, and w is rounded to T after each update.
//
//   sweep 1   d = Q_R w                 n_in2  = ||w||^2        (reads Q_R once)
//   sweep 2   w -= Q_R^T d;  c = Q_R w   n_mid2 = ||w||^2        (the CPU fuses the update with
//                                                               the dots per cache tile; CUDA
//                                                               reads Q_R twice)
//   skip      again = second_update_needed(sum_r c_r^2, n_mid2, eps)
//   sweep 3   only where again: w -= Q_R^T c;  n_out2 = ||w||^2   (elsewhere nothing happens)
//
// The coefficients applied along row r are coefficient(d_r, c_r, again) = d_r (+ c_r when
// again): reorthogonalize_ returns them. lanczos_step_ then takes
//   alpha     = coefficient(d_j, c_j, again)
//   beta      = sqrt(final_norm2(again, n_mid2, n_out2))
//   breakdown = is_breakdown(beta, n_in2, beta_prev, j, tol):
//               beta <= tol * (||w_in|| + (j > 0 ? |beta_prev| : 0))
//   Q[i, j+1] = next_row_entry(w_x, next_row_scale(beta, breakdown)) for every entry x:
//               w / beta, or exactly 0 on breakdown or when beta is not > 0 (a NaN
//               residual included: never NaN/Inf), when j + 1 < m; w keeps the residual.
//
// The three-term recurrence w -= alpha q_j + beta_prev q_{j-1} is the part of sweep 2
// along rows j and j - 1: d_j = <w_in, q_j> is alpha's first term and d_{j-1} equals
// beta_prev up to rounding (exactly, in exact arithmetic, for a symmetric operator), so
// subtracting Q_R^T d does the recurrence and the first reorthogonalization in one pass.
// beta_prev enters only the breakdown scale. The result is identical in exact arithmetic
// to the contract in csrc/hesslab.cpp and agrees to rounding with hesslab/reference.py,
// which always applies both updates.
//
// Why the skip rule is safe: c / ||w|| (after sweep 2) are exactly the inner products of
// the new vector with the basis, so when ||c|| <= eps ||w|| the vector is already
// orthogonal to working precision and the second update could change its stored value
// only by rounding. With float64 accumulation a float32 basis almost always skips it (one
// pass leaves ~1e-10); a float64 basis usually does not. A NaN anywhere takes the second
// update (the comparison is written so that NaN fails it), so NaN propagates to beta.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define HESSLAB_HOST_DEVICE __host__ __device__
#else
#define HESSLAB_HOST_DEVICE
#endif

namespace hesslab {
namespace plan {

// Sweeps over Q_R per op call: 2 always, 3 when some run takes the second update.
constexpr int kMinSweeps = 2;
constexpr int kMaxSweeps = 3;

// Rows the op orthogonalizes against.
HESSLAB_HOST_DEVICE constexpr int64_t step_rows(int64_t j) { return j + 1; }
HESSLAB_HOST_DEVICE constexpr int64_t reorthogonalize_rows(int64_t j) { return j; }

// Whether run i takes the second update (sweep 3): not (||c||^2 <= eps^2 ||w||^2), so NaN
// takes it. c_norm2 = sum_r c_r^2 in float64, w_norm2 = ||w||^2 after sweep 2.
HESSLAB_HOST_DEVICE inline bool second_update_needed(double c_norm2, double w_norm2, double eps) {
  return !(c_norm2 <= eps * eps * w_norm2);
}

// The coefficient applied along a row: the first pass's, plus the second's when it ran.
HESSLAB_HOST_DEVICE inline double coefficient(double d, double c, bool again) {
  return again ? d + c : d;
}

// ||w_out||^2: after sweep 3 where it ran, else the norm after sweep 2 (w is unchanged).
HESSLAB_HOST_DEVICE inline double final_norm2(bool again, double mid_norm2, double out_norm2) {
  return again ? out_norm2 : mid_norm2;
}

// Breakdown: reorthogonalization removed all but a tol share of what entered the step
// (the scale of the subtracted terms, so that w_in = 0 is a breakdown too).
HESSLAB_HOST_DEVICE inline bool is_breakdown(double beta, double in_norm2, double beta_prev,
                                             int64_t j, double tol) {
  return beta <= tol * (sqrt(in_norm2) + (j > 0 ? fabs(beta_prev) : 0.0));
}

// Factor that turns the residual w into Q[i, j+1]: 1 / beta, or 0 on breakdown or when
// beta is not > 0 (so the row is never NaN/Inf, even for tol < 0).
HESSLAB_HOST_DEVICE inline double next_row_scale(double beta, bool breakdown) {
  return (breakdown || !(beta > 0.0)) ? 0.0 : 1.0 / beta;
}

// One entry of Q[i, j+1] from the residual's entry w_x: exactly 0 where the scale is 0
// (not w_x * 0, which is NaN for a NaN or infinite entry), else w_x / beta.
HESSLAB_HOST_DEVICE inline double next_row_entry(double w_x, double scale) {
  return scale == 0.0 ? 0.0 : w_x * scale;
}

}  // namespace plan
}  // namespace hesslab
