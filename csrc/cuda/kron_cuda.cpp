// CUDA backend of kron_matmul, kron_eig_apply and kron_topk: the torch adapter.
//
// Checks the arguments (common/checks.h plus "is a CUDA tensor"), makes the inputs
// contiguous, allocates outputs and workspaces on the device and calls the raw-pointer
// launchers on the current stream. Nothing here synchronises the host (kron_topk's
// argsort of lamA runs on the device).
//
// Two GEMM paths, chosen per layer by its size out * in:
//   * below the threshold (many tiny layers): the grouped SIMT kernel of kron_kernels.cu,
//     every small layer of a stage in one launch (per-layer cuBLAS calls would be
//     launch-bound);
//   * at or above it: cuBLAS strided-batched GEMMs over the batch (cublas_gemm.h), one
//     per layer and stage, on tensor cores where the dtype allows (float64 DMMA; float32
//     only with allow_tf32, which the grouped kernel ignores: it always computes in FP32).
// The threshold is kCublasMinElements (64 x 256: four of the grouped kernel's 64 x 64
// output tiles per batch row), overridable by the environment variable
// HESSLAB_KRON_CUBLAS_MIN (elements; 0 sends every layer to cuBLAS, a huge value none),
// read at each call, for the tests and the benchmark's threshold sweep. Both paths
// write disjoint column ranges of the same (b, N) output and workspace, in stream order.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "cublas_gemm.h"
#include "kron_kernels.h"

namespace {

std::vector<at::Tensor> contiguous_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    out.push_back(t.contiguous());
  }
  return out;
}

// Contiguous factors of every layer; the eigenvalue lists are empty for kron_matmul.
struct KronArgs {
  std::vector<at::Tensor> left, right, lam_left, lam_right;
  std::vector<int64_t> offsets;
};

constexpr int64_t kCublasMinElements = 64 * 256;

int64_t cublas_min_elements() {
  const char* env = std::getenv("HESSLAB_KRON_CUBLAS_MIN");
  if (env == nullptr || *env == '\0') {
    return kCublasMinElements;
  }
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && v >= 0,
                    "hesslab: HESSLAB_KRON_CUBLAS_MIN must be a non-negative integer, got '", env,
                    "'");
  return static_cast<int64_t>(v);
}

template <typename T>
using Layers = std::vector<hesslab::cuda::KronLayer<T>>;

// The nonempty layers split by the threshold: {grouped kernel, cuBLAS}.
template <typename T>
std::pair<Layers<T>, Layers<T>> split_layers(const Layers<T>& layers) {
  const int64_t threshold = cublas_min_elements();
  std::pair<Layers<T>, Layers<T>> out;
  for (const auto& L : layers) {
    if (L.out == 0 || L.in == 0) {
      continue;
    }
    (L.out * L.in >= threshold ? out.second : out.first).push_back(L);
  }
  return out;
}


// For every layer of `layers` and batch row e, through cuBLAS: C_l = X_l op(right)
// (hesslab::cuda::Side::kRight) or C_l = op(left) X_l (hesslab::cuda::Side::kLeft); op = transpose when `transpose`.
// X, C: (b, N) flat, distinct.
template <typename T>
void cublas_layer_products(const Layers<T>& layers, hesslab::cuda::Side side, bool transpose, const T* X, T* C,
                           int64_t b, int64_t N, bool allow_tf32, const char* op) {
  if (layers.empty()) {
    return;
  }
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  for (const auto& L : layers) {
    const cublasStatus_t status = hesslab::cuda::row_major_gemm<T>(
        handle, hesslab::cuda::layer_gemm(L, side, transpose, X, C, b, N), allow_tf32);
    TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "hesslab.", op, ": cuBLAS GEMM failed: ",
                cublasGetStatusString(status));
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "hesslab.", op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

template <typename T>
Layers<T> make_layers(const KronArgs& args) {
  std::vector<hesslab::cuda::KronLayer<T>> layers(args.left.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    layers[l].left = args.left[l].const_data_ptr<T>();
    layers[l].right = args.right[l].const_data_ptr<T>();
    layers[l].lam_left = args.lam_left.empty() ? nullptr : args.lam_left[l].const_data_ptr<T>();
    layers[l].lam_right = args.lam_right.empty() ? nullptr : args.lam_right[l].const_data_ptr<T>();
    layers[l].out = args.left[l].size(0);
    layers[l].in = args.right[l].size(0);
    layers[l].offset = args.offsets[l];
    layers[l].index = static_cast<int64_t>(l);
  }
  return layers;
}

// workspace_l = V_l A_l^T, then out_l = B_l workspace_l: small layers by the grouped
// kernel (one launcher call), large ones by cuBLAS.
template <typename T>
void launch_kron_matmul(const KronArgs& args, const at::Tensor& V, const at::Tensor& out,
                        const at::Tensor& workspace, bool allow_tf32, cudaStream_t stream) {
  const auto [small, large] = split_layers<T>(make_layers<T>(args));
  const int64_t b = V.size(0), N = V.size(1);
  const T* v = V.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  T* ws = workspace.mutable_data_ptr<T>();
  if (!small.empty()) {
    check_launch(hesslab::cuda::kron_matmul_cuda<T>(small.data(),
                                                    static_cast<int64_t>(small.size()), v, b, N,
                                                    o, ws, stream),
                 "kron_matmul");
  }
  cublas_layer_products<T>(large, hesslab::cuda::Side::kRight, true, v, ws, b, N, allow_tf32, "kron_matmul");
  cublas_layer_products<T>(large, hesslab::cuda::Side::kLeft, false, ws, o, b, N, allow_tf32, "kron_matmul");
}

at::Tensor kron_matmul_op(at::TensorList A, at::TensorList B, const at::Tensor& V,
                          bool allow_tf32) {
  KronArgs args;
  args.offsets = hesslab::check_kron_factors(A, B, V, "kron_matmul", "A", "B");
  TORCH_CHECK_VALUE(V.is_cuda(), "hesslab.kron_matmul: argument 'V' must be a CUDA tensor, got ",
                    V.device());
  const c10::cuda::CUDAGuard guard(V.device());
  at::Tensor out = at::empty(V.sizes(), V.options());
  if (out.numel() == 0) {
    return out;
  }
  args.left = contiguous_all(B);
  args.right = contiguous_all(A);
  const at::Tensor Vc = V.contiguous();
  const at::Tensor workspace = at::empty(V.sizes(), V.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (V.scalar_type() == at::kDouble) {
    launch_kron_matmul<double>(args, Vc, out, workspace, allow_tf32, stream);
  } else {
    launch_kron_matmul<float>(args, Vc, out, workspace, allow_tf32, stream);
  }
  return out;
}

// Small layers by the launcher (four grouped GEMM stages and the scale); large ones:
// ws = V U_A, out = U_B^T ws (cuBLAS), out *= F (eig_scale_kernel), ws = out U_A^T,
// out = U_B ws (cuBLAS).
template <typename T>
void launch_kron_eig_apply(const KronArgs& args, const at::Tensor& V, double power,
                           double damping, const at::Tensor& thresholds, const at::Tensor& out,
                           const at::Tensor& workspace, bool allow_tf32, cudaStream_t stream) {
  const auto [small, large] = split_layers<T>(make_layers<T>(args));
  const int64_t b = V.size(0), N = V.size(1);
  const T* v = V.const_data_ptr<T>();
  const double* thr = thresholds.const_data_ptr<double>();
  T* o = out.mutable_data_ptr<T>();
  T* ws = workspace.mutable_data_ptr<T>();
  const char* op = "kron_eig_apply";
  if (!small.empty()) {
    check_launch(hesslab::cuda::kron_eig_apply_cuda<T>(small.data(),
                                                       static_cast<int64_t>(small.size()), v, b,
                                                       N, power, damping, thr, o, ws, stream),
                 op);
  }
  if (large.empty()) {
    return;
  }
  cublas_layer_products<T>(large, hesslab::cuda::Side::kRight, false, v, ws, b, N, allow_tf32, op);
  cublas_layer_products<T>(large, hesslab::cuda::Side::kLeft, true, ws, o, b, N, allow_tf32, op);
  check_launch(hesslab::cuda::kron_eig_scale_cuda<T>(large.data(),
                                                     static_cast<int64_t>(large.size()), thr,
                                                     power, damping, o, b, N, stream),
               op);
  cublas_layer_products<T>(large, hesslab::cuda::Side::kRight, true, o, ws, b, N, allow_tf32, op);
  cublas_layer_products<T>(large, hesslab::cuda::Side::kLeft, false, ws, o, b, N, allow_tf32, op);
}

at::Tensor kron_eig_apply_op(at::TensorList UA, at::TensorList lamA, at::TensorList UB,
                             at::TensorList lamB, const at::Tensor& V, double power,
                             double damping, const at::Tensor& thresholds, bool allow_tf32) {
  KronArgs args;
  args.offsets = hesslab::check_kron_eig(UA, lamA, UB, lamB, V, thresholds);
  TORCH_CHECK_VALUE(V.is_cuda(),
                    "hesslab.kron_eig_apply: argument 'V' must be a CUDA tensor, got ",
                    V.device());
  const c10::cuda::CUDAGuard guard(V.device());
  at::Tensor out = at::empty(V.sizes(), V.options());
  if (out.numel() == 0) {
    return out;
  }
  args.left = contiguous_all(UB);
  args.right = contiguous_all(UA);
  args.lam_left = contiguous_all(lamB);
  args.lam_right = contiguous_all(lamA);
  const at::Tensor Vc = V.contiguous();
  const at::Tensor thresholds_c = thresholds.contiguous();
  const at::Tensor workspace = at::empty(V.sizes(), V.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (V.scalar_type() == at::kDouble) {
    launch_kron_eig_apply<double>(args, Vc, power, damping, thresholds_c, out, workspace,
                                  allow_tf32, stream);
  } else {
    launch_kron_eig_apply<float>(args, Vc, power, damping, thresholds_c, out, workspace,
                                 allow_tf32, stream);
  }
  return out;
}

template <typename T>
cudaError_t launch_kron_topk(const at::Tensor& lamB, const at::Tensor& lamA,
                             const at::Tensor& ascending, int64_t k, const at::Tensor& values,
                             const at::Tensor& idx_B, const at::Tensor& idx_A,
                             const at::Tensor& workspace, cudaStream_t stream) {
  return hesslab::cuda::kron_topk_cuda<T>(
      lamB.const_data_ptr<T>(), lamA.const_data_ptr<T>(), ascending.const_data_ptr<int64_t>(),
      lamB.size(0), lamA.size(0), k, values.mutable_data_ptr<T>(),
      idx_B.mutable_data_ptr<int64_t>(), idx_A.mutable_data_ptr<int64_t>(),
      workspace.mutable_data_ptr<int64_t>(), stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_topk_op(const at::Tensor& lamB,
                                                            const at::Tensor& lamA, int64_t k) {
  hesslab::check_kron_topk(lamB, lamA, k);
  TORCH_CHECK_VALUE(lamB.is_cuda(),
                    "hesslab.kron_topk: argument 'lamB' must be a CUDA tensor, got ",
                    lamB.device());
  const c10::cuda::CUDAGuard guard(lamB.device());
  at::Tensor values = at::empty({k}, lamB.options());
  at::Tensor idx_B = at::empty({k}, lamB.options().dtype(at::kLong));
  at::Tensor idx_A = at::empty({k}, lamB.options().dtype(at::kLong));
  if (k == 0) {
    return {values, idx_B, idx_A};
  }
  const at::Tensor lamB_c = lamB.contiguous();
  const at::Tensor lamA_c = lamA.contiguous();
  const at::Tensor ascending = at::argsort(lamA_c, /*stable=*/true);  // as on the CPU
  const at::Tensor workspace = at::empty({2 * lamB.size(0)}, lamB.options().dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err =
      lamB.scalar_type() == at::kDouble
          ? launch_kron_topk<double>(lamB_c, lamA_c, ascending, k, values, idx_B, idx_A,
                                     workspace, stream)
          : launch_kron_topk<float>(lamB_c, lamA_c, ascending, k, values, idx_B, idx_A,
                                    workspace, stream);
  TORCH_CHECK(err == cudaSuccess, "hesslab.kron_topk: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return {values, idx_B, idx_A};
}

}  // namespace

TORCH_LIBRARY_IMPL(hesslab, CUDA, m) {
  m.impl("kron_matmul", &kron_matmul_op);
  m.impl("kron_eig_apply", &kron_eig_apply_op);
  m.impl("kron_topk", &kron_topk_op);
}
