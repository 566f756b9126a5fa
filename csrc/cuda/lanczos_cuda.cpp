// CUDA backend of lanczos_step_, reorthogonalize_ and gs_sweep_: the torch adapter.
//
// Checks the arguments (common/checks.h plus "is a CUDA tensor": the mutated Q and w must
// be contiguous and must not share memory with another argument; they are refused, not
// copied), makes the read-only inputs contiguous, allocates outputs and the float64
// workspace on Q's device (under a device guard, so a tensor on cuda:1 works while cuda:0
// is current) and calls the raw-pointer launchers of lanczos_kernels.cu on the current
// stream. Nothing here synchronises the host.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "common/checks.h"
#include "lanczos_kernels.h"

namespace {

template <typename T>
cudaError_t launch_lanczos_step(const at::Tensor& Q, const at::Tensor& w,
                                const at::Tensor& beta_prev, int64_t j, double tol,
                                const at::Tensor& alpha, const at::Tensor& beta,
                                const at::Tensor& breakdown, const at::Tensor& workspace,
                                cudaStream_t stream) {
  return hesslab::cuda::lanczos_step_cuda<T>(
      Q.mutable_data_ptr<T>(), w.mutable_data_ptr<T>(), beta_prev.const_data_ptr<double>(),
      Q.size(0), Q.size(1), Q.size(2), j, tol, alpha.mutable_data_ptr<double>(),
      beta.mutable_data_ptr<double>(), breakdown.mutable_data_ptr<bool>(),
      workspace.mutable_data_ptr<double>(), stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lanczos_step_op(const at::Tensor& Q,
                                                               const at::Tensor& w,
                                                               const at::Tensor& beta_prev,
                                                               int64_t j, double tol) {
  hesslab::check_lanczos_step(Q, w, beta_prev, j);
  TORCH_CHECK_VALUE(Q.is_cuda(), "hesslab.lanczos_step_: argument 'Q' must be a CUDA tensor, got ",
                    Q.device());
  const c10::cuda::CUDAGuard guard(Q.device());
  const int64_t b = Q.size(0);
  const auto f64 = Q.options().dtype(at::kDouble);
  at::Tensor alpha = at::empty({b}, f64);
  at::Tensor beta = at::empty({b}, f64);
  at::Tensor breakdown = at::empty({b}, Q.options().dtype(at::kBool));
  if (b == 0) {
    return {alpha, beta, breakdown};
  }
  const at::Tensor beta_prev_c = beta_prev.contiguous();
  const at::Tensor workspace =
      at::empty({hesslab::cuda::lanczos_step_workspace_size(b, j, Q.size(2))}, f64);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err =
      Q.scalar_type() == at::kDouble
          ? launch_lanczos_step<double>(Q, w, beta_prev_c, j, tol, alpha, beta, breakdown,
                                        workspace, stream)
          : launch_lanczos_step<float>(Q, w, beta_prev_c, j, tol, alpha, beta, breakdown,
                                       workspace, stream);
  TORCH_CHECK(err == cudaSuccess, "hesslab.lanczos_step_: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return {alpha, beta, breakdown};
}

template <typename T>
cudaError_t launch_reorthogonalize(const at::Tensor& Q, const at::Tensor& w, int64_t j,
                                   const at::Tensor& coeffs, const at::Tensor& workspace,
                                   cudaStream_t stream) {
  return hesslab::cuda::reorthogonalize_cuda<T>(
      Q.const_data_ptr<T>(), w.mutable_data_ptr<T>(), Q.size(0), Q.size(1), Q.size(2), j,
      coeffs.mutable_data_ptr<double>(), workspace.mutable_data_ptr<double>(), stream);
}

at::Tensor reorthogonalize_op(const at::Tensor& Q, const at::Tensor& w, int64_t j) {
  hesslab::check_reorthogonalize(Q, w, j);
  TORCH_CHECK_VALUE(Q.is_cuda(),
                    "hesslab.reorthogonalize_: argument 'Q' must be a CUDA tensor, got ",
                    Q.device());
  const c10::cuda::CUDAGuard guard(Q.device());
  const int64_t b = Q.size(0);
  const auto f64 = Q.options().dtype(at::kDouble);
  at::Tensor coeffs = at::empty({b, j}, f64);
  if (b == 0 || j == 0) {
    return coeffs;
  }
  const at::Tensor Qc = Q.contiguous();  // read only: a copy is fine
  const at::Tensor workspace =
      at::empty({hesslab::cuda::reorthogonalize_workspace_size(b, j, Q.size(2))}, f64);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err =
      Q.scalar_type() == at::kDouble
          ? launch_reorthogonalize<double>(Qc, w, j, coeffs, workspace, stream)
          : launch_reorthogonalize<float>(Qc, w, j, coeffs, workspace, stream);
  TORCH_CHECK(err == cudaSuccess, "hesslab.reorthogonalize_: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return coeffs;
}

template <typename T>
cudaError_t launch_gs_sweep(const at::Tensor& Q, const at::Tensor& w, const at::Tensor& coef,
                            int64_t rows, int64_t dot_rows, const at::Tensor& out,
                            const at::Tensor& workspace, cudaStream_t stream) {
  return hesslab::cuda::gs_sweep_cuda<T>(
      Q.const_data_ptr<T>(), w.mutable_data_ptr<T>(),
      coef.defined() ? coef.const_data_ptr<double>() : nullptr, Q.size(0), Q.size(1), Q.size(2),
      rows, dot_rows, out.mutable_data_ptr<double>(), workspace.mutable_data_ptr<double>(), stream);
}

at::Tensor gs_sweep_op(const at::Tensor& Q, const at::Tensor& w,
                       const std::optional<at::Tensor>& coef, int64_t rows, bool dots) {
  hesslab::check_gs_sweep(Q, w, coef, rows);
  TORCH_CHECK_VALUE(Q.is_cuda(), "hesslab.gs_sweep_: argument 'Q' must be a CUDA tensor, got ",
                    Q.device());
  const c10::cuda::CUDAGuard guard(Q.device());
  const int64_t b = Q.size(0), dot_rows = dots ? rows : 0;
  const auto f64 = Q.options().dtype(at::kDouble);
  at::Tensor flat = at::empty({b * dot_rows + b}, f64);  // the launcher's layout: dots, then norms
  if (b > 0) {
    const at::Tensor Qc = Q.contiguous();  // read only: a copy is fine
    const at::Tensor cc = coef.has_value() ? coef->contiguous() : at::Tensor();
    const at::Tensor workspace =
        at::empty({hesslab::cuda::gs_sweep_workspace_size(b, dot_rows, Q.size(2))}, f64);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const cudaError_t err =
        Q.scalar_type() == at::kDouble
            ? launch_gs_sweep<double>(Qc, w, cc, rows, dot_rows, flat, workspace, stream)
            : launch_gs_sweep<float>(Qc, w, cc, rows, dot_rows, flat, workspace, stream);
    TORCH_CHECK(err == cudaSuccess, "hesslab.gs_sweep_: CUDA kernel launch failed: ",
                cudaGetErrorString(err));
  }
  return at::cat({flat.narrow(0, 0, b * dot_rows).view({b, dot_rows}),
                  flat.narrow(0, b * dot_rows, b).view({b, 1})},
                 1);
}

}  // namespace

TORCH_LIBRARY_IMPL(hesslab, CUDA, m) {
  m.impl("lanczos_step_", &lanczos_step_op);
  m.impl("reorthogonalize_", &reorthogonalize_op);
  m.impl("gs_sweep_", &gs_sweep_op);
}
