"""The ``hesslab demo`` pipeline, and the per-model analysis ``hesslab analyze`` shares.

The demo needs no download: it trains, on scikit-learn's bundled 8×8 digits, an MLP and
a small CNN, each with and without BatchNorm (``hesslab.zoo``), keeping checkpoints along
training, and then measures what the four papers behind hesslab measure:

* Ghorbani et al. (ICML 2019): top eigenvalues (with residuals), the SLQ density, the
  trace, outliers and the gradient concentration, with and without BatchNorm, and the
  spectrum through training (``SpectrumTracker`` during training of both MLPs).
* Wu et al. ("Dissecting Hessian"): Kronecker factors E[M] ⊗ E[xxᵀ] against the exact
  layer Hessians (eigenvalues, eigenspace overlap), the rank of reshaped eigenvectors, the
  dominant eigenvalues of E[M], and the overlap between two independently trained MLPs.
* Xie et al. (2022): power-law fits of the top eigenvalues with the KS verdict.
* Singh et al. (NeurIPS 2021): measured ranks of H_L, H_O, H_F of small deep linear
  networks against the closed-form predictions.

It writes ``summary.json`` (headline numbers and a manifest of result files),
``results/<model>/<measure>.{json,npz}`` (each result dataclass's own ``save()``),
``checkpoints/``, ``report.html`` (self-contained) and ``plots/*.png``.

Modules that other parts of hesslab provide (KFAC, overlap, concentration, rank report,
tracking) are imported lazily: when one is missing or broken, its part of the demo is
reported as "not available" with the reason, and the rest runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ._results import jsonable
from .errors import HesslabError

__all__ = ["Budget", "DemoConfig", "ModelAnalysis", "KfacAnalysis", "Stages", "measure_model", "kfac_analysis",
           "rank_analysis", "run_demo", "run_analysis", "MEASURES"]

#: The measures ``hesslab analyze`` offers (and the demo runs on every model; kfac on some).
MEASURES = ("top_k", "density", "trace", "power_law", "concentration", "kfac")


# ======================================================================================
# Settings
# ======================================================================================


@dataclasses.dataclass
class Budget:
    """How much work each measure gets (products of the Hessian with vectors)."""

    lanczos_tol: float = 1e-6
    slq_steps: int = 80
    slq_probes: int = 8
    slq_reorthogonalize: str = "full"
    density_grid: int = 4000
    trace_matvecs: int = 99
    layer_k: int = 20


@dataclasses.dataclass
class DemoConfig:
    """Sizes of the demo; ``DemoConfig.make(quick)`` gives the two presets."""

    quick: bool
    epochs: int
    checkpoint_epochs: tuple[int, ...]
    hessian_samples: int
    k_top: int
    k_concentration: int
    budget: Budget
    kfac_models: tuple[str, ...]
    tracking_models: tuple[str, ...]
    tracking_k: int
    tracking_density: tuple[int, int]
    tracking_trace: int
    rank_hidden: tuple[int, ...]
    rank_samples: int
    second_seed_epochs: int

    @classmethod
    def make(cls, quick: bool) -> DemoConfig:
        if quick:
            return cls(
                quick=True, epochs=6, checkpoint_epochs=(0, 1, 2, 4, 6), hessian_samples=256, k_top=30,
                k_concentration=10,
                budget=Budget(lanczos_tol=1e-5, slq_steps=40, slq_probes=4, density_grid=2000, trace_matvecs=30,
                              layer_k=10),
                kfac_models=("mlp", "mlp_bn"), tracking_models=("mlp", "mlp_bn"), tracking_k=10,
                tracking_density=(30, 3), tracking_trace=0, rank_hidden=(1, 2, 4, 8, 12), rank_samples=48,
                second_seed_epochs=6,
            )
        return cls(
            quick=False, epochs=15, checkpoint_epochs=(0, 1, 2, 3, 5, 8, 11, 15), hessian_samples=1024, k_top=60,
            k_concentration=10, budget=Budget(),
            kfac_models=("mlp", "mlp_bn", "cnn"), tracking_models=("mlp", "mlp_bn"), tracking_k=10,
            tracking_density=(50, 6), tracking_trace=30, rank_hidden=(1, 2, 3, 4, 6, 8, 10, 12, 16), rank_samples=64,
            second_seed_epochs=15,
        )


# ======================================================================================
# Progress and logging
# ======================================================================================


class Stages:
    """A progress bar over the pipeline's stages (tqdm, quiet when stderr is not a
    terminal) and timestamped log lines on stderr.

    Args:
        total: The number of stages expected (the bar's length).
        progress: True/False forces the bar; None shows it when stderr is a terminal.
        verbose: Print a line per stage on stderr.
    """

    def __init__(self, total: int, progress: bool | None = None, verbose: bool = True, desc: str = "hesslab"):
        from tqdm.auto import tqdm

        self.t0 = time.perf_counter()
        self.verbose = verbose
        disable = (not sys.stderr.isatty()) if progress is None else (not progress)
        self.bar = tqdm(total=total, desc=desc, unit="stage", disable=disable, file=sys.stderr, leave=False,
                        dynamic_ncols=True)
        self.inner_progress = None if progress is None else bool(progress)
        self.seconds: dict[str, float] = {}

    def log(self, message: str) -> None:
        if self.verbose:
            self.bar.write(f"[{time.perf_counter() - self.t0:6.1f}s] {message}", file=sys.stderr)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(name[:60], refresh=True)
        self.log(name)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
            self.bar.update(1)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def close(self) -> None:
        self.bar.close()


def _optional(module: str, names: Sequence[str]) -> tuple[tuple[Any, ...] | None, str]:
    """Import ``names`` from ``module``; ``(None, reason)`` when it fails."""
    try:
        mod = importlib.import_module(module)
        return tuple(getattr(mod, n) for n in names), ""
    except Exception as exc:  # noqa: BLE001 - a missing or broken module makes its part "not available"
        return None, f"{module} could not be imported or lacks {', '.join(names)}: {type(exc).__name__}: {exc}"


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, HesslabError) else str(exc)


# ======================================================================================
# Per-model analysis (shared by demo and analyze)
# ======================================================================================


@dataclasses.dataclass
class ModelAnalysis:
    """What :func:`measure_model` found for one model.

    Attributes:
        label: Name of the model in files and the report.
        num_params: n.
        num_samples: N, the samples the Hessian is taken over.
        results: ``{measure: Result}``: "top_k" (EigenResult), "power_law", "concentration",
            "density" (SpectralDensity), "outliers" (from the density), "outliers_top"
            (from the top eigenvalues), "trace".
        numbers: Headline numbers (plain JSON).
        errors: ``{measure: message}`` for measures that failed.
        unavailable: ``{measure: reason}`` for measures whose module is missing.
    """

    label: str
    num_params: int
    num_samples: int
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    numbers: dict[str, Any] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def _measure(errors: dict[str, str], name: str, stages: Stages) -> Iterator[None]:
    """Record a failing measure in ``errors`` instead of stopping the run."""
    try:
        yield
    except HesslabError as exc:
        errors[name] = str(exc)
        stages.log(f"  {name} failed: {exc}")
    except Exception as exc:  # noqa: BLE001 - keep the other measures; the traceback goes to stderr
        errors[name] = _error_text(exc)
        stages.log(f"  {name} failed:\n{traceback.format_exc()}")



def _record(summary: dict, label: str, a: "ModelAnalysis") -> None:
    """A model's headline numbers, errors and unavailable sections into the summary."""
    summary["models"][label] = jsonable(a.numbers)
    if a.errors:
        summary["errors"][label] = a.errors
    if a.unavailable:
        summary["unavailable"][label] = a.unavailable


def _record_kfac(summary: dict, label: str, ka: "KfacAnalysis") -> None:
    """A model's per-layer Kronecker results, errors and unavailable parts into the summary."""
    summary["kfac"][label] = jsonable({"layers": ka.layers, "skipped": ka.skipped})
    if ka.errors:
        summary["errors"][f"kfac {label}"] = ka.errors
    if ka.unavailable:
        summary["unavailable"][f"kfac {label}"] = ka.unavailable


def measure_model(
    label: str,
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    measures: Sequence[str],
    *,
    k: int = 10,
    k_top: int | None = None,
    seed: int = 0,
    budget: Budget | None = None,
    store: Any = None,
    stages: Stages | None = None,
    hessian_options: dict[str, Any] | None = None,
) -> ModelAnalysis:
    """Top eigenvalues, density, trace, power law, concentration and outliers of one model.

    Args:
        label: Name used for files (``results/<label>/...``) and the report.
        model, loss_fn, data: As for :class:`hesslab.Hessian`.
        measures: Any of ``"top_k"``, ``"density"``, ``"trace"``, ``"power_law"``,
            ``"concentration"`` (``"kfac"`` is :func:`kfac_analysis`).
        k: Eigenvectors for the gradient concentration (and eigenvalues when k_top is None).
        k_top: Top eigenvalues computed by Lanczos (the power law is fitted to them).
        seed: Seed of every random vector.
        budget: Steps, probes and products per measure.
        store: A :class:`hesslab.report.ResultStore` to save every result to.
        stages: Progress and logging.
        hessian_options: Keyword arguments for :class:`hesslab.Hessian`.
    """
    from .analysis import power_law_fit
    from .linops import Hessian
    from .solvers import lanczos, spectral_density, trace

    budget = budget or Budget()
    stages = stages or Stages(0, progress=False, verbose=False)
    H = Hessian(model, loss_fn, data, progress=False, **(hessian_options or {}))
    n = H.shape[0]
    out = ModelAnalysis(label, int(n), int(H.num_data))
    out.numbers.update(num_params=int(n), num_samples=int(H.num_data))
    conc_mod, conc_reason = _optional("hesslab.analysis.concentration", ("gradient_concentration", "outliers"))

    def save(name: str, result: Any, json_copy: Any = None) -> None:
        if store is not None:
            store.save(f"{label}/{name}", result, json_copy=json_copy)

    with _measure(out.errors, "loss", stages):
        out.numbers["loss"] = H.loss()

    top = None
    if any(m in measures for m in ("top_k", "power_law", "concentration")):
        kt = int(min(max(k_top or k, k), n - 1))
        with stages.stage(f"{label}: top {kt} eigenvalues (Lanczos, residuals)"), _measure(out.errors, "top_k", stages):
            top = lanczos(H, k=kt, which="LA", tol=budget.lanczos_tol, seed=seed, progress=stages.inner_progress)
            lam = np.asarray(top.eigenvalues, dtype=np.float64)
            rel = np.asarray(top.residuals, dtype=np.float64) / np.maximum(np.abs(lam), 1e-300)
            out.results["top_k"] = top
            out.numbers.update(lambda_1=float(lam[0]), lambda_k=float(lam[-1]), k_top=kt,
                               max_relative_residual=float(np.nanmax(rel)), lanczos_matvecs=int(top.num_matvecs),
                               num_converged=int(top.num_converged))
            save("top_k", top, dataclasses.replace(top, eigenvectors=None))
    if "power_law" in measures and top is not None:
        with _measure(out.errors, "power_law", stages):
            fit = power_law_fit(top.eigenvalues)
            out.results["power_law"] = fit
            out.numbers.update(power_law_s=fit.s, power_law_s_std_error=fit.s_std_error, power_law_k=fit.k,
                               ks_distance=fit.ks_distance, ks_critical=fit.ks_critical,
                               is_power_law=fit.is_power_law, s_lstsq=fit.s_lstsq, r2_lstsq=fit.r2)
            save("power_law", fit)
    if top is not None and conc_mod is not None:
        with _measure(out.errors, "outliers_top", stages):
            lam = np.asarray(top.eigenvalues)
            if int((lam > 0).sum()) >= 12:
                o = conc_mod[1](top)
                out.results["outliers_top"] = o
                out.numbers.update(outliers_top_k=o.count, bulk_edge=o.bulk_edge)
                save("outliers_top", o)
    if "concentration" in measures and top is not None:
        if conc_mod is None:
            out.unavailable["concentration"] = conc_reason
        else:
            kc = min(k, top.eigenvectors.shape[1])
            with stages.stage(f"{label}: gradient concentration (k = {kc})"), _measure(out.errors, "concentration", stages):
                c = conc_mod[0](H, k=kc, eigenvectors=top)
                out.results["concentration"] = c
                out.numbers.update(concentration=c.concentration, concentration_k=c.k, gradient_norm=c.gradient_norm)
                save("concentration", c)
    if "density" in measures:
        steps = int(min(budget.slq_steps, n))
        with stages.stage(f"{label}: SLQ density ({budget.slq_probes} probes × {steps} steps)"), \
                _measure(out.errors, "density", stages):
            d = spectral_density(H, num_steps=steps, num_probes=budget.slq_probes, seed=seed,
                                 grid_size=budget.density_grid, reorthogonalize=budget.slq_reorthogonalize,
                                 progress=stages.inner_progress)
            out.results["density"] = d
            valid = d.valid()
            nodes = np.asarray(d.nodes)
            out.numbers.update(density_min=float(np.mean([x[v].min() for x, v in zip(nodes, valid)])),
                               density_max=float(np.mean([x[v].max() for x, v in zip(nodes, valid)])),
                               negative_mass_strict=d.negative_mass(tol=0), slq_matvecs=int(d.num_matvecs))
            save("density", d)
        if "density" in out.results:
            if conc_mod is None:
                out.unavailable["outliers"] = conc_reason
            else:
                with _measure(out.errors, "outliers", stages):
                    o = conc_mod[1](out.results["density"])
                    out.results["outliers"] = o
                    out.numbers.update(outliers=o.count, outlier_positions=[float(p) for p in o.positions],
                                       negative_mass=o.negative_mass)
                    save("outliers", o)
    if "trace" in measures:
        with stages.stage(f"{label}: trace (Hutch++, {budget.trace_matvecs} products)"), _measure(out.errors, "trace", stages):
            t = trace(H, num_matvecs=max(3, min(budget.trace_matvecs, 3 * n)), method="hutch++", seed=seed,
                      progress=stages.inner_progress)
            out.results["trace"] = t
            out.numbers.update(trace=t.value, trace_std_error=t.std_error)
            save("trace", t)
    out.numbers["hessian_matvecs"] = int(H.num_matvecs)
    return out


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
        errors: Failures, by step.
        unavailable: Missing modules.
    """

    label: str
    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)
    kfac: Any = None  # the KFAC operator (not saved)


def _display_layer(name: str) -> str:
    return name.replace(".", "_") or "root"


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
) -> KfacAnalysis:
    """Per Kronecker layer: top-k of E[M] ⊗ E[xxᵀ] and of the exact layer Hessian
    (Lanczos), their eigenspace overlap curve, the low rank of the reshaped eigenvectors
    and the dominant eigenvalues of B = E[M]. Float64 throughout."""
    from .solvers import EigenResult, lanczos

    stages = stages or Stages(0, progress=False, verbose=False)
    out = KfacAnalysis(label)
    mods, reason = _optional("hesslab.linops._kfac", ("KFAC", "layer_hessian"))
    if mods is None:
        out.unavailable["kfac"] = reason
        return out
    ov, ov_reason = _optional("hesslab.analysis.overlap",
                              ("overlap_curve", "eigenvector_low_rank", "dominant_eigenvalues"))
    if ov is None:
        out.unavailable["overlap"] = ov_reason
    KFAC, layer_hessian = mods

    def save(name: str, result: Any, json_copy: Any = None) -> None:
        if store is not None:
            store.save(f"{label}/kfac/{name}", result, json_copy=json_copy)

    import warnings

    with stages.stage(f"{label}: Kronecker factors E[M] ⊗ E[xxᵀ]"), _measure(out.errors, "kfac", stages):
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            K = KFAC(model, loss_fn, data, dtype=torch.float64, loss_type=loss_type)
        out.kfac = K
        out.skipped = dict(getattr(K, "skipped", {}))
    K = out.kfac
    if K is None:
        return out
    modules = dict(model.named_modules())
    for name in K.layer_names:
        disp = _display_layer(name)
        sl = K.layer_slice(name)
        n_l = sl.stop - sl.start
        kk = int(min(k, n_l - 1))
        if kk < 1:
            continue
        weight_shape = tuple(modules[name].weight.shape)
        info: dict[str, Any] = {"n": int(n_l), "shape": list(K.layer_shape(name)), "k": kk,
                                "module": type(modules[name]).__name__}
        out.layers[name] = info
        with stages.stage(f"{label}: layer {name}: exact block vs Kronecker factors (k = {kk})"), \
                _measure(out.errors, f"{name}", stages):
            vals_k, vecs_k = K.topk(name, kk)
            kres = EigenResult(vals_k.double().cpu(), vecs_k.double().cpu(),
                               torch.full((kk,), float("nan"), dtype=torch.float64), torch.ones(kk, dtype=torch.bool),
                               0, 0, "LA")
            Hl = layer_hessian(model, loss_fn, data, name, dtype=torch.float64, progress=False)
            ex = lanczos(Hl, k=kk, which="LA", tol=tol, seed=seed, progress=stages.inner_progress)
            out.results[f"{disp}/exact"] = ex
            out.results[f"{disp}/kfac"] = kres
            save(f"{disp}/exact", ex, dataclasses.replace(ex, eigenvectors=None))
            save(f"{disp}/kfac", kres, dataclasses.replace(kres, eigenvectors=None))
            lam_e = np.asarray(ex.eigenvalues, dtype=np.float64)
            lam_k = np.asarray(kres.eigenvalues, dtype=np.float64)
            info.update(lambda1_exact=float(lam_e[0]), lambda1_kfac=float(lam_k[0]),
                        trace_ratio_topk=float(lam_k.sum() / lam_e.sum()) if lam_e.sum() > 0 else None)
            if ov is not None:
                overlap_curve, eigenvector_low_rank, dominant_eigenvalues = ov
                curve = overlap_curve(ex.eigenvectors, vecs_k.double().cpu(), label=f"{name}: KFAC vs exact",
                                      atol=1e-3)
                out.results[f"{disp}/overlap"] = curve
                save(f"{disp}/overlap", curve)
                c = num_classes or 10
                info.update(overlap_k1=float(curve.overlaps[0]),
                            overlap_kc=float(curve.overlaps[min(c, curve.overlaps.size) - 1]),
                            overlap_kmax=float(curve.overlaps[-1]), overlap_random=float(curve.random_baseline[-1]))
                lr_e = eigenvector_low_rank(ex.eigenvectors, weight_shape)
                lr_k = eigenvector_low_rank(vecs_k.double().cpu(), weight_shape)
                out.results[f"{disp}/low_rank_exact"] = lr_e
                out.results[f"{disp}/low_rank_kfac"] = lr_k
                save(f"{disp}/low_rank_exact", lr_e)
                save(f"{disp}/low_rank_kfac", lr_k)
                info.update(top_share_v1=float(np.atleast_1d(lr_e.top_share)[0]),
                            mean_top_share=float(np.mean(lr_e.top_share)),
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
    return out


# ======================================================================================
# Singh et al.: ranks of small deep linear networks
# ======================================================================================


def _linear_net(widths: Sequence[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:])]
    return nn.Sequential(*layers).double()


def _pooled_digits(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N digits images average-pooled to 4×4: inputs (N, 16) float64, labels (N,)."""
    from . import zoo

    (X, y), _ = zoo.digits(image=True, seed=seed, dtype=torch.float64)
    X = torch.nn.functional.avg_pool2d(X[:num_samples], 2).reshape(num_samples, -1)
    return X - X.mean(0), y[:num_samples]


def rank_analysis(hidden: Sequence[int], num_samples: int, seed: int = 0, store: Any = None,
                  stages: Stages | None = None) -> dict[str, Any]:
    """Measured ranks of H_L, H_O, H_F against Singh et al.'s formulas on small deep
    linear networks (no bias) fed with N pooled digits images (d = 16, K = 10).

    Returns:
        ``{"sweep": [rows over the hidden width, cross-entropy], "reports": {name:
        RankReport}, "unavailable": reason or ""}``.
    """
    stages = stages or Stages(0, progress=False, verbose=False)
    mods, reason = _optional("hesslab.analysis.rank_report", ("rank_report",))
    result: dict[str, Any] = {"sweep": [], "reports": {}, "unavailable": reason, "errors": {}}
    if mods is None:
        return result
    (rank_report,) = mods
    X, y = _pooled_digits(num_samples, seed)
    onehot = torch.nn.functional.one_hot(y, 10).double()
    ce, mse = nn.CrossEntropyLoss(), nn.MSELoss()
    with stages.stage(f"deep linear networks: ranks over the hidden width {list(hidden)}"):
        for m in hidden:
            widths = [X.shape[1], int(m), 10]
            with _measure(result["errors"], f"sweep M1={m}", stages):
                rep = rank_report(_linear_net(widths, seed + m), ce, (X, y))
                result["sweep"].append({"hidden": int(m), "widths": widths, "num_params": rep.num_params,
                                        "num_samples": rep.num_samples,
                                        "ranks": dict(rep.ranks), "predicted": dict(rep.predicted),
                                        "input_rank": rep.input_rank})
                if store is not None:
                    store.save(f"rank/linear_{'-'.join(map(str, widths))}_cross_entropy", rep)
    with stages.stage("deep linear networks: three layers, cross-entropy and MSE"):
        for name, widths, loss, targets in [
            ("linear_16-8-6-10_cross_entropy", [X.shape[1], 8, 6, 10], ce, y),
            ("linear_16-6-10_mse", [X.shape[1], 6, 10], mse, onehot),
        ]:
            with _measure(result["errors"], name, stages):
                rep = rank_report(_linear_net(widths, seed + 100), loss, (X, targets))
                result["reports"][name] = rep
                if store is not None:
                    store.save(f"rank/{name}", rep)
    return result


# ======================================================================================
# The demo
# ======================================================================================


def _summary_rows(models: dict[str, ModelAnalysis], training: dict[str, dict[str, Any]]) -> tuple[list[str], list]:
    headers = ["model", "params", "test acc", "λ₁", "max rel. residual", "trace", "± s.e.", "outliers",
               "grad. conc.", "power-law ŝ", "d_ks / d_c", "power law?"]
    rows = []
    for label, a in models.items():
        nb = a.numbers
        ks = nb.get("ks_distance")
        rows.append([
            label, a.num_params, training.get(label, {}).get("test_accuracy"), nb.get("lambda_1"),
            nb.get("max_relative_residual"), nb.get("trace"), nb.get("trace_std_error"),
            nb.get("outliers_top_k", nb.get("outliers")), nb.get("concentration"), nb.get("power_law_s"),
            None if ks is None else f"{ks:.3f} / {nb.get('ks_critical'):.3f}", nb.get("is_power_law"),
        ])
    if not training:  # analyze: no accuracy to show
        headers = headers[:2] + headers[3:]
        rows = [r[:2] + r[3:] for r in rows]
    return headers, rows


def run_demo(
    out: str | Path = "hesslab-demo",
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool | None = None,
    verbose: bool = True,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Run the whole demo and write its folder; returns the summary (also ``summary.json``).

    Args:
        out: The output folder (created; files in it are overwritten).
        quick: The small preset (about a fifth of the work).
        seed: Seed of the data split, the models' initialisation, training and every
            random vector.
        progress: Progress bars (None: when stderr is a terminal).
        verbose: Log lines on stderr.
        threads: torch intra-op threads during the run (restored after). One is the
            fastest for these tiny models (on a 2-core machine two threads were 3–8×
            slower, mostly synchronisation); None keeps torch's setting.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run_demo(Path(out), quick, seed, progress, verbose)
    finally:
        torch.set_num_threads(before)


def _run_demo(out: Path, quick: bool, seed: int, progress: bool | None, verbose: bool) -> dict[str, Any]:
    from . import zoo
    from ._version import __version__
    from .report import ResultStore

    cfg = DemoConfig.make(quick)
    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out)
    torch.manual_seed(seed)
    labels = ["mlp", "mlp_bn", "cnn", "cnn_bn"]
    num_stages = (4 + 1 + 4 * 5 + len(cfg.kfac_models) * 5 + 3 + 2 + 2)
    stages = Stages(num_stages, progress=progress, verbose=verbose, desc="hesslab demo")
    loss_fn = nn.CrossEntropyLoss()
    (Xtr, ytr), (Xte, yte) = zoo.digits(image=False, seed=seed)
    (Itr, _), (Ite, _) = zoo.digits(image=True, seed=seed)
    n_h = min(cfg.hessian_samples, len(ytr))
    hess_data = {"mlp": (Xtr[:n_h], ytr[:n_h]), "cnn": (Itr[:n_h], ytr[:n_h])}
    summary: dict[str, Any] = {
        "command": "demo", "quick": quick, "seed": seed, "hesslab": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "data": {"name": "scikit-learn digits (8×8, 10 classes)", "train": int(len(ytr)), "test": int(len(yte)),
                 "hessian_samples": int(n_h)},
        "config": jsonable(dataclasses.asdict(cfg)), "training": {}, "models": {}, "kfac": {}, "tracking": {},
        "rank": {}, "unavailable": {}, "errors": {}, "files": {},
    }
    stages.log(f"hesslab demo ({'quick' if quick else 'full'}), seed {seed}, {torch.get_num_threads()} threads, "
               f"writing to {out}")

    # ---------------------------------------------------------------- training
    track_cls, track_reason = _optional("hesslab.tracking", ("SpectrumTracker",))
    if track_cls is None:
        summary["unavailable"]["tracking"] = track_reason
    models: dict[str, nn.Module] = {}
    trackers: dict[str, Any] = {}
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    for label in labels:
        kind, bn = label.split("_")[0], label.endswith("_bn")
        model = zoo.digits_mlp(batchnorm=bn, seed=seed) if kind == "mlp" else zoo.digits_cnn(batchnorm=bn, seed=seed)
        train = (Xtr, ytr) if kind == "mlp" else (Itr, ytr)
        test = (Xte, yte) if kind == "mlp" else (Ite, yte)
        tracker = None
        if track_cls is not None and label in cfg.tracking_models:
            try:
                ds, dp = cfg.tracking_density
                measures = ("top_k", "density", "power_law", "concentration") + (("trace",) if cfg.tracking_trace else ())
                tracker = track_cls[0](
                    model, loss_fn, hess_data[kind], every=1, measures=measures, path=out / "tracking" / f"{label}.jsonl",
                    k=cfg.tracking_k, overwrite=True, seed=seed,
                    lanczos_options={"tol": 1e-5}, density_options={"num_steps": ds, "num_probes": dp},
                    trace_options={"num_matvecs": max(cfg.tracking_trace, 3)}, on_error="warn",
                )
                trackers[label] = tracker
            except Exception as exc:  # noqa: BLE001
                summary["unavailable"][f"tracking {label}"] = _error_text(exc)
                tracker = None
        checkpoints: list[str] = []
        what = f" + spectrum at epochs {list(cfg.checkpoint_epochs)}" if tracker is not None else ""
        with stages.stage(f"train {label} ({sum(p.numel() for p in model.parameters())} parameters, "
                          f"{cfg.epochs} epochs){what}"):
            def keep(epoch: int, m: nn.Module, label: str = label, tracker: Any = tracker) -> None:
                if epoch in cfg.checkpoint_epochs:
                    path = ckpt_dir / f"{label}_epoch{epoch:03d}.pt"
                    torch.save(m.state_dict(), path)
                    checkpoints.append(str(path.relative_to(out)))
                    if tracker is not None:
                        with warnings_as_log(stages, f"tracking {label}"):
                            tracker.measure(epoch)

            keep(0, model)
            losses = zoo.train(model, train, epochs=cfg.epochs, seed=seed, loss_fn=loss_fn,
                               on_epoch=lambda e, m: keep(e + 1, m))
        models[label] = model
        summary["training"][label] = {
            "num_params": int(sum(p.numel() for p in model.parameters())), "epochs": cfg.epochs,
            "train_loss": [float(x) for x in losses], "train_accuracy": zoo.accuracy(model, train),
            "test_accuracy": zoo.accuracy(model, test), "checkpoint_epochs": list(cfg.checkpoint_epochs),
            "checkpoints": checkpoints, "batchnorm": bn,
        }

    # ------------------------------------------------------- spectra of each model
    analyses: dict[str, ModelAnalysis] = {}
    for label in labels:
        kind = label.split("_")[0]
        a = measure_model(label, models[label], loss_fn, hess_data[kind], MEASURES[:5], k=cfg.k_concentration,
                          k_top=cfg.k_top, seed=seed, budget=cfg.budget, store=store, stages=stages)
        analyses[label] = a
        _record(summary, label, a)

    # -------------------------------------------------------- Kronecker factors
    kfacs: dict[str, KfacAnalysis] = {}
    for label in cfg.kfac_models:
        kind = label.split("_")[0]
        ka = kfac_analysis(label, models[label], loss_fn, hess_data[kind], k=cfg.budget.layer_k, num_classes=10,
                           seed=seed, store=store, stages=stages)
        kfacs[label] = ka
        _record_kfac(summary, label, ka)
    seeds_overlap: dict[str, Any] = {}
    ov, ov_reason = _optional("hesslab.analysis.overlap", ("kfac_overlap", "overlap_curve"))
    seed_errors: dict[str, str] = {}
    if "mlp" in kfacs and kfacs["mlp"].kfac is not None and ov is not None:
        with stages.stage(f"second MLP (seed {seed + 1}): overlap of Kronecker eigenspaces across seeds"), \
                _measure(seed_errors, "kfac seeds", stages):
            seeds_overlap = _seed_overlaps(kfacs["mlp"].kfac, ov, seed, cfg, (Xtr, ytr), hess_data["mlp"], loss_fn)
            for key, curve in seeds_overlap.items():
                store.save(f"mlp/kfac/seeds_{key}", curve)
            summary["kfac"]["seeds"] = {
                curve.label: {"k": int(curve.ks[len(curve.ks) // 2 - 1]),
                              "overlap": float(curve.overlaps[len(curve.ks) // 2 - 1]),
                              "random": float(curve.random_baseline[len(curve.ks) // 2 - 1]),
                              "overlap_k1": float(curve.overlaps[0]), "overlap_kmax": float(curve.overlaps[-1])}
                for curve in seeds_overlap.values()}
        summary["errors"].update(seed_errors)
    elif ov is None:
        summary["unavailable"]["kfac seeds"] = ov_reason

    # --------------------------------------------------------------- ranks
    rank = rank_analysis(cfg.rank_hidden, cfg.rank_samples, seed=seed, store=store, stages=stages)
    if rank["unavailable"]:
        summary["unavailable"]["rank"] = rank["unavailable"]
    if rank["errors"]:
        summary["errors"]["rank"] = rank["errors"]
    summary["rank"] = jsonable({
        "sweep": rank["sweep"],
        "reports": {k: {"ranks": r.ranks, "predicted": r.predicted, "num_params": r.num_params,
                        "matches": r.matches, "widths": r.widths, "loss": r.loss}
                    for k, r in rank["reports"].items()},
        "sweep_all_match": all(r["ranks"][p] == r["predicted"][p] for r in rank["sweep"] for p in r["ranks"])
        if rank["sweep"] else None,
    })

    # ------------------------------------------------------------- tracking
    histories: dict[str, Any] = {}
    for label, tracker in trackers.items():
        try:
            h = tracker.history()
            histories[label] = h
            store.save(f"{label}/tracking", h)
            steps, counts = h.outlier_counts()
            c_steps, conc = h.concentration()
            summary["tracking"][label] = jsonable({
                "epochs": h.steps, "outliers": dict(zip(steps.tolist(), counts.tolist())),
                "concentration": dict(zip(c_steps.tolist(), conc.tolist())),
                "lambda_1": dict(zip(h.top_eigenvalues()[0].tolist(), h.top_eigenvalues()[1][:, 0].tolist()))
                if len(h.top_eigenvalues()[0]) else {},
            })
        except Exception as exc:  # noqa: BLE001
            summary["errors"][f"tracking {label}"] = _error_text(exc)

    # ---------------------------------------------------------------- report
    summary["results"] = store.entries
    summary["files"] = {"checkpoints": sorted(str(p.relative_to(out)) for p in ckpt_dir.glob("*.pt"))}
    headers, rows = _summary_rows(analyses, summary["training"])
    summary["table"] = {"headers": headers, "rows": jsonable(rows)}
    with stages.stage("report: plots and HTML"):
        from .report._sections import build_demo_report

        rep = build_demo_report(summary, analyses, kfacs, seeds_overlap, rank, histories, stages)
        rep.write(out / "report.html", plots_dir=out / "plots")
    summary["files"].update(report="report.html", plots=sorted(f"plots/{n}.png" for n in rep.figure_names))
    summary["seconds"] = {"total": stages.elapsed, "stages": stages.seconds}
    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=1, allow_nan=False))
    stages.close()
    return summary


def _seed_overlaps(K1: Any, ov: Any, seed: int, cfg: DemoConfig, train: Any, data: Any, loss_fn: Any) -> dict:
    """Train a second MLP from seed + 1 and compare its Kronecker eigenspaces with K1's.

    Hidden units of two independently trained networks are not aligned (permuting them
    gives the same function), so the one factor that depends on the model and lives in an
    aligned space is the output factor E[M] of the last layer (classes; the first layer's
    input factor E[xxᵀ] is the same data for both). The whole blocks B ⊗ A are compared too.
    """
    from . import zoo

    kfac_overlap, overlap_curve = ov
    (KFAC,), _ = _optional("hesslab.linops._kfac", ("KFAC",))
    m2 = zoo.digits_mlp(seed=seed + 1)
    zoo.train(m2, train, epochs=cfg.second_seed_epochs, seed=seed + 1, loss_fn=loss_fn)
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
    for layer, curve in kfac_overlap(K1, K2, cfg.budget.layer_k).items():
        curve.label = f"layer {layer}: whole block B ⊗ A (hidden units not aligned)"
        out[f"block_{_display_layer(layer)}"] = curve
    return out


@contextlib.contextmanager
def warnings_as_log(stages: Stages, what: str) -> Iterator[None]:
    """Route warnings raised inside to the log (the tracker warns on a failed measure)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        msg = str(w.message)
        if "SpectrumTracker" in msg or issubclass(w.category, UserWarning):
            stages.log(f"  {what}: {msg.splitlines()[0][:300]}")


# ======================================================================================
# hesslab analyze
# ======================================================================================


def run_analysis(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    measures: Sequence[str] = MEASURES,
    out: str | Path = "hesslab-analysis",
    k: int = 10,
    seed: int = 0,
    label: str = "model",
    loss_name: str | None = None,
    source: dict[str, Any] | None = None,
    progress: bool | None = None,
    verbose: bool = True,
    budget: Budget | None = None,
) -> dict[str, Any]:
    """The demo's analyses on one given model; writes results, ``report.html`` and
    ``summary.json`` to ``out`` and returns the summary."""
    from ._version import __version__
    from .report import ResultStore

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(out)
    budget = budget or Budget(layer_k=k)
    torch.manual_seed(seed)
    num_stages = len([m for m in measures if m != "power_law"]) + (6 if "kfac" in measures else 0) + 1
    stages = Stages(num_stages, progress=progress, verbose=verbose, desc="hesslab analyze")
    summary: dict[str, Any] = {
        "command": "analyze", "seed": seed, "hesslab": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(), "source": source or {}, "measures": list(measures), "k": k,
        "models": {}, "kfac": {}, "unavailable": {}, "errors": {},
    }
    analyses: dict[str, ModelAnalysis] = {}
    a = measure_model(label, model, loss_fn, data, [m for m in measures if m != "kfac"], k=k, seed=seed,
                      budget=budget, store=store, stages=stages)
    analyses[label] = a
    _record(summary, label, a)
    kfacs: dict[str, KfacAnalysis] = {}
    if "kfac" in measures:
        loss_type = loss_name if loss_name in ("cross_entropy", "mse") else None
        ka = kfac_analysis(label, model, loss_fn, data, k=budget.layer_k, seed=seed, store=store, stages=stages,
                           loss_type=loss_type if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.MSELoss)) else None)
        kfacs[label] = ka
        _record_kfac(summary, label, ka)
    summary["results"] = store.entries
    headers, rows = _summary_rows(analyses, {})
    summary["table"] = {"headers": headers, "rows": jsonable(rows)}
    with stages.stage("report: plots and HTML"):
        from .report._sections import build_analysis_report

        rep = build_analysis_report(summary, analyses, kfacs, stages)
        rep.write(out / "report.html", plots_dir=out / "plots")
    summary["files"] = {"report": "report.html", "plots": sorted(f"plots/{n}.png" for n in rep.figure_names)}
    summary["seconds"] = {"total": stages.elapsed, "stages": stages.seconds}
    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=1, allow_nan=False))
    stages.close()
    return summary
