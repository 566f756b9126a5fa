// CUDA kernels of lanczos_step_ and reorthogonalize_ (plain CUDA, no torch).
//
// Must match hesslab/reference.py. For each run i independently, with every inner
// product and norm accumulated in float64 whatever the storage dtype T:
//   lanczos_step_:    a0 = <w, q_j>, nw = ||w||;  w -= a0 q_j + beta_prev[i] q_{j-1} (j > 0);
//                     two classical Gram-Schmidt passes against q_0..q_j (c = Q w; w -= Q^T c),
//                     the second update only where ||c(pass 2)|| > eps ||w|| (eps: T's machine
//                     epsilon; elsewhere w is already orthogonal to working precision and
//                     c(pass 2) counts as 0); alpha = a0 + c_j(pass 1) + c_j(pass 2); beta = ||w||;
//                     breakdown = beta <= tol * (nw + |beta_prev|); Q[i, j+1] = breakdown ? 0 : w / beta
//                     when j + 1 < m. w keeps the unnormalised residual.
//   reorthogonalize_: the two passes against q_0..q_{j-1} (the second as above); returns
//                     c(pass 1) + c(pass 2). The CPU kernel applies the same rule.
//
// Memory layout: Q (b, m, n) row-major, row r of run i at Q + i*m*n + r*n; w (b, n);
// coefficients (b, rows) row-major in a float64 workspace zeroed with cudaMemsetAsync.
//
// The ops are bandwidth-bound; each Gram-Schmidt pass is two kernels:
//   dot_rows_kernel: grid (x: <= 1024 blocks striding over n, y: runs), 256 threads.
//     Rows are taken kRowTile at a time so that w is read once per tile; each thread
//     accumulates its strided elements in float64 registers, the block reduces them
//     (warp shuffles + shared memory) and thread 0 atomicAdds the block's partial sum
//     into the zeroed coefficient (atomicAdd on double: sm_60+).
//   subtract_rows_kernel: same grid; thread x of run i computes
//     w[i, x] -= sum_r c[i, r] Q[i, r, x] in float64, coalesced over x for every row r.
// Norms are dot_rows_kernel with w as its own single "row". The per-run scalar logic
// (alpha, beta, breakdown) is one thread per run; normalize_kernel writes Q[:, j+1].
// All indexing is int64_t (n up to 1e8, b*m*n beyond 2^31).
#include "lanczos_kernels.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "cuda_utils.cuh"

namespace hesslab {
namespace cuda {
namespace {

// Rows whose dot products with w one sweep of dot_rows_kernel computes.
constexpr int kRowTile = 8;
constexpr int kWarps = kBlockThreads / 32;

__device__ double warp_reduce_sum(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum of v over the block (blockDim.x == kBlockThreads), valid in thread 0. Every thread
// of the block must call it; it may be called repeatedly.
__device__ double block_reduce_sum(double v) {
  __shared__ double warp_sums[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_reduce_sum(v);
  __syncthreads();  // warp 0 has finished reading warp_sums of the previous call
  if (lane == 0) {
    warp_sums[warp] = v;
  }
  __syncthreads();
  v = 0.0;
  if (warp == 0) {
    v = warp_reduce_sum(lane < kWarps ? warp_sums[lane] : 0.0);
  }
  return v;
}

// c[i*ldc + r] += <X[i*x_run + r*x_row, 0:n], w[i, 0:n]> for r < rows, i < b (float64).
// c must be zeroed beforehand; X may alias w (squared norms: X = w, rows = 1).
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    dot_rows_kernel(const T* X, int64_t x_run, int64_t x_row, int64_t rows, const T* w,
                    int64_t b, int64_t n, double* c, int64_t ldc) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.y; i < b; i += gridDim.y) {
    const T* Xi = X + i * x_run;
    const T* wi = w + i * n;
    for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
      // Block-uniform, so every thread reaches the same block_reduce_sum calls below.
      const int64_t tile = rows - r0 < kRowTile ? rows - r0 : kRowTile;
      double acc[kRowTile];
#pragma unroll
      for (int k = 0; k < kRowTile; ++k) {
        acc[k] = 0.0;
      }
      for (int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; x < n;
           x += stride) {
        const double wx = static_cast<double>(wi[x]);
#pragma unroll
        for (int k = 0; k < kRowTile; ++k) {
          if (k < tile) {
            acc[k] += static_cast<double>(Xi[(r0 + k) * x_row + x]) * wx;
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kRowTile; ++k) {
        if (k < tile) {
          const double sum = block_reduce_sum(acc[k]);
          if (threadIdx.x == 0) {
            atomicAdd(&c[i * ldc + r0 + k], sum);
          }
        }
      }
    }
  }
}

// w[i, x] -= sum_{r < rows} c[i*ldc + r] * Q[i*q_run + r*n + x], accumulated in float64;
// runs with mask[i] false (mask not null) are skipped without reading Q.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    subtract_rows_kernel(const T* Q, int64_t q_run, int64_t rows, const double* c, int64_t ldc,
                         T* w, int64_t b, int64_t n, const bool* mask) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.y; i < b; i += gridDim.y) {
    if (mask != nullptr && !mask[i]) {
      continue;
    }
    const T* Qi = Q + i * q_run;
    const double* ci = c + i * ldc;
    T* wi = w + i * n;
    for (int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; x < n;
         x += stride) {
      double acc = 0.0;
      for (int64_t r = 0; r < rows; ++r) {
        acc += ci[r] * static_cast<double>(Qi[r * n + x]);
      }
      wi[x] = static_cast<T>(static_cast<double>(wi[x]) - acc);
    }
  }
}

// Float64 workspace of lanczos_step_cuda, carved from one zeroed buffer.
struct StepWorkspace {
  double* w_norm2;  // (b,)      ||w_in||^2
  double* first;    // (b, 2)    [beta_prev, a0]: coefficients of q_{j-1}, q_j
  double* pass1;    // (b, j+1)  Gram-Schmidt coefficients, pass 1
  double* pass2;    // (b, j+1)  pass 2
  double* mid2;     // (b,)      ||w||^2 after the first pass
  bool* again;      // (b,)      second update needed (carved from b doubles)
  double* beta2;    // (b,)      ||w_out||^2
};

StepWorkspace step_workspace(double* base, int64_t b, int64_t j) {
  StepWorkspace ws;
  ws.w_norm2 = base;
  ws.first = ws.w_norm2 + b;
  ws.pass1 = ws.first + 2 * b;
  ws.pass2 = ws.pass1 + b * (j + 1);
  ws.mid2 = ws.pass2 + b * (j + 1);
  ws.again = reinterpret_cast<bool*>(ws.mid2 + b);
  ws.beta2 = ws.mid2 + 2 * b;
  return ws;
}

// One thread per run: alpha, beta and breakdown from the accumulated sums.
__global__ void __launch_bounds__(kBlockThreads)
    step_scalars_kernel(StepWorkspace ws, const double* beta_prev, int64_t b, int64_t j, double tol,
                        double* alpha, double* beta, bool* breakdown) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= b) {
    return;
  }
  const int64_t ld = j + 1;
  alpha[i] = ws.first[2 * i + 1] + ws.pass1[i * ld + j] + ws.pass2[i * ld + j];
  const double beta_i = sqrt(ws.beta2[i]);
  beta[i] = beta_i;
  const double scale = sqrt(ws.w_norm2[i]) + (j > 0 ? fabs(beta_prev[i]) : 0.0);
  breakdown[i] = beta_i <= tol * scale;
}

// q_next[i*q_run + x] = w[i, x] / beta[i], or 0 on breakdown (or beta not > 0, so that
// the row is never NaN/Inf even for tol < 0).
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    normalize_kernel(const T* w, const double* beta, const bool* breakdown, T* q_next,
                     int64_t q_run, int64_t b, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.y; i < b; i += gridDim.y) {
    const double beta_i = beta[i];
    const bool zero = breakdown[i] || !(beta_i > 0.0);
    const T* wi = w + i * n;
    T* qi = q_next + i * q_run;
    for (int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; x < n;
         x += stride) {
      qi[x] = zero ? T(0) : static_cast<T>(static_cast<double>(wi[x]) / beta_i);
    }
  }
}

// One thread per run: again[i] = ||c_i|| > eps ||w_i|| (||w_i||^2 in norm2); where not,
// c_i is zeroed (the update it stands for is not applied).
__global__ void __launch_bounds__(kBlockThreads)
    second_update_kernel(double* c, const double* norm2, int64_t rows, int64_t b, double eps,
                         bool* again) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= b) {
    return;
  }
  double c2 = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    c2 += c[i * rows + r] * c[i * rows + r];
  }
  const bool needed = !(c2 <= eps * eps * norm2[i]);  // NaN takes the second update too
  again[i] = needed;
  if (!needed) {
    for (int64_t r = 0; r < rows; ++r) {
      c[i * rows + r] = 0.0;
    }
  }
}

// out[e] = a[e] + b[e] for e < count.
__global__ void __launch_bounds__(kBlockThreads)
    add_kernel(const double* a, const double* b, double* out, int64_t count) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += stride) {
    out[e] = a[e] + b[e];
  }
}

dim3 run_grid(int64_t b, int64_t n) { return dim3(stride_blocks(n), stride_blocks_y(b)); }

// Launches dot_rows_kernel (see there); nothing to do when a dimension is empty.
template <typename T>
cudaError_t launch_dots(const T* X, int64_t x_run, int64_t x_row, int64_t rows, const T* w,
                        int64_t b, int64_t n, double* c, int64_t ldc, cudaStream_t stream) {
  if (rows == 0 || n == 0) {
    return cudaSuccess;
  }
  dot_rows_kernel<T><<<run_grid(b, n), kBlockThreads, 0, stream>>>(X, x_run, x_row, rows, w, b,
                                                                    n, c, ldc);
  return cudaGetLastError();
}

// Launches subtract_rows_kernel (see there); nothing to do when a dimension is empty.
template <typename T>
cudaError_t launch_subtract(const T* Q, int64_t q_run, int64_t rows, const double* c,
                            int64_t ldc, T* w, int64_t b, int64_t n, cudaStream_t stream,
                            const bool* mask = nullptr) {
  if (rows == 0 || n == 0) {
    return cudaSuccess;
  }
  subtract_rows_kernel<T><<<run_grid(b, n), kBlockThreads, 0, stream>>>(Q, q_run, rows, c, ldc,
                                                                         w, b, n, mask);
  return cudaGetLastError();
}

// CGS2 of w against rows 0..rows-1 of Q (m rows per run), into zeroed c1, c2 (b, rows) and
// mid2 (b,): c1 = Q w, w -= Q^T c1; c2 = Q w and mid2 = ||w||^2; then w -= Q^T c2 only for
// the runs that need it (see the top; c2 is zeroed for the others).
template <typename T>
cudaError_t cgs2(const T* Q, int64_t m, int64_t rows, T* w, int64_t b, int64_t n, double* c1,
                 double* c2, double* mid2, bool* again, cudaStream_t stream) {
  if (rows == 0 || n == 0) {
    return cudaSuccess;
  }
  HESSLAB_CUDA_TRY(launch_dots<T>(Q, m * n, n, rows, w, b, n, c1, rows, stream));
  HESSLAB_CUDA_TRY(launch_subtract<T>(Q, m * n, rows, c1, rows, w, b, n, stream));
  HESSLAB_CUDA_TRY(launch_dots<T>(Q, m * n, n, rows, w, b, n, c2, rows, stream));
  HESSLAB_CUDA_TRY(launch_dots<T>(w, n, 0, 1, w, b, n, mid2, 1, stream));
  second_update_kernel<<<static_cast<unsigned int>(ceil_div(b, kBlockThreads)), kBlockThreads, 0,
                         stream>>>(c2, mid2, rows, b, std::numeric_limits<T>::epsilon(), again);
  HESSLAB_CUDA_TRY(cudaGetLastError());
  return launch_subtract<T>(Q, m * n, rows, c2, rows, w, b, n, stream, again);
}

}  // namespace

int64_t lanczos_step_workspace_size(int64_t b, int64_t j) { return b * (2 * (j + 1) + 6); }

template <typename T>
cudaError_t lanczos_step_cuda(T* Q, T* w, const double* beta_prev, int64_t b, int64_t m,
                              int64_t n, int64_t j, double tol, double* alpha, double* beta,
                              bool* breakdown, double* workspace, cudaStream_t stream) {
  if (b == 0) {
    return cudaSuccess;
  }
  const StepWorkspace ws = step_workspace(workspace, b, j);
  HESSLAB_CUDA_TRY(cudaMemsetAsync(workspace, 0,
                                   lanczos_step_workspace_size(b, j) * sizeof(double), stream));
  const int64_t run = m * n;
  const T* q_j = Q + j * n;
  // ||w_in||^2 and a0 = <w, q_j> (into first[2i + 1]).
  HESSLAB_CUDA_TRY(launch_dots<T>(w, n, 0, 1, w, b, n, ws.w_norm2, 1, stream));
  HESSLAB_CUDA_TRY(launch_dots<T>(q_j, run, n, 1, w, b, n, ws.first + 1, 2, stream));
  // w -= beta_prev q_{j-1} + a0 q_j: rows j-1, j with coefficients first[2i], first[2i + 1].
  if (j > 0) {
    HESSLAB_CUDA_TRY(cudaMemcpy2DAsync(ws.first, 2 * sizeof(double), beta_prev, sizeof(double),
                                       sizeof(double), b, cudaMemcpyDeviceToDevice, stream));
    HESSLAB_CUDA_TRY(launch_subtract<T>(q_j - n, run, 2, ws.first, 2, w, b, n, stream));
  } else {
    HESSLAB_CUDA_TRY(launch_subtract<T>(q_j, run, 1, ws.first + 1, 2, w, b, n, stream));
  }
  // CGS2 against q_0..q_j.
  HESSLAB_CUDA_TRY(cgs2<T>(Q, m, j + 1, w, b, n, ws.pass1, ws.pass2, ws.mid2, ws.again, stream));
  // ||w_out||^2, then the per-run scalars.
  HESSLAB_CUDA_TRY(launch_dots<T>(w, n, 0, 1, w, b, n, ws.beta2, 1, stream));
  step_scalars_kernel<<<static_cast<unsigned int>(ceil_div(b, kBlockThreads)), kBlockThreads, 0,
                        stream>>>(ws, beta_prev, b, j, tol, alpha, beta, breakdown);
  HESSLAB_CUDA_TRY(cudaGetLastError());
  if (j + 1 < m && n > 0) {
    normalize_kernel<T><<<run_grid(b, n), kBlockThreads, 0, stream>>>(w, beta, breakdown,
                                                                      Q + (j + 1) * n, run, b, n);
    HESSLAB_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

int64_t reorthogonalize_workspace_size(int64_t b, int64_t j) { return 2 * b * j + 2 * b; }

template <typename T>
cudaError_t reorthogonalize_cuda(const T* Q, T* w, int64_t b, int64_t m, int64_t n, int64_t j,
                                 double* coeffs, double* workspace, cudaStream_t stream) {
  if (b == 0 || j == 0) {
    return cudaSuccess;
  }
  double* pass1 = workspace;
  double* pass2 = workspace + b * j;
  double* mid2 = pass2 + b * j;
  bool* again = reinterpret_cast<bool*>(mid2 + b);
  HESSLAB_CUDA_TRY(cudaMemsetAsync(workspace, 0,
                                   reorthogonalize_workspace_size(b, j) * sizeof(double), stream));
  HESSLAB_CUDA_TRY(cgs2<T>(Q, m, j, w, b, n, pass1, pass2, mid2, again, stream));
  add_kernel<<<stride_blocks(b * j), kBlockThreads, 0, stream>>>(pass1, pass2, coeffs, b * j);
  return cudaGetLastError();
}

template cudaError_t lanczos_step_cuda<float>(float*, float*, const double*, int64_t, int64_t,
                                              int64_t, int64_t, double, double*, double*, bool*,
                                              double*, cudaStream_t);
template cudaError_t lanczos_step_cuda<double>(double*, double*, const double*, int64_t, int64_t,
                                               int64_t, int64_t, double, double*, double*, bool*,
                                               double*, cudaStream_t);
template cudaError_t reorthogonalize_cuda<float>(const float*, float*, int64_t, int64_t, int64_t,
                                                 int64_t, double*, double*, cudaStream_t);
template cudaError_t reorthogonalize_cuda<double>(const double*, double*, int64_t, int64_t,
                                                  int64_t, int64_t, double*, double*,
                                                  cudaStream_t);

}  // namespace cuda
}  // namespace hesslab
