// CPU kernels of the Lanczos family: lanczos_step_ and reorthogonalize_.
//
// Algorithm (both ops): classical Gram–Schmidt applied twice (CGS2) of w against rows of
// the Krylov basis Q, for b independent runs at once. Each pass is two sweeps over the
// rows involved: (1) c[i, r] = <Q[i, r], w[i]> for every row r, (2) w[i] -= sum_r c[i, r]
// Q[i, r]. lanczos_step_ adds the three-term recurrence before and the normalisation after
// (see csrc/hesslab.cpp for the exact contract).
//
// Layout: Q is (b, m, n) contiguous, w is (b, n) contiguous, storage float or double.
// Every inner product and every correction sum_r c_r q_r is accumulated in double,
// whatever the storage type: this is the accuracy edge over a float32 GEMM.
//
// Parallel mapping: a run's n entries are cut into a fixed number of segments
// (independent of the thread count, so results are bitwise reproducible across thread
// counts); at::parallel_for spreads the b x segments tasks over the threads. Sweep (1)
// keeps a per-task accumulator per row and sums the segments afterwards in a fixed order;
// sweep (2) needs no reduction.
//
// Reference: hesslab/reference.py (lanczos_step, reorthogonalize) with float64
// accumulation must agree to rounding.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"

namespace hesslab {
namespace {

constexpr int64_t kSegment = 1 << 16;  // entries of one run per dot-product task
constexpr int64_t kTile = 1024;        // entries kept in L1 while sweeping the rows
constexpr int kLanes = 8;              // independent accumulators, so the compiler vectorises

// sum_x a[x] * b[x] in double, with kLanes partial sums.
template <typename T>
inline double dot_double(const T* a, const T* b, int64_t len) {
  double acc[kLanes] = {0};
  int64_t x = 0;
  for (; x + kLanes <= len; x += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += static_cast<double>(a[x + k]) * static_cast<double>(b[x + k]);
  double s = 0;
  for (; x < len; ++x) s += static_cast<double>(a[x]) * static_cast<double>(b[x]);
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// out[i * rows + r] = <rows_ptr[i * run_stride + r * n : +n], w[i * n : +n]> for i < b, r < rows.
template <typename T>
void multi_dot(const T* rows_ptr, int64_t run_stride, int64_t rows, const T* w, int64_t b, int64_t n,
               double* out) {
  if (rows == 0 || b == 0) return;
  const int64_t segs = std::max<int64_t>(1, (n + kSegment - 1) / kSegment);
  std::vector<double> partial(static_cast<size_t>(b * segs * rows), 0.0);
  at::parallel_for(0, b * segs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / segs, s = task % segs;
      const int64_t x0 = s * kSegment, x1 = std::min(n, x0 + kSegment);
      double* acc = partial.data() + task * rows;
      const T* wi = w + i * n;
      const T* qi = rows_ptr + i * run_stride;
      for (int64_t t = x0; t < x1; t += kTile) {
        const int64_t len = std::min(kTile, x1 - t);
        for (int64_t r = 0; r < rows; ++r) acc[r] += dot_double(qi + r * n + t, wi + t, len);
      }
    }
  });
  for (int64_t i = 0; i < b; ++i)
    for (int64_t r = 0; r < rows; ++r) {
      double s = 0;
      for (int64_t seg = 0; seg < segs; ++seg) s += partial[(i * segs + seg) * rows + r];
      out[i * rows + r] = s;
    }
}

// w[i] -= sum_r c[i * rows + r] * rows_ptr[i * run_stride + r * n], the sum formed in double.
template <typename T>
void multi_axpy(const T* rows_ptr, int64_t run_stride, int64_t rows, const double* c, T* w, int64_t b,
                int64_t n) {
  if (rows == 0 || b == 0 || n == 0) return;
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, b * tiles, 16, [&](int64_t begin, int64_t end) {
    double tmp[kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / tiles, t = (task % tiles) * kTile;
      const int64_t len = std::min(kTile, n - t);
      std::fill(tmp, tmp + len, 0.0);
      const T* qi = rows_ptr + i * run_stride + t;
      for (int64_t r = 0; r < rows; ++r) {
        const double cr = c[i * rows + r];
        const T* q = qi + r * n;
        for (int64_t x = 0; x < len; ++x) tmp[x] += cr * static_cast<double>(q[x]);
      }
      T* wi = w + i * n + t;
      for (int64_t x = 0; x < len; ++x) wi[x] = static_cast<T>(static_cast<double>(wi[x]) - tmp[x]);
    }
  });
}

// Two classical Gram–Schmidt passes of w against rows [0, rows) of Q; coeff (b, rows) gets
// the sum of both passes' coefficients.
template <typename T>
void cgs2(const T* Q, int64_t m, int64_t rows, T* w, int64_t b, int64_t n, double* coeff) {
  std::vector<double> c(static_cast<size_t>(b * rows));
  std::fill(coeff, coeff + b * rows, 0.0);
  for (int pass = 0; pass < 2; ++pass) {
    multi_dot(Q, m * n, rows, w, b, n, c.data());
    multi_axpy(Q, m * n, rows, c.data(), w, b, n);
    for (int64_t k = 0; k < b * rows; ++k) coeff[k] += c[k];
  }
}

template <typename T>
void lanczos_step_kernel(T* Q, T* w, const double* beta_prev, int64_t b, int64_t m, int64_t n, int64_t j,
                         double tol, double* alpha, double* beta, bool* breakdown) {
  std::vector<double> a0(b), nw2(b), coeff(static_cast<size_t>(b * (j + 1)));
  multi_dot(Q + j * n, m * n, 1, w, b, n, a0.data());
  multi_dot(w, n, 1, w, b, n, nw2.data());
  // Three-term recurrence: w -= a0 q_j + beta_prev q_{j-1}, one sweep over rows (j-1, j).
  const int64_t first = j > 0 ? j - 1 : j, rows = j - first + 1;
  std::vector<double> c3(static_cast<size_t>(b * rows));
  for (int64_t i = 0; i < b; ++i) {
    if (j > 0) c3[i * rows] = beta_prev[i];
    c3[i * rows + rows - 1] = a0[i];
  }
  multi_axpy(Q + first * n, m * n, rows, c3.data(), w, b, n);
  cgs2(Q, m, j + 1, w, b, n, coeff.data());
  std::vector<double> bw2(b);
  multi_dot(w, n, 1, w, b, n, bw2.data());
  for (int64_t i = 0; i < b; ++i) {
    alpha[i] = a0[i] + coeff[i * (j + 1) + j];
    beta[i] = std::sqrt(bw2[i]);
    breakdown[i] = beta[i] <= tol * std::sqrt(nw2[i]);
  }
  if (j + 1 >= m) return;
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* next = Q + i * m * n + (j + 1) * n;
      const T* wi = w + i * n;
      if (breakdown[i]) {
        std::fill(next, next + n, T(0));
      } else {
        const double inv = 1.0 / beta[i];
        for (int64_t x = 0; x < n; ++x) next[x] = static_cast<T>(static_cast<double>(wi[x]) * inv);
      }
    }
  });
}

// Runs `body(Qc, wc)` on contiguous tensors and copies the results back into the
// caller's (possibly strided) Q and w, which the ops mutate in place.
template <typename F>
void with_contiguous(const at::Tensor& Q, const at::Tensor& w, bool write_q, F body) {
  at::Tensor Qc = Q.contiguous(), wc = w.contiguous();
  body(Qc, wc);
  if (write_q && !Qc.is_same(Q)) Q.copy_(Qc);
  if (!wc.is_same(w)) w.copy_(wc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lanczos_step_cpu(const at::Tensor& Q, const at::Tensor& w,
                                                                 const at::Tensor& beta_prev, int64_t j,
                                                                 double tol) {
  check_lanczos_step(Q, w, beta_prev, j);
  const int64_t b = Q.size(0), m = Q.size(1), n = Q.size(2);
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor alpha = at::empty({b}, f64), beta = at::empty({b}, f64);
  at::Tensor breakdown = at::empty({b}, at::TensorOptions().dtype(at::kBool));
  at::Tensor bp = beta_prev.contiguous();
  with_contiguous(Q, w, true, [&](at::Tensor& Qc, at::Tensor& wc) {
    AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "lanczos_step_cpu", [&] {
      lanczos_step_kernel<scalar_t>(Qc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), bp.data_ptr<double>(), b,
                                    m, n, j, tol, alpha.data_ptr<double>(), beta.data_ptr<double>(),
                                    breakdown.data_ptr<bool>());
    });
  });
  return {alpha, beta, breakdown};
}

at::Tensor reorthogonalize_cpu(const at::Tensor& Q, const at::Tensor& w, int64_t j) {
  check_reorthogonalize(Q, w, j);
  const int64_t b = Q.size(0), m = Q.size(1), n = Q.size(2);
  at::Tensor coeff = at::zeros({b, j}, at::TensorOptions().dtype(at::kDouble));
  with_contiguous(Q, w, false, [&](at::Tensor& Qc, at::Tensor& wc) {
    AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "reorthogonalize_cpu", [&] {
      cgs2<scalar_t>(Qc.data_ptr<scalar_t>(), m, j, wc.data_ptr<scalar_t>(), b, n, coeff.data_ptr<double>());
    });
  });
  return coeff;
}

}  // namespace

TORCH_LIBRARY_IMPL(hesslab, CPU, m) {
  m.impl("lanczos_step_", &lanczos_step_cpu);
  m.impl("reorthogonalize_", &reorthogonalize_cpu);
}

}  // namespace hesslab
