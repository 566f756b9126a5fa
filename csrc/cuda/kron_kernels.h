// Raw-pointer CUDA launchers of the Kronecker ops (kron_matmul, kron_eig_apply, kron_topk).
//
// Plain C++ declarations, no torch: kron_cuda.cpp (the torch adapter) calls them with
// contiguous device pointers; kron_kernels.cu defines them for T = float and double.
// Every launcher only enqueues work on `stream` (no host synchronisation) and returns
// the first CUDA error met while enqueueing, or cudaSuccess.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hesslab {
namespace cuda {

// One Kronecker layer: device pointers to row-major, contiguous factors (host struct).
// Layer l's block of a flat (b, N) vector is columns [offset, offset + out*in) of every
// row, read as an (out, in) row-major matrix.
template <typename T>
struct KronLayer {
  const T* left;       // (out, out): B_l (kron_matmul) or U_B (kron_eig_apply)
  const T* right;      // (in, in):   A_l (kron_matmul) or U_A (kron_eig_apply)
  const T* lam_left;   // (out,): lamB_l, kron_eig_apply only (nullptr for kron_matmul)
  const T* lam_right;  // (in,):  lamA_l, kron_eig_apply only (nullptr for kron_matmul)
  int64_t out;
  int64_t in;
  int64_t offset;
  int64_t index;  // position in the op's layer list: its entry of `thresholds`
};

// One row-major strided-batched GEMM: C_e = op(X_e) op(Y_e) for e < batch, op(X) (M x K),
// op(Y) (K x N), C (M x N), leading dimensions ldx, ldy, ldc, and Z_e = Z + e * stride_z
// (stride 0: one matrix shared by the batch). The grouped kernel of kron_kernels.cu and the
// cuBLAS path of kron_cuda.cpp both run it.
template <typename T>
struct RowMajorGemm {
  const T* X;
  const T* Y;
  T* C;
  int64_t M, N, K;
  int64_t ldx, ldy, ldc;
  int64_t stride_x, stride_y, stride_c;
  int64_t batch;
  bool trans_x;  // op(X)[m][k] = X[k * ldx + m] instead of X[m * ldx + k]
  bool trans_y;  // op(Y)[k][n] = Y[n * ldy + k] instead of Y[k * ldy + n]
};

// Which factor of a layer multiplies its (out, in) block: X_l op(right) or op(left) X_l.
enum class Side { kRight, kLeft };

// The GEMM of one side of layer L for every batch row e: C_l = X_l op(right)
// (Side::kRight, (out x in)(in x in)) or C_l = op(left) X_l (Side::kLeft,
// (out x out)(out x in)); op = transpose when `transpose`. X, C: (b, N) flat, distinct.
template <typename T>
inline RowMajorGemm<T> layer_gemm(const KronLayer<T>& L, Side side, bool transpose, const T* X,
                                  T* C, int64_t b, int64_t N) {
  RowMajorGemm<T> g{};
  g.M = L.out;
  g.N = L.in;
  g.batch = b;
  g.C = C + L.offset;
  g.ldc = L.in;
  g.stride_c = N;
  if (side == Side::kRight) {
    g.K = L.in;
    g.X = X + L.offset;
    g.ldx = L.in;
    g.stride_x = N;
    g.Y = L.right;
    g.ldy = L.in;
    g.stride_y = 0;
    g.trans_y = transpose;
  } else {
    g.K = L.out;
    g.X = L.left;
    g.ldx = L.out;
    g.stride_x = 0;
    g.trans_x = transpose;
    g.Y = X + L.offset;
    g.ldy = L.in;
    g.stride_y = N;
  }
  return g;
}

// out_l = B_l V_l A_l^T for every layer and batch row. V, out: (b, N) row-major;
// workspace: b*N elements of T. `layers` is a host array of num_layers entries.
template <typename T>
cudaError_t kron_matmul_cuda(const KronLayer<T>* layers, int64_t num_layers, const T* V,
                             int64_t b, int64_t N, T* out, T* workspace, cudaStream_t stream);

// out_l = U_B (F_l * (U_B^T V_l U_A)) U_A^T with F_l[r, s] = f(lamB_l[r] * lamA_l[s]),
// f(x) = (x + damping)^power if x >= thresholds[l] else 0. thresholds: (num_layers,)
// float64 on the device; workspace: b*N elements of T.
template <typename T>
cudaError_t kron_eig_apply_cuda(const KronLayer<T>* layers, int64_t num_layers, const T* V,
                                int64_t b, int64_t N, double power, double damping,
                                const double* thresholds, T* out, T* workspace,
                                cudaStream_t stream);

// X_l[r, s] *= f(lamB_l[r] * lamA_l[s]) in place for every layer of `layers` and batch row,
// f as in kron_eig_apply_cuda (thresholds[layers[i].index]); X: (b, N). For the adapter's
// cuBLAS path, which runs the four rotations itself.
template <typename T>
cudaError_t kron_eig_scale_cuda(const KronLayer<T>* layers, int64_t num_layers,
                                const double* thresholds, double power, double damping, T* X,
                                int64_t b, int64_t N, cudaStream_t stream);

// The k largest products lamB[i] * lamA[j] in descending order with their (i, j), keyed
// in float64 with ties to the larger i, as the CPU kernel. lamA_ascending: (q,) indices
// sorting lamA ascending (a stable argsort, as on the CPU). values, idx_B, idx_A:
// (k,); workspace: 2*p int64. Meant for small p, q (one layer's eigenvalue counts).
template <typename T>
cudaError_t kron_topk_cuda(const T* lamB, const T* lamA, const int64_t* lamA_ascending, int64_t p,
                           int64_t q, int64_t k, T* values, int64_t* idx_B, int64_t* idx_A,
                           int64_t* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace hesslab
