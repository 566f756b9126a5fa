"""One measurement pipeline: an operator and the measures asked for in, results and records out.

``hesslab demo`` and ``hesslab analyze`` (both through :func:`hesslab.demo.measure_model`)
and :class:`hesslab.SpectrumTracker` measure a Hessian with :func:`measure_spectrum`, so
they share its order, its defaults (:data:`DEFAULTS`) and its records:

====================  ======================================================================
``"loss"``            always first, when the operator has ``loss()`` (one pass over the data)
``"top_k"``           the top eigenpairs (:func:`hesslab.lanczos`, ``which="LA"``, with
                      residuals), and the outliers among them (:func:`hesslab.outliers`)
                      when at least :data:`MIN_POSITIVE_FOR_OUTLIERS` are positive;
                      computed when ``"top_k"``, ``"power_law"`` or ``"concentration"``
                      is asked for
``"power_law"``       :func:`hesslab.power_law_fit` of the top eigenvalues
``"concentration"``   :func:`hesslab.gradient_concentration` in the top-k eigenspace
``"density"``         the SLQ density (:func:`hesslab.spectral_density`) and its outliers
``"trace"``           :func:`hesslab.trace` (Hutch++)
====================  ======================================================================

**Records.** Each measure gives one plain-JSON record (NaN/Inf as None): ``{"seconds": t,
"num_matvecs": m, **values}``, or ``{"seconds", "num_matvecs", "error": message}`` when it
failed. The values are those of the measure's result (e.g. ``eigenvalues``, ``residuals``,
``converged``, ``num_steps`` for ``top_k``; ``nodes``, ``weights``, ``num_steps``,
``sigma2``, ``reorthogonalize``, ``negative_mass_strict``, ``negative_mass`` and
``outliers`` for ``density``). The tracker writes them as its JSON lines; the demo keeps
the result objects and the headline numbers of :meth:`Measurements.numbers`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, ContextManager

import numpy as np

from hesslab._results import jsonable
from hesslab.errors import HesslabError, require_subset

__all__ = ["MEASURES", "NEEDS_TOP_K", "DEFAULTS", "MIN_POSITIVE_FOR_OUTLIERS", "Measurements", "measure_spectrum",
           "error_text"]

#: The measures of a spectrum, in the order they are taken.
MEASURES = ("top_k", "density", "trace", "power_law", "concentration")

#: The measures that use the top eigenpairs (which are then computed).
NEEDS_TOP_K = ("top_k", "power_law", "concentration")

#: The defaults of every solver call (those of the demo; the tracker used tol 1e-8, 90 SLQ
#: steps, a 2000-point grid and 100 trace products before the pipeline was shared).
DEFAULTS: dict[str, dict[str, Any]] = {
    "lanczos": {"tol": 1e-6},
    "density": {"num_steps": 80, "num_probes": 8, "grid_size": 4000, "reorthogonalize": "full"},
    "trace": {"num_matvecs": 99, "method": "hutch++"},
    "outliers": {},
}

#: Sharded operators: the top eigenvectors are gathered on rank 0 up to n × k entries.
GATHER_ENTRIES = 2**26

#: Outliers of the top eigenvalues are looked for when at least this many are positive
#: (the rule's window of 10 plus two).
MIN_POSITIVE_FOR_OUTLIERS = 12


def error_text(exc: BaseException) -> str:
    """A failure as one line: a HesslabError's own message, else ``Type: message``."""
    return str(exc) if isinstance(exc, HesslabError) else f"{type(exc).__name__}: {exc}"


@dataclasses.dataclass
class Measurements:
    """What :func:`measure_spectrum` found.

    Attributes:
        num_params: n.
        num_samples: The samples the operator averages over (``op.num_data``; 0 if unknown).
        results: ``{name: Result}``: ``"top_k"`` (EigenResult), ``"outliers_top"``
            (OutlierResult of the top eigenvalues), ``"power_law"`` (PowerLawFit),
            ``"concentration"`` (ConcentrationResult), ``"density"`` (SpectralDensity),
            ``"outliers"`` (OutlierResult of the density), ``"trace"`` (TraceEstimate).
        records: ``{measure: record}`` in the order taken (``"loss"`` first); see the
            module docstring.
        errors: ``{name: message}`` of every part that failed (a measure, or
            ``"outliers"``/``"outliers_top"``).
        num_matvecs: Products with the operator, all measures together.
    """

    num_params: int
    num_samples: int
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    records: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    num_matvecs: int = 0

    def numbers(self) -> dict[str, Any]:
        """Headline numbers (plain JSON), as in the demo's ``summary.json``: ``num_params``,
        ``num_samples``, ``loss``, ``lambda_1``, ``max_relative_residual``, ``power_law_s``,
        ``concentration``, ``outliers``, ``trace``, ... (those measured)."""
        out: dict[str, Any] = {"num_params": self.num_params, "num_samples": self.num_samples}
        loss = self.records.get("loss", {})
        if "value" in loss:
            out["loss"] = loss["value"]
        r = self.results
        if "top_k" in r:
            top = r["top_k"]
            lam = np.asarray(top.eigenvalues, dtype=np.float64)
            rel = np.asarray(top.residuals, dtype=np.float64) / np.maximum(np.abs(lam), 1e-300)
            out.update(lambda_1=float(lam[0]), lambda_k=float(lam[-1]), k_top=int(lam.size),
                       max_relative_residual=float(np.nanmax(rel)), lanczos_matvecs=int(top.num_matvecs),
                       num_converged=int(top.num_converged))
        if "power_law" in r:
            fit = r["power_law"]
            out.update(power_law_s=fit.s, power_law_s_std_error=fit.s_std_error, power_law_k=fit.k,
                       ks_distance=fit.ks_distance, ks_critical=fit.ks_critical, is_power_law=fit.is_power_law,
                       power_law_verdict=fit.verdict, power_law_reason=fit.verdict_reason,
                       power_law_lambda1_ratio=fit.lambda1_ratio,
                       s_lstsq=fit.s_lstsq, r2_lstsq=fit.r2)
        if "outliers_top" in r:
            out.update(outliers_top_k=r["outliers_top"].count, bulk_edge=r["outliers_top"].bulk_edge)
        if "concentration" in r:
            c = r["concentration"]
            out.update(concentration=c.concentration, concentration_k=c.k, gradient_norm=c.gradient_norm)
        if "density" in r:
            d = r["density"]
            nodes = np.asarray(d.nodes)
            out.update(density_min=float(np.mean([x[v].min() for x, v in zip(nodes, d.valid())])),
                       density_max=float(np.mean([x[v].max() for x, v in zip(nodes, d.valid())])),
                       negative_mass_strict=d.negative_mass(tol=0), slq_matvecs=int(d.num_matvecs))
        if "outliers" in r:
            o = r["outliers"]
            out.update(outliers=o.count, outlier_positions=[float(p) for p in o.positions],
                       negative_mass=o.negative_mass)
        if "trace" in r:
            out.update(trace=r["trace"].value, trace_std_error=r["trace"].std_error)
        out["hessian_matvecs"] = int(self.num_matvecs)
        return jsonable(out)


OnError = Callable[[str, Exception], None]
OnRecord = Callable[[str, dict[str, Any], Any], None]


def measure_spectrum(
    op: Any,
    measures: Sequence[str] = MEASURES,
    *,
    k: int = 10,
    k_top: int | None = None,
    seed: int = 0,
    lanczos_options: dict[str, Any] | None = None,
    density_options: dict[str, Any] | None = None,
    trace_options: dict[str, Any] | None = None,
    outlier_options: dict[str, Any] | None = None,
    progress: bool | None = False,
    stage: Callable[[str], ContextManager[Any]] | None = None,
    on_error: OnError | None = None,
    on_record: OnRecord | None = None,
    outliers: bool = True,
    on_progress: Callable[[Measurements], None] | None = None,
    on_start: Callable[[str, dict[str, Any]], None] | None = None,
) -> Measurements:
    """Measure the spectrum of ``op``: loss → top-k (+ outliers) → power law →
    concentration → density (+ outliers) → trace, each only when asked for or needed.

    Args:
        op: A symmetric :class:`hesslab.LinearOperator` (n, n), typically a
            :class:`hesslab.Hessian`; its ``loss()`` is recorded when it has one, its
            ``gradient()`` is used by the concentration.
        measures: A subset of :data:`MEASURES` (none: the loss only).
        k: The eigenspace of the gradient concentration; also the number of top
            eigenpairs when ``k_top`` is None.
        k_top: Top eigenpairs computed by Lanczos (at least ``k``, at most n − 1).
        seed: Seed of every random start vector and probe.
        lanczos_options: For :func:`hesslab.lanczos` over :data:`DEFAULTS` (``tol``,
            ``v0`` for a warm start, ...).
        density_options: For :func:`hesslab.spectral_density` (``num_steps``, capped at
            n; ``num_probes``, ``grid_size``, ``reorthogonalize``, ...).
        trace_options: For :func:`hesslab.trace` (``num_matvecs``, capped at 3n, where
            Hutch++ is exact; ``method``).
        outlier_options: For :func:`hesslab.outliers` (both outlier searches).
        progress: Progress bars of the solvers (None: when stderr is a terminal).
        stage: ``stage(description)``, a context manager around each expensive measure
            (progress and timing of a caller).
        on_error: Called as ``on_error(name, exc)`` inside the ``except`` block of a part
            that raised an Exception; it may log, warn or raise (raising stops the
            pipeline). When it returns, the failure is recorded and the rest goes on.
            Default: record it.
        on_record: Called as ``on_record(measure, record, result)`` as soon as each
            measure is done (``result`` is None for the loss and on failure), e.g. to
            write the record at once.
        outliers: Look for outliers among the top eigenvalues and in the density (False:
            neither runs, e.g. when a caller did not ask for them).
        on_progress: Called with the :class:`Measurements` found so far after each
            measure (e.g. to rewrite a report, so that an interrupted run keeps them).
        on_start: Called as ``on_start(measure, cost)`` before each measure with what it
            will cost at most: ``{"products": p, "memory_bytes": b, "what": text}`` (products
            with the operator; the memory of its Krylov basis or sketch), e.g. to print an
            estimate.

    Returns:
        :class:`Measurements`.

    Raises:
        HesslabError: ``measures`` is not a subset of :data:`MEASURES`.
    """
    measures = require_subset("measures", measures, MEASURES) if measures else ()
    options = {
        "lanczos": {**DEFAULTS["lanczos"], **(lanczos_options or {})},
        "density": {**DEFAULTS["density"], **(density_options or {})},
        "trace": {**DEFAULTS["trace"], **(trace_options or {})},
        "outliers": {**DEFAULTS["outliers"], **(outlier_options or {})},
    }
    run = _Run(op, options, k=k, k_top=k_top, seed=seed, progress=progress, stage=stage, on_error=on_error,
               on_record=on_record, outliers=outliers, on_progress=on_progress, on_start=on_start)
    if hasattr(op, "loss"):
        run.measure("loss", lambda: ({"value": op.loss()}, None))
    top = None
    if any(m in measures for m in NEEDS_TOP_K):
        top = run.measure("top_k", run.top_k, run.top_k_description())
    if "power_law" in measures:
        run.measure("power_law", lambda: run.power_law(top))
    if "concentration" in measures:
        run.measure("concentration", lambda: run.concentration(top), f"gradient concentration (k = {run.kc(top)})")
    if "density" in measures:
        run.measure("density", run.density, run.density_description())
    if "trace" in measures:
        run.measure("trace", run.trace, run.trace_description())
    run.out.num_matvecs = int(op.num_matvecs - run.start)
    return run.out


class _Run:
    """One call of :func:`measure_spectrum`: the operator, the options and what was found."""

    def __init__(self, op: Any, options: dict[str, dict[str, Any]], *, k: int, k_top: int | None, seed: int,
                 progress: bool | None, stage: Callable[[str], ContextManager[Any]] | None,
                 on_error: OnError | None, on_record: OnRecord | None, outliers: bool = True,
                 on_progress: Callable[[Measurements], None] | None = None,
                 on_start: Callable[[str, dict[str, Any]], None] | None = None):
        self.op = op
        shards = getattr(op, "shards", None)  # sharded: n is the global size, the basis is the local part
        self.sharded = shards is not None
        self.n_local = int(op.shape[0])
        self.n = int(shards.global_size) if self.sharded else self.n_local
        self.options = options
        self.k, self.k_top, self.seed, self.progress = int(k), k_top, int(seed), progress
        self.stage = stage or (lambda what: contextlib.nullcontext())
        self.on_error = on_error
        self.on_record = on_record
        self.outliers = bool(outliers)
        self.on_progress = on_progress
        self.on_start = on_start
        self.start = int(op.num_matvecs)
        self.out = Measurements(self.n, int(getattr(op, "num_data", 0) or 0))
        self.parts: dict[str, Any] = {}  # results found along with a measure's own (its outliers)

    # ------------------------------------------------------------------ bookkeeping
    def attempt(self, name: str, fn: Callable[[], Any]) -> tuple[Any, str | None]:
        """``(fn(), None)``, or ``(None, message)`` with the failure recorded under ``name``."""
        try:
            return fn(), None
        except Exception as exc:  # noqa: BLE001 - on_error decides; the rest of the pipeline goes on
            if self.on_error is not None:
                self.on_error(name, exc)
            self.out.errors[name] = error_text(exc)
            return None, self.out.errors[name]

    def measure(self, name: str, fn: Callable[[], tuple[dict[str, Any], Any]], what: str | None = None) -> Any:
        """Run one measure (``fn() -> (values, result)``), record it, and return its result."""
        if self.on_start is not None and name != "loss":
            self.on_start(name, self.cost(name, what))
        t0, m0 = time.perf_counter(), self.op.num_matvecs
        with self.stage(what) if what else contextlib.nullcontext():
            got, message = self.attempt(name, fn)
        values, result = got if message is None else ({"error": message}, None)
        if result is not None:
            self.out.results[name] = result
        self.out.results.update(self.parts)
        self.parts = {}
        record = jsonable({"seconds": time.perf_counter() - t0, "num_matvecs": int(self.op.num_matvecs - m0),
                           **values})
        self.out.records[name] = record
        if self.on_record is not None:
            self.on_record(name, record, result)
        if self.on_progress is not None:
            self.out.num_matvecs = int(self.op.num_matvecs - self.start)
            self.on_progress(self.out)
        return result

    def cost(self, name: str, what: str | None) -> dict[str, Any]:
        """The most ``name`` will cost: products with the operator and the bytes of its
        basis (Lanczos, SLQ) or sketch (Hutch++), at the operator's dtype."""
        item = int(getattr(self.op, "dtype", None).itemsize) if hasattr(getattr(self.op, "dtype", None),
                                                                       "itemsize") else 8
        products, vectors = 0, 0
        if name == "top_k":
            k = self.num_top()
            steps = self.options["lanczos"].get("max_steps") or min(self.n, max(300, 40 * k))
            products, vectors = int(steps) + k, int(steps) + 1
        elif name == "concentration":
            products = 0  # one gradient, no product
        elif name == "density":
            o = self.density_options()
            products = int(o["num_probes"]) * int(o["num_steps"])
            per_probe = 3 if o.get("reorthogonalize") == "local" else int(o["num_steps"]) + 1
            vectors = int(o["num_probes"]) * per_probe
        elif name == "trace":
            m = self.trace_options().get("num_matvecs")
            products = int(m) if isinstance(m, int) else 0
            vectors = products // 3 + 1 if self.trace_options().get("method") == "hutch++" else 1
        return {"products": products, "memory_bytes": vectors * self.n_local * item, "what": what or name}

    # ------------------------------------------------------------------- measures
    def num_top(self) -> int:
        return int(min(max(self.k_top or self.k, self.k), self.n - 1))

    def top_k_description(self) -> str:
        return f"top {self.num_top()} eigenvalues (Lanczos, residuals)"

    def top_k(self) -> tuple[dict[str, Any], Any]:
        from hesslab import solvers
        from hesslab.analysis.concentration import outliers

        options = {"seed": self.seed, "progress": self.progress, **self.options["lanczos"]}
        top = solvers.lanczos(self.op, k=self.num_top(), which="LA", **options)
        if self.sharded and top.eigenvectors is not None:  # sharded: a rank's rows are no eigenvectors;
            whole = self.n * top.eigenvectors.shape[1] <= GATHER_ENTRIES  # rank 0 keeps whole ones when they fit
            top = dataclasses.replace(top, eigenvectors=solvers.gather_shards(self.op, top.eigenvectors)
                                      if whole else None)
        values: dict[str, Any] = {"eigenvalues": top.eigenvalues, "residuals": top.residuals,
                                  "converged": top.converged, "num_steps": top.num_steps}
        if self.outliers and int((np.asarray(top.eigenvalues) > 0).sum()) >= MIN_POSITIVE_FOR_OUTLIERS:
            o, message = self.attempt("outliers_top", lambda: outliers(top, **self.options["outliers"]))
            if o is not None:
                self.parts["outliers_top"] = o
            values["outliers"] = _outlier_values(o) if o is not None else {"error": message}
        return values, top

    def power_law(self, top: Any) -> tuple[dict[str, Any], Any]:
        from hesslab.analysis.powerlaw import power_law_fit

        if top is None:
            raise HesslabError("power_law: the top-k eigenvalues could not be computed (see top_k)")
        fit = power_law_fit(top.eigenvalues)
        return {key: value for key, value in fit.to_dict().items() if key != "eigenvalues"}, fit

    def kc(self, top: Any) -> int:
        """The concentration's k: ``k``, at most the eigenvectors computed."""
        vectors = None if top is None else top.eigenvectors
        return self.k if vectors is None else int(min(self.k, vectors.shape[1]))

    def concentration(self, top: Any) -> tuple[dict[str, Any], Any]:
        from hesslab.analysis.concentration import gradient_concentration

        if top is None:
            raise HesslabError("concentration: the top-k eigenvectors could not be computed (see top_k)")
        c = gradient_concentration(self.op, k=self.kc(top), eigenvectors=top)
        values = {"concentration": c.concentration, "shares": c.shares, "gradient_norm": c.gradient_norm,
                  "k": c.k, "num_params": c.num_params}
        return values, c

    def density_options(self) -> dict[str, Any]:
        options = {"seed": self.seed, "progress": self.progress, **self.options["density"]}
        options["num_steps"] = min(int(options["num_steps"]), self.n)
        return options

    def density_description(self) -> str:
        options = self.density_options()
        return f"SLQ density ({options['num_probes']} probes × {options['num_steps']} steps)"

    def density(self) -> tuple[dict[str, Any], Any]:
        from hesslab import solvers
        from hesslab.analysis.concentration import outliers

        d = solvers.spectral_density(self.op, **self.density_options())
        values: dict[str, Any] = {
            "nodes": d.nodes, "weights": d.weights, "num_steps": d.num_steps, "sigma2": d.sigma2,
            "reorthogonalize": d.reorthogonalize, "negative_mass_strict": d.negative_mass(tol=0),
        }
        if not self.outliers:
            return values, d
        o, message = self.attempt("outliers", lambda: outliers(d, **self.options["outliers"]))
        if o is None:
            values.update(negative_mass=None, outliers={"error": message})
        else:
            self.parts["outliers"] = o
            values.update(negative_mass=o.negative_mass, outliers=_outlier_values(o))
        return values, d

    def trace_options(self) -> dict[str, Any]:
        options = {"seed": self.seed, "progress": self.progress, **self.options["trace"]}
        if isinstance(options.get("num_matvecs"), (int, np.integer)):
            options["num_matvecs"] = int(min(options["num_matvecs"], 3 * self.n))
        return options

    def trace_description(self) -> str:
        options = self.trace_options()
        method = {"hutch++": "Hutch++", "hutchinson": "Hutchinson"}.get(options.get("method"), options.get("method"))
        return f"trace ({method}, {options.get('num_matvecs')} products)"

    def trace(self) -> tuple[dict[str, Any], Any]:
        from hesslab import solvers

        t = solvers.trace(self.op, **self.trace_options())
        return {"value": t.value, "std_error": t.std_error, "method": t.method}, t


def _outlier_values(o: Any) -> dict[str, Any]:
    return {"count": o.count, "positions": o.positions, "bulk_edge": o.bulk_edge, "separation": o.separation,
            "counts_per_probe": o.counts_per_probe, "masses": o.masses}
