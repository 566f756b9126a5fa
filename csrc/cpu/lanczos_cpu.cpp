// CPU kernels of the Lanczos family: lanczos_step_, reorthogonalize_ and gs_sweep_ (one sweep).
//
// Algorithm: the Gram–Schmidt plan of common/gram_schmidt_plan.h (CGS2 in up to three
// sweeps over the rows of the Krylov basis, the second update skipped where the first
// already reached working precision; alpha, beta, breakdown and the next row assembled by
// the plan's functions), for b independent runs at once. Sweep 2's update and dots are
// fused per tile of kTile entries, while the tile of every row is in cache, so Q is read
// two or three times per call.
//
// Layout: Q is (b, m, n) contiguous, w is (b, n) contiguous (both are mutated in place, so
// the adapter refuses non-contiguous ones instead of copying them), storage float or
// double. Every inner product and every correction sum_r c_r q_r is accumulated in double,
// whatever the storage type: this is the accuracy edge over a float32 GEMM.
//
// Parallel mapping: a run's n entries are cut into fixed segments (independent of the
// thread count, so results are bitwise reproducible across thread counts); at::parallel_for
// spreads the b x segments tasks over the threads. Each task keeps its own partial sums,
// added up afterwards in a fixed order.
//
// Reference: hesslab/reference.py (lanczos_step, reorthogonalize) with float64
// accumulation must agree to rounding; cuda/lanczos_kernels.cu follows the same plan.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "common/checks.h"
#include "common/gram_schmidt_plan.h"

namespace hesslab {
namespace {

constexpr int64_t kSegment = 1 << 14;  // entries of one run per task
constexpr int64_t kTile = 512;         // entries of every row kept in cache between update and dots
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

// One sweep over rows [0, rows) of every run, tile by tile. For run i and each tile:
//   if sub:   w[i] -= sum_r sub[i, r] Q[i, r]   (the sum formed in double)
//   if dots:  dots[i, r] += <Q[i, r], w[i]>     (after the update)
//   if norm2: norm2[i] += <w[i], w[i]>          (after the update)
// Q rows are read once; the outputs are overwritten. With a run mask, runs whose entry is
// false are left alone (no reads, their outputs untouched).
template <typename T>
void sweep(const T* Q, int64_t m, int64_t rows, T* w, int64_t b, int64_t n, const double* sub, double* dots,
           double* norm2, const bool* mask = nullptr) {
  if (b == 0) return;
  const int64_t segs = std::max<int64_t>(1, (n + kSegment - 1) / kSegment);
  const int64_t width = rows + 1;  // per task: the row dots, then the norm
  std::vector<double> partial(static_cast<size_t>(b * segs * width), 0.0);
  at::parallel_for(0, b * segs, 1, [&](int64_t begin, int64_t end) {
    double tmp[kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / segs, x0 = (task % segs) * kSegment, x1 = std::min(n, x0 + kSegment);
      if (mask != nullptr && !mask[i]) continue;
      double* acc = partial.data() + task * width;
      const T* qi = Q + i * m * n;
      T* wi = w + i * n;
      for (int64_t t = x0; t < x1; t += kTile) {
        const int64_t len = std::min(kTile, x1 - t);
        if (sub != nullptr && rows > 0) {
          std::fill(tmp, tmp + len, 0.0);
          for (int64_t r = 0; r < rows; ++r) {
            const double cr = sub[i * rows + r];
            const T* q = qi + r * n + t;
            for (int64_t x = 0; x < len; ++x) tmp[x] += cr * static_cast<double>(q[x]);
          }
          for (int64_t x = 0; x < len; ++x) wi[t + x] = static_cast<T>(static_cast<double>(wi[t + x]) - tmp[x]);
        }
        if (dots != nullptr)
          for (int64_t r = 0; r < rows; ++r) acc[r] += dot_double(qi + r * n + t, wi + t, len);
        if (norm2 != nullptr) acc[rows] += dot_double(wi + t, wi + t, len);
      }
    }
  });
  for (int64_t i = 0; i < b; ++i)
    for (int64_t r = 0; r < width && (mask == nullptr || mask[i]); ++r) {
      double s = 0;
      for (int64_t seg = 0; seg < segs; ++seg) s += partial[(i * segs + seg) * width + r];
      if (r < rows && dots != nullptr) dots[i * rows + r] = s;
      if (r == rows && norm2 != nullptr) norm2[i] = s;
    }
}

// The plan's sweeps 1-3 (common/gram_schmidt_plan.h) against rows [0, rows): coeff (b, rows)
// gets the coefficients applied; norm2_in / norm2_out (b,) get ||w||^2 before and after,
// when not null.
template <typename T>
void cgs2(const T* Q, int64_t m, int64_t rows, T* w, int64_t b, int64_t n, double* coeff, double* norm2_in,
          double* norm2_out) {
  std::vector<double> d(static_cast<size_t>(b * rows)), c(static_cast<size_t>(b * rows)), mid(b), out(b);
  sweep(Q, m, rows, w, b, n, nullptr, d.data(), norm2_in);    // sweep 1
  sweep(Q, m, rows, w, b, n, d.data(), c.data(), mid.data());  // sweep 2
  const double eps = std::numeric_limits<T>::epsilon();
  std::unique_ptr<bool[]> again(new bool[b]);
  bool any = false;
  for (int64_t i = 0; i < b; ++i) {
    double c2 = 0;
    for (int64_t r = 0; r < rows; ++r) c2 += c[i * rows + r] * c[i * rows + r];
    again[i] = plan::second_update_needed(c2, mid[i], eps);
    any = any || again[i];
    out[i] = mid[i];
  }
  if (any) sweep(Q, m, rows, w, b, n, c.data(), nullptr, out.data(), again.get());  // sweep 3
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t r = 0; r < rows; ++r)
      coeff[i * rows + r] = plan::coefficient(d[i * rows + r], c[i * rows + r], again[i]);
    if (norm2_out != nullptr) norm2_out[i] = plan::final_norm2(again[i], mid[i], out[i]);
  }
}

template <typename T>
void lanczos_step_kernel(T* Q, T* w, const double* beta_prev, int64_t b, int64_t m, int64_t n, int64_t j,
                         double tol, double* alpha, double* beta, bool* breakdown) {
  const int64_t rows = plan::step_rows(j);
  std::vector<double> coeff(static_cast<size_t>(b * rows)), nw2(b), bw2(b);
  cgs2(Q, m, rows, w, b, n, coeff.data(), nw2.data(), bw2.data());
  std::vector<double> scale(b);
  for (int64_t i = 0; i < b; ++i) {
    alpha[i] = coeff[i * rows + j];
    beta[i] = std::sqrt(bw2[i]);
    breakdown[i] = plan::is_breakdown(beta[i], nw2[i], beta_prev[i], j, tol);
    scale[i] = plan::next_row_scale(beta[i], breakdown[i]);
  }
  if (j + 1 >= m) return;
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* next = Q + i * m * n + (j + 1) * n;
      const T* wi = w + i * n;
      const double s = scale[i];
      for (int64_t x = 0; x < n; ++x) next[x] = static_cast<T>(plan::next_row_entry(static_cast<double>(wi[x]), s));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lanczos_step_cpu(const at::Tensor& Q, const at::Tensor& w,
                                                                 const at::Tensor& beta_prev, int64_t j,
                                                                 double tol) {
  check_lanczos_step(Q, w, beta_prev, j);
  const int64_t b = Q.size(0), m = Q.size(1), n = Q.size(2);
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor alpha = at::empty({b}, f64), beta = at::empty({b}, f64);
  at::Tensor breakdown = at::empty({b}, at::TensorOptions().dtype(at::kBool));
  const at::Tensor bp = beta_prev.contiguous();  // read only: a copy is fine
  AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "lanczos_step_cpu", [&] {
    lanczos_step_kernel<scalar_t>(Q.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), bp.data_ptr<double>(), b, m, n,
                                  j, tol, alpha.data_ptr<double>(), beta.data_ptr<double>(),
                                  breakdown.data_ptr<bool>());
  });
  return {alpha, beta, breakdown};
}

at::Tensor reorthogonalize_cpu(const at::Tensor& Q, const at::Tensor& w, int64_t j) {
  check_reorthogonalize(Q, w, j);
  const int64_t b = Q.size(0), m = Q.size(1), n = Q.size(2);
  at::Tensor coeff = at::zeros({b, j}, at::TensorOptions().dtype(at::kDouble));
  const at::Tensor Qc = Q.contiguous();  // read only: a copy is fine
  AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "reorthogonalize_cpu", [&] {
    cgs2<scalar_t>(Qc.data_ptr<scalar_t>(), m, plan::reorthogonalize_rows(j), w.data_ptr<scalar_t>(), b, n,
                   coeff.data_ptr<double>(), nullptr, nullptr);
  });
  return coeff;
}

at::Tensor gs_sweep_cpu(const at::Tensor& Q, const at::Tensor& w, const std::optional<at::Tensor>& coef,
                        int64_t rows, bool dots) {
  check_gs_sweep(Q, w, coef, rows);
  const int64_t b = Q.size(0), m = Q.size(1), n = Q.size(2), width = dots ? rows + 1 : 1;
  at::Tensor out = at::empty({b, width}, at::TensorOptions().dtype(at::kDouble));
  const at::Tensor Qc = Q.contiguous();  // read only: a copy is fine
  const at::Tensor cc = coef.has_value() ? coef->contiguous() : at::Tensor();
  std::vector<double> d(static_cast<size_t>(b * rows)), norm2(b);
  AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "gs_sweep_cpu", [&] {
    sweep<scalar_t>(Qc.data_ptr<scalar_t>(), m, rows, w.data_ptr<scalar_t>(), b, n,
                    cc.defined() ? cc.data_ptr<double>() : nullptr, dots ? d.data() : nullptr, norm2.data());
  });
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t r = 0; r + 1 < width; ++r) o[i * width + r] = d[i * rows + r];
    o[i * width + width - 1] = norm2[i];
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hesslab, CPU, m) {
  m.impl("lanczos_step_", &lanczos_step_cpu);
  m.impl("reorthogonalize_", &reorthogonalize_cpu);
  m.impl("gs_sweep_", &gs_sweep_cpu);
}

}  // namespace hesslab
