"""Plots and small reports. matplotlib is imported lazily: plotting is optional work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .io import atomic_write, write_json


def save_figure(figure, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG, atomically (see :func:`depthprune.io.atomic_write`)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(target, lambda stream: figure.savefig(stream, format="png", dpi=120, bbox_inches="tight"))


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


def format_number(value: float | int | None) -> str:
    """Short human form: counts with thousands separators, scores to 4 places, PPL to 2."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if value != value:
        return "nan"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


def format_params(count: int | None) -> str:
    return "-" if count is None else f"{count / 1e6:.1f}M"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-markdown table; pipes inside cells are escaped so error messages can't break it."""

    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_plan_scores(plan: Any, path: str | Path) -> Path | None:
    """Bar chart of the plan's first per-layer score, dropped layers in red; None if it has none."""
    for metric, scores in plan.scores.items():
        if len(scores) == plan.num_layers:
            return plot_layer_scores(scores, path, metric=metric, highlight=plan.dropped, title=plan.summary())
    return None


SCORES_PLOT = "layer_scores.png"
RUN_REPORT_MD = "report.md"
RUN_REPORT_JSON = "report.json"


def compare_metrics(before: Mapping[str, float | None], after: Mapping[str, float | None],
                    higher_is_better: Mapping[str, bool]) -> dict[str, dict[str, Any]]:
    """Per metric: before, after, change, ratio and its direction (as the evaluation declared it)."""
    out: dict[str, dict[str, Any]] = {}
    for name in list(dict.fromkeys([*before, *after])):
        b, a = before.get(name), after.get(name)
        both = b is not None and a is not None
        out[name] = {
            "before": b,
            "after": a,
            "change": a - b if both else None,
            "ratio": a / b if both and b else None,
            "higher_is_better": bool(higher_is_better.get(name, True)),
        }
    return out


def _change_text(entry: Mapping[str, Any]) -> str:
    if entry["ratio"] is None:
        return "-"
    if not entry["higher_is_better"]:
        return f"x{entry['ratio']:.2f}"
    return f"{entry['change']:+.4f} ({100 * entry['ratio']:.1f}% retained)"


def _divergence_note(report: Mapping[str, Any]) -> str:
    """What kl/top1 were measured against, and whether kl is the top-k lower bound."""
    measured = (report.get("evaluation") or {}).get("after") or (report.get("evaluation") or {}).get("before") or {}
    divergence = measured.get("divergence")
    if not divergence:
        return ""
    return (f"\nkl = mean per-token KL(reference || model), top1 = fraction of predicted tokens where both models' "
            f"most likely next token agree; reference `{divergence['reference']}`, {divergence['tokens']} tokens, "
            f"reference distributions {divergence['cache']}.\n")


def per_domain_table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """Held-out text x metric, ``before -> after`` in each cell, the mean last (empty for a single text)."""
    domains = list(dict.fromkeys(name.partition("/")[2] for name in metrics if "/" in name))
    if not domains:
        return ""
    bases = list(dict.fromkeys(name.partition("/")[0] for name in metrics if "/" in name))

    def cell(name: str) -> str:
        e = metrics.get(name)
        return "-" if e is None else f"{format_number(e['before'])} -> {format_number(e['after'])}"

    rows = [(d, *[cell(f"{b}/{d}") for b in bases]) for d in domains] + [("mean", *[cell(b) for b in bases])]
    return markdown_table(("text", *bases), rows)


def write_run_report(directory: str | Path, report: Mapping[str, Any], plan: Any = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.json`` of one job into ``directory`` (the checkpoint being written).

    ``report`` is :meth:`depthprune.job.JobResult.to_dict`; ``plan`` the depth
    plan saved with the checkpoint (its per-layer scores are drawn into
    ``layer_scores.png`` when the directory lacks the plot, so the markdown
    never points at a missing image).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plot = directory / SCORES_PLOT
    if plan is not None and not plot.exists():
        plot_plan_scores(plan, plot)
    data = {**report, "scores_plot": SCORES_PLOT if plot.exists() else None}
    json_path = write_json(directory / RUN_REPORT_JSON, data)

    rows = [
        (f"{name} ({'higher' if e['higher_is_better'] else 'lower'} is better)",
         format_number(e["before"]), format_number(e["after"]), _change_text(e))
        for name, e in report.get("metrics", {}).items()
    ]
    layers, params = report.get("layers", {}), report.get("parameters", {})
    parts = ["# depthprune report\n"]
    if report.get("model"):
        parts.append(f"Model: `{report['model']}`\n")
    sizes = [f"layers {layers.get('before')} -> {layers.get('after')}"] if layers else []
    if params.get("before") and params.get("after"):
        sizes.append(f"parameters {format_params(params['before'])} -> {format_params(params['after'])} "
                     f"({params['after'] / params['before']:.1%})")
    if sizes:
        parts.append("; ".join(sizes) + "\n")
    stages = "".join(f"{i}. `{st.get('summary', st.get('stage'))}`\n" for i, st in enumerate(report.get("stages", []), 1))
    parts.append("## Stages\n\n" + (stages or "none\n"))
    parts.append("## Metrics\n\n" + (markdown_table(("metric", "before", "after", "change"), rows) if rows
                                     else "No metrics measured.\n") + _divergence_note(report))
    domain_table = per_domain_table(report.get("metrics", {}))
    if domain_table:
        parts.append("## Per held-out text\n\n" + domain_table)
    if plan is not None:
        merged = ", ".join(f"{m.low}..{m.high} ({m.operator})" for m in plan.merges) or "none"
        parts.append(
            f"## Plan\n\n- method: `{plan.method}`\n- layers: {plan.num_layers} -> {plan.num_layers_after}\n"
            f"- removed: {list(plan.remove) or 'none'}\n- merged: {merged}\n"
            f"- parameters: `{json.dumps(plan.params, default=str)}`\n"
        )
    if data["scores_plot"]:
        parts.append(f"## Per-layer scores\n\n![per-layer scores; removed layers in red]({SCORES_PLOT})\n")
    settings = report.get("settings") or {}
    if settings:
        parts.append("## Settings\n\n" + "".join(f"- {k}: `{json.dumps(v, default=str)}`\n"
                                                  for k, v in settings.items()))
    timings = report.get("timings_s") or {}
    if timings:
        parts.append("## Wall time\n\n" + "".join(f"- {k}: {v:.1f} s\n" for k, v in timings.items()))
    md_path = atomic_write(directory / RUN_REPORT_MD, "\n".join(parts))
    return md_path, json_path


def _log_axis(ax) -> None:
    """Log scale with plain numbers (60, 200) instead of 6x10^1 labels."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    if high / max(low, 1e-12) < 30:
        ax.yaxis.set_minor_formatter(plain)


def plot_depth_curves(
    curves: Mapping[str, Sequence[tuple[int, float | None, float | None]]],
    path: str | Path,
    *,
    dense: tuple[float | None, float | None],
    accuracy_label: str = "mean task accuracy",
    title: str | None = None,
) -> Path:
    """Perplexity (log scale) and, when measured, mean accuracy against layers removed.

    ``curves`` maps a method to ``(layers removed, perplexity, accuracy)``
    points; every line starts at the dense model (0 removed) so methods are
    read as a drop from the same origin.  Missing values are skipped.
    """
    from matplotlib.figure import Figure

    dense_ppl, dense_acc = dense
    has_acc = dense_acc is not None or any(p[2] is not None for pts in curves.values() for p in pts)
    panels = [("perplexity", 1, dense_ppl)] + ([(accuracy_label, 2, dense_acc)] if has_acc else [])
    fig = Figure(figsize=(5.2 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, column, origin) in zip(axes, panels):
        for method, points in curves.items():
            xy = sorted((p[0], p[column]) for p in points if p[column] is not None)
            if origin is not None:
                xy = [(0, origin), *xy]
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=method)
        if origin is not None:
            ax.axhline(origin, color="grey", linestyle=":", linewidth=1, label="dense")
        if column == 1:
            _log_axis(ax)
        _label(ax, "layers removed", label)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _label(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_budget_curves(
    curves: Mapping[str, Sequence[tuple[int, Mapping[str, float | None]]]],
    path: str | Path,
    *,
    panels: Sequence[tuple[str, str]],
    dense: Mapping[str, float | None] | None = None,
    title: str | None = None,
) -> Path:
    """Metrics against training tokens: one panel per ``(key, label)`` of ``panels``, one line per recipe.

    ``curves`` maps a recipe to ``(tokens, {key: value})`` points (the untrained model at 0 tokens belongs
    in every recipe's points); ``dense`` values are drawn as dotted lines. Tokens are on a symmetric-log axis
    so 0 and budgets that grow by factors both show; a ``perplexity`` panel is log-scaled.
    """
    from matplotlib.figure import Figure

    shown = [(key, label) for key, label in panels
             if any(values.get(key) is not None for points in curves.values() for _, values in points)]
    fig = Figure(figsize=(4.6 * max(1, len(shown)), 3.8))
    axes = fig.subplots(1, max(1, len(shown)), squeeze=False)[0]
    positive = [t for points in curves.values() for t, _ in points if t > 0]
    for ax, (key, label) in zip(axes, shown):
        for recipe, points in curves.items():
            xy = sorted((t, v[key]) for t, v in points if v.get(key) is not None)
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=recipe)
        if dense and dense.get(key) is not None:
            ax.axhline(dense[key], color="grey", linestyle=":", linewidth=1, label="dense")
        if positive:
            ax.set_xscale("symlog", linthresh=min(positive))
        if key == "perplexity":
            _log_axis(ax)
        _label(ax, "training tokens", label)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _validate_windows(windows: Sequence[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    checked = []
    for low, high in windows:
        if not 0 <= low <= high < size:
            raise ValueError(
                f"merged window ({low}, {high}) is not an inclusive layer range inside [0, {size - 1}]"
            )
        checked.append((int(low), int(high)))
    return checked


def plot_cka_heatmap(
    matrix: Any,
    path: str | Path,
    title: str | None = None,
    merged_windows: Sequence[tuple[int, int]] | None = None,
) -> Path:
    """Write the (L, L) CKA matrix as a heatmap PNG and return its path.

    Layer 0 is at the bottom-left so the diagonal runs upwards.  Each
    ``merged_windows`` entry (low, high), inclusive layer indices, is outlined
    as the square block [low, high] x [low, high] on the diagonal, so the
    patches an SLM plan merged can be checked against the CKA patches.

    The figure is rendered with the non-interactive Agg canvas (no pyplot
    global state, safe in headless jobs) and saved atomically: written to a
    temporary file in the target directory and renamed into place, so a
    reader never sees a half-written PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    data = np.asarray(matrix.detach().cpu() if hasattr(matrix, "detach") else matrix, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] != data.shape[1]:
        raise ValueError(f"matrix must be square (L, L), got shape {data.shape}")
    windows = _validate_windows(merged_windows or (), data.shape[0])

    figure = Figure(figsize=(6.0, 5.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    finite = data[np.isfinite(data)]
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    vmax = max(1.0, float(finite.max())) if finite.size else 1.0
    image = axes.imshow(data, origin="lower", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="CKA")
    for low, high in windows:
        side = high - low + 1
        axes.add_patch(
            Rectangle((low - 0.5, low - 0.5), side, side, fill=False, edgecolor="red", linewidth=2.0)
        )
    axes.set_xlabel("layer")
    axes.set_ylabel("layer")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    if title is not None:
        axes.set_title(title)
    figure.tight_layout()
    return save_figure(figure, Path(path))
