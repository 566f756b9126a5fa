"""Kronecker-factored layer Hessians (Wu et al., "Dissecting Hessian"): ``KFAC`` and ``layer_hessian``.

The package, composed as in curvlinops (each part usable and testable on its own):

* :mod:`~hesslab.linops.kfac._layers`: which modules are Kronecker layers; their layout.
* :mod:`~hesslab.linops.kfac._loss`: the losses KFAC recognises; output/target checks.
* :mod:`~hesslab.linops.kfac._math`: pure math per layer type (input/output rows, the
  square root of the loss Hessian, the factor terms).
* :mod:`~hesslab.linops.kfac._computer`: the factor computer (forward hooks, one pass
  over the data, the exact-vs-Gauss-Newton decision, per-sample terms).
* :mod:`~hesslab.linops.kfac._kronecker`: the Kronecker block-diagonal operator over given
  factors (products, eigendecompositions, top-k, powers, damped inverses; compiled ops).
* :mod:`~hesslab.linops.kfac._operator`: ``KFAC`` = P ∘ K ∘ Pᵀ with P the layout
  permutation (:class:`~hesslab.linops._base.PermutationOperator`), and ``layer_hessian``.

Notation (per layer; see also :mod:`hesslab.linops._curvature`):
    W: the weight, viewed as a matrix of shape (out, in): ``nn.Linear`` as it is,
        ``nn.Conv2d`` as (C_out, C_in·kh·kw) (its row-major flattening).
    W̃ = [W | b]: the augmented matrix (out, in + 1) when the layer has a bias; the bias
        is its last column and every input x gets a constant 1 appended: x̃ = [x; 1].
    z = W̃ x̃: the layer's pre-activation output for one input vector.
    ℓ_j: the loss of sample j, defined by ``loss_fn(output, targets) = (1/n) Σ_j ℓ_j``
        (``loss_fn`` returns the batch MEAN); L = (1/N) Σ_j ℓ_j over all N samples.
    M_j = ∂²ℓ_j/∂z∂z: the per-sample Hessian of the loss with respect to the layer's
        output (out × out), everything else held fixed.
    P: positions sharing the weight within one sample: the spatial positions of a
        convolution's output (H_out·W_out), or the extra leading dimensions of a Linear
        layer's input (n, *, in) (P = 1 for the usual (n, in)). x̃_{j,t} and M_j[t, t] are
        the input (patch) and the output Hessian block at position t.

The factors (one pass over the data, each batch weighted by its number of samples; for
P > 1 this is the default "expand" form, see ``kfac_approx`` below for "reduce"):

    A = (1/N) Σ_j (1/P) Σ_t x̃_{j,t} x̃_{j,t}ᵀ          ((in+1) × (in+1), input second moment)
    B = (1/N) Σ_j Σ_t M_j[t, t]                        (out × out, output Hessian)

and the layer's block of the operator is B ⊗ A. For P = 1 the exact layer Hessian is
H_W = (1/N) Σ_j M_j ⊗ x̃_j x̃_jᵀ (z is linear in W̃, so ∂²ℓ/∂W̃² = Jᵀ M J exactly), and
B ⊗ A = E[M] ⊗ E[x̃x̃ᵀ] is Wu et al.'s decoupling approximation of it; it is exact for one
sample, or when all samples share one input x̃.

Factor order and layout:
    PyTorch flattens W̃ row-major, vec(W̃)[r·(in+1) + s] = W̃[r, s], so the block is
    B ⊗ A (``torch.kron(B, A)``) with (B ⊗ A) vec(V) = vec(B V Aᵀ); texts that use the
    column-major vec (Martens & Grosse, BackPACK's and curvlinops' documentation) write the
    same matrix as A ⊗ B. The *operator's* flat vectors, however, use the model's own
    parameter layout, as every hesslab operator does: the selected parameters in
    ``named_parameters()`` order, each flattened row-major, so a layer contributes its
    weight (out·in entries) and then its bias (out entries). ``KFAC`` and
    ``Hessian(model, loss_fn, data, params=K.param_names)`` act on the same vectors and can
    be compared or subtracted. Index permutations, precomputed once, move vectors between
    this layout and the augmented row-major layout the compiled Kronecker ops use
    (:func:`hesslab._ops.kron_matmul`, ``kron_eig_apply``, ``kron_topk``).

Scaling conventions (where libraries differ):
    * Mean, not sum: A and B are means over all N samples, so B ⊗ A approximates the
      Hessian of the mean loss L, the same matrix ``hesslab.Hessian`` applies. BackPACK's
      KFAC/KFLR return the factors of one mini-batch's loss (its reduction applied);
      curvlinops normalises by the number of data points like hesslab.
    * Cross-entropy (``nn.CrossEntropyLoss()``, ``F.cross_entropy``): at the logits
      M = diag(p) − p pᵀ with p = softmax(z) (rank c − 1; label smoothing does not change
      it; soft-label targets q scale it by Σ_i q_i). Its square root used for the
      propagation has columns √p_k (e_k − p), k = 1..c. Same as BackPACK and curvlinops.
    * Mean squared error: ``nn.MSELoss()`` with reduction="mean" averages over the batch
      AND over the D = numel(output)/n output entries of a sample, so
      ℓ_j = (1/D) ‖z_j − y_j‖² and M = (2/D) I_D at the output, square root √(2/D) I_D.
      The 2 is kept because hesslab's operators are Hessians of exactly the loss the user
      passed (``Hessian`` and ``KFAC`` must agree on one ``loss_fn``). BackPACK (since its
      fix of the "mean" scaling, PR #56) and curvlinops use the same 2/D; texts that model
      regression as a unit-variance Gaussian, ½‖z − y‖², (Martens & Grosse's K-FAC and
      many optimizers) get M = I, a factor 2/D apart.
    * Convolutions (and Linear layers with positions), ``kfac_approx=``: the exact block is
      E_j[Σ_{t,t'} M_j[t,t'] ⊗ x̃_{j,t} x̃_{j,t'}ᵀ]; Eschenhagen et al. (2023) name the two
      Kronecker approximations of it, and both are offered:
      "expand" (default; Grosse & Martens 2016, curvlinops' default): every position is
      treated like a sample, A = E_j[(1/P) Σ_t x̃_{j,t} x̃_{j,t}ᵀ] (AVERAGED over positions)
      and B = E_j[Σ_t M_j[t,t]] (SUMMED over positions), dropping the cross-position
      terms t ≠ t'. Exact when the patches do not depend on (j, t) and M is block diagonal
      over positions, i.e. for weight sharing "expanded" into separate outputs (flatten
      then Linear, per-position losses).
      "reduce": A = E_j[x̄_j x̄_jᵀ] with x̄_j = (1/P) Σ_t x̃_{j,t} the mean patch, and
      B = E_j[Σ_{t,t'} M_j[t,t']] (the output Hessian of a perturbation shared by all
      positions). Exact when every sample's patches are equal (whatever M is), and its
      bias block is always the exact one; suited to networks that pool over positions
      before the loss (global average pooling, ResNets).
      Why the 1/P sits in A: A stays the second moment of one input vector, comparable
      with a Linear layer's E[x̃x̃ᵀ] (its bias entry A[-1, -1] is exactly 1, and the
      E[x̃]E[x̃]ᵀ-dominance of Wu et al. reads the same), while B carries the sum over
      positions that the layer's Hessian does. With P = 1 (Linear on (n, in), a kernel as
      large as its input) both are the Linear case. Decision: "expand" stays the
      default, and "reduce" is the one to prefer for networks that pool over positions
      (global average pooling, ResNets), where it is much closer to the exact blocks'
      top eigenvalues; the measurements on hesslab.zoo's models are in
      benchmarks/RESULTS.md ("Design measurements (moved from docstrings)").
    * The split of scale between A and B is a convention: only B ⊗ A is meaningful.

The output Hessian M (``curvature=``):
    "ggn": the Gauss-Newton part M = Jᵀ (∇²_out ℓ) J, J = ∂out/∂z, propagated backward for
        all layers at once by vector-Jacobian products of the columns of the square root of
        ∇²_out ℓ (c products per batch for c outputs; no Monte Carlo). Always PSD.
    "exact" (default): the exact M = ∂²ℓ/∂z². It differs from the Gauss-Newton part by
        Σ_k (∂ℓ/∂out_k) ∂²out_k/∂z², which vanishes for networks that are piecewise linear
        between the layer and the output (ReLU, max-pooling, BatchNorm in eval mode, the
        last layer itself). On the first batch each layer is checked with one random
        Hessian-vector product w.r.t. its output (flagged where ‖(H − G)v‖ > √eps·‖Hv‖);
        the flagged layers (``K.exact_layers``; e.g. tanh networks) get M from out ("reduce")
        or P·out ("expand") exact Hessian-vector products per batch instead (double
        backward). Their B may be indefinite.

Assumptions: the model is evaluated in eval mode (BatchNorm uses running statistics,
dropout is off) and treats samples independently; each KFAC layer is called once per
forward pass as a module (``register_forward_hook``) and its parameters are used only
there (layers called several times, or not at all, are detected and skipped; a weight
that is also read directly, e.g. ``F.linear(x, self.fc.weight)``, is not); the factors
are a snapshot of the model when ``KFAC`` (or :meth:`KFAC.update`) ran.
"""

from __future__ import annotations

from hesslab.linops.kfac._computer import KronFactors, SampleTerms
from hesslab.linops.kfac._layers import is_conv1d, kronecker_layer_sizes
from hesslab.linops.kfac._operator import KFAC, KFACFunction, KronEigenpairs, layer_hessian

__all__ = ["KFAC", "KFACFunction", "KronEigenpairs", "KronFactors", "SampleTerms", "is_conv1d",
           "kronecker_layer_sizes", "layer_hessian"]
