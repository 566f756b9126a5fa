// Row-major strided-batched GEMM through cuBLAS with the precision spelled out.
//
// Plain C++ over raw device pointers and a cuBLAS handle (no torch): kron_cuda.cpp (the
// torch adapter) calls it for the Kronecker layers above the size threshold, where
// cuBLAS's tuned (tensor-core where the dtype allows) GEMMs beat the grouped SIMT kernel
// of kron_kernels.cu.
//
// Precision: float64 computes and accumulates in float64 (CUBLAS_COMPUTE_64F; on
// sm_80/sm_90 the FP64 tensor-core DMMA path, IEEE float64 products and sums). float32
// computes and accumulates in float32 (CUBLAS_COMPUTE_32F with the handle's math mode
// set to CUBLAS_DEFAULT_MATH for the call, so torch's global TF32 switches cannot turn
// it on) unless allow_tf32, which asks for CUBLAS_COMPUTE_32F_FAST_TF32 (inputs rounded
// to TF32's 10-bit mantissa: relative errors ~1e-3, several times faster on tensor
// cores). There is no mixed mode: for float64 accumulation of float32 data, pass float64
// tensors. The handle's previous math mode is restored before returning.
//
// Determinism: cuBLAS gives the same bits run to run for the same problem, GPU model,
// library version and stream (torch's handle is per thread and stream).
#pragma once

#include <cublas_v2.h>

#include "kron_kernels.h"

#include <cstdint>

namespace hesslab {
namespace cuda {

// RowMajorGemm: see kron_kernels.h.

// Enqueues the GEMM on the handle's stream (no host synchronisation). Returns the first
// cuBLAS error, or CUBLAS_STATUS_INVALID_VALUE for a dimension beyond cuBLAS's int range.
template <typename T>
cublasStatus_t row_major_gemm(cublasHandle_t handle, const RowMajorGemm<T>& g, bool allow_tf32);

}  // namespace cuda
}  // namespace hesslab
