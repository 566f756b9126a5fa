// CUDA kernels of lanczos_step_ and reorthogonalize_ (plain CUDA, no torch).
//
// Algorithm: the Gram–Schmidt plan of common/gram_schmidt_plan.h, the same sequence of
// sweeps and the same scalar formulas (alpha, beta, breakdown, skip rule, next row) as
// cpu/lanczos_cpu.cpp; must match hesslab/reference.py to rounding. For each run i
// independently, every inner product and norm accumulated in float64 whatever the
// storage dtype T:
//   sweep 1: d = Q_R w, ||w||^2                                       (launch_sums)
//   sweep 2: w -= Q_R^T d (subtract_rows_kernel); c = Q_R w, ||w||^2  (launch_sums)
//   skip:    again = plan::second_update_needed (skip_rule_kernel)
//   sweep 3: w -= Q_R^T c where again (masked subtract_rows_kernel); ||w||^2
//   lanczos_step_: step_scalars_kernel (alpha, beta, breakdown, the next row's scale),
//                  normalize_kernel writes Q[:, j+1]; reorthogonalize_: coefficient_kernel.
// Q_R is read three times per call (four when some run takes the second update), plus
// small reads of w; 12-14 launches, no host synchronisation.
//
// Memory layout: Q (b, m, n) row-major, row r of run i at Q + i*m*n + r*n; w (b, n);
// coefficients (b, rows) row-major; every float64 intermediate lives in one workspace
// (see Workspace) that the adapter allocates.
//
// Thread/block mapping: grid-stride kernels use a grid (x: G = min(ceil(n / 256), 1024)
// blocks striding over n, y: min(b, 65535) blocks striding over the runs) of 256 threads.
//   dot_rows_kernel: rows are taken kRowTile at a time so that w is read once per tile;
//     each thread accumulates its strided elements in float64 registers, the block reduces
//     them (warp shuffles + shared memory) and thread 0 stores the block's partial sum in
//     its own slot partial[blockIdx.x][output]; finalize_kernel (one warp per output) then
//     adds the G partial sums in a fixed order. No atomics: for a given n (hence G) every
//     sum is formed in the same order on every call, so the ops are bitwise deterministic
//     run to run on one GPU model and build (they still differ from the CPU kernel, which
//     adds in another fixed order, by rounding).
//   subtract_rows_kernel: same grid; thread x of run i computes
//     w[i, x] -= sum_r c[i, r] Q[i, r, x] in float64, coalesced over x for every row r.
// Per-run scalar logic (skip rule, alpha, beta, breakdown) is one thread per run.
// All indexing is int64_t (n up to 1e8, b*m*n beyond 2^31).
#include "lanczos_kernels.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "common/gram_schmidt_plan.h"
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

// partial[blockIdx.x * ldp + col0 + i*rows + r] = this block's share of
// <X[i*x_run + r*x_row, 0:n], w[i, 0:n]> for r < rows, i < b (float64). X may alias w
// (squared norms: X = w, x_row = 0, rows = 1).
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    dot_rows_kernel(const T* X, int64_t x_run, int64_t x_row, int64_t rows, const T* w,
                    int64_t b, int64_t n, double* partial, int64_t ldp, int64_t col0) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double* slot = partial + static_cast<int64_t>(blockIdx.x) * ldp + col0;
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
            slot[i * rows + r0 + k] = sum;
          }
        }
      }
    }
  }
}

// out[o] = sum_{g < G} partial[g * count + o] for o < count, one warp per output: lane l
// adds g = l, l + 32, ... in order, then the warp's fixed shuffle tree. Deterministic.
__global__ void __launch_bounds__(kBlockThreads)
    finalize_kernel(const double* partial, int64_t G, int64_t count, double* out) {
  const int64_t o = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (o >= count) {
    return;  // warp-uniform: o is the same for the 32 lanes of a warp
  }
  const int lane = threadIdx.x & 31;
  double s = 0.0;
  for (int64_t g = lane; g < G; g += 32) {
    s += partial[g * count + o];
  }
  s = warp_reduce_sum(s);
  if (lane == 0) {
    out[o] = s;
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

// Float64 workspace, carved from one buffer: sums of sweeps 1, 2 (dots then norms, the
// layout launch_sums writes) and 3, the skip flags, the next row's scale and the partial
// sums of the two-stage reductions. The partial sums take G * b * (rows + 1) doubles with
// G <= n / 256: at most ~1% of the basis' own bytes (2 (rows + 1) / (256 m) of a float32 Q).
struct Workspace {
  double* s1;       // (b*rows + b)  d, then ||w_in||^2
  double* s2;       // (b*rows + b)  c, then ||w||^2 after sweep 2
  double* s3;       // (b,)          ||w||^2 after sweep 3
  double* scale;    // (b,)          plan::next_row_scale (lanczos_step_)
  bool* again;      // (b,)          plan::second_update_needed (carved from b doubles)
  double* partial;  // (G * (b*rows + b))
};

int64_t partial_blocks(int64_t n) { return n > 0 ? stride_blocks(n) : 0; }

int64_t workspace_size(int64_t b, int64_t rows, int64_t n) {
  return 2 * (b * rows + b) + 3 * b + partial_blocks(n) * (b * rows + b);
}

Workspace carve(double* base, int64_t b, int64_t rows) {
  Workspace ws;
  ws.s1 = base;
  ws.s2 = ws.s1 + b * rows + b;
  ws.s3 = ws.s2 + b * rows + b;
  ws.scale = ws.s3 + b;
  ws.again = reinterpret_cast<bool*>(ws.scale + b);
  ws.partial = ws.scale + 2 * b;
  return ws;
}

dim3 run_grid(int64_t b, int64_t n) { return dim3(stride_blocks(n), stride_blocks_y(b)); }

unsigned int warp_blocks(int64_t count) {
  return static_cast<unsigned int>(ceil_div(count * 32, kBlockThreads));
}

// out[0 : b*rows] = Q_R w (row-major (b, rows)), out[b*rows : b*rows + b] = ||w||^2, by
// the two-stage reduction (see the top). Zeros when n == 0.
template <typename T>
cudaError_t launch_sums(const T* Q, int64_t m, int64_t rows, const T* w, int64_t b, int64_t n,
                        double* partial, double* out, cudaStream_t stream) {
  const int64_t count = b * rows + b;
  if (n == 0) {
    return cudaMemsetAsync(out, 0, count * sizeof(double), stream);
  }
  if (rows > 0) {
    dot_rows_kernel<T><<<run_grid(b, n), kBlockThreads, 0, stream>>>(Q, m * n, n, rows, w, b, n,
                                                                      partial, count, 0);
    HESSLAB_CUDA_TRY(cudaGetLastError());
  }
  dot_rows_kernel<T><<<run_grid(b, n), kBlockThreads, 0, stream>>>(w, n, 0, 1, w, b, n, partial,
                                                                    count, b * rows);
  HESSLAB_CUDA_TRY(cudaGetLastError());
  finalize_kernel<<<warp_blocks(count), kBlockThreads, 0, stream>>>(partial, partial_blocks(n),
                                                                    count, out);
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

// One thread per run: again[i] = plan::second_update_needed(||c_i||^2, ||w_i||^2, eps).
__global__ void __launch_bounds__(kBlockThreads)
    skip_rule_kernel(const double* c, const double* norm2, int64_t rows, int64_t b, double eps,
                     bool* again) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= b) {
    return;
  }
  double c2 = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    c2 += c[i * rows + r] * c[i * rows + r];
  }
  again[i] = plan::second_update_needed(c2, norm2[i], eps);
}

// The plan's sweeps 1-3 against rows 0..rows-1 of Q (m rows per run, rows > 0, b > 0).
template <typename T>
cudaError_t cgs2(const T* Q, int64_t m, int64_t rows, T* w, int64_t b, int64_t n,
                 const Workspace& ws, cudaStream_t stream) {
  HESSLAB_CUDA_TRY(launch_sums<T>(Q, m, rows, w, b, n, ws.partial, ws.s1, stream));  // sweep 1
  HESSLAB_CUDA_TRY(launch_subtract<T>(Q, m * n, rows, ws.s1, rows, w, b, n, stream));  // sweep 2
  HESSLAB_CUDA_TRY(launch_sums<T>(Q, m, rows, w, b, n, ws.partial, ws.s2, stream));
  skip_rule_kernel<<<static_cast<unsigned int>(ceil_div(b, kBlockThreads)), kBlockThreads, 0,
                     stream>>>(ws.s2, ws.s2 + b * rows, rows, b,
                               std::numeric_limits<T>::epsilon(), ws.again);
  HESSLAB_CUDA_TRY(cudaGetLastError());
  HESSLAB_CUDA_TRY(
      launch_subtract<T>(Q, m * n, rows, ws.s2, rows, w, b, n, stream, ws.again));  // sweep 3
  return launch_sums<T>(Q, m, 0, w, b, n, ws.partial, ws.s3, stream);
}

// One thread per run: alpha, beta, breakdown and the next row's scale, by the plan.
__global__ void __launch_bounds__(kBlockThreads)
    step_scalars_kernel(Workspace ws, const double* beta_prev, int64_t b, int64_t j, double tol,
                        double* alpha, double* beta, bool* breakdown) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= b) {
    return;
  }
  const int64_t rows = plan::step_rows(j);
  const bool again = ws.again[i];
  alpha[i] = plan::coefficient(ws.s1[i * rows + j], ws.s2[i * rows + j], again);
  const double beta_i = sqrt(plan::final_norm2(again, ws.s2[b * rows + i], ws.s3[i]));
  const bool broke = plan::is_breakdown(beta_i, ws.s1[b * rows + i], beta_prev[i], j, tol);
  beta[i] = beta_i;
  breakdown[i] = broke;
  ws.scale[i] = plan::next_row_scale(beta_i, broke);
}

// q_next[i*q_run + x] = plan::next_row_entry(w[i, x], scale[i]) (0 on breakdown: see the plan).
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    normalize_kernel(const T* w, const double* scale, T* q_next, int64_t q_run, int64_t b,
                     int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.y; i < b; i += gridDim.y) {
    const double s = scale[i];
    const T* wi = w + i * n;
    T* qi = q_next + i * q_run;
    for (int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; x < n;
         x += stride) {
      qi[x] = static_cast<T>(plan::next_row_entry(static_cast<double>(wi[x]), s));
    }
  }
}

// coeffs[e] = plan::coefficient(d[e], c[e], again[e / rows]) for e < b * rows.
__global__ void __launch_bounds__(kBlockThreads)
    coefficient_kernel(const double* d, const double* c, const bool* again, int64_t rows,
                       int64_t count, double* coeffs) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += stride) {
    coeffs[e] = plan::coefficient(d[e], c[e], again[e / rows]);
  }
}

}  // namespace

int64_t lanczos_step_workspace_size(int64_t b, int64_t j, int64_t n) {
  return workspace_size(b, plan::step_rows(j), n);
}

template <typename T>
cudaError_t lanczos_step_cuda(T* Q, T* w, const double* beta_prev, int64_t b, int64_t m,
                              int64_t n, int64_t j, double tol, double* alpha, double* beta,
                              bool* breakdown, double* workspace, cudaStream_t stream) {
  if (b == 0) {
    return cudaSuccess;
  }
  const int64_t rows = plan::step_rows(j);
  const Workspace ws = carve(workspace, b, rows);
  HESSLAB_CUDA_TRY(cgs2<T>(Q, m, rows, w, b, n, ws, stream));
  step_scalars_kernel<<<static_cast<unsigned int>(ceil_div(b, kBlockThreads)), kBlockThreads, 0,
                        stream>>>(ws, beta_prev, b, j, tol, alpha, beta, breakdown);
  HESSLAB_CUDA_TRY(cudaGetLastError());
  if (j + 1 < m && n > 0) {
    normalize_kernel<T><<<run_grid(b, n), kBlockThreads, 0, stream>>>(w, ws.scale, Q + (j + 1) * n,
                                                                      m * n, b, n);
    HESSLAB_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

int64_t reorthogonalize_workspace_size(int64_t b, int64_t j, int64_t n) {
  return workspace_size(b, plan::reorthogonalize_rows(j), n);
}

template <typename T>
cudaError_t reorthogonalize_cuda(const T* Q, T* w, int64_t b, int64_t m, int64_t n, int64_t j,
                                 double* coeffs, double* workspace, cudaStream_t stream) {
  const int64_t rows = plan::reorthogonalize_rows(j);
  if (b == 0 || rows == 0) {
    return cudaSuccess;
  }
  const Workspace ws = carve(workspace, b, rows);
  HESSLAB_CUDA_TRY(cgs2<T>(Q, m, rows, w, b, n, ws, stream));
  coefficient_kernel<<<stride_blocks(b * rows), kBlockThreads, 0, stream>>>(
      ws.s1, ws.s2, ws.again, rows, b * rows, coeffs);
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
