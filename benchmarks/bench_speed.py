"""Inference speed of ShortGPT-pruned models against the dense one, and against the ideal L/(L-k).

Depth pruning only shortens the decoder stack; the embeddings and the LM head
(for SmolLM2-135M a 49152 x 576 matmul per token, about a fifth of the
per-token compute) stay, so the measured speedup must fall short of
L/(L-k). The "compute ideal" column is the bound that includes them: matmul
parameters touched per token, dense over pruned.

All models are held in memory and timed round-robin (one prefill + decode
per model per round), so a change in machine load hits every model alike;
figures are medians over rounds (see depthprune.evaluate.speed for what is
timed).

    python benchmarks/bench_speed.py [--model smollm2-135m] [--ratios 0.25,0.35] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import print_table  # noqa: E402


def matmul_params(model) -> int:
    """Weights multiplied per generated token: the decoder layers plus the LM head (not the embedding lookup)."""
    from depthprune.models.arch import get_layers

    layers = sum(p.numel() for p in get_layers(model).parameters())
    return layers + model.get_output_embeddings().weight.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", default="0.25,0.35", help="fractions of layers ShortGPT removes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7, help="timed round-robin rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    import torch

    from depthprune import apply_plan, calibration_windows, load_model
    from depthprune.evaluate.speed import measure_speed
    from depthprune.methods import Target, make_plan

    torch.set_num_threads(args.threads)
    dense = load_model(args.model, device=args.device)
    models = {"dense": dense.model}
    windows = calibration_windows(dense.tokenizer)
    for ratio in (float(r) for r in args.ratios.split(",")):
        pruned = load_model(dense.path, device=args.device)
        plan = make_plan("shortgpt", pruned.model, windows, Target(ratio=ratio), progress=False)
        apply_plan(pruned.model, plan)
        models[f"shortgpt {ratio:g}"] = pruned.model

    workload = dict(prompt_len=args.prompt_len, gen_len=args.gen_len, batch_size=args.batch_size)
    for _ in range(args.warmup):
        for model in models.values():
            measure_speed(model, dense.tokenizer, warmup=0, repeats=1, **workload)
    runs: dict[str, list] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            runs[name].append(measure_speed(model, dense.tokenizer, warmup=0, repeats=1, **workload))

    def medians(name: str) -> tuple[float, float]:
        return (statistics.median(r.prefill_latency_s for r in runs[name]),
                statistics.median(r.decode_latency_s for r in runs[name]))

    base_prefill, base_decode = medians("dense")
    base_layers, base_matmul = runs["dense"][0].num_layers, matmul_params(models["dense"])
    rows = []
    for name, model in models.items():
        prefill, decode = medians(name)
        layers = runs[name][0].num_layers
        ideal = base_layers / layers
        compute_ideal = base_matmul / matmul_params(model)
        decode_speedup = base_decode / decode
        rows.append((name, layers, f"{runs[name][0].num_params / 1e6:.1f}M", f"{prefill * 1e3:.1f}",
                     f"{args.batch_size * args.gen_len / decode:.1f}", f"{base_prefill / prefill:.3f}x",
                     f"{decode_speedup:.3f}x", f"{ideal:.3f}x", f"{decode_speedup / ideal:.1%}",
                     f"{compute_ideal:.3f}x", f"{decode_speedup / compute_ideal:.1%}"))
    print(f"{args.model} on {args.device}, torch threads {args.threads}, batch {args.batch_size}, "
          f"prompt {args.prompt_len}, {args.gen_len} generated tokens, median of {args.rounds} round-robin rounds")
    print_table(rows, ("model", "layers", "params", "prefill ms", "decode tok/s", "prefill speedup",
                       "decode speedup", "ideal L/(L-k)", "decode/ideal", "compute ideal", "decode/compute"))


if __name__ == "__main__":
    main()
