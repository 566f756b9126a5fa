// Row-major strided-batched GEMM through cuBLAS (see cublas_gemm.h for the precision).
//
// cuBLAS is column-major: a row-major (r x c) matrix with leading dimension ld is, read
// column-major, its (c x r) transpose. So row-major C = op(X) op(Y) is column-major
// C^T = op(Y)^T op(X)^T: cublasGemmStridedBatchedEx with the operands swapped (Y first),
// m = N, n = M, and each operand's own transpose flag. Batches beyond 65535 go in chunks
// (the batch count maps to a grid dimension in some cuBLAS kernels).
#include "cublas_gemm.h"

#include <algorithm>
#include <climits>
#include <type_traits>

namespace hesslab {
namespace cuda {

namespace {

constexpr int64_t kMaxBatchPerCall = 65535;

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

// Restores the handle's math mode when the call returns.
class MathModeGuard {
 public:
  MathModeGuard(cublasHandle_t handle, cublasMath_t mode) : handle_(handle) {
    ok_ = cublasGetMathMode(handle, &saved_) == CUBLAS_STATUS_SUCCESS &&
          cublasSetMathMode(handle, mode) == CUBLAS_STATUS_SUCCESS;
  }
  ~MathModeGuard() {
    if (ok_) {
      cublasSetMathMode(handle_, saved_);
    }
  }
  bool ok() const { return ok_; }

 private:
  cublasHandle_t handle_;
  cublasMath_t saved_ = CUBLAS_DEFAULT_MATH;
  bool ok_ = false;
};

}  // namespace

template <typename T>
cublasStatus_t row_major_gemm(cublasHandle_t handle, const RowMajorGemm<T>& g, bool allow_tf32) {
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value,
                "float32 or float64");
  if (g.M == 0 || g.N == 0 || g.batch == 0) {
    return CUBLAS_STATUS_SUCCESS;
  }
  if (!fits_int(g.M) || !fits_int(g.N) || !fits_int(g.K) || !fits_int(g.ldx) ||
      !fits_int(g.ldy) || !fits_int(g.ldc)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  constexpr bool is_double = std::is_same<T, double>::value;
  const cudaDataType_t type = is_double ? CUDA_R_64F : CUDA_R_32F;
  const cublasComputeType_t compute =
      is_double ? CUBLAS_COMPUTE_64F
                : (allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F);
  const MathModeGuard guard(handle, CUBLAS_DEFAULT_MATH);
  if (!guard.ok()) {
    return CUBLAS_STATUS_INTERNAL_ERROR;
  }
  const T one = T(1);
  const T zero = T(0);
  for (int64_t e0 = 0; e0 < g.batch; e0 += kMaxBatchPerCall) {
    const int64_t count = std::min(kMaxBatchPerCall, g.batch - e0);
    const cublasStatus_t status = cublasGemmStridedBatchedEx(
        handle, g.trans_y ? CUBLAS_OP_T : CUBLAS_OP_N, g.trans_x ? CUBLAS_OP_T : CUBLAS_OP_N,
        static_cast<int>(g.N), static_cast<int>(g.M), static_cast<int>(g.K), &one,
        g.Y + e0 * g.stride_y, type, static_cast<int>(g.ldy), g.stride_y,
        g.X + e0 * g.stride_x, type, static_cast<int>(g.ldx), g.stride_x, &zero,
        g.C + e0 * g.stride_c, type, static_cast<int>(g.ldc), g.stride_c,
        static_cast<int>(count), compute, CUBLAS_GEMM_DEFAULT);
    if (status != CUBLAS_STATUS_SUCCESS) {
      return status;
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

template cublasStatus_t row_major_gemm<float>(cublasHandle_t, const RowMajorGemm<float>&, bool);
template cublasStatus_t row_major_gemm<double>(cublasHandle_t, const RowMajorGemm<double>&, bool);

}  // namespace cuda
}  // namespace hesslab
