// CUDA kernels of kron_matmul, kron_eig_apply and kron_topk (plain CUDA, no torch).
//
// Must match hesslab/reference.py. Layouts: V and the output are (b, N) row-major; layer
// l's block of batch row e is the (out_l, in_l) row-major matrix at e*N + offset_l.
// Factors are row-major and contiguous: left (out, out) = B_l / U_B, right (in, in) =
// A_l / U_A.
//
//   kron_matmul:    out_l = B_l V_l A_l^T, as T = V_l A_l^T (into the workspace), then
//                   out_l = B_l T: two grouped GEMM stages over all layers.
//   kron_eig_apply: X = U_B^T (V_l U_A); X[r, s] *= f(lamB[r] * lamA[s]) with
//                   f(x) = (x + damping)^power if x >= thresholds[l] else 0 (in float64);
//                   out_l = U_B (X U_A^T): four grouped GEMM stages and eig_scale_kernel.
//   kron_topk:      the k largest lamB[i] * lamA[j], descending, by a heap over the rows i
//                   (kron_topk_kernel), keyed by the float64 product with ties to the
//                   larger row, exactly as the CPU's std::priority_queue of
//                   (double, (row, cursor)): both devices pick the same pairs on ties.
//
// grouped_gemm_kernel computes, for up to kMaxGroups groups per launch and every batch
// element e of a group, C_e = op(A_e) op(B_e) (op = optional transpose), all row-major,
// without alpha/beta. The group descriptors travel by value in the kernel parameter
// struct (GemmLaunch, < 4 KiB) with each group's first tile index, so the launch needs
// no device-side descriptors and no host synchronisation; the parameter is
// __grid_constant__, so the runtime index p.groups[g] reads the constant parameter bank
// instead of forcing a per-thread local-memory copy of the struct (likewise
// eig_scale_kernel's p.layers[blockIdx.y]). The adapter (kron_cuda.cpp) sends only the
// layers below its size threshold here; larger ones go through cuBLAS (cublas_gemm.h). The grid is a flat list of
// 64x64 output tiles (group, batch element, tile row, tile column); each block of 256
// threads (16 x 16) stages 64x16 tiles of op(A) and 16x64 tiles of op(B) in shared
// memory (loads coalesced along whichever dimension is contiguous in memory) and each
// thread accumulates a 4x4 sub-tile (rows ty + 16i, columns tx + 16j) in T.
#include "kron_kernels.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cuda_utils.cuh"

namespace hesslab {
namespace cuda {
namespace {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kThreadsM = 16;  // threads along a tile's rows (threadIdx.x / kThreadsN)
constexpr int kThreadsN = 16;  // threads along a tile's columns (threadIdx.x % kThreadsN)
constexpr int kRowsPerThread = kTileM / kThreadsM;
constexpr int kColsPerThread = kTileN / kThreadsN;
static_assert(kThreadsM * kThreadsN == kBlockThreads, "one thread per 4x4 sub-tile");
static_assert((kTileM * kTileK) % kBlockThreads == 0 && (kTileK * kTileN) % kBlockThreads == 0,
              "tile loads must split evenly over the block");
// Groups (GEMM problems, or layers to scale) per launch.
constexpr int kMaxGroups = 16;

// One GEMM problem of a grouped launch (RowMajorGemm, kron_kernels.h) with its tiling.
template <typename T>
struct GemmGroup : RowMajorGemm<T> {
  int64_t tiles_n;           // ceil(N / kTileN), set by launch_grouped_gemm
  int64_t tiles_per_matrix;  // ceil(M / kTileM) * tiles_n, set by launch_grouped_gemm
};

// Kernel parameter of grouped_gemm_kernel: group g owns the tiles
// [tile_offset[g], tile_offset[g + 1]).
template <typename T>
struct GemmLaunch {
  GemmGroup<T> groups[kMaxGroups];
  int64_t tile_offset[kMaxGroups + 1];
  int count;
};
static_assert(sizeof(GemmLaunch<double>) <= 4096, "kernel parameters must stay within 4 KiB");

// Two blocks per SM: caps registers at 128 (no spills for float, a few bytes for double).
template <typename T>
__global__ void __launch_bounds__(kBlockThreads, 2)
    grouped_gemm_kernel(const __grid_constant__ GemmLaunch<T> p) {
  __shared__ T As[kTileK][kTileM + 1];  // As[k][m] = op(A)[m0 + m][k0 + k]
  __shared__ T Bs[kTileK][kTileN + 1];  // Bs[k][n] = op(B)[k0 + k][n0 + n]

  const int64_t tile = blockIdx.x;
  int g = 0;
  while (g + 1 < p.count && tile >= p.tile_offset[g + 1]) {
    ++g;
  }
  const GemmGroup<T>& G = p.groups[g];
  const int64_t t = tile - p.tile_offset[g];
  const int64_t e = t / G.tiles_per_matrix;
  const int64_t rem = t - e * G.tiles_per_matrix;
  const int64_t m0 = (rem / G.tiles_n) * kTileM;
  const int64_t n0 = (rem % G.tiles_n) * kTileN;
  const T* A = G.X + e * G.stride_x;
  const T* B = G.Y + e * G.stride_y;
  T* C = G.C + e * G.stride_c;
  const int tx = threadIdx.x % kThreadsN;
  const int ty = threadIdx.x / kThreadsN;

  T acc[kRowsPerThread][kColsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) {
      acc[i][j] = T(0);
    }
  }

  for (int64_t k0 = 0; k0 < G.K; k0 += kTileK) {
    // Consecutive threads walk the dimension that is contiguous in memory; out-of-range
    // elements are staged as zeros.
#pragma unroll
    for (int s = 0; s < kTileM * kTileK / kBlockThreads; ++s) {
      const int idx = threadIdx.x + s * kBlockThreads;
      const int mm = G.trans_x ? idx % kTileM : idx / kTileK;
      const int kk = G.trans_x ? idx / kTileM : idx % kTileK;
      const int64_t gm = m0 + mm;
      const int64_t gk = k0 + kk;
      T v = T(0);
      if (gm < G.M && gk < G.K) {
        v = G.trans_x ? A[gk * G.ldx + gm] : A[gm * G.ldx + gk];
      }
      As[kk][mm] = v;
    }
#pragma unroll
    for (int s = 0; s < kTileK * kTileN / kBlockThreads; ++s) {
      const int idx = threadIdx.x + s * kBlockThreads;
      const int nn = G.trans_y ? idx / kTileK : idx % kTileN;
      const int kk = G.trans_y ? idx % kTileK : idx / kTileN;
      const int64_t gk = k0 + kk;
      const int64_t gn = n0 + nn;
      T v = T(0);
      if (gk < G.K && gn < G.N) {
        v = G.trans_y ? B[gn * G.ldy + gk] : B[gk * G.ldy + gn];
      }
      Bs[kk][nn] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      T a[kRowsPerThread];
      T bv[kColsPerThread];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        a[i] = As[kk][ty + i * kThreadsM];
      }
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) {
        bv[j] = Bs[kk][tx + j * kThreadsN];
      }
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) {
          acc[i][j] += a[i] * bv[j];
        }
      }
    }
    __syncthreads();  // the tiles are overwritten by the next k0
  }

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t gm = m0 + ty + i * kThreadsM;
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) {
      const int64_t gn = n0 + tx + j * kThreadsN;
      if (gm < G.M && gn < G.N) {
        C[gm * G.ldc + gn] = acc[i][j];
      }
    }
  }
}

// Launches grouped_gemm_kernel over `groups` (each with M, N, K, batch > 0), packing up
// to kMaxGroups groups (and at most kMaxGridX tiles) per launch.
template <typename T>
cudaError_t launch_grouped_gemm(std::vector<GemmGroup<T>>& groups, cudaStream_t stream) {
  GemmLaunch<T> launch{};
  int64_t tiles = 0;
  auto flush = [&]() -> cudaError_t {
    if (launch.count == 0) {
      return cudaSuccess;
    }
    launch.tile_offset[launch.count] = tiles;
    grouped_gemm_kernel<T><<<static_cast<unsigned int>(tiles), kBlockThreads, 0, stream>>>(launch);
    launch.count = 0;
    tiles = 0;
    return cudaGetLastError();
  };
  for (GemmGroup<T>& g : groups) {
    g.tiles_n = ceil_div(g.N, kTileN);
    g.tiles_per_matrix = ceil_div(g.M, kTileM) * g.tiles_n;
    const int64_t group_tiles = g.tiles_per_matrix * g.batch;
    if (group_tiles > kMaxGridX) {
      return cudaErrorInvalidConfiguration;
    }
    if (launch.count == kMaxGroups || tiles + group_tiles > kMaxGridX) {
      HESSLAB_CUDA_TRY(flush());
    }
    launch.tile_offset[launch.count] = tiles;
    launch.groups[launch.count] = g;
    ++launch.count;
    tiles += group_tiles;
  }
  return flush();
}


// For every nonempty layer and batch row e: C_l = X_l op(right) (Side::kRight,
// (out x in)(in x in)) or C_l = op(left) X_l (Side::kLeft, (out x out)(out x in)),
// op = transpose when `transpose`. X, C: (b, N) flat, distinct.
template <typename T>
cudaError_t layer_products(const KronLayer<T>* layers, int64_t num_layers, Side side,
                           bool transpose, const T* X, T* C, int64_t b, int64_t N,
                           cudaStream_t stream) {
  std::vector<GemmGroup<T>> groups;
  for (int64_t l = 0; l < num_layers; ++l) {
    const KronLayer<T>& L = layers[l];
    if (L.out == 0 || L.in == 0) {
      continue;
    }
    GemmGroup<T> g{};
    static_cast<RowMajorGemm<T>&>(g) = layer_gemm(L, side, transpose, X, C, b, N);
    groups.push_back(g);
  }
  return launch_grouped_gemm<T>(groups, stream);
}

// One layer of eig_scale_kernel: X_e[r, s] *= f(lam_row[r] * lam_col[s]) for the
// (rows, cols) block X_e = X + e * ld of every batch row e.
template <typename T>
struct ScaleLayer {
  T* X;
  const T* lam_row;          // lamB_l (rows,)
  const T* lam_col;          // lamA_l (cols,)
  const double* threshold;   // &thresholds[l] on the device
  int64_t rows, cols;
};

template <typename T>
struct ScaleLaunch {
  ScaleLayer<T> layers[kMaxGroups];
  int64_t batch, ld;
  double power, damping;
};

// grid (x: strides over one layer's rows*cols, y: layer). f is evaluated once per
// (r, s) and applied to every batch row.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    eig_scale_kernel(const __grid_constant__ ScaleLaunch<T> p) {
  const ScaleLayer<T>& L = p.layers[blockIdx.y];
  const int64_t size = L.rows * L.cols;
  const double threshold = *L.threshold;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < size;
       e += stride) {
    const int64_t r = e / L.cols;
    const int64_t s = e - r * L.cols;
    // The product is rounded to T, as torch's lamB[:, None] * lamA[None, :] and
    // kron_topk's values are, so a threshold taken from kron_topk selects exactly.
    const double x = static_cast<double>(L.lam_row[r] * L.lam_col[s]);
    const double f = x >= threshold ? pow(x + p.damping, p.power) : 0.0;
    for (int64_t i = 0; i < p.batch; ++i) {
      T* v = L.X + i * p.ld + e;
      *v = static_cast<T>(static_cast<double>(*v) * f);
    }
  }
}

// Scales every nonempty layer's block of X (b, N) in place, kMaxGroups layers per launch.
template <typename T>
cudaError_t launch_eig_scale(const KronLayer<T>* layers, int64_t num_layers,
                             const double* thresholds, double power, double damping, T* X,
                             int64_t b, int64_t N, cudaStream_t stream) {
  ScaleLaunch<T> launch{};
  launch.batch = b;
  launch.ld = N;
  launch.power = power;
  launch.damping = damping;
  int count = 0;
  int64_t largest = 0;
  auto flush = [&]() -> cudaError_t {
    if (count == 0) {
      return cudaSuccess;
    }
    const dim3 grid(stride_blocks(largest), static_cast<unsigned int>(count));
    eig_scale_kernel<T><<<grid, kBlockThreads, 0, stream>>>(launch);
    count = 0;
    largest = 0;
    return cudaGetLastError();
  };
  for (int64_t l = 0; l < num_layers; ++l) {
    const KronLayer<T>& L = layers[l];
    if (L.out == 0 || L.in == 0) {
      continue;
    }
    if (count == kMaxGroups) {
      HESSLAB_CUDA_TRY(flush());
    }
    launch.layers[count] = ScaleLayer<T>{X + L.offset, L.lam_left, L.lam_right,
                                         thresholds + L.index, L.out, L.in};
    largest = std::max(largest, L.out * L.in);
    ++count;
  }
  return flush();
}

// Row i of the implicit p x q product matrix, walked in non-increasing order: lamA
// descending when lamB[i] >= 0, ascending when lamB[i] < 0.
template <typename T>
struct SortedRows {
  const T* lamB;
  const T* lamA;
  const int64_t* ascending;  // argsort of lamA
  int64_t q;

  __device__ int64_t column(int64_t row, int64_t cursor) const {
    return lamB[row] < T(0) ? ascending[cursor] : ascending[q - 1 - cursor];
  }
  // The float64 product, the key of the CPU's heap (a product rounded to T could tie
  // where the float64 ones differ, and pick another pair).
  __device__ double value(int64_t row, int64_t cursor) const {
    return static_cast<double>(lamB[row]) * static_cast<double>(lamA[column(row, cursor)]);
  }
};

// The heap order of the CPU's std::priority_queue<(key, (row, cursor))>: the larger key,
// and on equal keys the larger row (a row holds one heap entry at a time).
__device__ inline bool heap_before(double key_a, int64_t row_a, double key_b, int64_t row_b) {
  return key_a > key_b || (key_a == key_b && row_a > row_b);
}

// Restores the max-heap property (heap_before) of heap[0, size) below `pos`; a row's key
// is its float64 value at its cursor.
template <typename T>
__device__ void sift_down(const SortedRows<T>& rows, int64_t* heap, const int64_t* cursor,
                          int64_t size, int64_t pos) {
  const int64_t row = heap[pos];
  const double key = rows.value(row, cursor[row]);
  while (true) {
    int64_t child = 2 * pos + 1;
    if (child >= size) {
      break;
    }
    double child_key = rows.value(heap[child], cursor[heap[child]]);
    if (child + 1 < size) {
      const double right_key = rows.value(heap[child + 1], cursor[heap[child + 1]]);
      if (heap_before(right_key, heap[child + 1], child_key, heap[child])) {
        ++child;
        child_key = right_key;
      }
    }
    if (!heap_before(child_key, heap[child], key, row)) {
      break;
    }
    heap[pos] = heap[child];
    pos = child;
  }
  heap[pos] = row;
}

// Single thread (p, q small): a max-heap of the p rows keyed by each row's next-largest
// product; k pops, advancing the popped row's cursor. heap, cursor: (p,) int64 each.
// Requires 1 <= k <= p*q.
template <typename T>
__global__ void kron_topk_kernel(SortedRows<T> rows, int64_t p, int64_t k, T* values,
                                 int64_t* idx_B, int64_t* idx_A, int64_t* heap,
                                 int64_t* cursor) {
  for (int64_t i = 0; i < p; ++i) {
    heap[i] = i;
    cursor[i] = 0;
  }
  int64_t size = p;
  for (int64_t pos = size / 2 - 1; pos >= 0; --pos) {
    sift_down(rows, heap, cursor, size, pos);
  }
  for (int64_t t = 0; t < k; ++t) {
    const int64_t row = heap[0];
    const int64_t col = rows.column(row, cursor[row]);
    values[t] = static_cast<T>(rows.value(row, cursor[row]));  // as the CPU: the float64 key, rounded
    idx_B[t] = row;
    idx_A[t] = col;
    if (++cursor[row] == rows.q) {
      heap[0] = heap[--size];  // row exhausted
    }
    if (size > 0) {
      sift_down(rows, heap, cursor, size, 0);
    }
  }
}

}  // namespace

template <typename T>
cudaError_t kron_matmul_cuda(const KronLayer<T>* layers, int64_t num_layers, const T* V,
                             int64_t b, int64_t N, T* out, T* workspace, cudaStream_t stream) {
  if (b == 0 || N == 0) {
    return cudaSuccess;
  }
  // workspace_l = V_l A_l^T, then out_l = B_l workspace_l.
  HESSLAB_CUDA_TRY(
      layer_products<T>(layers, num_layers, Side::kRight, true, V, workspace, b, N, stream));
  return layer_products<T>(layers, num_layers, Side::kLeft, false, workspace, out, b, N, stream);
}

template <typename T>
cudaError_t kron_eig_apply_cuda(const KronLayer<T>* layers, int64_t num_layers, const T* V,
                                int64_t b, int64_t N, double power, double damping,
                                const double* thresholds, T* out, T* workspace,
                                cudaStream_t stream) {
  if (b == 0 || N == 0) {
    return cudaSuccess;
  }
  // workspace_l = V_l U_A; out_l = X = U_B^T workspace_l; X *= F_l;
  // workspace_l = X U_A^T; out_l = U_B workspace_l.
  HESSLAB_CUDA_TRY(
      layer_products<T>(layers, num_layers, Side::kRight, false, V, workspace, b, N, stream));
  HESSLAB_CUDA_TRY(
      layer_products<T>(layers, num_layers, Side::kLeft, true, workspace, out, b, N, stream));
  HESSLAB_CUDA_TRY(launch_eig_scale<T>(layers, num_layers, thresholds, power, damping, out, b, N,
                                       stream));
  HESSLAB_CUDA_TRY(
      layer_products<T>(layers, num_layers, Side::kRight, true, out, workspace, b, N, stream));
  return layer_products<T>(layers, num_layers, Side::kLeft, false, workspace, out, b, N, stream);
}

template <typename T>
cudaError_t kron_eig_scale_cuda(const KronLayer<T>* layers, int64_t num_layers,
                                const double* thresholds, double power, double damping, T* X,
                                int64_t b, int64_t N, cudaStream_t stream) {
  if (b == 0 || N == 0) {
    return cudaSuccess;
  }
  return launch_eig_scale<T>(layers, num_layers, thresholds, power, damping, X, b, N, stream);
}

template <typename T>
cudaError_t kron_topk_cuda(const T* lamB, const T* lamA, const int64_t* lamA_ascending, int64_t p,
                           int64_t q, int64_t k, T* values, int64_t* idx_B, int64_t* idx_A,
                           int64_t* workspace, cudaStream_t stream) {
  if (k == 0) {
    return cudaSuccess;
  }
  const SortedRows<T> rows{lamB, lamA, lamA_ascending, q};
  kron_topk_kernel<T><<<1, 1, 0, stream>>>(rows, p, k, values, idx_B, idx_A, workspace,
                                           workspace + p);
  return cudaGetLastError();
}

template cudaError_t kron_matmul_cuda<float>(const KronLayer<float>*, int64_t, const float*,
                                             int64_t, int64_t, float*, float*, cudaStream_t);
template cudaError_t kron_matmul_cuda<double>(const KronLayer<double>*, int64_t, const double*,
                                              int64_t, int64_t, double*, double*, cudaStream_t);
template cudaError_t kron_eig_apply_cuda<float>(const KronLayer<float>*, int64_t, const float*,
                                                int64_t, int64_t, double, double, const double*,
                                                float*, float*, cudaStream_t);
template cudaError_t kron_eig_apply_cuda<double>(const KronLayer<double>*, int64_t,
                                                 const double*, int64_t, int64_t, double, double,
                                                 const double*, double*, double*, cudaStream_t);
template cudaError_t kron_eig_scale_cuda<float>(const KronLayer<float>*, int64_t, const double*,
                                                double, double, float*, int64_t, int64_t,
                                                cudaStream_t);
template cudaError_t kron_eig_scale_cuda<double>(const KronLayer<double>*, int64_t,
                                                 const double*, double, double, double*, int64_t,
                                                 int64_t, cudaStream_t);
template cudaError_t kron_topk_cuda<float>(const float*, const float*, const int64_t*, int64_t,
                                           int64_t, int64_t, float*, int64_t*, int64_t*, int64_t*,
                                           cudaStream_t);
template cudaError_t kron_topk_cuda<double>(const double*, const double*, const int64_t*, int64_t,
                                            int64_t, int64_t, double*, int64_t*, int64_t*,
                                            int64_t*, cudaStream_t);

}  // namespace cuda
}  // namespace hesslab
