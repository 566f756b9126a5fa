"""The one matplotlib helper the result classes share."""

from __future__ import annotations


def axes(ax=None, figsize: tuple[float, float] = (6.0, 4.5)):
    """``ax`` itself, or the Axes of a new figure (``plt.show`` is never called)."""
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=figsize)
    return ax
