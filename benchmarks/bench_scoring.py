"""Layer scoring: depthprune's streamed decoder-only pass vs the naive public-code approach.

naive = full forward *with the LM head* and ``output_hidden_states=True`` (all
L+1 states kept), then per-token cosine as the diagonal of a (tokens x tokens)
matrix. Both must give the same Block Influence; the script asserts it.

    python benchmarks/bench_scoring.py [--model smollm2-135m] [--configs 10x128,32x256]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import Timer, current_rss_mb, peak_rss_mb, print_table, run_variant  # noqa: E402


def naive_block_influence(model, ids, mask):
    import torch
    import torch.nn.functional as F

    from depthprune.models.arch import get_path, spec_for

    captured = {}
    norm = get_path(model, spec_for(model).final_norm)
    handle = norm.register_forward_pre_hook(lambda m, a: captured.setdefault("h_L", a[0]))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    handle.remove()
    states = list(out.hidden_states[:-1]) + [captured["h_L"]]
    flat_mask = mask.reshape(-1).bool()
    bi = []
    for a, b in zip(states[:-1], states[1:]):
        a = F.normalize(a.reshape(-1, a.shape[-1]).float(), dim=-1)
        b = F.normalize(b.reshape(-1, b.shape[-1]).float(), dim=-1)
        full = a @ b.T
        bi.append(float(1 - full.diagonal()[flat_mask].mean()))
    return bi


def variant(args) -> None:
    import torch

    from depthprune import calibration_windows, load_model, score_layers

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    n, s = (int(x) for x in args.config.split("x"))
    cal = calibration_windows(tok, num_windows=n, seq_len=s)
    with torch.no_grad():
        model(input_ids=cal.input_ids[:1, :8])  # page in the weights: they are mmapped at load time
    base_rss = current_rss_mb()
    with Timer() as t:
        if args.variant == "depthprune":
            bi = score_layers(model, cal, batch_size=n, progress=False).bi
        else:
            bi = naive_block_influence(model, cal.input_ids, cal.attention_mask)
    print(json.dumps({"seconds": t.seconds, "extra_mb": peak_rss_mb() - base_rss, "bi": bi}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--configs", default="10x128,32x256", help="windows x tokens, comma separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", choices=["depthprune", "naive"])
    ap.add_argument("--config")
    args = ap.parse_args()
    if args.variant:
        return variant(args)
    rows = []
    for config in args.configs.split(","):
        common = ["--model", args.model, "--config", config, "--threads", str(args.threads)]
        fast = run_variant(__file__, "--variant", "depthprune", *common)
        naive = run_variant(__file__, "--variant", "naive", *common)
        worst = max(abs(a - b) for a, b in zip(fast["bi"], naive["bi"]))
        assert worst < 1e-4, f"Block Influence differs by {worst}"
        rows.append((config, f"{naive['seconds']:.2f}", f"{fast['seconds']:.2f}",
                     f"{naive['seconds'] / fast['seconds']:.2f}x", f"{naive['extra_mb']:.0f}",
                     f"{fast['extra_mb']:.0f}", f"{naive['extra_mb'] / max(fast['extra_mb'], 1):.1f}x",
                     f"{worst:.1e}"))
    print(f"layer scoring on {args.model} ({args.threads} threads); memory = peak RSS above the loaded model")
    print_table(rows, ("windows", "naive s", "depthprune s", "speedup", "naive MB", "depthprune MB",
                       "memory ratio", "max |dBI|"))


if __name__ == "__main__":
    main()
