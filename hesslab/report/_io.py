"""Writing results to a run folder and reading them back; plain-text tables.

A run folder (``hesslab demo --out DIR`` or ``hesslab analyze --out DIR``) holds
``summary.json`` with a manifest: ``{"results": [{"name", "type", "json", "npz"}, ...]}``
(paths relative to the folder). :class:`ResultStore` writes each result dataclass with its
own ``save()`` as JSON and as NPZ and records it; :func:`load_results` reads every entry
back into its class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from hesslab._results import jsonable
from hesslab._results import result_types as registered_result_types

__all__ = ["ResultStore", "load_results", "result_types", "format_table", "jsonable"]


def result_types() -> dict[str, type]:
    """Every result dataclass a run folder may hold, by class name (the registry of
    :class:`hesslab._results.Result` subclasses; importing ``hesslab`` defines them all)."""
    import hesslab  # noqa: F401 - the package imports every module that defines a result

    return registered_result_types()


class ResultStore:
    """Saves results under ``root/results/<name>.{json,npz}`` and keeps the manifest.

    Args:
        root: The run folder.
        npz: Also write the NPZ twin of every result.
    """

    def __init__(self, root: str | Path, npz: bool = True):
        self.root = Path(root)
        self.npz = npz
        self.entries: list[dict[str, str]] = []

    def save(self, name: str, result: Any, *, json_copy: Any = None) -> dict[str, str]:
        """Write ``result`` (a hesslab Result) as ``results/<name>.json`` and ``.npz``.

        ``json_copy`` is what goes into the JSON file when it should be lighter than the
        full result (e.g. an EigenResult without its eigenvectors, kept in the NPZ).
        """
        base = self.root / "results" / name
        base.parent.mkdir(parents=True, exist_ok=True)
        entry = {"name": name, "type": type(result).__name__}
        if type(result).__name__ == "TrackingHistory":
            path = result.save(base.with_suffix(".jsonl"))
            entry["jsonl"] = str(path.relative_to(self.root))
        else:
            path = (json_copy if json_copy is not None else result).save(base.with_suffix(".json"))
            entry["json"] = str(path.relative_to(self.root))
            if self.npz:
                path = result.save(base.with_suffix(".npz"))
                entry["npz"] = str(path.relative_to(self.root))
        self.entries = [e for e in self.entries if e["name"] != name] + [entry]
        return entry


def load_results(root: str | Path, prefer: str = "json") -> dict[str, Any]:
    """Every result listed in ``root/summary.json``, read back into its dataclass.

    Args:
        root: A run folder written by ``hesslab demo`` or ``hesslab analyze``.
        prefer: ``"json"`` or ``"npz"``: which copy to read when both exist.

    Returns:
        ``{name: result}``.
    """
    from hesslab.errors import HesslabError

    root = Path(root)
    summary_path = root / "summary.json"
    if not summary_path.exists():
        raise HesslabError(f"root: no summary.json in {str(root)!r}; is it a hesslab run folder?")
    manifest = json.loads(summary_path.read_text()).get("results", [])
    types = result_types()
    out = {}
    for entry in manifest:
        cls = types.get(entry["type"])
        if cls is None:
            raise HesslabError(f"summary.json: unknown result type {entry['type']!r} for {entry['name']!r}")
        if "jsonl" in entry:
            out[entry["name"]] = cls.load(root / entry["jsonl"])
            continue
        key = prefer if prefer in entry else ("json" if "json" in entry else "npz")
        out[entry["name"]] = cls.load(root / entry[key])
    return out


def format_value(value: Any, exp_digits: int = 2) -> str:
    """A number or flag as a table cell: "—" for None, yes/no, 4 significant digits, or
    scientific notation with ``exp_digits`` decimals outside [1e-3, 1e5)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.{exp_digits}e}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A fixed-width text table (numbers right-aligned)."""
    cells = [[format_value(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) or row[i] is None
                   for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(list(headers)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)
