"""The report sections of the four papers behind the demo, built from its results.

Each builder takes what :mod:`hesslab.demo` computed (``ModelAnalysis``/``KfacAnalysis``
objects, read by attribute, and the summary dict) and adds one section to a generic
:class:`hesslab.report.Report`: figures with a sentence on what each shows and the
numbers beside it. A part that could not run is stated explicitly ("not available", with
the reason).

    ghorbani_section   density, outliers, gradient concentration, spectrum through training
    wu_section         layer Hessians against Kronecker factors, overlap across seeds
    xie_section        power-law fits of the top eigenvalues
    singh_section      ranks of deep linear networks against the formulas
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from hesslab.analysis.powerlaw import LAMBDA1_FACTOR, MIN_K_TO_DECIDE
from hesslab.report import Report, Section, plots

from ._text import CITE_GHORBANI, CITE_SINGH, CITE_WU, CITE_XIE, curve_indices, fmt, missing, pretty, safe

__all__ = ["ghorbani_section", "wu_section", "xie_section", "singh_section"]


# ======================================================================================
# Ghorbani et al.
# ======================================================================================


def ghorbani_section(rep: Report, analyses: Mapping[str, Any], histories: Mapping[str, Any] | None,
                     summary: Mapping[str, Any], log: Any = None, demo: bool = True) -> None:
    sec = rep.section(
        "Eigenvalue density, outliers and gradient concentration",
        cite=CITE_GHORBANI,
        intro=("Ghorbani et al. estimate the full eigenvalue density of the Hessian by stochastic Lanczos "
               "quadrature and find that, without BatchNorm, a few large isolated eigenvalues (outliers, about "
               "one per class) separate from the bulk early in training and the gradient concentrates in their "
               "eigenspace; with BatchNorm both effects almost vanish."
               + ("" if demo else " Below: the same measurements on this model, as far as they were asked for.")),
    )
    dens = {k: a.results["density"] for k, a in analyses.items() if "density" in a.results}
    _density_figure(sec, analyses, dens, demo, log)
    _outlier_figure(sec, analyses, dens, log)
    _concentration_figure(sec, analyses, log)
    _batchnorm_comparison(sec, analyses, demo)
    _tracking_figures(sec, histories, summary, demo, log)


def _density_figure(sec: Section, analyses: Mapping[str, Any], dens: Mapping[str, Any], demo: bool,
                    log: Any) -> None:
    """The SLQ densities, with and without BatchNorm side by side in the demo."""
    if dens:
        groups: dict[str, list] = {}
        for label, d in dens.items():
            base = label.split("_")[0] if demo else label
            groups.setdefault(pretty(base) + (": with and without BatchNorm" if demo else ""), []).append(
                (pretty(label), d))

        def fig() -> None:
            nums = []
            for label in dens:
                nb = analyses[label].numbers
                nums.append((f"{pretty(label)}: range of nodes", f"[{fmt(nb.get('density_min'))}, "
                                                                  f"{fmt(nb.get('density_max'))}]"))
                if nb.get("negative_mass") is not None:
                    nums.append((f"{pretty(label)}: mass below 0", fmt(nb.get("negative_mass"))))
            d0 = next(iter(dens.values()))
            sec.figure(
                "density", plots.density_panels(groups),
                caption=(f"Hessian eigenvalue density by SLQ ({d0.nodes.shape[0]} probes × {d0.nodes.shape[1]} "
                         "Lanczos steps, Gaussian kernel of Ghorbani et al.) on a log y-axis: the bulk sits at "
                         "zero; isolated bumps far to the right are outliers. The mass below zero is the share "
                         "of negative eigenvalues (nodes below −σ of the kernel)."),
                numbers=nums,
            )
        safe(sec, "density plot", fig, log)
    missing(sec, analyses, "density", "density")


def _outlier_figure(sec: Section, analyses: Mapping[str, Any], dens: Mapping[str, Any], log: Any) -> None:
    """The top eigenvalues with the outliers hesslab.outliers finds among them."""
    outl = {k: a.results["outliers_top"] for k, a in analyses.items() if "outliers_top" in a.results}
    if outl:
        def fig_o() -> None:
            ncols = min(len(outl), 4)
            fig = plots.outlier_panels({pretty(k): v for k, v in list(outl.items())[:ncols]})
            nums = []
            for k, o in outl.items():
                nums.append((f"{pretty(k)}: outliers", o.count))
                if o.count:
                    nums.append((f"{pretty(k)}: bulk edge λ_(c+1)", fmt(o.bulk_edge)))
                if k in dens and "outliers" in analyses[k].results:
                    nums.append((f"{pretty(k)}: outliers in the density", analyses[k].results["outliers"].count))
            sec.figure(
                "outliers", fig,
                caption=("Top eigenvalues (Lanczos) in descending order on a log scale; red points are the "
                         "outliers found by hesslab.outliers (a log-gap at least 0.6 times the spread of the next "
                         "10 values), the dashed line is the top of the bulk."),
                numbers=nums,
            )
        safe(sec, "outlier plot", fig_o, log)


def _concentration_figure(sec: Section, analyses: Mapping[str, Any], log: Any) -> None:
    """The share of the gradient in the top-j eigenspaces, j = 1..k."""
    conc = {k: a.results["concentration"] for k, a in analyses.items() if "concentration" in a.results}
    if conc:
        def fig_c() -> None:
            sec.figure(
                "concentration", plots.concentration_curves({pretty(k): v for k, v in conc.items()},
                                                            "Gradient concentration in the top Hessian eigenspace"),
                caption=("Share of the squared norm of the full-data gradient g lying in the span of the top-j "
                         "Hessian eigenvectors, for j = 1..k; a random j-dimensional subspace would hold j/n "
                         "(dotted, near zero)."),
                numbers=[(f"{pretty(k)}: ‖V_kᵀg‖²/‖g‖² (k = {v.k})", fmt(v.concentration)) for k, v in conc.items()]
                + [(f"{pretty(k)}: ‖g‖", fmt(v.gradient_norm)) for k, v in conc.items()],
            )
        safe(sec, "concentration plot", fig_c, log)
    missing(sec, analyses, "concentration", "gradient concentration")


def _batchnorm_comparison(sec: Section, analyses: Mapping[str, Any], demo: bool) -> None:
    """The headline numbers side by side, and in the demo a sentence per network."""
    rows = []
    for k, a in analyses.items():
        nb = a.numbers
        rows.append([pretty(k), nb.get("lambda_1"), nb.get("outliers_top_k"), nb.get("outliers"),
                     nb.get("concentration"), nb.get("negative_mass"), nb.get("trace"), nb.get("trace_std_error")])
    sec.table(["model", "λ₁", "outliers (top-k)", "outliers (density)", "gradient concentration",
               "mass below 0", "trace (Hutch++)", "± s.e."], rows,
              caption=("With and without BatchNorm, side by side." if demo else
                       "Measured on this model (n/a: not asked for, or not measured; see the summary)."))
    if demo:
        for base in ("mlp", "cnn"):
            a, b = analyses.get(base), analyses.get(f"{base}_bn")
            if a is None or b is None:
                continue
            na, nb = a.numbers, b.numbers
            sec.text(
                f"Measured here, {pretty(base)} without / with BatchNorm: λ₁ = {fmt(na.get('lambda_1'))} / "
                f"{fmt(nb.get('lambda_1'))}, trace = {fmt(na.get('trace'))} / {fmt(nb.get('trace'))}, gradient "
                f"concentration in the top-10 eigenspace = {fmt(na.get('concentration'))} / "
                f"{fmt(nb.get('concentration'))}, outliers = {fmt(na.get('outliers_top_k'))} / "
                f"{fmt(nb.get('outliers_top_k'))}.")
        if "mlp" in analyses and "mlp_bn" in analyses:
            sec.text("Ghorbani et al. report larger outliers and a stronger gradient concentration without "
                     "BatchNorm (on CIFAR-10 and ImageNet ResNets); these small networks on an easy data set need not "
                     "show the same, and the numbers above are what was measured here.")
    missing(sec, analyses, "trace", "trace")


def _tracking_figures(sec: Section, histories: Mapping[str, Any] | None, summary: Mapping[str, Any], demo: bool,
                      log: Any) -> None:
    """The density over training as a heatmap, and the tracker's lines per checkpoint."""
    if histories is None and demo:
        sec.unavailable("spectrum through training", summary.get("unavailable", {}).get("tracking", "not run"))
    elif histories:
        xlabel = "epoch (0 = initialisation)"

        def fig_h() -> None:
            nums = []
            for k, h in histories.items():
                steps, counts = h.outlier_counts()
                if len(steps):
                    nums.append((f"{pretty(k)}: outliers at epochs {steps.tolist()}", ", ".join(map(str, counts))))
            sec.figure(
                "density_evolution", plots.density_heatmaps({pretty(k): v for k, v in histories.items()}, xlabel),
                caption=("The eigenvalue density at each checkpoint (one column per checkpoint; log colour scale; "
                         "SLQ with few probes, so single eigenvalues show as thin lines) with the outliers that "
                         "hesslab.outliers finds in it marked ×."),
                numbers=nums,
            )

        def fig_t() -> None:
            nums = []
            for k, h in histories.items():
                s, c = h.concentration()
                if len(s):
                    nums.append((f"{pretty(k)}: concentration at epoch {int(s[-1])}", fmt(c[-1])))
                s, lam = h.top_eigenvalues()
                if len(s):
                    nums.append((f"{pretty(k)}: λ₁ epoch {int(s[0])} → {int(s[-1])}",
                                 f"{fmt(lam[0, 0])} → {fmt(lam[-1, 0])}"))
            sec.figure(
                "tracking", plots.tracking_lines({pretty(k): v for k, v in histories.items()}, xlabel),
                caption=("Measured by hesslab.SpectrumTracker during training: the largest and k-th eigenvalue, the "
                         "number of outliers, the gradient concentration in the top-k eigenspace and the KS "
                         "distance of a power-law fit to the top-k eigenvalues, per checkpoint."),
                numbers=nums,
            )
        safe(sec, "density evolution heatmap", fig_h, log)
        safe(sec, "tracking plot", fig_t, log)


# ======================================================================================
# Wu et al.
# ======================================================================================


def wu_section(rep: Report, kfacs: Mapping[str, Any], seeds: Mapping[str, Any] | None,
               summary: Mapping[str, Any], log: Any = None, demo: bool = True) -> None:
    sec = rep.section(
        "Layer-wise Hessians and Kronecker factors",
        cite=CITE_WU,
        intro=("Wu et al. show that a layer's Hessian block E[M ⊗ xxᵀ] is close to the Kronecker product "
               "E[M] ⊗ E[xxᵀ] of the output Hessian and the input second moment. Consequences: the top "
               "eigenvalues are products of the factors' eigenvalues, the top eigenvectors reshaped to the weight "
               "matrix are nearly rank one (E[xxᵀ] is dominated by E[x]E[x]ᵀ after a ReLU), E[M] has about c "
               "dominant eigenvalues (c = 10 classes), independently trained networks share the top eigenspace, "
               "and BatchNorm weakens this structure. Here each layer's exact block (Lanczos on "
               "hesslab.linops.layer_hessian, float64) is compared with hesslab's KFAC operator."),
    )
    if not kfacs:
        if demo:
            sec.unavailable("Kronecker factors", "no model was analysed")
        return
    for label, ka in kfacs.items():
        _kfac_model(sec, label, ka, log)
    _low_rank_figure(sec, kfacs, log)
    _kfac_table(sec, kfacs)
    _seed_figure(sec, seeds, summary, demo, log)


def _kfac_model(sec: Section, label: str, ka: Any, log: Any) -> None:
    """One model's layers: overlap curves, eigenvalues exact vs Kronecker, dominant eigenvalues of E[M]."""
    sec.heading(pretty(label))
    for what, reason in ka.unavailable.items():
        sec.unavailable(f"{what} for {pretty(label)}", reason)
    for what, err in ka.errors.items():
        sec.unavailable(f"{what} for {pretty(label)}", f"failed: {err}")
    if ka.skipped:
        sec.note(f"{pretty(label)}: layers without a Kronecker form, left out: "
                 + "; ".join(f"{k} ({v})" for k, v in ka.skipped.items()))
    if getattr(ka, "not_compared", None):
        sec.note(f"{pretty(label)}: exact layer blocks computed for {', '.join(ka.layers) or 'no layer'} only; "
                 f"not computed (each costs a Lanczos run on the layer) for {len(ka.not_compared)} layer(s): "
                 + "; ".join(f"{k} ({v})" for k, v in ka.not_compared.items()))
    if not ka.layers:
        return
    curves = {name: ka.results[f"{name.replace('.', '_') or 'root'}/overlap"] for name in ka.layers
              if f"{name.replace('.', '_') or 'root'}/overlap" in ka.results}
    disp = label.replace(" ", "_")
    if curves:
        def fig_ov(label: str = label, curves: dict = curves, ka: Any = ka, disp: str = disp) -> None:
            sec.figure(
                f"kfac_overlap_{disp}",
                plots.overlap_curves({f"layer {k}": v for k, v in curves.items()},
                                     f"{pretty(label)}: top-k eigenspaces, E[M] ⊗ E[xxᵀ] vs exact block"),
                caption=(f"{pretty(label)}: overlap ‖U_kᵀV_k‖²_F/k between the top-k eigenvectors of each "
                         "layer's exact Hessian block (U) and of its Kronecker approximation (V), for "
                         "k = 1..K; 1 means the same subspace, the dotted lines are random subspaces (k/n)."),
                numbers=[(f"layer {k}: overlap at k = " + " / ".join(str(int(v.ks[i])) for i in curve_indices(v)),
                          " / ".join(fmt(v.overlaps[i]) for i in curve_indices(v))) for k, v in curves.items()],
            )
        safe(sec, f"overlap curves of {pretty(label)}", fig_ov, log)

    pairs = {}
    for name in ka.layers:
        d = name.replace(".", "_") or "root"
        if f"{d}/exact" in ka.results and f"{d}/kfac" in ka.results:
            pairs[f"layer {name}"] = (np.asarray(ka.results[f"{d}/exact"].eigenvalues),
                                      np.asarray(ka.results[f"{d}/kfac"].eigenvalues))
    if pairs:
        def fig_eig(label: str = label, pairs: dict = pairs, ka: Any = ka, disp: str = disp) -> None:
            sec.figure(
                f"kfac_eigenvalues_{disp}",
                plots.kfac_vs_exact(pairs, f"{pretty(label)}: top eigenvalues per layer"),
                caption=(f"{pretty(label)}: the top eigenvalues of each layer's exact Hessian block (solid) "
                         "and of E[M] ⊗ E[xxᵀ] (dashed, products of the factors' eigenvalues)."),
                numbers=[(f"layer {n}: λ₁ exact / Kronecker",
                          f"{fmt(v.get('lambda1_exact'))} / {fmt(v.get('lambda1_kfac'))}")
                         for n, v in ka.layers.items()],
            )
        safe(sec, f"eigenvalue comparison of {pretty(label)}", fig_eig, log)

    doms = {f"layer {n}": ka.results[f"{n.replace('.', '_') or 'root'}/dominant_B"] for n in ka.layers
            if f"{n.replace('.', '_') or 'root'}/dominant_B" in ka.results}
    if doms:
        def fig_dom(label: str = label, doms: dict = doms, disp: str = disp) -> None:
            sec.figure(
                f"kfac_dominant_{disp}",
                plots.dominant_panels(doms, f"{pretty(label)}: eigenvalues of the output factor E[M]"),
                caption=(f"{pretty(label)}: eigenvalues of each layer's output Hessian factor B = E[M] "
                         "(log scale); red: the dominant ones before the largest gap, dashed: c = 10 classes."),
                numbers=[(k, f"{v.count} dominant" + (" (c or c − 1)" if v.matches_classes else ""))
                         for k, v in doms.items()],
            )
        safe(sec, f"dominant eigenvalues of {pretty(label)}", fig_dom, log)


def _low_rank_figure(sec: Section, kfacs: Mapping[str, Any], log: Any) -> None:
    """The low rank of the exact blocks' top eigenvectors reshaped to weight matrices, one panel per model."""
    # low rank of reshaped eigenvectors: one panel per model
    if any(ka.layers for ka in kfacs.values()):
        sec.heading("All models" if len(kfacs) > 1 else "Eigenvectors and summary")
    groups: dict[str, dict[str, Any]] = {}
    for label, ka in kfacs.items():
        for name in ka.layers:
            key = f"{name.replace('.', '_') or 'root'}/low_rank_exact"
            if key in ka.results:
                groups.setdefault(pretty(label), {})[f"layer {name}"] = ka.results[key]
    if groups:
        def fig_lr() -> None:
            nums = []
            for model, shares in groups.items():
                for k, v in shares.items():
                    t = np.atleast_1d(v.top_share)
                    nums.append((f"{model} {k}: σ₁²/Σσ² of v₁ / mean of top {t.size}", f"{fmt(t[0])} / {fmt(t.mean())}"))
            sec.figure(
                "eigenvector_low_rank",
                plots.low_rank_shares(groups, "Top eigenvectors of exact layer blocks, reshaped to the weight matrix"),
                caption=("Each top eigenvector of an exact layer Hessian block is reshaped to the (augmented) weight "
                         "matrix (out × in+1); the plot shows the share σ₁²/Σσ² of its largest singular value "
                         "(1 = rank one, as the decoupling conjecture predicts for the top eigenvectors)."),
                numbers=nums,
            )
        safe(sec, "eigenvector low rank", fig_lr, log)


def _kfac_table(sec: Section, kfacs: Mapping[str, Any]) -> None:
    rows = []
    for label, ka in kfacs.items():
        for name, v in ka.layers.items():
            rows.append([pretty(label), name, v.get("module"), v.get("n"), "×".join(map(str, v.get("shape", []))),
                         v.get("lambda1_exact"), v.get("lambda1_kfac"), v.get("overlap_k1"), v.get("overlap_kc"),
                         v.get("top_share_v1"), v.get("stable_rank_v1"), v.get("dominant_B")])
    if rows:
        sec.table(["model", "layer", "type", "n", "matrix", "λ₁ exact", "λ₁ Kronecker", "overlap k=1",
                   "overlap k=10", "σ₁²/Σσ² (v₁)", "stable rank (v₁)", "dominant in E[M]"], rows)


def _seed_figure(sec: Section, seeds: Mapping[str, Any] | None, summary: Mapping[str, Any], demo: bool,
                 log: Any) -> None:
    """The overlap of two independently trained MLPs' top eigenspaces."""
    if seeds:
        def fig_s() -> None:
            sec.figure(
                "kfac_overlap_seeds",
                plots.overlap_curves({c.label: c for c in seeds.values()},
                                     "Two MLPs trained from different seeds"),
                caption=("Overlap of the top-k eigenspaces of two MLPs trained from different random "
                         "initialisations. Hidden units of independently trained networks are not aligned (any "
                         "permutation of them gives the same function), so the factor that can be compared "
                         "directly is the output factor E[M] of the last layer, which lives in the class space; "
                         "whole blocks B ⊗ A of layers touching hidden units overlap little unless the units are "
                         "matched first. Dotted: random subspaces (k/n)."),
                numbers=[(c.label, f"{fmt(c.overlaps[len(c.ks) // 2 - 1])} at k = {int(c.ks[len(c.ks) // 2 - 1])} "
                                   f"(random {fmt(c.random_baseline[len(c.ks) // 2 - 1])})") for c in seeds.values()],
            )
        safe(sec, "overlap across seeds", fig_s, log)
    elif demo:
        why = summary.get("unavailable", {}).get("kfac seeds") or summary.get("errors", {}).get("kfac seeds")
        if why:
            sec.unavailable("overlap across seeds", str(why))


# ======================================================================================
# Xie et al.
# ======================================================================================


def _fitted_ks(analyses: Mapping[str, Any]) -> str:
    """"K = 30" (or "K = 30 / 60" for several models): what the power law was fitted to."""
    ks = sorted({int(a.results["power_law"].k) for a in analyses.values() if "power_law" in a.results})
    if not ks:
        ks = sorted({len(a.results["top_k"].eigenvalues) for a in analyses.values() if "top_k" in a.results})
    return "K = " + " / ".join(map(str, ks)) + " eigenvalues" if ks else "eigenvalues"


def xie_section(rep: Report, analyses: Mapping[str, Any], log: Any = None) -> None:
    sec = rep.section(
        "Power-law spectrum of the top eigenvalues",
        cite=CITE_XIE,
        intro=("Xie et al. find that the top eigenvalues of well-trained networks follow a power law "
               "λ_k = λ₁ k^(−s). hesslab fits it by maximum likelihood (Clauset et al., cutoff at the K-th "
               "eigenvalue) and accepts it when the Kolmogorov–Smirnov distance d_ks is below d_c = 1.36/√K; a "
               "log-log least-squares line is shown as a second estimate. The paper used K = 1000 on small "
               f"networks; here the top {_fitted_ks(analyses)} computed by Lanczos are fitted. The verdict is "
               f"'undecided' below K = {MIN_K_TO_DECIDE} (the test cannot reject a linearly decaying spectrum "
               f"there) and when the fitted λ₁ misses the largest eigenvalue by more than {LAMBDA1_FACTOR:g}×."),
    )
    rows = []
    for label, a in analyses.items():
        if "top_k" not in a.results:
            continue
        fit = a.results.get("power_law")
        top = a.results["top_k"]

        def fig(label: str = label, fit: Any = fit, top: Any = top, a: Any = a) -> None:
            nb = a.numbers
            nums = [("λ₁ (Lanczos)", fmt(nb.get("lambda_1"))), ("largest relative residual",
                                                              fmt(nb.get("max_relative_residual"))),
                    ("converged eigenpairs", f"{nb.get('num_converged')} of {nb.get('k_top')}"),
                    ("products (Lanczos + residuals)", nb.get("lanczos_matvecs"))]
            if fit is not None:
                nums += [("ŝ (MLE) ± s.e.", f"{fmt(fit.s)} ± {fmt(fit.s_std_error, 2)}"),
                         ("d_ks / d_c", f"{fmt(fit.ks_distance)} / {fmt(fit.ks_critical)}"),
                         ("verdict", f"{fit.verdict}: {fit.verdict_reason}"),
                         ("least squares s, R²", f"{fmt(fit.s_lstsq)}, {fmt(fit.r2)}")]
            sec.figure(
                f"top_eigenvalues_{label}", plots.top_eigenvalues(top, fit, pretty(label)),
                caption=(f"{pretty(label)}: left, the top {len(top.eigenvalues)} Hessian eigenvalues on log-log "
                         "axes with the maximum-likelihood power law (red) and the least-squares line (green); "
                         "right, the relative residual ‖Hv − λv‖/|λ| of each computed eigenpair."),
                numbers=nums,
            )
        safe(sec, f"top eigenvalues of {pretty(label)}", fig, log)
        if fit is not None:
            rows.append([pretty(label), fit.k, fit.s, fit.s_std_error, fit.beta, fit.ks_distance, fit.ks_critical,
                         fit.verdict, fit.s_lstsq, fit.r2, fit.num_dropped])
    if rows:
        sec.table(["model", "K", "ŝ", "± s.e.", "β̂", "d_ks", "d_c", "verdict", "s (least sq.)", "R²",
                   "dropped ≤ 0"], rows)
    missing(sec, analyses, "top_k", "top eigenvalues")
    missing(sec, analyses, "power_law", "power-law fit")


# ======================================================================================
# Singh et al.
# ======================================================================================


def singh_section(rep: Report, rank: Mapping[str, Any], log: Any = None) -> None:
    sec = rep.section(
        "Hessian rank of deep linear networks",
        cite=CITE_SINGH,
        intro=("Singh et al. split the Hessian into an outer-product part H_O (Gauss–Newton) and a functional "
               "part H_F and derive closed-form ranks for deep linear networks f(x) = W_L ⋯ W_1 x: with "
               "r = rank(X), K' = K − 1 for cross-entropy, q = min(r, K', M_1, …), rank H_O = q(r + K' − q) and "
               "rank H_L = 2qΣM_i + q(r + K') − Lq². hesslab.rank_report builds the three matrices densely in "
               "float64 and measures their numerical ranks (numpy's rule). Inputs: digits images average-pooled "
               "to 4×4 (d = 16), centred, K = 10 classes."),
    )
    if rank.get("unavailable"):
        sec.unavailable("rank report", rank["unavailable"])
        return
    for what, err in (rank.get("errors") or {}).items():
        sec.unavailable(what, f"failed: {err}")
    sweep = rank.get("sweep") or []
    if sweep:
        def fig() -> None:
            mism = [(r["hidden"], p) for r in sweep for p in ("H_L", "H_O", "H_F")
                    if r["predicted"].get(p) is not None and r["ranks"][p] != r["predicted"][p]]
            sec.figure(
                "rank_sweep", plots.rank_sweep(sweep, f"Deep linear network 16 → M₁ → 10, cross-entropy, "
                                                      f"N = {sweep[0].get('num_samples')}"),
                caption=("Numerical ranks of H_L, H_O and H_F (circles) against Singh et al.'s formulas (lines) as "
                         "the hidden width M₁ grows; the dotted line is the number of parameters n, so the "
                         "Hessian is far from full rank."),
                numbers=[("configurations", len(sweep)), ("input rank r", sweep[0].get("input_rank")),
                         ("ranks matching the formula", f"{3 * len(sweep) - len(mism)} of {3 * len(sweep)}")]
                + [(f"M₁ = {r['hidden']}: rank H_L / n", f"{r['ranks']['H_L']} / {r['num_params']}")
                   for r in sweep[-3:]],
            )
        safe(sec, "rank sweep", fig, log)
    reports = rank.get("reports") or {}
    for name, r in reports.items():
        def fig_r(name: str = name, r: Any = r) -> None:
            sec.figure(
                f"rank_{name}", plots.rank_bars(r),
                caption=(f"Measured (blue) and predicted (orange) ranks for the deep linear network "
                         f"{'-'.join(map(str, r.widths))} with {r.loss.replace('_', '-')} loss, N = {r.num_samples}."),
                numbers=[(f"rank {p}: measured / formula", f"{r.ranks[p]} / {fmt(r.predicted.get(p))}")
                         for p in ("H_L", "H_O", "H_F")] + [("gap σ_rank/σ_(rank+1) of H_L", fmt(r.gaps["H_L"]))],
            )
        safe(sec, f"rank bars {name}", fig_r, log)
    if reports:
        name, r = next(iter(reports.items()))

        def fig_sv() -> None:
            sec.figure(
                "rank_singular_values", plots.singular_values(r, f"Singular values, linear network "
                                                                 f"{'-'.join(map(str, r.widths))}"),
                caption=("All singular values of H_L, H_O and H_F of the first network above (log scale) with "
                         "each matrix's threshold σ_max·n·eps: the gap of many orders of magnitude at the "
                         "threshold makes the numerical rank unambiguous."),
                numbers=[(f"{p}: threshold", fmt(r.thresholds[p])) for p in ("H_L", "H_O", "H_F")],
            )
        safe(sec, "singular values", fig_sv, log)
    rows = [[r["hidden"], r["num_params"], r["ranks"]["H_L"], r["predicted"].get("H_L"), r["ranks"]["H_O"],
             r["predicted"].get("H_O"), r["ranks"]["H_F"], r["predicted"].get("H_F")] for r in sweep]
    if rows:
        sec.table(["M₁", "n", "rank H_L", "formula", "rank H_O", "formula", "rank H_F", "formula"], rows)
