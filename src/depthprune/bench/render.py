"""A bench result as people read it: the markdown table, the one-paragraph description of the settings, the
plot of metrics against layers removed, and the files they go to."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..io import atomic_write, write_json
from ..report import format_number, format_params, markdown_table, plot_depth_curves
from .results import REFERENCE_FILE, RESULTS_JSON, RESULTS_MD, RESULTS_PLOT, ROWS_DIR, BenchResult, BenchRow


def results_table(result: BenchResult) -> str:
    """The results table: one row per model, dense first."""
    evaluation = result.settings["evaluation"]
    speed = evaluation.get("speed") is not None
    divergence = evaluation.get("divergence") is not None
    compensated = any(row.compensation != "none" for row in result.rows)
    tasks = result.tasks
    domains = result.domains
    per_text = "kl" if divergence else "perplexity"
    generation = any("gen_f1" in row.metrics for row in result.all_rows)
    mean = " (mean)" if domains else ""
    headers = ["method", *(["compensation"] if compensated else []), "ratio", "layers", "removed / merged",
               "params", f"PPL{mean}", *([f"KL{mean}", f"top-1{mean}"] if divergence else []),
               *[f"{'KL' if divergence else 'PPL'} {d}" for d in domains],
               *(["gen prefix", "gen F1"] if generation else []), *tasks]
    many = len(tasks) > 1
    if tasks:
        headers += (["mean"] if many else []) + ["acc retention"]
    headers += ["PPL ratio"] + (["speedup (ideal)"] if speed else []) + ["note"]
    lines = []
    for row in result.all_rows:
        r = result.derived(row)
        fit = "-" if row.method == "auto" else row.compensation  # auto's own choice is in its label
        cells: list[Any] = [_method_label(row), *([fit] if compensated else []),
                            "-" if row.ratio is None else f"{row.ratio:g}",
                            row.layers if row.layers is not None else "-", _dropped(row.plan),
                            format_params(row.params),
                            format_number(row.perplexity)]
        if divergence:
            cells += [format_number(row.kl), format_number(row.top1)]
        cells += [format_number(row.metrics.get(f"{per_text}/{d}")) for d in domains]
        if generation:
            cells += [format_number(row.metrics.get("gen_prefix")), format_number(row.metrics.get("gen_f1"))]
        cells += [format_number(row.tasks.get(t)) for t in tasks]
        if tasks:
            cells += ([format_number(row.task_mean)] if many else []) + [_percent(r["accuracy_retention"])]
        cells.append("-" if r["perplexity_ratio"] is None else f"x{format_number(r['perplexity_ratio'])}")
        if speed:
            cells.append("-" if r["speedup"] is None else f"{r['speedup']:.2f}x ({r['ideal_speedup']:.2f}x)")
        cells.append(f"error: {row.error}" if row.error else "")
        lines.append(cells)
    return markdown_table(headers, lines)


def write_results(result: BenchResult) -> None:
    """results.json, results.md and the plot, each written atomically."""
    write_json(result.out / RESULTS_JSON, result.to_dict())
    settings = result.settings
    head = (f"# depthprune bench: {settings['model']}\n\n"
            f"{describe_settings(settings)}\n\n")
    atomic_write(result.out / RESULTS_MD,
                 head + results_table(result) + f"\n![metrics vs layers removed]({RESULTS_PLOT})\n")
    plot_results(result, result.out / RESULTS_PLOT)


def plot_results(result: BenchResult, path: Path) -> Path:
    curves: dict[str, list[tuple[int, float | None, float | None]]] = {}
    for row in result.rows:
        if row.ok and row.layers_removed is not None:
            label = row.method if row.compensation == "none" else f"{row.method}+{row.compensation}"
            curves.setdefault(label, []).append((row.layers_removed, row.perplexity, row.task_mean))
    tasks = result.tasks
    label = "mean accuracy" if len(tasks) > 1 else (f"{tasks[0]} accuracy" if tasks else "")
    return plot_depth_curves(curves, path, dense=(result.dense.perplexity, result.dense.task_mean),
                             accuracy_label=label, title=str(result.settings["model"]))


def summary_line(result: BenchResult) -> str:
    failed = sum(not r.ok for r in result.rows)
    return (f"{len(result.rows) - failed} pruned rows ok, {failed} failed, {len(result.cached)} reused from "
            f"{result.out / ROWS_DIR}; wrote {RESULTS_JSON}, {RESULTS_MD} and {RESULTS_PLOT} in {result.out} "
            f"({result.wall_time_s:.0f} s)")


def _method_label(row: BenchRow) -> str:
    """The method, and for ``auto`` the candidate it chose (its compensation included)."""
    chosen = (row.plan or {}).get("params", {}).get("chosen") if row.method == "auto" else None
    return f"auto: {chosen}" if chosen else row.method


def _ranges(indices: Sequence[int]) -> str:
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in spans)


def _dropped(plan: dict[str, Any] | None) -> str:
    """Which original layers went: removed ones as ranges (``12-17,25``), merges as windows."""
    if not plan:
        return "-"
    parts = [_ranges(plan["remove"])] if plan.get("remove") else []
    parts += [f"merge {m['low']}..{m['high']}" for m in plan.get("merges", [])]
    return "; ".join(parts) or "none"


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def describe_settings(s: dict[str, Any]) -> str:
    parts = [f"calibration: {s['calibration']['source']}, {s['calibration']['num_windows']} x "
             f"{s['calibration']['seq_len']} tokens, seed {s['calibration']['seed']}"]
    evaluation = s["evaluation"]
    if evaluation.get("perplexity"):
        p = evaluation["perplexity"]
        parts.append(f"PPL: {p['dataset']}, {p['max_windows'] or 'all'} windows x {p['seq_len']} tokens"
                     + (" each, the mean their geometric mean" if "=" in p["dataset"] else ""))
    if evaluation.get("divergence"):
        d = evaluation["divergence"]
        parts.append(f"KL(dense || row) per token and top-1 agreement with the dense row on the PPL windows "
                     f"(dense distributions exact when they fit {d['exact_budget_mb']:g} MiB, else its top-"
                     f"{d['top_k']} tokens + remainder, then KL is a lower bound; see {REFERENCE_FILE})")
    if evaluation.get("zeroshot"):
        z = evaluation["zeroshot"]
        parts.append(f"zero-shot: {', '.join(z['tasks'])} (lm-eval, {z['num_fewshot']}-shot, "
                     f"limit {z['limit'] if z['limit'] is not None else 'none'})")
    if evaluation.get("speed"):
        v = evaluation["speed"]
        parts.append(f"speed: greedy decode {v['gen_len']} tokens after a {v['prompt_len']}-token prompt, "
                     f"batch {v['batch_size']}, median of {v['repeats']}; speedup = decode tokens/s vs dense, "
                     "ideal = L/(L-k)")
    return "; ".join(parts) + "."
