"""What ``hesslab demo`` and ``hesslab analyze`` print at the end: the table (or the JSON
summary), notes and failures on stderr, and the exit code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_INPUT_ERROR", "finish", "exit_status"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INPUT_ERROR = 3


def finish(summary: dict[str, Any], args: argparse.Namespace, what: str) -> int:
    """Print the results (table or JSON), the problems on stderr; the exit code.

    Exit 1 only when a measure that was asked for failed; failures of the parts only
    needed by one (``summary["derived_errors"]``) are printed as notes."""
    from hesslab.report import format_table, jsonable

    out = Path(args.out)
    if args.json:
        print(json.dumps(jsonable(summary), indent=1, allow_nan=False))
    else:
        table = summary.get("table") or {}
        if table:
            print(format_table(table["headers"], table["rows"]))
        extra = _extra_lines(summary)
        if extra:
            print()
            print("\n".join(extra))
        print()
        secs = (summary.get("seconds") or {}).get("total")
        print(f"{what} finished in {secs:.1f} s. Report: {out / 'report.html'}  Results: {out / 'summary.json'}")
    for key, reason in (summary.get("unavailable") or {}).items():
        print(f"hesslab: {key}: not available: {reason}", file=sys.stderr)
    for key, errs in (summary.get("derived_errors") or {}).items():
        for part, message in errs.items():
            print(f"hesslab: note: {key}: {part} (not asked for, only needed by a measure that was) failed: "
                  f"{message}", file=sys.stderr)
    if summary.get("errors"):
        for key, errs in summary["errors"].items():
            print(f"hesslab: error in {key}: {errs}", file=sys.stderr)
        print(f"hesslab: some measures failed; the others were written to {out}", file=sys.stderr)
    return exit_status(summary)


def exit_status(summary: dict[str, Any]) -> int:
    """1 when a measure that was asked for failed, else 0."""
    return EXIT_FAILURE if summary.get("errors") else EXIT_OK


def _extra_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for label, info in (summary.get("kfac") or {}).items():
        if label == "seeds":
            lines.append("Two MLPs trained from different seeds, overlap of top-k eigenspaces:")
            lines += [f"  {name}: {v['overlap']:.2f} at k = {v['k']} (random {v['random']:.3f})"
                      for name, v in info.items()]
            continue
        parts = [f"{layer}: {v.get('overlap_kc', float('nan')):.2f}" for layer, v in (info.get("layers") or {}).items()
                 if v.get("overlap_kc") is not None]
        if parts:
            lines.append(f"{label}: overlap of top-10 eigenspaces, E[M]⊗E[xxᵀ] vs exact layer block: {', '.join(parts)}")
        if info.get("not_compared"):
            lines.append(f"{label}: exact layer blocks not computed for {len(info['not_compared'])} layer(s): "
                         f"{', '.join(info['not_compared'])} (choose with --kfac-layers)")
    rank = summary.get("rank") or {}
    if rank.get("sweep"):
        sweep = rank["sweep"]
        n_ok = sum(r["ranks"][p] == r["predicted"][p] for r in sweep for p in r["ranks"])
        lines.append(f"Deep linear networks: {n_ok} of {3 * len(sweep)} measured ranks (H_L, H_O, H_F over "
                     f"{len(sweep)} widths) equal Singh et al.'s formulas")
    for label, t in (summary.get("tracking") or {}).items():
        if t.get("outliers"):
            lines.append(f"{label}: outliers per epoch {t['outliers']}")
    source = summary.get("source") or {}
    if (source.get("world_size") or 1) > 1:
        lines.append(f"Processes: {source['world_size']} (torchrun), --shard {source.get('shard')}")
    data = source.get("data_used")
    if data:
        lines.append(f"Data: {data}")
    return lines
