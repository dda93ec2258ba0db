"""SLEB search: depthprune's loss engine vs the paper's straightforward loop.

slow = every round, for every remaining layer: deep-copy the model, remove the
layers chosen so far plus the candidate, run a full forward with the LM head
(tests/reference_search.py). depthprune = cached states entering each layer of
the current model, only the layers above the candidate run, the LM head a
chunk of tokens at a time, no copies. Both must choose the same layers; the
script asserts it and prints time and peak memory side by side.

    python benchmarks/bench_sleb.py [--model smollm2-135m] [--remove 3] [--objective nll] [--windows 8x128]
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
    from depthprune.engine.loss import LossEngine
    from depthprune.methods.sleb import sleb_search

    model, cal, model_mb, base_rss = load_variant(args)
    with Timer() as t:
        if args.variant == "depthprune":
            removed = sleb_search(LossEngine(model, cal, objective=args.objective), args.remove).remove
        else:
            from reference_search import slow_sleb

            removed = slow_sleb(model, cal.input_ids, cal.attention_mask, args.remove, args.objective,
                                len(model.model.layers))
    print(json.dumps({"seconds": t.seconds, "extra_mb": peak_rss_mb() - base_rss, "model_mb": model_mb,
                      "removed": removed}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--remove", type=int, default=3)
    ap.add_argument("--objective", default="nll", choices=["nll", "kl"])
    ap.add_argument("--windows", default="8x128")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", choices=["depthprune", "slow"])
    args = ap.parse_args()
    if args.variant:
        return variant(args)
    common = ["--model", args.model, "--remove", str(args.remove), "--objective", args.objective,
              "--windows", args.windows, "--threads", str(args.threads)]
    fast = run_variant(__file__, "--variant", "depthprune", *common)
    slow = run_variant(__file__, "--variant", "slow", *common)
    assert fast["removed"] == slow["removed"], (fast["removed"], slow["removed"])
    print_engine_vs_slow(f"SLEB search, {args.model}, remove {args.remove}, objective {args.objective}, "
                         f"{args.windows} windows, {args.threads} threads; same layers removed: {fast['removed']}",
                         fast, slow)


if __name__ == "__main__":
    main()
