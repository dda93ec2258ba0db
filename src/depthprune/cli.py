"""Command line: each command parses options and calls the Python API, nothing more."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="Make LLMs shallower: score layers, remove or merge them, save a plain transformers "
    "checkpoint, and measure what was lost.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Hub id, local directory, .gguf file, or alias "
                 "(smollm2-135m, gemma3-270m)."),
]
DtypeOpt = Annotated[Optional[str], typer.Option(help="float32 (CPU default), bfloat16 or float16 (GPU default).")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (accelerate device_map over all GPUs).")]
CalibOpt = Annotated[str, typer.Option("--calib", help="Calibration text: 'default' (shipped novel), "
                                       "bookcorpus, pg19, c4, wikitext2, or a .txt/.jsonl file.")]
SamplesOpt = Annotated[int, typer.Option("--calib-samples", help="Number of calibration windows.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per window (BOS included when the tokenizer adds one).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for sampling calibration windows.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


class UserError(Exception):
    """An error caused by input; printed without a traceback."""


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _load(model: str, dtype: str | None, device: str):
    from .models.load import load_model

    typer.echo(f"loading {model} ...", err=True)
    return load_model(model, dtype=dtype, device=device)


def _calib(calib: str, samples: int, seq_len: int, seed: int, sentences_file: Path | None = None):
    from .pipeline import CalibrationSpec

    return CalibrationSpec(calib, samples, seq_len, seed, sentences_file)


@app.command()
def score(
    model: ModelOpt = "smollm2-135m",
    metric: Annotated[str, typer.Option(help="bi (ShortGPT Block Influence) or angular (Gromov et al.).")] = "bi",
    out: Annotated[Optional[Path], typer.Option(help="Directory for scores.json and scores.png.")] = None,
    calib: CalibOpt = "default",
    calib_samples: SamplesOpt = 10,
    seq_len: SeqLenOpt = 128,
    seed: SeedOpt = 1234,
    batch_size: BatchOpt = 4,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """Score every layer's redundancy (low score = safe to remove) and save JSON + a bar chart."""
    from .analysis.stats import METRICS, layer_statistics
    from .io import check_output_dir, write_json
    from .report import plot_layer_scores

    if metric not in METRICS:
        _fail(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    if out is not None:
        check_output_dir(out, inputs=[model], overwrite=True)
    loaded = _load(model, dtype, device)
    windows = _calib(calib, calib_samples, seq_len, seed).windows(loaded.tokenizer)
    stats = layer_statistics(loaded.model, windows, batch_size=batch_size, progress=not quiet)
    values = stats.scores(metric)
    order = sorted(range(len(values)), key=lambda i: values[i])
    for i, v in enumerate(values):
        typer.echo(f"layer {i:3d}  {metric}={v:.5f}  rank={order.index(i) + 1}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "scores.json", {"model": model, "metric": metric, "scores": values,
                                          "tokens": stats.tokens, "calibration": stats.calibration})
        plot_layer_scores(values, out / "scores.png", metric=metric, title=f"{model}: {metric}")
        typer.echo(f"wrote {out / 'scores.json'} and {out / 'scores.png'}")


@app.command()
def prune(
    model: ModelOpt = "smollm2-135m",
    method: Annotated[str, typer.Option(help="shortgpt | angular | slm | laco (see `depthprune methods`).")] = "shortgpt",
    out: Annotated[Optional[Path], typer.Option(help="Output checkpoint directory (must not be the input).")] = None,
    ratio: Annotated[Optional[float], typer.Option(help="Fraction of layers to remove, in (0, 1).")] = None,
    remove_layers: Annotated[Optional[int], typer.Option(help="Number of layers to remove.")] = None,
    keep_layers: Annotated[Optional[int], typer.Option(help="Number of layers to keep.")] = None,
    block: Annotated[Optional[int], typer.Option(help="angular: size of the contiguous block to remove.")] = None,
    metric: Annotated[str, typer.Option(help="shortgpt: bi or angular score.")] = "bi",
    threshold: Annotated[Optional[float], typer.Option(
        help="slm/laco: similarity threshold T in (0, 1) (defaults: slm 0.72, laco 0.65). "
        "Give either T or a depth target; with a target, T is found by bisection.")] = None,
    operator: Annotated[Optional[str], typer.Option(
        help="slm/laco merge operator: reference (released code; slm default), rdsc (paper formula; "
        "laco default), average, drop.")] = None,
    final_window: Annotated[str, typer.Option(
        help="slm: a window still passing when the loop reaches layer 0 is 'commit'ted (default) "
        "or 'skip'ped (released code).")] = "commit",
    merge_layers: Annotated[int, typer.Option(help="laco: C, layers collapsed per merge.")] = 4,
    interval: Annotated[int, typer.Option(help="laco: I, step down after an accepted merge.")] = 2,
    lowest: Annotated[int, typer.Option(help="laco: lowest merge position L_low.")] = 1,
    highest: Annotated[Optional[int], typer.Option(help="laco: top of the layer range H (default L).")] = None,
    calib_sentences: Annotated[Optional[Path], typer.Option(
        help="Calibration = these sentences, one per line (LaCo's few-shot set), instead of windows.")] = None,
    then_width: Annotated[Optional[float], typer.Option(
        help="After depth pruning, remove this fraction of MLP channels in every layer (width stage).")] = None,
    then_width_heads: Annotated[float, typer.Option(
        help="Width stage: fraction of key/value groups (with their query heads) to remove.")] = 0.0,
    width_scorer: Annotated[str, typer.Option(help="Width stage scorer: taylor, wanda or magnitude.")] = "taylor",
    heal: Annotated[Optional[str], typer.Option(
        help="Heal with LoRA after pruning on this data (alpaca .json/.jsonl, .txt, or alpaca-cleaned).")] = None,
    heal_steps: Annotated[int, typer.Option(help="Healing: max optimizer steps (-1 = --heal-epochs).")] = -1,
    heal_epochs: Annotated[float, typer.Option(help="Healing: epochs when --heal-steps is -1.")] = 2.0,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    eval_: Annotated[Optional[str], typer.Option("--eval", help=(
        "Evaluate before and after, comma separated: ppl and/or lm-eval tasks (piqa = the offline "
        "piqa_local task when --piqa-dir or $DEPTHPRUNE_PIQA_DIR is set). Writes report.md/json."))] = None,
    eval_ppl: Annotated[bool, typer.Option("--eval-ppl/--no-eval-ppl", help="Same as --eval ppl.")] = False,
    eval_limit: Annotated[Optional[int], typer.Option(help="Zero-shot: use the first N items per task.")] = None,
    piqa_dir: Annotated[Optional[Path], typer.Option(help="PIQA release folder (valid.jsonl, valid-labels.lst).")] = None,
    ppl_data: Annotated[str, typer.Option(help="Perplexity text: default-heldout, wikitext2, ptb or a file.")] = "default-heldout",
    ppl_windows: Annotated[int, typer.Option(help="Maximum perplexity windows (0 = all).")] = 40,
    calib: CalibOpt = "default",
    calib_samples: SamplesOpt = 10,
    seq_len: SeqLenOpt = 128,
    seed: SeedOpt = 1234,
    batch_size: BatchOpt = 4,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """Plan with a method, remove/merge layers, and save a plain transformers checkpoint + plan JSON."""
    from .io import check_output_dir
    from .methods import METHODS, Target, check_threshold
    from .surgery.merge import check_operator
    from .pipeline import prune as run_prune

    if method not in METHODS:
        _fail(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if out is None:
        _fail("--out is required: the directory to write the pruned checkpoint to")
    target = Target(ratio, remove_layers, keep_layers).validate()
    check_output_dir(out, inputs=[model], overwrite=overwrite)
    if threshold is not None:
        check_threshold(threshold)
    if operator is not None:
        check_operator(operator)
    width = _width_spec(then_width, then_width_heads, width_scorer)
    healing = _heal_spec(heal, heal_steps, heal_epochs)
    wants_ppl, zeroshot = _eval_specs(eval_, piqa_dir, eval_limit)
    loaded = _load(model, dtype, device)
    ppl = _ppl_spec(eval_ppl or wants_ppl, ppl_data, seq_len, ppl_windows)
    result = run_prune(
        loaded, method, target,
        calibration=_calib(calib, calib_samples, seq_len, seed, calib_sentences), out=out,
        overwrite=overwrite, ppl=ppl, zeroshot=zeroshot, progress=not quiet, block=block, metric=metric, batch_size=batch_size,
        threshold=threshold, operator=operator, final_window=final_window, merge_layers=merge_layers,
        interval=interval, lowest=lowest, highest=highest, width=width, heal=healing,
    )
    _print_result(result)


def _eval_specs(names: str | None, piqa_dir: Path | None, limit: int | None):
    """Split ``--eval`` into perplexity and lm-eval tasks; check the tasks before any model loads."""
    from .evaluate.zeroshot import PIQA_LOCAL_TASK, resolve_piqa_dir
    from .pipeline import ZeroShotSpec

    wanted = [n.strip() for n in (names or "").split(",") if n.strip()]
    tasks = [n for n in wanted if n != "ppl"]
    if "piqa" in tasks and resolve_piqa_dir(str(piqa_dir) if piqa_dir else None) is not None:
        tasks[tasks.index("piqa")] = PIQA_LOCAL_TASK
    zeroshot = None
    if tasks:
        zeroshot = ZeroShotSpec(tasks, limit, piqa_dir=str(piqa_dir) if piqa_dir else None)
        zeroshot.check()
    return "ppl" in wanted, zeroshot


def _ppl_spec(enabled: bool, data: str, seq_len: int, windows: int):
    """Perplexity settings from the shared --ppl-* options; ``windows=0`` means every window."""
    from .pipeline import PerplexitySpec

    return PerplexitySpec(data, seq_len, windows or None) if enabled else None


def _width_spec(ratio_mlp: float | None, ratio_heads: float, scorer: str):
    from .analysis.importance import SCORERS
    from .pipeline import WidthSpec

    if ratio_mlp is None and not ratio_heads:
        return None
    if scorer not in SCORERS:
        _fail(f"unknown width scorer {scorer!r}: use one of {', '.join(SCORERS)}")
    for name, value in (("--then-width", ratio_mlp or 0.0), ("--then-width-heads", ratio_heads)):
        if not 0.0 <= value < 1.0:
            _fail(f"{name} must be in [0, 1), got {value}")
    return WidthSpec(ratio_mlp or 0.0, ratio_heads, scorer)


def _heal_spec(data: str | None, steps: int, epochs: float):
    if data is None:
        return None
    from .heal import HealConfig, data_paths
    from .pipeline import HealSpec

    for path in data_paths(data) or []:
        if not path.is_file():
            _fail(f"healing data file not found: {path}")
    config = HealConfig(max_steps=steps, epochs=epochs)
    config.validate()
    return HealSpec(data, config)


def _print_result(result) -> None:
    typer.echo(result.plan.summary())
    if result.ppl_before and result.ppl_after:
        typer.echo(
            f"perplexity ({result.ppl_after.source}, {result.ppl_after.windows} x {result.ppl_after.seq_len} tokens): "
            f"{result.ppl_before.perplexity:.2f} dense -> {result.ppl_after.perplexity:.2f} pruned"
        )
    for task, value in (result.tasks_after or {}).items():
        typer.echo(f"{task}: {result.tasks_before[task]:.4f} dense -> {value:.4f} pruned")
    if result.out:
        typer.echo(f"saved to {result.out} (report.md, report.json, depthprune_plan.json)")


@app.command()
def run(
    model: ModelOpt = "smollm2-135m",
    method: Annotated[str, typer.Option(help="Pruning method.")] = "shortgpt",
    ratio: Annotated[float, typer.Option(help="Fraction of layers to remove.")] = 0.25,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/smollm2-135m-shortgpt-0.25"),
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """The default job: ShortGPT removes 25% of SmolLM2-135M's layers, offline, with perplexity before/after."""
    from .io import check_output_dir
    from .methods import Target
    from .pipeline import PerplexitySpec
    from .pipeline import prune as run_prune

    target = Target(ratio=ratio).validate()
    check_output_dir(out, inputs=[model], overwrite=overwrite)
    loaded = _load(model, None, "cpu")
    result = run_prune(loaded, method, target, out=out, overwrite=overwrite,
                       ppl=PerplexitySpec(), progress=not quiet)
    _print_result(result)


@app.command("eval-ppl")
def eval_ppl_cmd(
    model: ModelOpt = "smollm2-135m",
    dataset: Annotated[str, typer.Option(help="wikitext2, ptb, default-heldout, or a text file.")] = "wikitext2",
    seq_len: SeqLenOpt = 128,
    batch_size: BatchOpt = 8,
    max_windows: Annotated[int, typer.Option(help="Use at most this many windows (0 = all).")] = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON.")] = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """Perplexity on non-overlapping windows (BOS as the tokenizer adds it)."""
    from .evaluate.perplexity import perplexity
    from .io import write_json

    loaded = _load(model, dtype, device)
    res = perplexity(loaded.model, loaded.tokenizer, dataset, seq_len=seq_len, batch_size=batch_size,
                     max_windows=max_windows or None, progress=not quiet)
    typer.echo(f"perplexity {res.perplexity:.3f}  ({res.windows} windows x {res.seq_len} tokens, "
               f"{res.tokens} scored tokens, {res.source})")
    if json_out:
        write_json(json_out, {"model": model, **res.to_dict()})


@app.command()
def analyze(
    model: ModelOpt = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="Directory for cka.json, cka.npy and cka.png.")] = Path("analysis"),
    kernel: Annotated[str, typer.Option(help="CKA kernel: linear or rbf (median-heuristic bandwidth).")] = "linear",
    plan: Annotated[Optional[Path], typer.Option(
        help="A depthprune_plan.json (or a pruned checkpoint directory) whose merged/removed windows "
        "are outlined on the heatmap.")] = None,
    calib: CalibOpt = "default",
    calib_samples: SamplesOpt = 10,
    seq_len: SeqLenOpt = 128,
    seed: SeedOpt = 1234,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per CKA minibatch.")] = 2,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """Layer x layer CKA of layer outputs (SLM's "patches" analysis): JSON, NPY and a heatmap."""
    import numpy as np

    from .analysis.layer_cka import layer_similarity
    from .analysis.cka import plot_cka_heatmap
    from .io import check_output_dir, write_json
    from .plan import Plan

    if kernel not in ("linear", "rbf"):
        _fail(f"unknown kernel {kernel!r}: use linear or rbf")
    check_output_dir(out, inputs=[model], overwrite=True)
    windows = None
    if plan is not None:
        loaded_plan = Plan.load(plan)
        windows = [(m.low, m.high) for m in loaded_plan.merges] + [(i, i) for i in loaded_plan.remove]
    loaded = _load(model, dtype, device)
    cal = _calib(calib, calib_samples, seq_len, seed).windows(loaded.tokenizer)
    result = layer_similarity(loaded.model, cal, kernel=kernel, batch_size=batch_size, progress=not quiet)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cka.json", {"model": model, **result.to_dict()})
    np.save(out / "cka.npy", result.matrix)
    plot_cka_heatmap(result.matrix, out / "cka.png", title=f"{model}: {kernel} CKA of layer outputs",
                     merged_windows=windows)
    typer.echo(f"wrote {out / 'cka.json'}, {out / 'cka.npy'} and {out / 'cka.png'}")


@app.command()
def methods() -> None:
    """List the pruning methods."""
    from .methods import METHODS

    for info in METHODS.values():
        typer.echo(f"{info.name:10s} {info.summary}")


def _register_commands() -> None:
    """Commands defined in sibling modules register themselves on ``app`` when imported."""
    from . import cli_eval, cli_heal  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; errors caused by input print one line (no traceback) and exit with 2."""
    from .data.calibration import CalibrationError
    from .evaluate.zeroshot import HubTaskUnavailableError
    from .io import OutputError
    from .models.arch import UnsupportedArchitectureError
    from .plan import PlanError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    _register_commands()
    try:
        app(args=argv, prog_name="depthprune")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except (CalibrationError, OutputError, PlanError, UnsupportedArchitectureError, UserError,
            HubTaskUnavailableError, FileNotFoundError, ModuleNotFoundError, ValueError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        return 2
    return 0


if __name__ == "__main__":
    from depthprune.cli import main as package_main  # the module's own name, so sibling commands register

    sys.exit(package_main())
