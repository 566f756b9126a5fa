// CUDA kernels of lanczos_step_, reorthogonalize_ and gs_sweep_ (plain CUDA, no torch).
//
// Algorithm: the Gram–Schmidt plan of common/gram_schmidt_plan.h, the same sequence of
// sweeps and the same scalar formulas (alpha, beta, breakdown, skip rule, next row) as
// cpu/lanczos_cpu.cpp; must match hesslab/reference.py to rounding. For each run i
// independently, every inner product and norm accumulated in float64 whatever the
// storage dtype T:
//   sweep 1: d = Q_R w and ||w||^2 in one pass                    (launch_sums)
//   sweep 2: w -= Q_R^T d, then c = Q_R w and ||w||^2, fused per column (update_dots_kernel)
//   skip:    again = plan::second_update_needed (skip_rule_kernel)
//   sweep 3: w -= Q_R^T c where again, and the final ||w||^2 (update_dots_kernel, masked)
//   lanczos_step_: step_scalars_kernel (alpha, beta, breakdown, the next row's scale),
//                  normalize_kernel writes Q[:, j+1]; reorthogonalize_: coefficient_kernel.
// Like the CPU kernel, sweep 2 fuses the update of w with the next inner products: each
// column's rows are read for the update and again at once for the dots (from L2 where
// the resident warps' slices fit), so Q_R comes from DRAM about twice per call (three
// times when some run takes the second update); the norms ride along with the sweeps.
// 9 launches, no host synchronisation. Beyond kMaxFusedRows = 512 rows sweep 2 runs as
// two passes (subtract_rows_kernel, then the dot sweep). The dot and fused sweeps load
// float4/double2 (16 bytes) where n is a multiple of the vector width and Q and w are
// 16-byte aligned (fresh allocations always are), scalars otherwise; the summation order,
// hence the last bits, depends on which (deterministically, for given n and alignment).
//
// Memory layout: Q (b, m, n) row-major, row r of run i at Q + i*m*n + r*n; w (b, n);
// coefficients (b, rows) row-major; every float64 intermediate lives in one workspace
// (see Workspace) that the adapter allocates.
//
// Thread/block mapping: grid-stride kernels use a grid (x: G = min(ceil(n / 256),
// kBlocksPerSm * SMs) blocks striding over n, SMs = cudaDevAttrMultiProcessorCount of the
// current device, i.e. several waves of resident blocks; y: min(b, 65535) blocks striding
// over the runs) of 256 threads.
//   dot_rows_kernel: rows are taken kRowTile at a time so that w is read once per tile
//     (the first tile also accumulates ||w||^2); each thread accumulates its strided
//     elements in float64 registers, and one block reduction per tile (warp shuffles, one
//     shared-memory exchange for all the tile's sums: 2 __syncthreads) leaves the block's
//     partial sums, which thread 0 stores in the block's own slots
//     partial[blockIdx.x][output]; finalize_kernel (one warp per output) then adds the G
//     partial sums in a fixed order. No atomics: for a given n and GPU model (hence G)
//     every sum is formed in the same order on every call, so the ops are bitwise
//     deterministic run to run on one GPU model and build (they still differ from the CPU
//     kernel, which adds in another fixed order, by rounding).
//   update_dots_kernel: same grid; thread x of run i computes w[i, x] -= sum_r c[i, r]
//     Q[i, r, x] in float64 (coalesced over x for every row r), then the tile products
//     with the updated entry; per 32-column chunk each warp reduces them by shuffles into
//     its own shared-memory accumulators, the block adds its warps' at the end, and
//     finalize_kernel adds the blocks': fixed orders, no atomics.
//   subtract_rows_kernel (beyond 512 rows): the update alone, same mapping.
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
// Grid-stride blocks per SM (x extent of the grid): dot_rows_kernel takes 64 registers,
// so 4 blocks of 256 threads are resident per SM and 16 per SM make four waves (two for
// the lighter kernels, 8 resident). tests/test_ops_paths.py's wrap case assumes <= 160 SMs.
constexpr int64_t kBlocksPerSm = 16;

// SMs of the current device (an attribute query: no synchronisation); 132 if it fails.
int64_t sm_count() {
  int device = 0;
  int sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      sms <= 0) {
    cudaGetLastError();  // clear the error: the launches report their own
    return 132;
  }
  return sms;
}

// gridDim.x of the Lanczos grid-stride kernels over n > 0 columns on the current device.
unsigned int lanczos_blocks(int64_t n) {
  const int64_t cap = kBlocksPerSm * sm_count();
  return static_cast<unsigned int>(std::min(ceil_div(n, kBlockThreads), cap));
}

// Vector loads: W consecutive entries of T as doubles, in one 16-byte load where W is
// the vector width (float4: 4 floats, double2: 2 doubles), or a scalar load (W = 1).
// The vector path needs n % W == 0 and 16-byte aligned Q and w (every row then starts
// aligned); the launchers check it and otherwise run the scalar kernels.
template <typename T>
struct VecWidth {
  static constexpr int value = 16 / sizeof(T);
};

template <typename T, int W>
__device__ inline void load_as_double(const T* p, double (&out)[W]) {
  if constexpr (W == 1) {
    out[0] = static_cast<double>(p[0]);
  } else if constexpr (sizeof(T) == 4) {
    static_assert(W == 4, "float4");
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  } else {
    static_assert(W == 2, "double2");
    const double2 v = *reinterpret_cast<const double2*>(p);
    out[0] = v.x;
    out[1] = v.y;
  }
}

template <typename T>
bool vector_ok(const T* Q, const T* w, int64_t n) {
  constexpr int W = VecWidth<T>::value;
  return n % W == 0 && reinterpret_cast<uintptr_t>(Q) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

__device__ double warp_reduce_sum(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <int K>
__device__ void block_reduce_sums(double (&v)[K]) {
  __shared__ double warp_sums[K][kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = warp_reduce_sum(v[k]);
  }
  __syncthreads();  // warp 0 has finished reading warp_sums of the previous call
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      warp_sums[k][warp] = v[k];
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      v[k] = warp_reduce_sum(lane < kWarps ? warp_sums[k][lane] : 0.0);
    }
  }
}

// This block's share (float64) of <Q[i*q_run + r*n, 0:n], w[i, 0:n]> for r < rows and of
// ||w[i]||^2, for i < b: partial[blockIdx.x * ldp + i*rows + r] and
// partial[blockIdx.x * ldp + b*rows + i]. rows may be 0 (the norm alone); the norm rides
// along with the first row tile, so w is read once per tile of kRowTile rows. Each thread
// takes W consecutive entries at a time (W = 1, or the vector width with n % W == 0).
template <typename T, int W>
__global__ void __launch_bounds__(kBlockThreads)
    dot_rows_kernel(const T* Q, int64_t q_run, int64_t rows, const T* w, int64_t b, int64_t n,
                    double* partial, int64_t ldp) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t groups = n / W;
  double* slot = partial + static_cast<int64_t>(blockIdx.x) * ldp;
  for (int64_t i = blockIdx.y; i < b; i += gridDim.y) {
    const T* Qi = Q + i * q_run;
    const T* wi = w + i * n;
    // r0 = 0 always runs (the norm); block-uniform, so every thread reaches the same
    // block_reduce_sums calls below.
    for (int64_t r0 = 0; r0 == 0 || r0 < rows; r0 += kRowTile) {
      const int64_t tile = rows - r0 < kRowTile ? rows - r0 : kRowTile;  // 0..kRowTile
      const bool with_norm = r0 == 0;
      double acc[kRowTile + 1];  // the tile's dots, then ||w||^2
#pragma unroll
      for (int k = 0; k <= kRowTile; ++k) {
        acc[k] = 0.0;
      }
      for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
           g += stride) {
        const int64_t x = g * W;
        double wx[W];
        load_as_double<T, W>(wi + x, wx);
#pragma unroll
        for (int k = 0; k < kRowTile; ++k) {
          if (k < tile) {
            double q[W];
            load_as_double<T, W>(Qi + (r0 + k) * n + x, q);
#pragma unroll
            for (int e = 0; e < W; ++e) {
              acc[k] += q[e] * wx[e];
            }
          }
        }
        if (with_norm) {
#pragma unroll
          for (int e = 0; e < W; ++e) {
            acc[kRowTile] += wx[e] * wx[e];
          }
        }
      }
      block_reduce_sums<kRowTile + 1>(acc);
      if (threadIdx.x == 0) {
#pragma unroll
        for (int k = 0; k < kRowTile; ++k) {  // static indices: acc stays in registers
          if (k < tile) {
            slot[i * rows + r0 + k] = acc[k];
          }
        }
        if (with_norm) {
          slot[b * rows + i] = acc[kRowTile];
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

// Rows up to which sweeps 2 and 3 run fused (update_dots_kernel): its per-warp
// accumulators take kWarps * (rows + 1) doubles of shared memory (32.8 KB at 512).
constexpr int64_t kMaxFusedRows = 512;

// Sweep 2 (or 3) of the plan in one pass over each column of Q_R: w[i, x] -=
// sum_{r < rows} coef[i*rows + r] Q[i*q_run + r*n + x] (float64, rounded to T; skipped
// for runs with mask[i] false, mask not null), then, with the updated entry still in a
// register, this block's share of <Q[i, r], w[i]> for r < dot_rows (rows or 0) and of
// ||w[i]||^2 at partial[blockIdx.x * ldp + i*dot_rows + r] and
// partial[blockIdx.x * ldp + b*dot_rows + i]. Each warp walks its own 32-column chunks
// (chunk c of the block at x = (blockIdx.x + c * gridDim.x) * 256 + warp * 32 + lane), so
// a chunk's rows are read a second time right after the first, from L2 when the resident
// warps' slices fit there; per chunk and row tile each warp reduces its kRowTile + 1
// products by shuffles and lane 0 adds them to the warp's own shared-memory
// accumulators (no block barrier inside the loop); the block then adds its warps'
// accumulators in warp order. Fixed order throughout: deterministic.
template <typename T, int W>
__global__ void __launch_bounds__(kBlockThreads)
    update_dots_kernel(const T* Q, int64_t q_run, int64_t rows, const double* coef,
                       const bool* mask, int64_t dot_rows, T* w, int64_t b, int64_t n,
                       double* partial, int64_t ldp) {
  extern __shared__ double warp_acc[];  // [kWarps][dot_rows + 1]: dots, then ||w||^2
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t width = dot_rows + 1;
  const int64_t groups = n / W;  // W consecutive entries per lane and chunk
  double* mine = warp_acc + warp * width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double* slot = partial + static_cast<int64_t>(blockIdx.x) * ldp;
  for (int64_t i = blockIdx.y; i < b; i += gridDim.y) {
    const bool update = rows > 0 && (mask == nullptr || mask[i]);
    const T* Qi = Q + i * q_run;
    const double* ci = coef + i * rows;
    T* wi = w + i * n;
    for (int64_t r = lane; r < width; r += 32) {
      mine[r] = 0.0;
    }
    __syncwarp();
    // Warp-uniform loops: every lane reaches the same shuffles.
    for (int64_t g0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + warp * 32; g0 < groups;
         g0 += stride) {
      const int64_t x = (g0 + lane) * W;
      const bool inside = g0 + lane < groups;
      double wx[W];
#pragma unroll
      for (int e = 0; e < W; ++e) {
        wx[e] = 0.0;
      }
      if (inside) {
        load_as_double<T, W>(wi + x, wx);
        if (update) {
          double acc[W];
#pragma unroll
          for (int e = 0; e < W; ++e) {
            acc[e] = 0.0;
          }
          for (int64_t r = 0; r < rows; ++r) {
            double q[W];
            load_as_double<T, W>(Qi + r * n + x, q);
#pragma unroll
            for (int e = 0; e < W; ++e) {
              acc[e] += ci[r] * q[e];
            }
          }
#pragma unroll
          for (int e = 0; e < W; ++e) {
            const T updated = static_cast<T>(wx[e] - acc[e]);
            wi[x + e] = updated;
            wx[e] = static_cast<double>(updated);
          }
        }
      }
      for (int64_t r0 = 0; r0 == 0 || r0 < dot_rows; r0 += kRowTile) {
        const int64_t tile = dot_rows - r0 < kRowTile ? dot_rows - r0 : kRowTile;  // 0..8
        double v[kRowTile + 1];
#pragma unroll
        for (int k = 0; k < kRowTile; ++k) {
          v[k] = 0.0;
          if (inside && k < tile) {
            double q[W];
            load_as_double<T, W>(Qi + (r0 + k) * n + x, q);
#pragma unroll
            for (int e = 0; e < W; ++e) {
              v[k] += q[e] * wx[e];
            }
          }
        }
        v[kRowTile] = 0.0;
        if (r0 == 0) {
#pragma unroll
          for (int e = 0; e < W; ++e) {
            v[kRowTile] += wx[e] * wx[e];
          }
        }
#pragma unroll
        for (int k = 0; k <= kRowTile; ++k) {
          v[k] = warp_reduce_sum(v[k]);
        }
        if (lane == 0) {
#pragma unroll
          for (int k = 0; k < kRowTile; ++k) {  // static indices: v stays in registers
            if (k < tile) {
              mine[r0 + k] += v[k];
            }
          }
          if (r0 == 0) {
            mine[dot_rows] += v[kRowTile];
          }
        }
      }
    }
    __syncthreads();  // every warp's accumulators are complete
    for (int64_t r = threadIdx.x; r < width; r += blockDim.x) {
      double sum = 0.0;
      for (int k = 0; k < kWarps; ++k) {
        sum += warp_acc[k * width + r];
      }
      slot[r < dot_rows ? i * dot_rows + r : b * dot_rows + i] = sum;
    }
    __syncthreads();  // warp_acc is reset for the next run
  }
}

// Float64 workspace, carved from one buffer: sums of sweeps 1, 2 (dots then norms, the
// layout launch_sums writes) and 3, the skip flags, the next row's scale and the partial
// sums of the two-stage reductions. The partial sums take G * b * (rows + 1) doubles with
// G <= n / 256: at most ~1% of the basis' own bytes (2 (rows + 1) / (256 m) of a float32 Q).
// G depends on the device (its SM count): the adapter asks for the size with the
// tensors' device current, as the launch then runs.
struct Workspace {
  double* s1;       // (b*rows + b)  d, then ||w_in||^2
  double* s2;       // (b*rows + b)  c, then ||w||^2 after sweep 2
  double* s3;       // (b,)          ||w||^2 after sweep 3
  double* scale;    // (b,)          plan::next_row_scale (lanczos_step_)
  bool* again;      // (b,)          plan::second_update_needed (carved from b doubles)
  double* partial;  // (G * (b*rows + b))
};

int64_t partial_blocks(int64_t n) { return n > 0 ? lanczos_blocks(n) : 0; }

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

dim3 run_grid(int64_t b, int64_t n) { return dim3(lanczos_blocks(n), stride_blocks_y(b)); }

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
  const dim3 grid = run_grid(b, n);
  if (vector_ok(Q, w, n)) {
    dot_rows_kernel<T, VecWidth<T>::value><<<grid, kBlockThreads, 0, stream>>>(
        Q, m * n, rows, w, b, n, partial, count);
  } else {
    dot_rows_kernel<T, 1><<<grid, kBlockThreads, 0, stream>>>(Q, m * n, rows, w, b, n, partial,
                                                              count);
  }
  HESSLAB_CUDA_TRY(cudaGetLastError());
  finalize_kernel<<<warp_blocks(count), kBlockThreads, 0, stream>>>(partial, grid.x, count, out);
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

// Sweep 2 (dot_rows = rows) or 3 (dot_rows = 0, masked) of the plan: w -= Q_R^T coef,
// then out[0 : b*dot_rows] = Q_R w and out[b*dot_rows : +b] = ||w||^2 (see
// update_dots_kernel; two launches). More than kMaxFusedRows dot rows: the update and
// the sums as two sweeps (subtract_rows_kernel, launch_sums).
template <typename T>
cudaError_t launch_update_sums(const T* Q, int64_t m, int64_t rows, const double* coef,
                               const bool* mask, int64_t dot_rows, T* w, int64_t b, int64_t n,
                               double* partial, double* out, cudaStream_t stream) {
  const int64_t count = b * dot_rows + b;
  if (n == 0) {
    return cudaMemsetAsync(out, 0, count * sizeof(double), stream);
  }
  if (dot_rows > kMaxFusedRows) {
    HESSLAB_CUDA_TRY(launch_subtract<T>(Q, m * n, rows, coef, rows, w, b, n, stream, mask));
    return launch_sums<T>(Q, m, dot_rows, w, b, n, partial, out, stream);
  }
  const dim3 grid = run_grid(b, n);
  const size_t shared = static_cast<size_t>(kWarps * (dot_rows + 1)) * sizeof(double);
  if (vector_ok<T>(Q, w, n)) {
    update_dots_kernel<T, VecWidth<T>::value><<<grid, kBlockThreads, shared, stream>>>(
        Q, m * n, rows, coef, mask, dot_rows, w, b, n, partial, count);
  } else {
    update_dots_kernel<T, 1><<<grid, kBlockThreads, shared, stream>>>(
        Q, m * n, rows, coef, mask, dot_rows, w, b, n, partial, count);
  }
  HESSLAB_CUDA_TRY(cudaGetLastError());
  finalize_kernel<<<warp_blocks(count), kBlockThreads, 0, stream>>>(partial, grid.x, count, out);
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
  HESSLAB_CUDA_TRY(launch_update_sums<T>(Q, m, rows, ws.s1, nullptr, rows, w, b, n, ws.partial,
                                         ws.s2, stream));  // sweep 2: update, then c and norm
  skip_rule_kernel<<<static_cast<unsigned int>(ceil_div(b, kBlockThreads)), kBlockThreads, 0,
                     stream>>>(ws.s2, ws.s2 + b * rows, rows, b,
                               std::numeric_limits<T>::epsilon(), ws.again);
  HESSLAB_CUDA_TRY(cudaGetLastError());
  return launch_update_sums<T>(Q, m, rows, ws.s2, ws.again, 0, w, b, n, ws.partial, ws.s3,
                               stream);  // sweep 3 where again, and the final norm
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

int64_t gs_sweep_workspace_size(int64_t b, int64_t dot_rows, int64_t n) {
  return partial_blocks(n) * (b * dot_rows + b);
}

template <typename T>
cudaError_t gs_sweep_cuda(const T* Q, T* w, const double* coef, int64_t b, int64_t m, int64_t n,
                          int64_t rows, int64_t dot_rows, double* out, double* workspace,
                          cudaStream_t stream) {
  if (b == 0) {
    return cudaSuccess;
  }
  if (coef == nullptr || rows == 0) {  // sweep 1 of the plan: the sums alone
    return launch_sums<T>(Q, m, dot_rows, w, b, n, workspace, out, stream);
  }
  return launch_update_sums<T>(Q, m, rows, coef, nullptr, dot_rows, w, b, n, workspace, out,
                               stream);  // sweep 2 (dot_rows = rows) or 3 (dot_rows = 0)
}

template cudaError_t gs_sweep_cuda<float>(const float*, float*, const double*, int64_t, int64_t,
                                          int64_t, int64_t, int64_t, double*, double*,
                                          cudaStream_t);
template cudaError_t gs_sweep_cuda<double>(const double*, double*, const double*, int64_t,
                                           int64_t, int64_t, int64_t, int64_t, double*, double*,
                                           cudaStream_t);
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
