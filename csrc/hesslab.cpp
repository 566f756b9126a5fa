// hesslab._C: the module stub and every op schema, in one TORCH_LIBRARY block.
//
// Importing hesslab._C loads this shared library, whose static initialisers register
// the schemas below and the kernels of each backend file (cpu/*_cpu.cpp with
// TORCH_LIBRARY_IMPL(hesslab, CPU, m), cuda/*_cuda.cpp with TORCH_LIBRARY_IMPL(hesslab,
// CUDA, m)). Python never calls into this module directly: everything goes through
// torch.ops.hesslab.*, wrapped by hesslab/_ops.py.
//
// Conventions shared by every op (see the docstrings in hesslab/_ops.py):
//   * Every backend's kernel must have the same C++ signature (const at::Tensor& for every
//     tensor, at::TensorList for Tensor[]): the dispatcher aborts at load time otherwise.
//   * Lanczos bases Q are (b, m, n): b independent runs, m rows each, n-vectors; the
//     storage dtype is float32 or float64, inner products accumulate in float64.
//   * Kronecker layers use PyTorch's row-major vec: for V of shape (out, in),
//     (B kron A) vec(V) = vec(B V A^T). Flat vectors concatenate the layers' blocks.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(hesslab, m) {
  // One Lanczos step for b runs, by the one Gram-Schmidt plan of common/gram_schmidt_plan.h
  // that the CPU and CUDA kernels both follow (rows q_0..q_j, float64 sums):
  //   d = Q w_in; w -= Q^T d (this is the recurrence w -= alpha q_j + beta_prev q_{j-1} and
  //   the first reorthogonalization at once); c = Q w; second update w -= Q^T c only where
  //   ||c|| > eps ||w|| (eps: the storage dtype's epsilon; NaN takes it);
  //   alpha = d_j (+ c_j where the second update ran); beta = ||w||;
  //   breakdown[i]: beta <= tol * (||w_in|| + |beta_prev| (j > 0)); Q[:, j+1] = w / beta when
  //   j + 1 < m, zeros (never NaN) on breakdown or beta not > 0, for the driver to replace.
  // Q and w are mutated: they must be contiguous and must not share memory with each other
  // or with beta_prev (refused, never copied); every tensor on one device.
  m.def(
      "lanczos_step_(Tensor(a!) Q, Tensor(b!) w, Tensor beta_prev, int j, float tol) -> "
      "(Tensor alpha, Tensor beta, Tensor breakdown)");
  // The same plan against Q[:, :j] (w mutated: contiguous, not sharing memory with Q);
  // returns the applied coefficients d (+ c) as (b, j) float64.
  m.def("reorthogonalize_(Tensor Q, Tensor(a!) w, int j) -> Tensor");
  // One sweep of the plan over rows R = q_0..q_{rows-1}, for callers that combine the
  // partial sums of several processes between sweeps (the sharded Lanczos step): where
  // coef (b, rows) float64 is given, w -= Q_R^T coef (float64 sums, w rounded once); then
  // out[:, :rows] = Q_R w when dots, and out[:, -1] = ||w||^2, as (b, rows + 1) or (b, 1)
  // float64. w mutated: contiguous, not sharing memory with Q or coef.
  m.def("gs_sweep_(Tensor Q, Tensor(a!) w, Tensor? coef, int rows, bool dots) -> Tensor");
  // Block-diagonal Kronecker product: out_l = vec(B_l V_l A_l^T) for every layer l.
  // allow_tf32 (trailing, default off: calls without it keep their meaning): float32 GEMMs
  // on CUDA may round their inputs to TF32 (cuBLAS path only); ignored for float64 and on
  // the CPU. Without it float32 products accumulate in float32, whatever torch's global
  // TF32 switches say.
  m.def("kron_matmul(Tensor[] A, Tensor[] B, Tensor V, bool allow_tf32=False) -> Tensor");
  // out_l = U_B (f(lamB lamA^T) * (U_B^T V_l U_A)) U_A^T with f(x) = (x + damping)^power
  // where x >= thresholds[l] and 0 elsewhere; allow_tf32 as for kron_matmul.
  m.def(
      "kron_eig_apply(Tensor[] UA, Tensor[] lamA, Tensor[] UB, Tensor[] lamB, Tensor V, "
      "float power, float damping, Tensor thresholds, bool allow_tf32=False) -> Tensor");
  // Top-k products lamB[i] * lamA[j], descending, with their index pairs.
  m.def("kron_topk(Tensor lamB, Tensor lamA, int k) -> (Tensor values, Tensor idx_B, Tensor idx_A)");
}
