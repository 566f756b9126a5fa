"""The one exception type hesslab raises for bad input."""

from __future__ import annotations


class HesslabError(ValueError):
    """Bad input to a hesslab function: the message names the argument and the fix."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`HesslabError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise HesslabError(message)
