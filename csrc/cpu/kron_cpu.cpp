// CPU kernels of the Kronecker family: kron_matmul, kron_eig_apply, kron_topk.
//
// Layout: V is (b, N); layer l owns columns [off_l, off_{l+1}) viewed as (b, out_l, in_l)
// row-major, so (B kron A) vec(V_l) = vec(B V_l A^T) (PyTorch flattens row-major).
//
// kron_matmul / kron_eig_apply: per layer, two GEMMs through ATen (BLAS, threaded over
// the cores): T = V_l A^T as one (b*out, in) x (in, in) product, then B T broadcast over
// the batch. kron_eig_apply rotates into the factors' eigenbases, scales each entry
// (r, s) by f(lamB[r] lamA[s]) with f(x) = (x + damping)^power where x >= threshold_l and
// 0 elsewhere (f in double; the cut compares x rounded to the storage dtype, the value
// kron_topk reports), and rotates back.
//
// kron_topk: the k largest products lamB[i] lamA[j] without forming all p*q of them. Each
// row i, walked along lamA in descending order when lamB[i] >= 0 and ascending otherwise,
// is non-increasing; a max-heap holds one cursor per row and k pops give the answer in
// O((p + k) log p). Keys are the float64 products; equal keys pop the larger row first
// (the pair order of std::priority_queue), and lamA's argsort is stable: the CUDA kernel
// follows the same rules, so ties give the same pairs on both devices.
//
// Reference: hesslab/reference.py (kron_matmul, kron_eig_apply, kron_topk).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/outer.h>
#include <torch/library.h>

#include <cmath>
#include <queue>
#include <vector>

#include "common/checks.h"

namespace hesslab {
namespace {

at::Tensor layer_view(const at::Tensor& V, const std::vector<int64_t>& off, size_t l, int64_t out, int64_t in) {
  return V.narrow(1, off[l], off[l + 1] - off[l]).view({V.size(0), out, in});
}

at::Tensor kron_matmul_cpu(at::TensorList A, at::TensorList B, const at::Tensor& V, bool /*allow_tf32*/) {
  auto off = check_kron_factors(A, B, V, "kron_matmul", "A", "B");
  at::Tensor Vc = V.contiguous();
  at::Tensor out = at::empty_like(Vc);
  for (size_t l = 0; l < A.size(); ++l) {
    const int64_t o = B[l].size(0), i = A[l].size(0);
    if (Vc.size(0) == 0 || o * i == 0) continue;
    at::Tensor Vl = layer_view(Vc, off, l, o, i);
    at::Tensor T = at::mm(Vl.reshape({-1, i}), A[l].t()).view({-1, o, i});
    // One vector: two plain GEMMs (a broadcast matmul would take the slower batched path).
    layer_view(out, off, l, o, i).copy_(Vc.size(0) == 1 ? at::mm(B[l], T[0]).unsqueeze(0) : at::matmul(B[l], T));
  }
  return out;
}

at::Tensor kron_eig_apply_cpu(at::TensorList UA, at::TensorList lamA, at::TensorList UB, at::TensorList lamB,
                              const at::Tensor& V, double power, double damping, const at::Tensor& thresholds,
                              bool /*allow_tf32: no TF32 on the CPU*/) {
  auto off = check_kron_eig(UA, lamA, UB, lamB, V, thresholds);
  at::Tensor Vc = V.contiguous();
  at::Tensor thr = thresholds.contiguous();
  at::Tensor out = at::empty_like(Vc);
  for (size_t l = 0; l < UA.size(); ++l) {
    const int64_t o = UB[l].size(0), i = UA[l].size(0);
    if (Vc.size(0) == 0 || o * i == 0) continue;
    at::Tensor x = at::outer(lamB[l].to(at::kDouble), lamA[l].to(at::kDouble));
    const double t = thr.data_ptr<double>()[l];
    double* px = x.data_ptr<double>();
    AT_DISPATCH_FLOATING_TYPES(V.scalar_type(), "kron_eig_apply_cpu", [&] {
      // The cut compares the product rounded to the storage dtype, as kron_topk reports it,
      // so a threshold taken from kron_topk keeps exactly the products it listed.
      for (int64_t e = 0; e < o * i; ++e)
        px[e] = static_cast<double>(static_cast<scalar_t>(px[e])) >= t ? std::pow(px[e] + damping, power) : 0.0;
    });
    at::Tensor X = at::matmul(at::matmul(UB[l].t(), layer_view(Vc, off, l, o, i)), UA[l]);
    X.mul_(x.to(V.scalar_type()));
    layer_view(out, off, l, o, i).copy_(at::matmul(at::matmul(UB[l], X), UA[l].t()));
  }
  return out;
}

template <typename T>
void topk_products(const T* lb, int64_t p, const T* la, const int64_t* asc, int64_t q, int64_t k, T* values,
                   int64_t* ib, int64_t* ia) {
  // Cursor c of row i points at lamA[asc[q-1-c]] (descending) when lb[i] >= 0, else lamA[asc[c]].
  auto col = [&](int64_t i, int64_t c) { return lb[i] >= T(0) ? asc[q - 1 - c] : asc[c]; };
  using Item = std::pair<double, std::pair<int64_t, int64_t>>;  // (product, (row, cursor))
  std::priority_queue<Item> heap;
  for (int64_t i = 0; i < p && q > 0; ++i)
    heap.push({static_cast<double>(lb[i]) * static_cast<double>(la[col(i, 0)]), {i, 0}});
  for (int64_t t = 0; t < k; ++t) {
    const Item top = heap.top();
    heap.pop();
    const int64_t i = top.second.first, c = top.second.second;
    values[t] = static_cast<T>(top.first);
    ib[t] = i;
    ia[t] = col(i, c);
    if (c + 1 < q) heap.push({static_cast<double>(lb[i]) * static_cast<double>(la[col(i, c + 1)]), {i, c + 1}});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_topk_cpu(const at::Tensor& lamB, const at::Tensor& lamA,
                                                             int64_t k) {
  check_kron_topk(lamB, lamA, k);
  at::Tensor lb = lamB.contiguous(), la = lamA.contiguous();
  at::Tensor asc = at::argsort(la, /*stable=*/true).contiguous();  // ties in lamA: as on CUDA
  at::Tensor values = at::empty({k}, lamB.options());
  at::Tensor ib = at::empty({k}, lamB.options().dtype(at::kLong));
  at::Tensor ia = at::empty({k}, lamB.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(lamB.scalar_type(), "kron_topk_cpu", [&] {
    topk_products<scalar_t>(lb.data_ptr<scalar_t>(), lb.size(0), la.data_ptr<scalar_t>(), asc.data_ptr<int64_t>(),
                            la.size(0), k, values.data_ptr<scalar_t>(), ib.data_ptr<int64_t>(),
                            ia.data_ptr<int64_t>());
  });
  return {values, ib, ia};
}

}  // namespace

TORCH_LIBRARY_IMPL(hesslab, CPU, m) {
  m.impl("kron_matmul", &kron_matmul_cpu);
  m.impl("kron_eig_apply", &kron_eig_apply_cpu);
  m.impl("kron_topk", &kron_topk_cpu);
}

}  // namespace hesslab
