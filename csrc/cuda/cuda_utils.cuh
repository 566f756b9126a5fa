// Launch helpers shared by the CUDA kernel files (lanczos_kernels.cu, kron_kernels.cu).
//
// Plain CUDA/C++ (no torch headers): block size, grid sizing for grid-stride loops and
// the early-return error propagation the raw-pointer launchers use.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

// Evaluates a CUDA runtime call (or cudaGetLastError() after a launch) and returns its
// error from the enclosing launcher if it failed.
#define HESSLAB_CUDA_TRY(expr)              \
  do {                                      \
    const cudaError_t hesslab_err_ = (expr); \
    if (hesslab_err_ != cudaSuccess) {      \
      return hesslab_err_;                  \
    }                                       \
  } while (0)

namespace hesslab {
namespace cuda {

// Threads per block of every kernel except kron_topk's single-thread kernel.
constexpr int kBlockThreads = 256;
// Cap on gridDim.x of the elementwise grid-stride kernels (kron's eig_scale, coefficient
// copies): 1024 blocks of 256 threads, about one wave on an H100/H200 (132 SMs x 8
// resident blocks). The Lanczos sweeps size their grid from the SM count instead
// (lanczos_kernels.cu: several waves).
constexpr int64_t kMaxStrideBlocks = 1024;
// Hardware limits on gridDim.y and gridDim.x.
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// gridDim.x for a grid-stride loop over `count` > 0 items, kBlockThreads per block.
inline unsigned int stride_blocks(int64_t count) {
  return static_cast<unsigned int>(std::min(ceil_div(count, kBlockThreads), kMaxStrideBlocks));
}

// gridDim.y for a loop `for (i = blockIdx.y; i < count; i += gridDim.y)` over `count` > 0.
inline unsigned int stride_blocks_y(int64_t count) {
  return static_cast<unsigned int>(std::min(count, kMaxGridY));
}

}  // namespace cuda
}  // namespace hesslab
