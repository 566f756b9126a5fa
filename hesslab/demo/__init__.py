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
* Zhang et al. (2024, "Why Transformers Need Adam"): per-block spectra of a tiny
  transformer trained on the digits (each image a sequence of its 8 rows;
  ``hesslab.zoo.digits_transformer``) against those of the MLP, and their heterogeneity.

It writes ``summary.json`` (headline numbers and a manifest of result files),
``results/<model>/<measure>.{json,npz}`` (each result dataclass's own ``save()``),
``checkpoints/``, ``report.html`` (self-contained) and ``plots/*.png``.

Modules: ``_config`` (:class:`DemoConfig`, :class:`Budget`, the measures of ``analyze``),
``_stages`` (progress, logging, failures recorded instead of raised), ``_measure`` (one
model's spectrum by :func:`hesslab.analysis.measure_spectrum`, shared with ``analyze``),
``_kfac`` (Kronecker factors against exact layer blocks, Wu et al.), ``_rank`` (ranks of
deep linear networks, Singh et al.), ``_run`` (:func:`run_demo`), ``_analyze``
(:func:`run_analysis`), :mod:`hesslab.demo.sections` (the four papers' report sections),
``_blocks`` (per-block spectra: the demo's transformer, ``analyze --measures blocks``),
``_report`` (the report pages), ``_text`` (formatting shared by the sections), ``_output``
(the summary and the report written to the run folder), ``_cost`` (what each measure will
cost, said before it starts).
"""

from __future__ import annotations

from hesslab.analysis.pipeline import MEASURES

from ._analyze import run_analysis
from ._config import ANALYZE_MEASURES, Budget, DemoConfig
from ._kfac import KfacAnalysis, choose_layers, kfac_analysis
from ._measure import ModelAnalysis, measure_model
from ._rank import rank_analysis
from ._report import build_analysis_report, build_demo_report
from ._run import run_demo
from ._stages import Stages, warnings_as_log

__all__ = ["Budget", "DemoConfig", "ModelAnalysis", "KfacAnalysis", "Stages", "measure_model", "kfac_analysis",
           "rank_analysis", "choose_layers", "run_demo", "run_analysis", "MEASURES", "ANALYZE_MEASURES", "build_demo_report",
           "build_analysis_report", "warnings_as_log"]
