"""Which text should the recovery fit on? One plan, several fit texts, judged on every held-out domain at once.

Each row is one ``depthprune prune`` command (the same plan: ``--method`` at ``--ratio``), run as a user runs
it, with ``--eval ppl,kl,top1,gen`` on the default held-out texts (fiction, encyclopedic, code): the plan
without recovery, with the linear maps, and with ``--compensate layers`` fitted on each ``--calib`` source.
Prints KL per domain, the mean, the ratio to no recovery, token F1 of greedy continuations and the fit's
time, and writes OUT/results.json.

    python benchmarks/bench_recovery.py --model smollm2-135m --calibs default,general,self,general+self --out rec/
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DOMAINS = ("fiction", "encyclopedic", "code")


def run_row(args, label: str, compensate: str, calib: str, out: Path) -> dict:
    """One prune command; its report's metrics and timings."""
    cmd = [sys.executable, "-m", "depthprune", "prune", "--model", args.model, "--method", args.method,
           "--ratio", str(args.ratio), "--compensate", compensate, "--calib", calib, "--eval", args.eval,
           "--out", str(out / label), "--overwrite", "-q"]
    if args.piqa_dir and label in args.piqa_rows.split(","):
        cmd[cmd.index("--eval") + 1] += ",piqa"
        cmd += ["--piqa-dir", args.piqa_dir]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"label": label, "error": proc.stderr.strip().splitlines()[-1:], "command": " ".join(cmd[2:])}
    report = json.loads((out / label / "report.json").read_text())
    fit = [r for s in report.get("stages", []) for r in (s.get("compensation") or []) if "layers" in r]
    return {"label": label, "command": "depthprune " + " ".join(cmd[3:]), "seconds": time.perf_counter() - start,
            "metrics": {k: v["after"] for k, v in report["metrics"].items()},
            "dense": {k: v["before"] for k, v in report["metrics"].items()},
            "fit": fit[0]["layers"] if fit else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="angular")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--calibs", default="default,general,self,general+self",
                        help="fit texts for --compensate layers (comma separated)")
    parser.add_argument("--eval", default="ppl,kl,top1,gen")
    parser.add_argument("--piqa-dir", default=None, help="add PIQA (all 1,838 items) to the --piqa-rows rows")
    parser.add_argument("--piqa-rows", default="none,layers:general")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_row(args, "none", "none", "general", args.out),
            run_row(args, "linear", "linear", "general", args.out)]
    rows += [run_row(args, f"layers:{c}", "layers", c, args.out) for c in args.calibs.split(",") if c]
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    base = rows[0].get("metrics", {})
    print(f"{args.model}, {args.method} {args.ratio:g}; KL(dense || model) per held-out domain "
          "(x = ratio to no recovery), top-1, perplexity and greedy token F1 means")
    print("| recovery | " + " | ".join(f"KL {d}" for d in DOMAINS) + " | KL mean | top-1 | PPL | gen F1 | "
          "piqa | time s |")
    print("|---" * (len(DOMAINS) + 7) + "|")
    for row in rows:
        if "error" in row:
            print(f"| {row['label']} | error: {row['error']} |")
            continue
        m = row["metrics"]
        cells = [f"{m[f'kl/{d}']:.3f} (x{m[f'kl/{d}'] / base[f'kl/{d}']:.2f})" for d in DOMAINS]
        piqa = m.get("piqa_local")
        print(f"| {row['label']} | " + " | ".join(cells) + f" | {m['kl']:.3f} | {m['top1']:.3f} | "
              f"{m['perplexity']:.2f} | {m.get('gen_f1', float('nan')):.3f} | "
              f"{'' if piqa is None else f'{piqa:.3f}'} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
