// Argument checks shared by every backend of every hesslab op.
//
// Each message names the op, the argument and what was expected, so that a user who
// calls torch.ops.hesslab.* directly (bypassing hesslab/_ops.py) still learns what to
// fix. Shape, device, layout and aliasing errors raise ValueError, dtype errors TypeError
// (TORCH_CHECK_VALUE/TYPE). hesslab/_ops.py's fake (meta) kernels raise the same messages
// with torch._check_value/_check_type, so a traced call fails the way an eager one does.
//
// Every tensor argument must be on the device of the op's first tensor (mixed devices,
// meta included, are refused; a meta argument mixed with real ones reaches the fake
// kernel, which applies the same rule). Arguments an op mutates must be contiguous (no
// silent copy of a whole basis) and must not share memory with any other argument.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace hesslab {

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                   "hesslab.", op, ": argument '", name,
                   "' must be float32 or float64, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, "hesslab.", op, ": argument '", name, "' must have shape ",
                    layout, " (", dim, " dims), got ", t.sizes());
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* name, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "hesslab.", op, ": argument '", name,
                   "' must have the dtype of '", ref_name, "' (", ref.scalar_type(), "), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), "hesslab.", op, ": argument '", name,
                    "' must be on the device of '", ref_name, "' (", ref.device(), "), got ",
                    t.device());
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                         const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "hesslab.", op, ": argument '", name,
                    "' must be on the device of '", ref_name, "' (", ref.device(), "), got ",
                    t.device());
}

// A tensor the op writes in place: contiguous, so the kernel works on it directly.
inline void check_mutated_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "hesslab.", op, ": argument '", name,
                    "' is written in place and must be contiguous, got shape ", t.sizes(),
                    " with strides ", t.strides(), "; pass ", name,
                    ".contiguous() and read the result from that tensor");
}

// Byte range [begin, end) that t's elements span inside its storage (t.numel() > 0).
inline std::pair<const char*, const char*> byte_span(const at::Tensor& t) {
  const char* begin = static_cast<const char*>(t.const_data_ptr());
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return {begin, begin + (last + 1) * static_cast<int64_t>(t.element_size())};
}

// Whether a and b may share memory: same storage and overlapping element ranges
// (conservative for strided views whose elements interleave without touching).
inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage()) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  const at::MemOverlapStatus status = at::get_overlap_status(a, b);
  if (status == at::MemOverlapStatus::No) return false;
  if (status != at::MemOverlapStatus::TooHard) return true;
  const auto sa = byte_span(a), sb = byte_span(b);
  return sa.first < sb.second && sb.first < sa.second;
}

// A mutated argument must not share memory with another argument (the kernels would
// read what they are writing: a wrong alpha, or a "read only" basis changed).
inline void check_no_overlap(const at::Tensor& mutated, const at::Tensor& other, const char* op,
                             const char* name, const char* other_name) {
  TORCH_CHECK_VALUE(!may_overlap(mutated, other), "hesslab.", op, ": argument '", name,
                    "' is written in place and must not share memory with argument '",
                    other_name, "'; pass a copy (", other_name, ".clone() or ", name,
                    ".clone())");
}

// A basis Q (b, m, n) and vectors w (b, n) of the same dtype and device.
inline void check_basis_and_vectors(const at::Tensor& Q, const at::Tensor& w, const char* op) {
  check_floating(Q, op, "Q");
  check_dim(Q, 3, op, "Q", "(b, m, n)");
  check_dim(w, 2, op, "w", "(b, n)");
  check_same(w, Q, op, "w", "Q");
  TORCH_CHECK_VALUE(w.size(0) == Q.size(0) && w.size(1) == Q.size(2), "hesslab.", op,
                    ": argument 'w' must have shape (b, n) = (", Q.size(0), ", ", Q.size(2),
                    ") to match 'Q' ", Q.sizes(), ", got ", w.sizes());
}

// lanczos_step_(Q (b,m,n), w (b,n), beta_prev (b,) float64, j in [0, m)).
inline void check_lanczos_step(const at::Tensor& Q, const at::Tensor& w,
                               const at::Tensor& beta_prev, int64_t j) {
  const char* op = "lanczos_step_";
  check_basis_and_vectors(Q, w, op);
  TORCH_CHECK_VALUE(Q.size(1) >= 1, "hesslab.", op, ": argument 'Q' must hold m >= 1 rows, got ",
                    Q.sizes());
  TORCH_CHECK_VALUE(j >= 0 && j < Q.size(1), "hesslab.", op, ": argument 'j' must satisfy 0 <= j < m = ",
                    Q.size(1), ", got ", j);
  TORCH_CHECK_TYPE(beta_prev.scalar_type() == at::kDouble, "hesslab.", op,
                   ": argument 'beta_prev' must be float64, got ", beta_prev.scalar_type());
  check_dim(beta_prev, 1, op, "beta_prev", "(b,)");
  TORCH_CHECK_VALUE(beta_prev.size(0) == Q.size(0), "hesslab.", op,
                    ": argument 'beta_prev' must have shape (b,) = (", Q.size(0), ",), got ",
                    beta_prev.sizes());
  check_device(beta_prev, Q, op, "beta_prev", "Q");
  check_mutated_contiguous(Q, op, "Q");
  check_mutated_contiguous(w, op, "w");
  check_no_overlap(w, Q, op, "w", "Q");
  check_no_overlap(Q, beta_prev, op, "Q", "beta_prev");
  check_no_overlap(w, beta_prev, op, "w", "beta_prev");
}

// What reorthogonalize_ and gs_sweep_ share: Q and w, a row count in [0, m] (argument
// `what`), and a w that is mutated (contiguous, no memory shared with Q).
inline void check_rows_and_mutated_w(const at::Tensor& Q, const at::Tensor& w, int64_t rows,
                                     const char* op, const char* what) {
  check_basis_and_vectors(Q, w, op);
  TORCH_CHECK_VALUE(rows >= 0 && rows <= Q.size(1), "hesslab.", op, ": argument '", what,
                    "' must satisfy 0 <= ", what, " <= m = ", Q.size(1), ", got ", rows);
  check_mutated_contiguous(w, op, "w");
  check_no_overlap(w, Q, op, "w", "Q");
}

// reorthogonalize_(Q (b,m,n), w (b,n), j in [0, m]).
inline void check_reorthogonalize(const at::Tensor& Q, const at::Tensor& w, int64_t j) {
  check_rows_and_mutated_w(Q, w, j, "reorthogonalize_", "j");
}

// gs_sweep_(Q (b,m,n), w (b,n), coef (b, rows) float64 or none, rows in [0, m]).
inline void check_gs_sweep(const at::Tensor& Q, const at::Tensor& w,
                           const std::optional<at::Tensor>& coef, int64_t rows) {
  const char* op = "gs_sweep_";
  check_rows_and_mutated_w(Q, w, rows, op, "rows");
  if (coef.has_value()) {
    const at::Tensor& c = *coef;
    TORCH_CHECK_TYPE(c.scalar_type() == at::kDouble, "hesslab.", op,
                     ": argument 'coef' must be float64, got ", c.scalar_type());
    check_dim(c, 2, op, "coef", "(b, rows)");
    TORCH_CHECK_VALUE(c.size(0) == Q.size(0) && c.size(1) == rows, "hesslab.", op,
                      ": argument 'coef' must have shape (b, rows) = (", Q.size(0), ", ", rows,
                      "), got ", c.sizes());
    check_device(c, Q, op, "coef", "Q");
    check_no_overlap(w, c, op, "w", "coef");
  }
}

// Grouped Kronecker factors: A[l] (in_l, in_l), B[l] (out_l, out_l); V (b, N) with
// N = sum_l out_l * in_l. Returns the per-layer offsets into the flat dimension.
inline std::vector<int64_t> check_kron_factors(at::TensorList A, at::TensorList B,
                                               const at::Tensor& V, const char* op,
                                               const char* a_name, const char* b_name) {
  check_floating(V, op, "V");
  check_dim(V, 2, op, "V", "(b, N)");
  TORCH_CHECK_VALUE(A.size() == B.size(), "hesslab.", op, ": arguments '", a_name, "' and '",
                    b_name, "' must list the same number of layers, got ", A.size(), " and ",
                    B.size());
  std::vector<int64_t> offsets(A.size() + 1, 0);
  for (size_t l = 0; l < A.size(); ++l) {
    const std::string an = std::string(a_name) + "[" + std::to_string(l) + "]";
    const std::string bn = std::string(b_name) + "[" + std::to_string(l) + "]";
    check_same(A[l], V, op, an.c_str(), "V");
    check_same(B[l], V, op, bn.c_str(), "V");
    TORCH_CHECK_VALUE(A[l].dim() == 2 && A[l].size(0) == A[l].size(1), "hesslab.", op,
                      ": argument '", an, "' must be a square matrix (in, in), got ",
                      A[l].sizes());
    TORCH_CHECK_VALUE(B[l].dim() == 2 && B[l].size(0) == B[l].size(1), "hesslab.", op,
                      ": argument '", bn, "' must be a square matrix (out, out), got ",
                      B[l].sizes());
    offsets[l + 1] = offsets[l] + A[l].size(0) * B[l].size(0);
  }
  TORCH_CHECK_VALUE(V.size(1) == offsets.back(), "hesslab.", op,
                    ": argument 'V' must have N = sum(out*in) = ", offsets.back(),
                    " columns for the given factors, got ", V.sizes());
  return offsets;
}

// kron_eig_apply: eigenvalue vectors match their bases; thresholds (L,) float64.
inline std::vector<int64_t> check_kron_eig(at::TensorList UA, at::TensorList lamA,
                                           at::TensorList UB, at::TensorList lamB,
                                           const at::Tensor& V, const at::Tensor& thresholds) {
  const char* op = "kron_eig_apply";
  auto offsets = check_kron_factors(UA, UB, V, op, "UA", "UB");
  TORCH_CHECK_VALUE(lamA.size() == UA.size() && lamB.size() == UB.size(), "hesslab.", op,
                    ": arguments 'lamA' and 'lamB' must list one eigenvalue vector per layer (",
                    UA.size(), "), got ", lamA.size(), " and ", lamB.size());
  for (size_t l = 0; l < UA.size(); ++l) {
    const std::string an = "lamA[" + std::to_string(l) + "]";
    const std::string bn = "lamB[" + std::to_string(l) + "]";
    check_same(lamA[l], V, op, an.c_str(), "V");
    check_same(lamB[l], V, op, bn.c_str(), "V");
    TORCH_CHECK_VALUE(lamA[l].dim() == 1 && lamA[l].size(0) == UA[l].size(0), "hesslab.", op,
                      ": argument '", an, "' must have shape (", UA[l].size(0), ",), got ",
                      lamA[l].sizes());
    TORCH_CHECK_VALUE(lamB[l].dim() == 1 && lamB[l].size(0) == UB[l].size(0), "hesslab.", op,
                      ": argument '", bn, "' must have shape (", UB[l].size(0), ",), got ",
                      lamB[l].sizes());
  }
  TORCH_CHECK_TYPE(thresholds.scalar_type() == at::kDouble, "hesslab.", op,
                   ": argument 'thresholds' must be float64, got ", thresholds.scalar_type());
  TORCH_CHECK_VALUE(thresholds.dim() == 1 && thresholds.size(0) == (int64_t)UA.size(), "hesslab.",
                    op, ": argument 'thresholds' must have shape (L,) = (", UA.size(),
                    ",), one per layer, got ", thresholds.sizes());
  check_device(thresholds, V, op, "thresholds", "V");
  return offsets;
}

// kron_topk(lamB (p,), lamA (q,), k in [0, p*q]).
inline void check_kron_topk(const at::Tensor& lamB, const at::Tensor& lamA, int64_t k) {
  const char* op = "kron_topk";
  check_floating(lamB, op, "lamB");
  check_dim(lamB, 1, op, "lamB", "(p,)");
  check_dim(lamA, 1, op, "lamA", "(q,)");
  check_same(lamA, lamB, op, "lamA", "lamB");
  TORCH_CHECK_VALUE(k >= 0 && k <= lamB.size(0) * lamA.size(0), "hesslab.", op,
                    ": argument 'k' must satisfy 0 <= k <= p*q = ", lamB.size(0) * lamA.size(0),
                    ", got ", k);
}

}  // namespace hesslab
