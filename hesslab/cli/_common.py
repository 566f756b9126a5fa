"""Options several commands share: ``--out`` and ``--threads`` (one default for all)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hesslab.errors import HesslabError

__all__ = ["THREADS_HELP", "SMALL_MODEL_PARAMS", "add_threads_option", "choose_threads", "check_common",
           "positive_int"]

#: Below this many parameters ``--threads 0`` (the default) runs on one thread: for such
#: models torch's threads cost more in synchronisation than they gain (on a 2-core machine
#: two threads made the demo's networks 3–8× slower).
SMALL_MODEL_PARAMS = 100_000

THREADS_HELP = (f"torch threads; default 0: automatic, one thread for models under {SMALL_MODEL_PARAMS:,} "
                "parameters (faster there), torch's own setting otherwise")


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0, metavar="N", help=THREADS_HELP)


def choose_threads(requested: int, num_params: int) -> int | None:
    """The threads to run on: ``requested`` when positive, else 1 for a small model and
    None (keep torch's setting) for a larger one."""
    if requested and requested > 0:
        return int(requested)
    return 1 if num_params < SMALL_MODEL_PARAMS else None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _check_out(text: str) -> None:
    """``--out`` must be a folder that exists or can be created, and be writable, before
    any work starts (the run writes everything there)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise HesslabError(f"--out: {text!r} is a file, not a folder; give a folder (created when missing)")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise HesslabError(f"--out: {text!r} cannot be created: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HesslabError(f"--out: {text!r} is not writable here (no write permission in {str(existing)!r}); "
                           "give a folder you can write to")


def check_common(args: argparse.Namespace) -> None:
    """The options several commands share (``--out``, ``--threads``), checked before any work."""
    if getattr(args, "threads", None) is not None and args.threads < 0:
        raise HesslabError(f"--threads: expected 0 (automatic) or a positive number of threads, "
                           f"got {args.threads}")
    if getattr(args, "out", None) is not None:
        _check_out(args.out)
