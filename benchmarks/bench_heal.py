"""Healing as a curve: KL, top-1, perplexity and PIQA against training tokens, per recipe.

Every (recipe, token budget) heals a fresh copy of the same pruned checkpoint on the same text, batch and seed
(``depthprune.run_job`` with one heal stage and ``max_tokens``, as ``depthprune heal --max-tokens`` runs it),
then is evaluated the same way against the dense model: KL(dense || model) per token and top-1 agreement on
the perplexity windows, perplexity, and PIQA when ``--piqa-dir`` is given. Budget 0 is the pruned model
itself; the dense model is measured once too (its distributions are the reference every row is compared
with, cached in OUT/reference.safetensors).

The distillation recipes share one teacher cache (OUT/teacher-cache): the teacher runs once over the items
of the largest budget (budgets run largest first) and every other run reads a prefix of it. It always keeps
the teacher's top-k tokens + remainder (never the exact distributions, which would only fit small budgets),
so every budget trains on the same loss. Prints one table, writes results.json and results.png.

The ``layers`` recipe is ``--compensate layers`` on the same budget axis: the pruned checkpoint's plan is
re-applied to the dense model with the linear maps and the kept layers at every gap trained on KL to the dense
model (``Compensation.layers_steps`` = budget / tokens per step), its windows drawn from the same text.

    python benchmarks/bench_heal.py --model runs/smollm2-135m-auto-0.25 --teacher smollm2-135m \\
        --data ../shared/data/austen/emma.txt --tokens 0,250000,1000000 \\
        --ppl-data ../shared/data/wikitext-2/test.txt --piqa-dir ../shared/data/piqa --limit 0 --out heal-curve/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import print_table  # noqa: E402

RECIPES = {
    "layers": None,
    "lora-distill": {"distill": True},
    "last4-distill": {"distill": True, "train_layers": "last:4"},
    "lora-lm": {},
    "last4-lm": {"train_layers": "last:4"},
}
PANELS = (("kl", "KL(dense || model) per token"), ("top1", "top-1 agreement with dense"),
          ("perplexity", "perplexity"), ("piqa_local", "PIQA accuracy"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the pruned checkpoint to heal")
    parser.add_argument("--teacher", required=True, help="the dense model (teacher and KL reference)")
    parser.add_argument("--data", required=True, help="healing text (.txt) or alpaca data")
    parser.add_argument("--tokens", default="0,250000,1000000", help="comma-separated training budgets")
    parser.add_argument("--recipes", default="lora-distill,last4-distill,lora-lm",
                        help=f"comma separated, from {', '.join(RECIPES)}")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--teacher-top-k", type=int, default=64)
    parser.add_argument("--ppl-data", default="default-heldout")
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--piqa-dir", default=None)
    parser.add_argument("--limit", type=float, default=0, help="PIQA items (0 = all 1,838)")
    parser.add_argument("--out", required=True, help="folder for results.json, results.png and the caches")
    parser.add_argument("--layers-unique-tokens", type=int, default=65536,
                        help="layers recipe: at most this many distinct text tokens (cached states), cycled")
    parser.add_argument("--keep-checkpoints", action="store_true", help="also save every healed model in "
                        "OUT/checkpoints/RECIPE@TOKENS")
    args = parser.parse_args()

    from depthprune import load_model
    from depthprune.evaluate.suite import DivergenceSpec, Evaluation, PerplexitySpec, ZeroShotSpec
    from depthprune.report import plot_budget_curves

    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}: use {', '.join(RECIPES)}")
    budgets = sorted({int(float(t)) for t in args.tokens.split(",")}, reverse=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = PerplexitySpec(dataset=args.ppl_data, max_windows=args.ppl_windows or None)
    evaluation = Evaluation(
        perplexity=text,
        divergence=DivergenceSpec(text=text, reference=args.teacher, cache_file=str(out / "reference.safetensors")),
        zeroshot=ZeroShotSpec(["piqa_local"], limit=int(args.limit) or None, piqa_dir=args.piqa_dir)
        if args.piqa_dir else None).check()

    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=1))

    def measure(source: str) -> dict:
        loaded = load_model(source, progress=False)
        evaluation.prepare(loaded.source, loaded.path, first_is_input=True, progress=False)
        return evaluation.run(loaded.model, loaded.tokenizer, progress=False).values()

    if "dense" not in results:
        results["dense"] = measure(args.teacher)
        save()
    if "pruned" not in results:
        results["pruned"] = measure(args.model)
        save()
    for recipe in recipes:
        for budget in budgets:
            name = f"{recipe}@{budget}"
            if budget == 0 or name in results:
                continue
            start = time.perf_counter()
            out_dir = out / "checkpoints" / name if args.keep_checkpoints else None
            train = _gap_training if recipe == "layers" else _healing
            results[name] = {**train(args, recipe, budget, evaluation, out_dir),
                             "seconds": time.perf_counter() - start}
            save()

    metrics = [key for key, _ in PANELS if key in results["pruned"]]
    rows = [("dense", "-", "-", "-", *(_cell(results["dense"].get(m)) for m in metrics)),
            ("pruned", 0, "-", "-", *(_cell(results["pruned"].get(m)) for m in metrics))]
    curves: dict[str, list] = {}
    for recipe in recipes:
        points = [(0, results["pruned"])]
        for budget in sorted(budgets):
            r = results.get(f"{recipe}@{budget}")
            if budget and r:
                points.append((r["tokens"], r))
                rows.append((recipe, f"{r['tokens']:,}", r["steps"], f"{r['tokens_per_s']:,.0f}",
                             *(_cell(r.get(m)) for m in metrics)))
        curves[recipe] = points
    reference = evaluation.divergence.cache.describe() if evaluation.divergence.cache else "from an earlier run"
    print(f"{args.model} healed on {args.data} ({args.batch_size} x {args.grad_accum} x {args.cutoff_len}-token "
          f"items per step; kl/top1 against {args.teacher}, reference distributions {reference})")
    print_table(rows, ("recipe", "tokens", "steps", "tokens/s", *metrics))
    plot_budget_curves(curves, out / "results.png", panels=[p for p in PANELS if p[0] in metrics],
                       dense=results["dense"], title=f"healing {args.model}")
    print(f"wrote {results_file} and {out / 'results.png'}")


def _healing(args, recipe: str, budget: int, evaluation, out_dir) -> dict:
    """``depthprune heal --max-tokens budget`` with the recipe's settings, the distillation teacher cached in OUT."""
    from depthprune import HealConfig, HealStage, Job, load_model, run_job

    config = HealConfig(max_tokens=budget, batch_size=args.batch_size, grad_accum=args.grad_accum,
                        cutoff_len=args.cutoff_len, lr=args.lr, val_size=0, seed=42, progress=False,
                        teacher_top_k=args.teacher_top_k, teacher_cache_mb=0,
                        teacher_cache_dir=str(Path(args.out) / "teacher-cache"), **RECIPES[recipe])
    stage = HealStage(args.data, config, teacher=args.teacher if config.distill else None)
    result = run_job(load_model(args.model, progress=False),
                     Job([stage], evaluation=evaluation, evaluate_before=False, progress=False),
                     out=out_dir, overwrite=True)
    record = result.stages[0]
    return {**result.after.values(), "recipe": recipe, "budget": budget, "tokens": record["tokens"],
            "steps": record["steps"], "tokens_per_s": record["tokens_per_s"], "teacher": record["teacher"]}


def _gap_training(args, recipe: str, budget: int, evaluation, out_dir) -> dict:
    """``--compensate layers`` trained on ``budget`` tokens: the pruned model's plan re-applied to the dense model."""
    from depthprune import CalibrationSpec, DepthStage, Job, Plan, load_model, run_job
    from depthprune.compensate import Compensation, LayersSettings

    plan = Plan.load(Path(args.model) / "depthprune_plan.json")
    calibration = CalibrationSpec(source=args.data)
    per_step = LayersSettings.batch * calibration.seq_len
    fit = Compensation(fit="layers", layers=LayersSettings(steps=max(1, budget // per_step),
                                                           tokens=min(budget, args.layers_unique_tokens)))
    stage = DepthStage(plan.method, plan=plan, compensation=fit)
    result = run_job(load_model(args.teacher, progress=False),
                     Job([stage], calibration=calibration, evaluation=evaluation, evaluate_before=False,
                         progress=False), out=out_dir, overwrite=True)
    trained = next(r["layers"] for r in result.stages[0]["compensation"] if "layers" in r)
    tokens, seconds = trained["tokens_trained"], trained["seconds"]
    return {**result.after.values(), "recipe": recipe, "budget": budget, "tokens": tokens,
            "steps": fit.layers.steps, "tokens_per_s": tokens / seconds if seconds else None,
            "teacher": args.teacher, "fit": trained}


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


if __name__ == "__main__":
    main()
