// Raw-pointer CUDA launchers of the Lanczos ops (lanczos_step_, reorthogonalize_).
//
// Plain C++ declarations, no torch: lanczos_cuda.cpp (the torch adapter) calls them with
// contiguous device pointers; lanczos_kernels.cu defines them for T = float and double.
// Every launcher only enqueues work on `stream` (no host synchronisation) and returns
// the first CUDA error met while enqueueing, or cudaSuccess.
//
// Layouts (row-major, contiguous): Q (b, m, n), row r of run i at Q + (i*m + r)*n;
// w (b, n); per-run scalars (b,); coefficients (b, j) row-major.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hesslab {
namespace cuda {

// Number of float64 elements of the `workspace` that lanczos_step_cuda needs.
int64_t lanczos_step_workspace_size(int64_t b, int64_t j, int64_t n);

// One Lanczos step for b runs (0 <= j < m), following common/gram_schmidt_plan.h: see
// lanczos_kernels.cu. Bitwise deterministic: no atomics, every sum in a fixed order. Mutates Q (row j+1
// when j + 1 < m) and w; writes alpha, beta (b,) float64 and breakdown (b,).
template <typename T>
cudaError_t lanczos_step_cuda(T* Q, T* w, const double* beta_prev, int64_t b, int64_t m,
                              int64_t n, int64_t j, double tol, double* alpha, double* beta,
                              bool* breakdown, double* workspace, cudaStream_t stream);

// Number of float64 elements of the `workspace` that reorthogonalize_cuda needs.
int64_t reorthogonalize_workspace_size(int64_t b, int64_t j, int64_t n);

// CGS2 of w against rows 0..j-1 of Q (0 <= j <= m), the second update only where needed
// (see lanczos_kernels.cu); coeffs (b, j) float64 receives the sum of the applied passes'
// coefficients. j == 0 or b == 0 enqueues nothing.
template <typename T>
cudaError_t reorthogonalize_cuda(const T* Q, T* w, int64_t b, int64_t m, int64_t n, int64_t j,
                                 double* coeffs, double* workspace, cudaStream_t stream);

// Number of float64 elements of the `workspace` that gs_sweep_cuda needs.
int64_t gs_sweep_workspace_size(int64_t b, int64_t dot_rows, int64_t n);

// One sweep of the plan against rows 0..rows-1 (0 <= rows <= m): where coef (b, rows)
// float64 is not null, w -= Q_R^T coef; then out[0 : b*dot_rows] = Q_R w (row-major
// (b, dot_rows), dot_rows = rows or 0) and out[b*dot_rows : + b] = ||w||^2. Deterministic
// like the other launchers. b == 0 enqueues nothing.
template <typename T>
cudaError_t gs_sweep_cuda(const T* Q, T* w, const double* coef, int64_t b, int64_t m, int64_t n,
                          int64_t rows, int64_t dot_rows, double* out, double* workspace,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace hesslab
