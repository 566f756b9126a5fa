// CUDA backend of kron_matmul, kron_eig_apply and kron_topk: the torch adapter.
//
// Checks the arguments (common/checks.h plus "is a CUDA tensor"), makes the inputs
// contiguous, allocates outputs and workspaces on the device and calls the raw-pointer
// launchers of kron_kernels.cu on the current stream. Nothing here synchronises the host
// (kron_topk's argsort of lamA runs on the device).
#include <ATen/core/Tensor.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/checks.h"
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

template <typename T>
std::vector<hesslab::cuda::KronLayer<T>> make_layers(const KronArgs& args) {
  std::vector<hesslab::cuda::KronLayer<T>> layers(args.left.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    layers[l].left = args.left[l].const_data_ptr<T>();
    layers[l].right = args.right[l].const_data_ptr<T>();
    layers[l].lam_left = args.lam_left.empty() ? nullptr : args.lam_left[l].const_data_ptr<T>();
    layers[l].lam_right = args.lam_right.empty() ? nullptr : args.lam_right[l].const_data_ptr<T>();
    layers[l].out = args.left[l].size(0);
    layers[l].in = args.right[l].size(0);
    layers[l].offset = args.offsets[l];
  }
  return layers;
}

template <typename T>
cudaError_t launch_kron_matmul(const KronArgs& args, const at::Tensor& V, const at::Tensor& out,
                               const at::Tensor& workspace, cudaStream_t stream) {
  const auto layers = make_layers<T>(args);
  return hesslab::cuda::kron_matmul_cuda<T>(
      layers.data(), static_cast<int64_t>(layers.size()), V.const_data_ptr<T>(), V.size(0),
      V.size(1), out.mutable_data_ptr<T>(), workspace.mutable_data_ptr<T>(), stream);
}

at::Tensor kron_matmul_op(at::TensorList A, at::TensorList B, const at::Tensor& V) {
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
  const cudaError_t err = V.scalar_type() == at::kDouble
                              ? launch_kron_matmul<double>(args, Vc, out, workspace, stream)
                              : launch_kron_matmul<float>(args, Vc, out, workspace, stream);
  TORCH_CHECK(err == cudaSuccess, "hesslab.kron_matmul: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return out;
}

template <typename T>
cudaError_t launch_kron_eig_apply(const KronArgs& args, const at::Tensor& V, double power,
                                  double damping, const at::Tensor& thresholds,
                                  const at::Tensor& out, const at::Tensor& workspace,
                                  cudaStream_t stream) {
  const auto layers = make_layers<T>(args);
  return hesslab::cuda::kron_eig_apply_cuda<T>(
      layers.data(), static_cast<int64_t>(layers.size()), V.const_data_ptr<T>(), V.size(0),
      V.size(1), power, damping, thresholds.const_data_ptr<double>(), out.mutable_data_ptr<T>(),
      workspace.mutable_data_ptr<T>(), stream);
}

at::Tensor kron_eig_apply_op(at::TensorList UA, at::TensorList lamA, at::TensorList UB,
                             at::TensorList lamB, const at::Tensor& V, double power,
                             double damping, const at::Tensor& thresholds) {
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
  const cudaError_t err =
      V.scalar_type() == at::kDouble
          ? launch_kron_eig_apply<double>(args, Vc, power, damping, thresholds_c, out, workspace,
                                          stream)
          : launch_kron_eig_apply<float>(args, Vc, power, damping, thresholds_c, out, workspace,
                                         stream);
  TORCH_CHECK(err == cudaSuccess, "hesslab.kron_eig_apply: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
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
  const at::Tensor ascending = at::argsort(lamA_c);
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
