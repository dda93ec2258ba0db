"""Plots and small reports. matplotlib is imported lazily: plotting is optional work."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


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


def write_text(path: str | Path, text: str) -> Path:
    """Write via a uniquely named temporary sibling and rename, so readers never see half a file."""
    target = Path(path)
    temp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target


def lower_is_better(metric: str) -> bool:
    """Perplexity-like metrics go down when the model gets better; task scores go up."""
    name = metric.lower()
    return any(word in name for word in ("perplexity", "ppl", "nll", "loss"))


def plot_plan_scores(plan: Any, path: str | Path) -> Path | None:
    """Bar chart of the plan's first per-layer score, dropped layers in red; None if it has none."""
    for metric, scores in plan.scores.items():
        if len(scores) == plan.num_layers:
            return plot_layer_scores(scores, path, metric=metric, highlight=plan.dropped, title=plan.summary())
    return None


SCORES_PLOT = "layer_scores.png"
RUN_REPORT_MD = "report.md"
RUN_REPORT_JSON = "report.json"


def _compare(before: Mapping[str, float | None], after: Mapping[str, float | None]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in list(dict.fromkeys([*before, *after])):
        b, a = before.get(name), after.get(name)
        both = b is not None and a is not None
        out[name] = {
            "before": b,
            "after": a,
            "change": a - b if both else None,
            "ratio": a / b if both and b else None,
            "lower_is_better": lower_is_better(name),
        }
    return out


def _change_text(entry: Mapping[str, Any]) -> str:
    if entry["ratio"] is None:
        return "-"
    if entry["lower_is_better"]:
        return f"x{entry['ratio']:.2f}"
    return f"{entry['change']:+.4f} ({100 * entry['ratio']:.1f}% retained)"


def plan_summary(plan: Any) -> dict[str, Any]:
    """What a reader of a report needs from a plan: which layers went and with which parameters."""
    return {
        "method": plan.method,
        "summary": plan.summary(),
        "num_layers": plan.num_layers,
        "num_layers_after": plan.num_layers_after,
        "removed": list(plan.remove),
        "merges": [{"low": m.low, "high": m.high, "operator": m.operator} for m in plan.merges],
        "dropped": list(plan.dropped),
        "params": plan.params,
    }


def write_run_report(
    directory: str | Path,
    *,
    plan: Any,
    before: Mapping[str, float | None],
    after: Mapping[str, float | None],
    model: str | None = None,
    settings: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.json`` for one prune run into ``directory``.

    ``before``/``after`` map metric names (``perplexity``, ``piqa_local``, ...)
    to numbers; a name containing perplexity/ppl/nll/loss counts as lower-is-
    better.  The per-layer score plot (``layer_scores.png``) is drawn here when
    the directory lacks it and the plan has per-layer scores, so the markdown
    never points at a missing image.  ``extra`` is merged into the JSON as is.
    Meant to run inside the checkpoint's temporary directory, which
    :func:`depthprune.io.save` renames into place only after every writer
    finished; each file is also written atomically on its own.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plot = directory / SCORES_PLOT
    if not plot.exists():
        plot_plan_scores(plan, plot)
    compared = _compare(before, after)
    summary = plan_summary(plan)
    data = {
        "model": model,
        "plan": summary,
        "metrics": compared,
        "before": dict(before),
        "after": dict(after),
        "settings": dict(settings or {}),
        "timings_s": dict(timings or {}),
        "scores_plot": SCORES_PLOT if plot.exists() else None,
        **dict(extra or {}),
    }
    from .io import write_json

    json_path = directory / RUN_REPORT_JSON
    write_json(json_path, data)

    rows = [
        (f"{name} ({'lower' if e['lower_is_better'] else 'higher'} is better)",
         format_number(e["before"]), format_number(e["after"]), _change_text(e))
        for name, e in compared.items()
    ]
    parts = [f"# Pruning report\n\n`{summary['summary']}`\n"]
    if model:
        parts.append(f"Model: `{model}`\n")
    parts.append(markdown_table(("metric", "before", "after", "change"), rows) if rows else "No metrics measured.\n")
    merged = ", ".join(f"{m.low}..{m.high} ({m.operator})" for m in plan.merges) or "none"
    parts.append(
        f"## Plan\n\n- method: `{plan.method}`\n- layers: {plan.num_layers} -> {plan.num_layers_after}\n"
        f"- removed: {summary['removed'] or 'none'}\n- merged: {merged}\n"
        f"- parameters: `{json.dumps(plan.params, default=str)}`\n"
    )
    if data["scores_plot"]:
        parts.append(f"## Per-layer scores\n\n![per-layer scores; removed layers in red]({SCORES_PLOT})\n")
    if settings:
        parts.append("## Settings\n\n" + "".join(f"- {k}: `{v}`\n" for k, v in settings.items()))
    if timings:
        parts.append("## Wall time\n\n" + "".join(f"- {k}: {v:.1f} s\n" for k, v in timings.items()))
    md_path = write_text(directory / RUN_REPORT_MD, "\n".join(parts))
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
        ax.set_xlabel("layers removed")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
