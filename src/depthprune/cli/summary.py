"""What a finished job did, printed in a few lines: the candidates a search ranked, each stage, the metrics
before and after, where it was saved. Every checkpoint-writing command ends with it."""

from __future__ import annotations

import typer


def print_result(result) -> None:
    """What a job did, in a few lines: each stage, before/after metrics, where it was saved."""
    candidates = result.plan.params.get("candidates", []) if result.plan is not None else []
    if candidates:
        objective = result.plan.params["objective"]
        teacher = result.plan.params.get("teacher")
        approximation = f"; kl against {teacher}" if teacher and teacher != "exact" else ""
        typer.echo(f"candidates ({objective} on {result.plan.params['heldout_windows']} held-out windows; "
                   f"dense {result.plan.params['dense_heldout_loss']:.4f}{approximation}):")
        depth = next((r for r in result.stages if r.get("stage") == "depth"), {})
        timings = depth.get("candidate_seconds") or [{} for _ in candidates]
        if result.plan.params.get("ranking", "exact") != "exact":
            typer.echo(f"  (ranking {result.plan.params['ranking']})")
        for c, t in sorted(zip(candidates, timings), key=lambda ct: (ct[0].get("fidelity") == "screen",
                                                                      ct[0]["loss"])):
            seconds = t.get("plan_seconds", 0) + t.get("fit_seconds", 0)
            suffix = f" (same plan as {c['same_as']})" if c.get("same_as") else ""
            suffix += " (screening windows only)" if c.get("fidelity") == "screen" else ""
            typer.echo(f"  {c['loss']:.4f}  {c['method']:<10} compensation {c['compensation']:<7} "
                       f"{seconds:6.1f} s  {c['plan']}{suffix}")
    for record in result.stages:
        typer.echo(record.get("summary", record["stage"]))
    depth = next((r for r in result.stages if r.get("stage") == "depth"), {})
    pruned = depth.get("uncompensated") or {}
    metrics = result.metrics()
    bases = list(dict.fromkeys(name.partition("/")[0] for name in metrics))
    width = max((len(name.partition("/")[2]) for name in metrics), default=0)
    for base in bases:
        domains = [name for name in metrics if name.startswith(base + "/")]
        if not domains:
            line = _metric_line(metrics[base], pruned.get(base))
            if line:
                typer.echo(f"{base}: {line}")
            continue
        typer.echo(f"{base}:")
        for name in [*domains, base]:
            if name in metrics:
                label = name.partition("/")[2] or "mean"
                typer.echo(f"  {label:<{width}}  {_metric_line(metrics[name], pruned.get(name))}")
    divergence = result.after.divergence if result.after is not None else None
    if divergence is not None:
        typer.echo(f"(kl/top1 against {divergence.reference} on {divergence.tokens} tokens, reference cache "
                   f"{divergence.cache})")
    if result.out:
        typer.echo(f"saved to {result.out} (report.md, report.json, depthprune_plan.json)")


def _metric_line(entry: dict, pruned: float | None) -> str:
    """``before -> after`` (dense -> pruned -> recovered when the plan was measured before its recovery)."""
    before, after = entry["before"], entry["after"]
    if before is not None and after is not None and pruned is not None:
        return f"{before:.4f} dense -> {pruned:.4f} pruned -> {after:.4f} recovered"
    if before is not None and after is not None:
        return f"{before:.4f} before -> {after:.4f} after"
    return f"{after:.4f}" if after is not None else ""
