"""Shared helpers for the benchmarks: run a function in a fresh process and read its peak memory.

Peak RSS is per process and only grows, so every variant runs in its own
subprocess; the reported memory is the peak minus the RSS right after the
model was loaded (what the algorithm itself added).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def run_variant(script: str, *args: str) -> dict:
    """Run ``script --variant ...`` in a subprocess; it prints one JSON line last."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_variant(args):
    """(model, calibration windows, model MB, RSS baseline MB) for one variant's process: ``args.model``,
    ``args.windows`` as NxS, ``args.threads``; the weights paged in before the baseline is taken."""
    import torch

    from depthprune import calibration_windows, load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    n, s = (int(x) for x in args.windows.split("x"))
    cal = calibration_windows(tok, num_windows=n, seq_len=s, seed=1234)
    with torch.no_grad():
        model(input_ids=cal.input_ids[:1, :8])
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return model, cal, model_mb, current_rss_mb()


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def print_table(rows: list[tuple], headers: tuple) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for row in (headers, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def print_engine_vs_slow(title: str, fast: dict, slow: dict) -> None:
    """The searches' benchmark table: the slow loop and depthprune's engine, time and peak memory side by side."""
    model_mb = fast["model_mb"]

    def peak(r: dict) -> str:
        return f"{(model_mb + r['extra_mb']) / model_mb:.2f}x"

    print(title)
    print_table(
        [("slow (deep copy + full forward)", f"{slow['seconds']:.1f}", "1.0x", f"{slow['extra_mb']:.0f}", peak(slow)),
         ("depthprune engine", f"{fast['seconds']:.1f}", f"{slow['seconds'] / fast['seconds']:.1f}x",
          f"{fast['extra_mb']:.0f}", peak(fast))],
        ("variant", "seconds", "speedup", "extra MB", "peak / model size"),
    )
