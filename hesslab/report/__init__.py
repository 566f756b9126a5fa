"""Reports, generic: plots of result objects (matplotlib, no pyplot state), a
self-contained HTML page of sections, and run folders (``ResultStore``, ``load_results``).
The report knows nothing of papers; the demo's paper sections are :mod:`hesslab.demo.sections`.

    from hesslab.report import Report, plots, load_results
    rep = Report("My model")
    sec = rep.section("Density", cite="Ghorbani et al., ICML 2019")
    sec.figure("density", plots.density_panels({"model": [("trained", density)]}),
               caption="The eigenvalue density on a log y-axis.")
    rep.write("out/report.html", plots_dir="out/plots")

``load_results(folder)`` reads every result of a ``hesslab demo``/``analyze`` run folder
back into its dataclass.
"""

from __future__ import annotations

from . import plots
from ._html import Report, Section, fig_to_png
from ._io import ResultStore, format_table, jsonable, load_results, result_types

__all__ = ["Report", "Section", "fig_to_png", "plots", "ResultStore", "load_results", "result_types",
           "format_table", "jsonable"]
