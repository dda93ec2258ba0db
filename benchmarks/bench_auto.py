"""How long `--method auto` takes, and what its fast search gives up: fast (the default) against --exact.

Each mode runs the job `depthprune run` runs (auto at --ratio, its candidates, fits and held-out ranking;
--recover none unless asked) in a fresh process, and reports wall time, the chosen plan, the chosen plan's
held-out KL (auto's own ranking score, on calibration windows no plan or fit saw) and KL / top-1 / PPL on the
evaluation text, side by side with the ratio to --exact.

``--model qwen2-0.5b-random`` builds (once, under --work) a checkpoint with Qwen2.5-0.5B's shapes (24 layers,
hidden 896, MLP 4864, 151,936-token vocabulary, tied embeddings) and random weights, for timing a 0.5B model
with a 150k vocabulary offline: its plans and numbers mean nothing, its times do.

    python benchmarks/bench_auto.py --model smollm2-135m --modes fast,exact
    python benchmarks/bench_auto.py --model qwen2-0.5b-random --modes fast --eval ppl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import run_variant  # noqa: E402

RANDOM_QWEN = "qwen2-0.5b-random"


def random_qwen(directory: Path) -> str:
    """A Qwen2.5-0.5B-shaped checkpoint with random weights and SmolLM2's tokenizer vocabulary padded to 151,936
    ids (timing only)."""
    target = directory / RANDOM_QWEN
    if (target / "config.json").is_file():
        return str(target)
    import torch
    import transformers as tf

    from depthprune.models.load import load_model, quiet_transformers

    config = tf.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048,
                            tie_word_embeddings=True)
    torch.manual_seed(0)
    with quiet_transformers():
        model = tf.AutoModelForCausalLM.from_config(config)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    load_model("smollm2-135m", progress=False).tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return str(target)


def variant(args) -> None:
    import torch

    from depthprune import DepthStage, Job, Target, build_options, load_model, run_job
    from depthprune.cli.options import evaluation

    torch.set_num_threads(args.threads)
    model = random_qwen(Path(args.work)) if args.model == RANDOM_QWEN else args.model
    options = build_options("auto", {"exact": args.variant == "exact", "recover": args.recover})
    job = Job([DepthStage("auto", Target(ratio=args.ratio), options)],
              evaluation=evaluation(args.eval, ppl_data=args.ppl_data, ppl_windows=args.ppl_windows),
              progress=False)
    loaded = load_model(model, progress=False)
    start = time.perf_counter()
    result = run_job(loaded, job)
    seconds = time.perf_counter() - start
    after = result.after.values() if result.after else {}
    depth = result.stages[0]
    print(json.dumps({"seconds": seconds, "chosen": result.plan.params["chosen"],
                      "plan": result.plan.summary(), "heldout_kl": result.plan.params["heldout_loss"],
                      "ranking_seconds": depth.get("ranking_seconds"),
                      "candidate_seconds": depth.get("candidate_seconds"), **after}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help=f"model source, or {RANDOM_QWEN}")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--modes", default="fast,exact", help="fast (the default search) and/or exact")
    parser.add_argument("--recover", default="none", choices=("none", "layers"))
    parser.add_argument("--eval", default="ppl,kl,top1")
    parser.add_argument("--ppl-data", default="default-heldout")
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="bench-auto-work", help="where the random model is built")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        variant(args)
        return
    passed = ["--model", args.model, "--ratio", str(args.ratio), "--recover", args.recover, "--eval", args.eval,
              "--ppl-data", args.ppl_data, "--ppl-windows", str(args.ppl_windows), "--threads", str(args.threads),
              "--work", args.work]
    results = {mode: run_variant(__file__, *passed, "--variant", mode) for mode in args.modes.split(",")}
    reference = results.get("exact")
    print(f"{args.model}, auto at {args.ratio:g}, {args.threads} threads, recover {args.recover}; held-out kl = "
          "auto's ranking score of its choice; the rest on the evaluation text")
    columns = ["mode", "seconds", "chosen", "held-out kl"] + [m for m in ("kl", "top1", "perplexity")
                                                               if m in next(iter(results.values()))]
    print("  ".join(f"{c:<16}" for c in columns) + ("  vs exact (time, held-out kl)" if reference else ""))
    for mode, r in results.items():
        cells = [mode, f"{r['seconds']:.0f}", r["chosen"], f"{r['heldout_kl']:.4f}"]
        cells += [f"{r[m]:.4f}" for m in columns[4:]]
        ratio = (f"  {r['seconds'] / reference['seconds']:.2f}x, {r['heldout_kl'] / reference['heldout_kl']:.3f}x"
                 if reference else "")
        print("  ".join(f"{c:<16}" for c in cells) + ratio)
        print(f"{'':<16}  {r['plan']}")


if __name__ == "__main__":
    main()
