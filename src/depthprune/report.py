"""Plots and small reports. matplotlib is imported lazily: plotting is optional work."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Sequence


def save_figure(figure, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG via a same-directory temp file and ``os.replace``.

    Opened with mode "xb" (not ``mkstemp``) so the PNG gets the usual
    umask-derived permissions instead of 0600; a reader never sees half a file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "xb") as stream:
            figure.savefig(stream, format="png", dpi=120, bbox_inches="tight")
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target


def plot_layer_scores(
    scores: Sequence[float],
    path: str | Path,
    *,
    metric: str = "bi",
    highlight: Sequence[int] = (),
    title: str | None = None,
) -> Path:
    """Bar chart of per-layer scores; layers a plan removes are drawn in red."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.28 * len(scores)), 3.6))
    ax = fig.subplots()
    marked = set(highlight)
    colors = ["tab:red" if i in marked else "tab:blue" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel(metric)
    ax.set_xticks(range(len(scores)))
    ax.tick_params(axis="x", labelsize=7)
    if title:
        ax.set_title(title)
    if marked:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="tab:red", label="removed")], loc="upper center")
    return save_figure(fig, path)
