"""Healing at equal steps and data: LoRA on LM loss vs LoRA distilled vs the last layers distilled.

Each configuration heals a fresh copy of the same pruned checkpoint with the same text, steps, batch and seed
(``depthprune.run_job`` with one heal stage, as ``depthprune heal`` runs it), then is evaluated the same way;
the pruned model itself is evaluated once, as the "before" row. Prints one table (and writes it as JSON).

    python bench/bench_heal.py --model runs/smollm2-135m-auto-0.25 --teacher smollm2-135m \\
        --data ../shared/data/austen/emma.txt --steps 40 --ppl-data ../shared/data/wikitext-2/test.txt \\
        --piqa-dir ../shared/data/piqa --limit 300 --out heal-compare/
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

CONFIGS = {
    "lora-lm": {},
    "lora-distill": {"distill": True},
    "last4-distill": {"distill": True, "train_layers": "last:4"},
    "last4-lm": {"train_layers": "last:4"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the pruned checkpoint to heal")
    parser.add_argument("--teacher", required=True, help="the dense model (distillation teacher)")
    parser.add_argument("--data", required=True, help="healing text (.txt) or alpaca data")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--configs", default="lora-lm,lora-distill,last4-distill",
                        help=f"comma separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--ppl-data", default="default-heldout")
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--piqa-dir", default=None)
    parser.add_argument("--limit", type=float, default=300)
    parser.add_argument("--out", required=True, help="folder for the healed checkpoints and results.json")
    args = parser.parse_args()

    from depthprune import load_model, run_job
    from depthprune.evaluate.suite import Evaluation, PerplexitySpec, ZeroShotSpec
    from depthprune.heal import HealConfig
    from depthprune.job import HealStage, Job

    evaluation = Evaluation(
        perplexity=PerplexitySpec(dataset=args.ppl_data, max_windows=args.ppl_windows),
        zeroshot=ZeroShotSpec(["piqa_local"], limit=int(args.limit), piqa_dir=args.piqa_dir) if args.piqa_dir
        else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    results_file = out / "results.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
    if "before" not in results:
        loaded = load_model(args.model, progress=False)
        results["before"] = evaluation.run(loaded.model, loaded.tokenizer, False).values()
        results_file.write_text(json.dumps(results, indent=1))
    for name in args.configs.split(","):
        if name in results:
            continue
        config = HealConfig(max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                            val_size=0, seed=42, progress=False, **CONFIGS[name])
        stage = HealStage(args.data, config, teacher=args.teacher if config.distill else None)
        start = time.perf_counter()
        result = run_job(load_model(args.model, progress=False),
                         Job([stage], evaluation=evaluation, evaluate_before=False, progress=False),
                         out=out / name, overwrite=True)
        results[name] = {**result.after.values(), "seconds": time.perf_counter() - start}
        results_file.write_text(json.dumps(results, indent=1))

    tasks = [k for k in results["before"] if k != "perplexity"]
    rows = [(name, f"{values['perplexity']:.2f}", *(f"{values[t]:.4f}" for t in tasks))
            for name, values in results.items()]
    print(f"{args.model}: {args.steps} steps x {args.batch_size} x {args.grad_accum} sequences of {args.data}")
    print_table(rows, ("healing", "PPL", *tasks))


if __name__ == "__main__":
    main()
