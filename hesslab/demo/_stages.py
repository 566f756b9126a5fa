"""Progress and logging of the demo and of ``hesslab analyze``: a bar over stages, log
lines on stderr, and failures that are logged and recorded instead of stopping the run."""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import Callable, Iterator

from hesslab.analysis.pipeline import error_text
from hesslab.errors import HesslabError

__all__ = ["Stages", "guard", "log_failure", "warnings_as_log"]


class Stages:
    """A progress bar over the pipeline's stages (tqdm, quiet when stderr is not a
    terminal) and timestamped log lines on stderr.

    Args:
        total: The number of stages expected (the bar's length).
        progress: True/False forces the bar; None shows it when stderr is a terminal.
        verbose: Print a line per stage on stderr.
        translate: ``translate(part, message) -> message``, applied to every failure logged
            or recorded (``hesslab analyze`` names its options instead of Python arguments).
    """

    def __init__(self, total: int, progress: bool | None = None, verbose: bool = True, desc: str = "hesslab",
                 translate: Callable[[str, str], str] | None = None):
        from tqdm.auto import tqdm

        self.t0 = time.perf_counter()
        self.verbose = verbose
        disable = (not sys.stderr.isatty()) if progress is None else (not progress)
        self.bar = tqdm(total=total, desc=desc, unit="stage", disable=disable, file=sys.stderr, leave=False,
                        dynamic_ncols=True)
        self.inner_progress = None if progress is None else bool(progress)
        self.seconds: dict[str, float] = {}
        self.translate: Callable[[str, str], str] = translate or (lambda part, message: message)

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


def log_failure(stages: Stages, name: str, exc: BaseException) -> None:
    """Log a failed part: a HesslabError by its message, anything else with its traceback
    (call it inside the ``except`` block)."""
    if isinstance(exc, HesslabError):
        stages.log(f"  {name} failed: {stages.translate(name, str(exc))}")
    else:
        stages.log(f"  {name} failed:\n{traceback.format_exc()}")


@contextlib.contextmanager
def guard(errors: dict[str, str], name: str, stages: Stages) -> Iterator[None]:
    """Record a failing part in ``errors`` (and the log) instead of stopping the run."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - keep the other parts; the traceback goes to the log
        errors[name] = stages.translate(name, error_text(exc))
        log_failure(stages, name, exc)


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
