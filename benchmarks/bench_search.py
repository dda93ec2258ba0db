"""SLM search: depthprune's engine vs the straightforward loop of the released code.

slow = for every candidate window: deep-copy the model, apply the merges,
run a full forward with the LM head and ``output_hidden_states=True``
(tests/reference_search.py). depthprune = cached states, decoder suffix only,
merged layer built functionally, no copies. Both must produce the same plan;
the script asserts it and prints time and peak memory side by side.

    python benchmarks/bench_search.py [--model smollm2-135m] [--threshold 0.72] [--windows 10x128]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _measure import Timer, load_variant, peak_rss_mb, print_engine_vs_slow, run_variant  # noqa: E402


def variant(args) -> None:
    from depthprune.engine.search import SimilarityEngine
    from depthprune.methods.slm import slm_search

    model, cal, model_mb, base_rss = load_variant(args)
    with Timer() as t:
        if args.variant == "depthprune":
            plan = slm_search(SimilarityEngine(model, cal), args.threshold)
            merges = [(m.low, m.high) for m in plan.merges]
            tried = len(plan.log)
        else:
            from reference_search import slow_slm

            merges = [(m.low, m.high) for m in slow_slm(model, cal.input_ids, cal.attention_mask,
                                                         args.threshold, "reference", len(model.model.layers))["commit"]]
            tried = None
    print(json.dumps({"seconds": t.seconds, "extra_mb": peak_rss_mb() - base_rss, "model_mb": model_mb,
                      "merges": merges, "tried": tried}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threshold", type=float, default=0.72)
    ap.add_argument("--windows", default="10x128")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", choices=["depthprune", "slow"])
    args = ap.parse_args()
    if args.variant:
        return variant(args)
    common = ["--model", args.model, "--threshold", str(args.threshold), "--windows", args.windows,
              "--threads", str(args.threads)]
    fast = run_variant(__file__, "--variant", "depthprune", *common)
    slow = run_variant(__file__, "--variant", "slow", *common)
    assert fast["merges"] == slow["merges"], (fast["merges"], slow["merges"])
    print_engine_vs_slow(f"SLM search, {args.model}, T={args.threshold}, {args.windows} windows, {args.threads} "
                         f"threads; same plan: {fast['merges']} ({fast['tried']} windows tried)", fast, slow)


if __name__ == "__main__":
    main()
