"""Depth commands: ``methods``, ``score``, ``prune``, ``run`` and ``analyze``.

Each command checks its input, builds API objects and calls the API; nothing
here computes. Method options are flags generated from each method's options
dataclass (``--threshold 0.7`` for slm), parsed from the command's extra
arguments, so a flag the chosen method does not take is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand

from ..heal.config import HealConfig
from .app import app
from .groups import CalibrationGroup, CompensationGroup, EvaluationGroup, ModelGroup, PushGroup, StreamingGroup
from .options import (
    SEED,
    SEQ_LEN,
    BatchOpt,
    OutOpt,
    OverwriteOpt,
    SettingFlags,
    check_model,
    fit_option_rules,
    refuse_ignored,
    require_out,
    uses,
)
from .streaming import finish, open_backend

METHOD_FLAGS = {"allow_extra_args": True, "ignore_unknown_options": True}
HEAL_SETTINGS = SettingFlags(HealConfig, into="heal_settings", prefix="heal-", help_prefix="Healing: ",
                             names=("max_steps", "max_tokens", "epochs", "train_layers", "distill"))
"""The healing settings ``prune --heal`` offers, as ``--heal-max-steps`` and so on."""


class MethodOptionsHelp(TyperCommand):
    """Appends every registered method's options to ``--help`` (built when help is shown, not at import)."""

    def format_epilog(self, ctx, formatter) -> None:
        from ..methods import describe_methods

        formatter.write_paragraph()
        formatter.write("Method options (flags after the command's own; see `depthprune methods`):\n\n")
        for line in describe_methods().splitlines():
            formatter.write(f"  {line}\n")


def method_flags(ctx: typer.Context, methods: list[str], command: str) -> dict[str, dict]:
    from ..methods import parse_flags

    return parse_flags(list(ctx.args), methods, command=command)


def check_batch(batch_size: int) -> int:
    from ..errors import InputError

    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    return batch_size


@app.command("methods")
def methods_cmd() -> None:
    """List the pruning methods with their options, defaults and help."""
    from ..methods import describe_methods

    typer.echo(describe_methods())


@app.command("fits")
def fits_cmd() -> None:
    """List the compensation fits (--compensate, bench --compensate, auto --fits) with the settings each reads."""
    from ..compensate.registry import describe_fits

    typer.echo(describe_fits())


@app.command()
@uses()
def score(
    metric: Annotated[str, typer.Option(help="bi (ShortGPT Block Influence) or angular (Gromov et al.).")] = "bi",
    out: Annotated[Optional[str], typer.Option(help="Directory for scores.json and scores.png.")] = None,
    batch_size: BatchOpt = 8,
    *,
    model: ModelGroup,
    calibration: CalibrationGroup,
    streaming: StreamingGroup,
) -> None:
    """Score every layer's redundancy (low score = safe to remove) and save JSON + a bar chart."""
    from ..analysis.stats import METRICS, layer_statistics
    from ..errors import InputError
    from ..io import check_output_dir, prepare_dir, write_json
    from ..report import plot_layer_scores

    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    check_batch(batch_size)
    spec = calibration.spec().check()
    if out is not None:
        out = check_output_dir(out, inputs=[model.model], kind="scores")
    model.check(("--seq-len", calibration.seq_len))
    backend = open_backend(model, streaming)
    stats = layer_statistics(backend, spec.windows(backend.tokenizer), batch_size=batch_size, progress=not model.quiet)
    values = stats.scores(metric)
    order = sorted(range(len(values)), key=lambda i: values[i])
    for i, v in enumerate(values):
        typer.echo(f"layer {i:3d}  {metric}={v:.5f}  rank={order.index(i) + 1}")
    if out is not None:
        prepare_dir(out, "scores")
        write_json(out / "scores.json", {"model": model.model, "metric": metric, "scores": values,
                                          "tokens": stats.tokens, "calibration": stats.calibration})
        plot_layer_scores(values, out / "scores.png", metric=metric, title=f"{model.model}: {metric}")
        typer.echo(f"wrote {out / 'scores.json'} and {out / 'scores.png'}")


@app.command(context_settings=METHOD_FLAGS, cls=MethodOptionsHelp)
@uses(HEAL_SETTINGS)
def prune(
    ctx: typer.Context,
    method: Annotated[str, typer.Option(help="Pruning method (see `depthprune methods`).")] = "shortgpt",
    out: OutOpt = None,
    ratio: Annotated[Optional[float], typer.Option(help="Fraction of layers to remove, in (0, 1).")] = None,
    remove_layers: Annotated[Optional[int], typer.Option(help="Number of layers to remove.")] = None,
    keep_layers: Annotated[Optional[int], typer.Option(help="Number of layers to keep.")] = None,
    calib_sentences: Annotated[Optional[Path], typer.Option(
        help="Calibration = these sentences, one per line (LaCo's few-shot set), instead of windows.")] = None,
    then_width: Annotated[Optional[float], typer.Option(
        help="After depth pruning, remove this fraction of MLP channels in every layer (width stage).")] = None,
    then_width_heads: Annotated[float, typer.Option(
        help="Width stage: fraction of key/value groups (with their query heads) to remove.")] = 0.0,
    width_scorer: Annotated[str, typer.Option(help="Width stage scorer: taylor, wanda or magnitude.")] = "taylor",
    heal: Annotated[Optional[str], typer.Option(
        help="Heal after pruning on this data (alpaca .json/.jsonl, .txt, or alpaca-cleaned).")] = None,
    heal_settings: dict[str, Any] = None,
    overwrite: OverwriteOpt = False,
    batch_size: BatchOpt = 8,
    *,
    model: ModelGroup,
    calibration: CalibrationGroup,
    compensation: CompensationGroup,
    evaluation: EvaluationGroup,
    streaming: StreamingGroup,
    push: PushGroup,
) -> None:
    """Plan with a method, remove/merge layers (then optionally compensate, width-prune and heal), save a plain
    transformers checkpoint with its plan and report."""
    from ..job import DepthStage, HealStage, Job, WidthStage
    from ..methods import Target, build_options, get_method

    get_method(method)
    options = build_options(method, method_flags(ctx, [method], "prune")[method])
    width = then_width is not None or bool(then_width_heads)
    refuse_ignored(*fit_option_rules([compensation.compensate]),
                   ("width_scorer", width, "needs a width stage (--then-width or --then-width-heads)"),
                   *[(HEAL_SETTINGS.parameter(info), heal is not None, "needs --heal DATA")
                     for info in HEAL_SETTINGS.infos()],
                   ("calib_samples", calib_sentences is None,
                    "is not used with --calib-sentences (its file gives one sample per line)"))
    stages: list = [DepthStage(method, Target(ratio, remove_layers, keep_layers), options, compensation.spec())]
    if width:
        stages.append(WidthStage(then_width or 0.0, then_width_heads, width_scorer,
                                 flags=("--then-width", "--then-width-heads")))
    if heal is not None:
        stages.append(HealStage(heal, HealConfig(**heal_settings, progress=not model.quiet),
                                option_prefix="--heal-"))
    job = Job(stages, calibration.spec(calib_sentences),
              evaluation.spec(model=model.model, batch_size=batch_size, seq_len=calibration.seq_len,
                              seed=calibration.seed),
              batch_size=batch_size, progress=not model.quiet).check()
    finish(job, model, streaming, push, check_out(require_out(out), model.model, overwrite, job), overwrite)


def check_out(out: str, model: str, overwrite: bool, job) -> Path:
    """The job's output directory and model source, checked before the model loads; for a model on disk also
    the job against its config (depth targets, layer ranges, widths, compensation support)."""
    from types import SimpleNamespace

    from ..compensate import check_supported
    from ..io import check_output_dir
    from ..models.arch import spec_for

    out = check_output_dir(out, inputs=[model], overwrite=overwrite)
    config = check_model(model, *job.window_lengths())
    if config is not None:
        job.check(config)
        if any(getattr(stage, "compensation", None) for stage in job.stages):
            check_supported(spec_for(SimpleNamespace(**config)))
    return out


RUN_CANDIDATES = "shortgpt,angular"
"""The demo's candidates, the two one-pass searches: SLM's merges break SmolLM2 at 25% (KL 5.9, README) and its
search was 60% of the demo's time; SLEB's seven rounds cost about two minutes here and its plan lost to angular's
with the linear map on WikiText (KL 0.896 vs 0.807, README)."""
RUN_RECOVER_STEPS = 30
"""Steps of the demo's recovery: the held-out KL of its 60-step fit was 0.738 -> 0.562 at step 30 and 0.543 at step
60 (2026-12-06), for half the fit's time; 30 keeps `depthprune run` under six minutes on a 2-core CPU."""


@app.command()
@uses()
def run(
    method: Annotated[str, typer.Option(help="Pruning method (auto: the best of several, see `methods`).")] = "auto",
    ratio: Annotated[float, typer.Option(help="Fraction of layers to remove.")] = 0.25,
    recover: Annotated[str, typer.Option(
        help="With --method auto, after choosing: layers (retrain the kept layer at every gap of the chosen plan "
        "on the dense model's next-token distributions) or none.")] = "layers",
    out: Annotated[str, typer.Option(help="Output directory.")] = "runs/smollm2-135m-auto-0.25",
    overwrite: OverwriteOpt = False,
    *,
    model: ModelGroup,
    evaluation: EvaluationGroup = EvaluationGroup(eval_="ppl,kl,top1"),
    streaming: StreamingGroup,
    push: PushGroup,
) -> None:
    """The default job: the best 25%-shallower SmolLM2-135M depthprune can make (--method auto over ShortGPT,
    angular and SLEB plans, each with and without a linear map, calibrated on the general mix; then the kept
    layers at the gaps retrained on the dense model's distributions), offline, with perplexity, KL and top-1
    agreement against the dense model on held-out fiction, encyclopedic prose and code: dense vs pruned vs
    recovered per domain."""
    from ..errors import InputError
    from ..job import DepthStage, Job
    from ..methods import Target, build_options
    from ..methods.auto import RECOVERIES

    if recover not in RECOVERIES:
        raise InputError(f"--recover must be {' or '.join(reversed(RECOVERIES))}, got {recover!r}")
    if method != "auto" and recover != "none":
        raise InputError(f"--recover belongs to --method auto; with --method {method} pass --recover none (or use "
                         "`depthprune prune --compensate layers`)")
    options = build_options(method, {"recover": recover, "recover_steps": RUN_RECOVER_STEPS,
                                     "candidates": RUN_CANDIDATES} if method == "auto" else {})
    job = Job([DepthStage(method, Target(ratio=ratio), options, measure_uncompensated=True)],
              evaluation=evaluation.spec(model=model.model, batch_size=8, seq_len=SEQ_LEN, seed=SEED),
              progress=not model.quiet).check()
    finish(job, model, streaming, push, check_out(out, model.model, overwrite, job), overwrite)


@app.command()
@uses()
def analyze(
    out: Annotated[str, typer.Option(help="Directory for cka.json, cka.npy and cka.png.")] = "analysis",
    kernel: Annotated[str, typer.Option(help="CKA kernel: linear or rbf (median-heuristic bandwidth).")] = "linear",
    plan: Annotated[Optional[Path], typer.Option(
        help="A depthprune_plan.json (or a pruned checkpoint directory) whose merged/removed windows "
        "are outlined on the heatmap.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per CKA minibatch.")] = 2,
    *,
    model: ModelGroup,
    calibration: CalibrationGroup,
    streaming: StreamingGroup,
) -> None:
    """Layer x layer CKA of layer outputs (SLM's "patches" analysis): JSON, NPY and a heatmap."""
    import numpy as np

    from ..analysis.layer_cka import layer_similarity
    from ..errors import InputError
    from ..io import atomic_write, check_output_dir, prepare_dir, write_json
    from ..models.load import check_plan_depth
    from ..plan import Plan
    from ..report import plot_cka_heatmap

    if kernel not in ("linear", "rbf"):
        raise InputError(f"unknown kernel {kernel!r}: use linear or rbf")
    check_batch(batch_size)
    spec = calibration.spec().check()
    out = check_output_dir(out, inputs=[model.model], kind="analysis")
    loaded_plan = Plan.load(plan) if plan is not None else None
    model.check(("--seq-len", calibration.seq_len))
    if loaded_plan is not None:
        check_plan_depth(loaded_plan, model.model)
    loaded = open_backend(model, streaming)
    windows = None
    if loaded_plan is not None:
        loaded_plan.check_model_depth(loaded.num_layers, f"--model {model.model}")
        windows = [(m.low, m.high) for m in loaded_plan.merges] + [(i, i) for i in loaded_plan.remove]
    result = layer_similarity(loaded, spec.windows(loaded.tokenizer), kernel=kernel, batch_size=batch_size,
                              progress=not model.quiet)
    prepare_dir(out, "analysis")
    write_json(out / "cka.json", {"model": model.model, **result.to_dict()})
    atomic_write(out / "cka.npy", lambda stream: np.save(stream, result.matrix))
    plot_cka_heatmap(result.matrix, out / "cka.png", title=f"{model.model}: {kernel} CKA of layer outputs",
                     merged_windows=windows)
    typer.echo(f"wrote {out / 'cka.json'}, {out / 'cka.npy'} and {out / 'cka.png'}")
