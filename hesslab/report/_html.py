"""A self-contained HTML report: sections of figures (base64 PNG), tables and text.

Nothing is fetched when the page is opened: the style sheet is inline and every plot is
embedded as ``<img src="data:image/png;base64,...">``. Each figure has a stable ``id``
(``fig-<name>``) and, when the report is written with ``plots_dir``, the same PNG is also
saved as ``<plots_dir>/<name>.png``.

    rep = Report("hesslab demo", meta={"seed": 0})
    sec = rep.section("Eigenvalue density", cite="Ghorbani et al. 2019", intro="...")
    sec.figure("density", fig, caption="What the plot shows.", numbers=[("λ₁", "9.9")])
    sec.table(["model", "λ₁"], [["mlp", "9.9"]])
    rep.write("out/report.html", plots_dir="out/plots")
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import re
from pathlib import Path
from typing import Any, Sequence

from ._io import format_value

__all__ = ["Report", "Section", "fig_to_png"]

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 1.2em 2em 4em; color: #1d1d1f; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2.2em; }
h3 { margin: 1.4em 0 0.4em; }
.cite { color: #555; font-size: 0.92em; margin-top: -0.6em; }
.meta { color: #555; font-size: 0.9em; }
.intro { max-width: 62em; }
.fig { display: flex; flex-wrap: wrap; gap: 1.4em; align-items: flex-start; margin: 1.2em 0 1.8em; }
.fig figure { margin: 0; flex: 1 1 620px; max-width: 760px; }
.fig img { width: 100%; height: auto; border: 1px solid #e3e3e3; }
.fig figcaption { font-size: 0.93em; color: #333; margin-top: 0.3em; }
.numbers { flex: 0 1 330px; font-size: 0.9em; }
.fig.wide figure { flex: 1 1 100%; max-width: 100%; }
.fig.wide .numbers { flex: 1 1 100%; }
.fig.wide .numbers table { columns: 2; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.6em 0 1em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 0.8em; margin: 1em 0; }
.na { background: #fdecea; border-left: 4px solid #d93025; padding: 0.5em 0.8em; margin: 1em 0; }
nav ul { columns: 2; font-size: 0.93em; }
code { background: #f4f4f6; padding: 0 0.2em; }
details { margin: 0.6em 0 1em; } summary { cursor: pointer; color: #333; }
"""


def fig_to_png(fig: Any, dpi: int = 100) -> bytes:
    """A matplotlib Figure as PNG bytes (no pyplot state is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)  # the figures use constrained layout: no second "tight" draw
    return buf.getvalue()


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _cell(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    text = _fmt(value)
    return f'<td class="num">{_esc(text)}</td>' if numeric else f"<td>{_esc(text)}</td>"


def _fmt(value: Any) -> str:
    return format_value(value, exp_digits=3)


def _table_html(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclasses.dataclass
class _Figure:
    name: str
    png: bytes
    caption: str
    numbers: list[tuple[str, Any]]
    title: str = ""


@dataclasses.dataclass
class Section:
    """One section of the report (usually one paper)."""

    title: str
    cite: str = ""
    intro: str = ""
    items: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    _owner: Any = None

    def figure(self, name: str, fig: Any, caption: str, numbers: Sequence[tuple[str, Any]] = (),
               title: str = "") -> None:
        """Add a figure: ``fig`` a matplotlib Figure (or PNG bytes), ``caption`` one or two
        sentences on what it shows, ``numbers`` (label, value) pairs printed beside it."""
        if not _NAME.match(name):
            raise ValueError(f"figure name {name!r}: use letters, digits, '_', '-', '.'")
        if self._owner is not None:
            self._owner._claim(name)
        png = fig if isinstance(fig, (bytes, bytearray)) else fig_to_png(fig)
        self.items.append(("figure", _Figure(name, bytes(png), caption, list(numbers), title)))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "",
              fold: str = "") -> None:
        """A table; with ``fold`` it is folded (HTML ``<details>``) under that summary line."""
        self.items.append(("table", (list(headers), [list(r) for r in rows], caption, fold)))

    def folded(self, summary: str, text: str) -> None:
        """A paragraph folded (HTML ``<details>``) under a summary line, for long lists."""
        self.items.append(("folded", (summary, text)))

    def heading(self, text: str) -> None:
        """A sub-heading inside the section."""
        self.items.append(("heading", text))

    def text(self, text: str) -> None:
        """A paragraph (plain text, escaped)."""
        self.items.append(("text", text))

    def note(self, text: str) -> None:
        """A highlighted remark."""
        self.items.append(("note", text))

    def unavailable(self, what: str, why: str) -> None:
        """Say explicitly that part of the analysis is not available, and why."""
        self.items.append(("na", f"{what}: not available ({why})"))

    @property
    def figure_names(self) -> list[str]:
        return [f.name for kind, f in self.items if kind == "figure"]


class Report:
    """A self-contained HTML report made of sections."""

    def __init__(self, title: str, subtitle: str = "", meta: dict[str, Any] | None = None):
        self.title = title
        self.subtitle = subtitle
        self.meta = dict(meta or {})
        self.sections: list[Section] = []
        self._names: set[str] = set()

    def _claim(self, name: str) -> None:
        if name in self._names:
            raise ValueError(f"figure name {name!r} is used twice in the report")
        self._names.add(name)

    def section(self, title: str, cite: str = "", intro: str = "") -> Section:
        sec = Section(title, cite, intro, _owner=self)
        self.sections.append(sec)
        return sec

    @property
    def figure_names(self) -> list[str]:
        return [n for s in self.sections for n in s.figure_names]

    def to_html(self) -> str:
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_esc(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{_esc(self.title)}</h1>",
        ]
        if self.subtitle:
            parts.append(f'<p class="intro">{_esc(self.subtitle)}</p>')
        if self.meta:
            parts.append('<p class="meta">' + " · ".join(f"{_esc(k)}: {_esc(_fmt(v))}" for k, v in self.meta.items())
                         + "</p>")
        if len(self.sections) > 1:
            parts.append("<nav><ul>" + "".join(
                f'<li><a href="#sec-{i}">{_esc(s.title)}</a></li>' for i, s in enumerate(self.sections)
            ) + "</ul></nav>")
        for i, sec in enumerate(self.sections):
            parts.append(f'<section id="sec-{i}"><h2>{_esc(sec.title)}</h2>')
            if sec.cite:
                parts.append(f'<p class="cite">{_esc(sec.cite)}</p>')
            if sec.intro:
                parts.append(f'<p class="intro">{_esc(sec.intro)}</p>')
            for kind, item in sec.items:
                if kind == "figure":
                    parts.append(self._figure_html(item))
                elif kind == "table":
                    headers, rows, caption, fold = item
                    if caption:
                        parts.append(f"<p>{_esc(caption)}</p>")
                    table = _table_html(headers, rows)
                    parts.append(f"<details><summary>{_esc(fold)}</summary>{table}</details>" if fold else table)
                elif kind == "folded":
                    summary, text = item
                    parts.append(f'<details><summary>{_esc(summary)}</summary><p class="intro">{_esc(text)}</p>'
                                 "</details>")
                elif kind == "heading":
                    parts.append(f"<h3>{_esc(item)}</h3>")
                elif kind == "text":
                    parts.append(f'<p class="intro">{_esc(item)}</p>')
                elif kind == "note":
                    parts.append(f'<div class="note">{_esc(item)}</div>')
                elif kind == "na":
                    parts.append(f'<div class="na">{_esc(item)}</div>')
            parts.append("</section>")
        parts.append("</body></html>")
        return "\n".join(parts)

    @staticmethod
    def _figure_html(f: _Figure) -> str:
        b64 = base64.b64encode(f.png).decode("ascii")
        width = int.from_bytes(f.png[16:20], "big") if f.png[:8] == b"\x89PNG\r\n\x1a\n" else 0
        out = ['<div class="fig wide">' if width > 900 else '<div class="fig">']
        if f.title:
            out.insert(0, f"<h3>{_esc(f.title)}</h3>")
        out.append(
            f'<figure><img id="fig-{_esc(f.name)}" data-plot="{_esc(f.name)}" alt="{_esc(f.caption)}" '
            f'src="data:image/png;base64,{b64}"><figcaption>{_esc(f.caption)}</figcaption></figure>'
        )
        if f.numbers:
            rows = "".join(f"<tr><th>{_esc(k)}</th>{_cell(v)}</tr>" for k, v in f.numbers)
            out.append(f'<div class="numbers"><table><tbody>{rows}</tbody></table></div>')
        out.append("</div>")
        return "\n".join(out)

    def write(self, path: str | Path, plots_dir: str | Path | None = None) -> Path:
        """Write the HTML (and, with ``plots_dir``, every plot as ``<name>.png``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if plots_dir is not None:
            plots_dir = Path(plots_dir)
            plots_dir.mkdir(parents=True, exist_ok=True)
            for sec in self.sections:
                for kind, f in sec.items:
                    if kind == "figure":
                        (plots_dir / f"{f.name}.png").write_bytes(f.png)
        path.write_text(self.to_html(), encoding="utf-8")
        return path
