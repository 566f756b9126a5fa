"""Kronecker factors against exact layer Hessians (Wu et al.), for the demo and ``hesslab
analyze``: per layer the top-k of E[M] ⊗ E[xxᵀ] and of the exact block, their eigenspace
overlap, the low rank of the reshaped eigenvectors, the dominant eigenvalues of E[M]; and
the overlap between two independently trained MLPs."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from hesslab._results import jsonable
from hesslab.analysis import dominant_eigenvalues, eigenvector_low_rank, kfac_overlap, overlap_curve
from hesslab.errors import HesslabError

from ._stages import Stages, guard

__all__ = ["KfacAnalysis", "kfac_analysis", "record_kfac", "seed_overlaps", "display_layer", "choose_layers"]


@dataclasses.dataclass
class KfacAnalysis:
    """Kronecker factors against exact layer Hessians for one model (Wu et al.).

    Attributes:
        label: The model's name.
        layers: Per layer ``{"n": n_l, "shape": (out, in[+1]), "k": k}`` and its headline
            numbers.
        results: ``{"<layer>/exact"|"<layer>/kfac": EigenResult, "<layer>/overlap":
            OverlapCurve, "<layer>/low_rank_exact"|"<layer>/low_rank_kfac": LowRank,
            "<layer>/dominant_B": DominantEigenvalues}``.
        skipped: Layers KFAC left out, with the reason.
        not_compared: Kronecker layers whose exact block was not computed (not chosen),
            with the reason.
        errors: Failures, by step.
        unavailable: Missing modules.
    """

    label: str
    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    not_compared: dict[str, str] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)
    kfac: Any = None  # the KFAC operator (not saved)


def display_layer(name: str) -> str:
    """A layer's name as used in file names and result keys ("0.fc" -> "0_fc", "" -> "root")."""
    return name.replace(".", "_") or "root"


def choose_layers(sizes: dict[str, int], spec: Any = None) -> list[str]:
    """The layers whose exact block is compared, in the model's order.

    Args:
        sizes: ``{layer: number of parameters}`` of the Kronecker layers, in order.
        spec: None: the largest layer and the last one (an exact block costs Lanczos
            products on that layer, and the largest is the most expensive one worth
            seeing); ``"all"``; or names and glob patterns (:mod:`fnmatch`).

    Raises:
        HesslabError: a name or pattern that matches no Kronecker layer.
    """
    import fnmatch

    names = list(sizes)
    if not names:
        return []
    if spec is None:
        chosen = {max(names, key=lambda n: sizes[n]), names[-1]}
    elif spec == "all" or spec == ["all"]:
        chosen = set(names)
    else:
        items = [spec] if isinstance(spec, str) else list(spec)
        chosen = set()
        for item in items:
            hit = [n for n in names if n == item or fnmatch.fnmatchcase(n, item)]
            if not hit:
                raise HesslabError(f"kfac_layers: {item!r} matches none of the Kronecker layers "
                                   f"({', '.join(names[:12])}{', ...' if len(names) > 12 else ''})")
            chosen.update(hit)
    return [n for n in names if n in chosen]


def kfac_analysis(
    label: str,
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    k: int = 20,
    num_classes: int | None = None,
    seed: int = 0,
    tol: float = 1e-6,
    store: Any = None,
    stages: Stages | None = None,
    loss_type: str | None = None,
    layers: Any = "all",
    max_steps: int | None = None,
    cost_log: Any = None,
    on_layer: Callable[[KfacAnalysis], None] | None = None,
) -> KfacAnalysis:
    """Per Kronecker layer: top-k of E[M] ⊗ E[xxᵀ] and of the exact layer Hessian
    (Lanczos), their eigenspace overlap curve, the low rank of the reshaped eigenvectors
    and the dominant eigenvalues of B = E[M]. Float64 throughout.

    When ``hesslab.linops`` cannot provide ``KFAC`` and ``layer_hessian``, the analysis is
    reported as unavailable (``unavailable["kfac"]``) and nothing else is done.

    Args:
        layers: The layers whose exact block is computed (:func:`choose_layers`; default
            all, None the largest and the last); the others are listed in
            ``not_compared``.
        max_steps: At most this many Lanczos steps on each exact block (default: the
            solver's own, up to n of the layer).
        cost_log: Says what each exact block will cost before it starts.
        on_layer: Called with the analysis so far after each layer's comparison.
    """
    stages = stages or Stages(0, progress=False, verbose=False)
    out = KfacAnalysis(label)
    try:
        from hesslab.linops import KFAC, layer_hessian
    except ImportError as exc:
        out.unavailable["kfac"] = f"hesslab.linops does not provide KFAC and layer_hessian: {exc}"
        return out
    with stages.stage(f"{label}: Kronecker factors E[M] ⊗ E[xxᵀ]"), guard(out.errors, "kfac", stages):
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            out.kfac = KFAC(model, loss_fn, data, dtype=torch.float64, loss_type=loss_type)
        out.skipped = dict(getattr(out.kfac, "skipped", {}))
    if out.kfac is None:
        return out
    modules = dict(model.named_modules())
    sizes = {name: int(out.kfac.layer_slice(name).stop - out.kfac.layer_slice(name).start)
             for name in out.kfac.layer_names}
    chosen = choose_layers(sizes, layers)
    for name in out.kfac.layer_names:
        sl = out.kfac.layer_slice(name)
        kk = int(min(k, sl.stop - sl.start - 1))
        if name not in chosen:
            out.not_compared[name] = f"{sizes[name]} parameters, not chosen"
            continue
        if kk < 1:
            continue
        out.layers[name] = {"n": int(sl.stop - sl.start), "shape": list(out.kfac.layer_shape(name)), "k": kk,
                            "module": type(modules[name]).__name__}
        with stages.stage(f"{label}: layer {name}: exact block vs Kronecker factors (k = {kk})"), \
                guard(out.errors, f"{name}", stages):
            exact = layer_hessian(model, loss_fn, data, name, dtype=torch.float64, progress=False)
            steps = None if max_steps is None else int(min(max(max_steps, kk), sizes[name]))
            if cost_log is not None:
                cost_log.start(exact, f"{label}: layer {name}", {
                    "products": (steps or min(sizes[name], max(300, 40 * kk))) + kk,
                    "memory_bytes": ((steps or min(sizes[name], max(300, 40 * kk))) + 1) * sizes[name] * 8})
            _compare_layer(out, name, kk, exact, modules[name], num_classes, seed, tol,
                           stages, _saver(store, label), steps)
        if on_layer is not None:
            on_layer(out)
    return out


def _saver(store: Any, label: str) -> Callable[..., None]:
    def save(name: str, result: Any, json_copy: Any = None) -> None:
        if store is not None:
            store.save(f"{label}/kfac/{name}", result, json_copy=json_copy)

    return save


def _as_matrix_layout(vecs: torch.Tensor, module: nn.Module) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Layer vectors (m, k) in the model layout -> the layout of the weight as an (out, in, ...)
    matrix, and that shape: a transformers ``Conv1D`` stores its weight (in, out), so its
    weight entries are transposed (the singular values, hence the low rank, are the same)."""
    from hesslab.linops.kfac import is_conv1d

    shape = tuple(module.weight.shape)
    if not is_conv1d(module):
        return vecs, shape
    n_in, n_out = shape
    W = vecs[: n_in * n_out].reshape(n_in, n_out, -1).transpose(0, 1).reshape(n_in * n_out, -1)
    return torch.cat([W, vecs[n_in * n_out:]]), (n_out, n_in)


def _compare_layer(out: KfacAnalysis, name: str, kk: int, exact_op: Any, module: nn.Module,
                   num_classes: int | None, seed: int, tol: float, stages: Stages, save: Callable[..., None],
                   max_steps: int | None = None) -> None:
    """One layer: the Kronecker top-k against Lanczos on the exact block, then the overlap,
    low rank and dominant eigenvalues; results into ``out.results``, numbers into its layer."""
    from hesslab.solvers import EigenResult, lanczos

    disp, info, K = display_layer(name), out.layers[name], out.kfac
    vals_k, vecs_k = K.topk(name, kk)
    vecs_k = vecs_k.double().cpu()
    kres = EigenResult(vals_k.double().cpu(), vecs_k, torch.full((kk,), float("nan"), dtype=torch.float64),
                       torch.ones(kk, dtype=torch.bool), 0, 0, "LA")
    ex = lanczos(exact_op, k=kk, which="LA", tol=tol, seed=seed, progress=stages.inner_progress, max_steps=max_steps)
    out.results[f"{disp}/exact"] = ex
    out.results[f"{disp}/kfac"] = kres
    save(f"{disp}/exact", ex, dataclasses.replace(ex, eigenvectors=None))
    save(f"{disp}/kfac", kres, dataclasses.replace(kres, eigenvectors=None))
    lam_e = np.asarray(ex.eigenvalues, dtype=np.float64)
    lam_k = np.asarray(kres.eigenvalues, dtype=np.float64)
    info.update(lambda1_exact=float(lam_e[0]), lambda1_kfac=float(lam_k[0]),
                trace_ratio_topk=float(lam_k.sum() / lam_e.sum()) if lam_e.sum() > 0 else None)
    curve = overlap_curve(ex.eigenvectors, vecs_k, label=f"{name}: KFAC vs exact", atol=1e-3)
    out.results[f"{disp}/overlap"] = curve
    save(f"{disp}/overlap", curve)
    c = num_classes or 10
    info.update(overlap_k1=float(curve.overlaps[0]), overlap_kc=float(curve.overlaps[min(c, curve.overlaps.size) - 1]),
                overlap_kmax=float(curve.overlaps[-1]), overlap_random=float(curve.random_baseline[-1]))
    lr_e = eigenvector_low_rank(*_as_matrix_layout(torch.as_tensor(ex.eigenvectors), module))
    lr_k = eigenvector_low_rank(*_as_matrix_layout(vecs_k, module))
    out.results[f"{disp}/low_rank_exact"] = lr_e
    out.results[f"{disp}/low_rank_kfac"] = lr_k
    save(f"{disp}/low_rank_exact", lr_e)
    save(f"{disp}/low_rank_kfac", lr_k)
    info.update(top_share_v1=float(np.atleast_1d(lr_e.top_share)[0]), mean_top_share=float(np.mean(lr_e.top_share)),
                stable_rank_v1=float(np.atleast_1d(lr_e.stable_rank)[0]))
    B = K.factors[name].B
    try:
        dom = dominant_eigenvalues(B, num_classes=num_classes, max_count=min(B.shape[0] - 1, 2 * c))
    except HesslabError as exc:
        info["dominant_B_error"] = str(exc)
    else:
        out.results[f"{disp}/dominant_B"] = dom
        save(f"{disp}/dominant_B", dom)
        info.update(dominant_B=dom.count, dominant_B_matches_classes=dom.matches_classes)


def record_kfac(summary: dict, label: str, ka: KfacAnalysis) -> None:
    """A model's per-layer Kronecker results, errors and unavailable parts into the summary."""
    summary["kfac"][label] = jsonable({"layers": ka.layers, "skipped": ka.skipped, "not_compared": ka.not_compared})
    if ka.errors:
        summary["errors"][f"kfac {label}"] = ka.errors
    if ka.unavailable:
        summary["unavailable"][f"kfac {label}"] = ka.unavailable


def seed_overlaps(K1: Any, seed: int, epochs: int, layer_k: int, train: Any, data: Any, loss_fn: Any) -> dict:
    """Train a second MLP from seed + 1 and compare its Kronecker eigenspaces with K1's.

    Hidden units of two independently trained networks are not aligned (permuting them
    gives the same function), so the one factor that depends on the model and lives in an
    aligned space is the output factor E[M] of the last layer (classes; the first layer's
    input factor E[xxᵀ] is the same data for both). The whole blocks B ⊗ A are compared too.
    """
    from hesslab import zoo
    from hesslab.linops import KFAC

    m2 = zoo.digits_mlp(seed=seed + 1)
    zoo.train(m2, train, epochs=epochs, seed=seed + 1, loss_fn=loss_fn)
    K2 = KFAC(m2, loss_fn, data, dtype=torch.float64)

    def top(M: torch.Tensor, k: int) -> torch.Tensor:
        return torch.linalg.eigh(M.double()).eigenvectors.flip(1)[:, :k]

    last = K1.layer_names[-1]
    B1, B2 = K1.factors[last].B, K2.factors[last].B
    kb = min(12, B1.shape[0] - 1)
    out = {
        "output_factor": overlap_curve(top(B1, kb), top(B2, kb),
                                       label=f"layer {last}: output factor E[M] (class space, aligned)"),
    }
    for layer, curve in kfac_overlap(K1, K2, layer_k).items():
        curve.label = f"layer {layer}: whole block B ⊗ A (hidden units not aligned)"
        out[f"block_{display_layer(layer)}"] = curve
    return out
