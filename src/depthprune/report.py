"""Plots and small reports. matplotlib is imported lazily: plotting is optional work."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


def _save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


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
    return _save_figure(fig, path)
