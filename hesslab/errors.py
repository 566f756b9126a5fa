"""The one exception type hesslab raises for bad input."""

from __future__ import annotations

from typing import Iterable


class HesslabError(ValueError):
    """Bad input to a hesslab function: the message names the argument and the fix."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`HesslabError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise HesslabError(message)


def require_subset(name: str, value: str | Iterable[str], allowed: tuple[str, ...]) -> tuple[str, ...]:
    """``value`` (one name or several) as a tuple, checked to be a non-empty subset of ``allowed``."""
    values = (value,) if isinstance(value, str) else tuple(value)
    if not values or any(v not in allowed for v in values):
        raise HesslabError(f"{name}: expected a non-empty subset of {allowed}, got {values!r}")
    return values
