"""Layer streaming vs loading the whole model: peak memory against model size.

Builds random-weight Llama-family checkpoints (hidden 2048, MLP 5632, GQA 16/4
heads, 32k vocabulary, float32: 172 MB per layer, 250 MB of embeddings and as
much again for the untied LM head) of several depths, written tensor by tensor
so building them needs no memory either. The benchmark sets itself a memory
cap of a quarter of the largest model's weights, gives it to streaming as
``--max-memory`` (states that would not fit beside one layer and the
embeddings spill to disk) and checks the measured peak against it. Each
variant runs in its own process:

* ``stream score``: streamed BI/angular statistics (``depthprune score --stream``);
* ``stream prune``: the whole streamed prune job (scoring, plan, surgery, atomic save);
* ``in-memory prune``: ``load_model`` + ShortGPT + ``save`` at the smallest depth only (its weights alone exceed
  the cap; it runs to show what it needs).

Memory is peak RSS (``getrusage``) minus the RSS after imports and the empty skeleton, i.e. what the work
added. The cap is measured, not enforced by the kernel: ``RLIMIT_DATA``/``RLIMIT_AS`` count the address space
safetensors maps for a whole shard, not the pages it touches. The target: streaming's peak under
1.5 x (one layer + calibration states + embeddings), whatever the depth.

    python benchmarks/bench_streaming.py [--depths 4,8,16] [--windows 8x128] [--threads 2] [--dir /tmp/...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _measure import Timer, current_rss_mb, peak_rss_mb, print_table, run_variant  # noqa: E402

HIDDEN, MLP, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
MB = 2**20


def config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=layers,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_checkpoint(directory: Path, layers: int) -> Path:
    """A random-weight checkpoint written one tensor at a time (1 GB shards with an index)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from depthprune.backend.hf import saved_names
    from depthprune.surgery.safetensors_out import Entry, plan_shards, write_safetensors
    from depthprune.surgery.streamed import INDEX_FILE
    from tiny import byte_tokenizer

    if (directory / "config.json").is_file():
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config(layers))
    state = model.state_dict()
    entries = [Entry(saved, torch.float32, tuple(state[name].shape)) for name, saved in saved_names(model).items()]
    generator = torch.Generator().manual_seed(0)

    def produce(entry: Entry) -> torch.Tensor:
        if len(entry.shape) == 1:
            return torch.ones(entry.shape)
        return torch.empty(entry.shape).normal_(0.0, 0.02, generator=generator)

    shards = plan_shards(entries, 2**30)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(tmp / name, shard, produce, {"format": "pt"})
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
             "weight_map": {e.name: name for name, shard in zip(names, shards) for e in shard}}
    (tmp / INDEX_FILE).write_text(json.dumps(index))
    model.config.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def variant(args) -> None:
    import torch

    from depthprune import CalibrationSpec, DepthStage, Job, Target, run_job, score_layers
    from depthprune.backend import load_streamed
    from depthprune.data.calibration import sample_windows

    torch.set_num_threads(args.threads)
    path = str(Path(args.dir) / f"llama-{args.layers}")
    n, s = (int(x) for x in args.windows.split("x"))
    cap = int(args.cap_mb * MB) or None
    spilled = []
    sm = load_streamed(path, progress=False, max_memory=cap, report=spilled.append)
    cal = sample_windows(sm.tokenizer, num_windows=n, seq_len=s, seed=1234)
    plan = sm.memory_plan(n, s)
    sizes = {"layer_mb": plan.layer / MB, "embeddings_mb": plan.outside / MB, "states_mb": plan.states / MB,
             "weights_mb": sm.checkpoint.nbytes(dtype=torch.float32) / MB}
    base = current_rss_mb()
    out = Path(tempfile.mkdtemp(prefix="bench-streaming-", dir=args.dir))
    try:
        with Timer() as t:
            if args.variant == "stream-score":
                score_layers(sm, cal, batch_size=8, progress=False)
            elif args.variant == "stream-prune":
                job = Job([DepthStage("shortgpt", Target(ratio=0.25))], CalibrationSpec(num_windows=n, seq_len=s),
                          progress=False)
                run_job(sm, job, out=out / "pruned")
            else:
                from depthprune import apply_plan, load_model, make_plan, save

                model, tok = load_model(path, progress=False)
                apply_plan(model, make_plan("shortgpt", model, cal, Target(ratio=0.25), progress=False))
                save(model, tok, out / "pruned")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({**sizes, "seconds": t.seconds, "extra_mb": peak_rss_mb() - base, "base_mb": base,
                      "spilled": any("spilled" in m for m in spilled)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="4,8,16")
    ap.add_argument("--windows", default="8x128")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "depthprune-bench-streaming"))
    ap.add_argument("--keep", action="store_true", help="Keep the built checkpoints for the next run.")
    ap.add_argument("--variant", choices=["stream-score", "stream-prune", "memory-prune"])
    ap.add_argument("--layers", type=int)
    ap.add_argument("--cap-mb", type=float, default=0.0)
    args = ap.parse_args()
    if args.variant:
        return variant(args)
    depths = sorted(int(d) for d in args.depths.split(","))
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    for layers in depths:
        with Timer() as t:
            build_checkpoint(Path(args.dir) / f"llama-{layers}", layers)
        print(f"built llama-{layers} in {t.seconds:.0f} s", file=sys.stderr)
    common = ["--windows", args.windows, "--threads", str(args.threads), "--dir", args.dir]
    runs = {}
    try:
        weights_max = max(_weights_mb(args.dir, d) for d in depths)
        cap_mb = weights_max / 4
        rows = []
        for layers in depths:
            for name in ("stream-score", "stream-prune"):
                r = run_variant(__file__, "--variant", name, "--layers", str(layers), "--cap-mb", f"{cap_mb:.0f}",
                                *common)
                runs[(name, layers)] = r
                rows.append(_row(name.replace("-", " "), layers, r, cap_mb))
        r = run_variant(__file__, "--variant", "memory-prune", "--layers", str(depths[0]), *common)
        rows.append(_row("in-memory prune", depths[0], r, cap_mb))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    first = next(iter(runs.values()))
    print(f"random Llama checkpoints, float32, {first['layer_mb']:.0f} MB per layer, {first['embeddings_mb']:.0f} MB "
          f"embeddings, calibration {args.windows} ({first['states_mb']:.0f} MB of states), {args.threads} threads; "
          f"cap {cap_mb:.0f} MB = 1/4 of the largest model's weights")
    print_table(rows, ("variant", "layers", "weights MB", "peak MB (above base)", "target MB", "peak / target",
                       "seconds", "under cap"))


def _weights_mb(directory: str, layers: int) -> float:
    from depthprune.backend.checkpoint import Checkpoint

    return Checkpoint(Path(directory) / f"llama-{layers}").nbytes() / MB


def _row(name: str, layers: int, r: dict, cap_mb: float) -> tuple:
    target = 1.5 * (r["layer_mb"] + r["embeddings_mb"] + r["states_mb"])
    under = "yes" if r["extra_mb"] <= cap_mb else "no"
    return (name, layers, f"{r['weights_mb']:.0f}", f"{r['extra_mb']:.0f}", f"{target:.0f}",
            f"{r['extra_mb'] / target:.2f}", f"{r['seconds']:.0f}", under)


if __name__ == "__main__":
    main()
