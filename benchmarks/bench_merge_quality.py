"""Which merge operator preserves quality? Perplexity of SLM/LaCo plans under each operator.

For each model: dense, ShortGPT at the depth SLM reached, the SLM plan (default
T) re-applied with every operator on the *same* windows (isolating the
operator), and LaCo at its default T with rdsc and with reference.

    python benchmarks/bench_merge_quality.py --models smollm2-135m,gemma3-270m --ppl-data FILE
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from depthprune import calibration_windows, load_model, perplexity
from depthprune.methods import Target, make_plan
from depthprune.plan import Merge, Plan
from depthprune.surgery import apply_plan

OPERATORS = ("reference", "rdsc", "average", "drop")


def with_operator(plan: Plan, operator: str) -> Plan:
    merges = [Merge(m.low, m.high, operator) for m in plan.merges]
    return dataclasses.replace(plan, merges=merges, params={**plan.params, "operator": operator})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--ppl-data", default="default-heldout")
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        loaded = load_model(name)
        cal = calibration_windows(loaded.tokenizer)
        layers = loaded.model.config.num_hidden_layers

        def ppl_of(plan: Plan | None) -> float:
            fresh = load_model(loaded.path)
            if plan is not None:
                apply_plan(fresh.model, plan)
            return perplexity(fresh.model, fresh.tokenizer, args.ppl_data, max_windows=args.ppl_windows,
                              progress=False).perplexity

        rows.append((name, "dense", "-", "-", layers, ppl_of(None)))
        slm = make_plan("slm", loaded.model, cal, progress=False)
        removed = slm.num_layers - slm.num_layers_after
        windows = ", ".join(f"{m.low}-{m.high}" for m in slm.merges)
        if removed:
            short = make_plan("shortgpt", loaded.model, cal, Target(remove=removed), progress=False)
            rows.append((name, "shortgpt", "-", f"remove {short.remove}", short.num_layers_after, ppl_of(short)))
        for op in OPERATORS:
            rows.append((name, f"slm T={slm.params['threshold']}", op, windows, slm.num_layers_after,
                         ppl_of(with_operator(slm, op))))
        for op in ("rdsc", "reference"):
            laco = make_plan("laco", loaded.model, cal, operator=op, progress=False)
            rows.append((name, f"laco T={laco.params['threshold']}", op,
                         ", ".join(f"{m.low}-{m.high}" for m in laco.merges) or "none",
                         laco.num_layers_after, ppl_of(laco)))
    print(f"perplexity on {args.ppl_data}, {args.ppl_windows} x 128 tokens; calibration 10 x 128 default text")
    print("| model | method | operator | windows / layers | layers kept | PPL |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.2f} |")


if __name__ == "__main__":
    main()
