"""Evaluation commands: ``eval-ppl``, ``eval-zeroshot``, ``eval-speed`` and ``bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..compensate import FITS
from ..data.calibration import DEFAULT_EVAL_TEXTS, PPL_WINDOWS
from .app import app
from .groups import CalibrationGroup, EvaluationGroup, FitSettingsGroup, ModelGroup, ZeroShotGroup
from .options import (
    BatchOpt,
    JsonOpt,
    ReferenceCacheOpt,
    SeedOpt,
    SeqLenOpt,
    check_json,
    check_model,
    evaluation,
    fit_option_rules,
    refuse_ignored,
    reference_for,
    split_list,
    uses,
)
from .prune import METHOD_FLAGS, MethodOptionsHelp, method_flags


@app.command("eval-ppl")
@uses()
def eval_ppl_cmd(
    dataset: Annotated[str, typer.Option(
        "--eval-texts", "--dataset",
        help="NAME=SOURCE,... (default: the shipped held-out fiction, encyclopedic and code texts, reported each "
        "and as their mean) or one SOURCE: a shipped text, wikitext2, ptb (need the Hub), or a text file.")
    ] = DEFAULT_EVAL_TEXTS,
    seq_len: SeqLenOpt = 128,
    batch_size: BatchOpt = 8,
    max_windows: Annotated[int, typer.Option(help="Use at most this many windows of each text (0 = all).")
                           ] = PPL_WINDOWS,
    reference: Annotated[Optional[str], typer.Option(
        help="Also measure KL(reference || model) per token and top-1 agreement with this dense model on the "
        "same windows (loaded first, its distributions cached, then freed). With only --reference-cache: the "
        "source recorded in the model's depthprune_plan.json.")] = None,
    reference_cache: ReferenceCacheOpt = None,
    json_out: JsonOpt = None,
    *,
    model: ModelGroup,
) -> None:
    """Perplexity on non-overlapping windows (BOS as the tokenizer adds it); with --reference, KL and top-1
    agreement against the dense model beside it."""
    from ..io import write_result

    json_out = check_json(json_out, model.model, reference)
    spec = evaluation("ppl,kl,top1" if reference or reference_cache else "ppl", ppl_data=dataset,
                      ppl_windows=max_windows, seq_len=seq_len, batch_size=batch_size,
                      windows_option="--max-windows", reference_cache=reference_cache)
    model.check(("--seq-len", seq_len))
    if spec.divergence is not None:
        spec.divergence.reference = reference_for(model.model, reference, input_is_reference=False)
        from ..backend import InMemoryBackend

        spec.prepare(model.model, first_is_input=True, progress=not model.quiet,
                     open_reference=lambda source: InMemoryBackend.of(model.load(source)))
    loaded = model.load()
    result = spec.run(loaded.model, loaded.tokenizer, not model.quiet)
    res, div = result.perplexity, result.divergence
    mean = " (mean of the texts)" if res.domains else ""
    typer.echo(f"perplexity {res.perplexity:.3f}{mean}  ({res.windows} windows x {res.seq_len} tokens, "
               f"{res.tokens} scored tokens, {res.source})")
    if div is not None:
        typer.echo(f"kl {div.kl:.4f}  top1 {div.top1:.4f}{mean}  (against {div.reference}; reference cache "
                   f"{div.cache})")
    for name, d in res.domains.items():
        typer.echo(f"  {name}: perplexity {d['perplexity']:.3f}" + (
            f"  kl {div.domains[name]['kl']:.4f}  top1 {div.domains[name]['top1']:.4f}" if div is not None else ""))
    if json_out:
        write_result(json_out, {"model": model.model, **res.to_dict(),
                                **({"divergence": div.to_dict()} if div is not None else {})})


TasksOpt = Annotated[str, typer.Option(
    "--tasks", help="Comma-separated lm-eval tasks. 'paper' = the seven paper tasks (boolq, piqa, hellaswag, "
    "winogrande, arc_easy, arc_challenge, openbookqa; need the Hugging Face Hub); 'piqa_local' = PIQA "
    "from local files (--piqa-dir).")]


@app.command("eval-zeroshot")
@uses()
def eval_zeroshot_cmd(
    tasks: TasksOpt = "paper",
    batch_size: BatchOpt = 8,
    seed: SeedOpt = 1234,
    json_out: JsonOpt = None,
    *,
    model: ModelGroup,
    zeroshot: ZeroShotGroup,
) -> None:
    """Zero-shot accuracy through lm-evaluation-harness (the metric each paper reports, and the mean)."""
    from ..errors import InputError
    from ..io import write_result

    if not split_list(tasks):
        raise InputError("no tasks given: name at least one lm-eval task, e.g. piqa_local")
    json_out = check_json(json_out, model.model)
    spec = evaluation(tasks, limit=zeroshot.limit, num_fewshot=zeroshot.num_fewshot, task_dir=zeroshot.task_dir,
                      piqa_dir=zeroshot.piqa_dir, batch_size=batch_size, seed=seed).zeroshot
    model.check()
    loaded = model.load()
    result = spec.run(loaded.model, loaded.tokenizer, not model.quiet)
    width = max(len(t) for t in spec.tasks)
    for name, score in result.scores.items():
        stderr = f" +- {score.stderr:.4f}" if score.stderr is not None else ""
        typer.echo(f"{name:{width}s}  {score.metric:8s} {score.value:.4f}{stderr}")
    n = spec.limit
    typer.echo(f"{'mean':{width}s}  {'':8s} {result.mean:.4f}  ({len(spec.tasks)} task"
               f"{'s' * (len(spec.tasks) > 1)}, {zeroshot.num_fewshot}-shot, limit {n if n is not None else 'none'})")
    if json_out:
        write_result(json_out, {"model": model.model, **result.to_dict()})


@app.command("eval-speed")
@uses()
def eval_speed_cmd(
    baseline: Annotated[Optional[str], typer.Option(
        help="Dense model to compare with (same sources as --model): prints both side by side.")] = None,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens (random ids, seeded).")] = 128,
    gen_len: Annotated[int, typer.Option(help="Generated tokens timed in the decode loop.")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass: prompts decoded "
                                            "together.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed runs; the median is reported.")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 2,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's choice).")] = None,
    json_out: JsonOpt = None,
    *,
    model: ModelGroup,
) -> None:
    """Prefill latency and greedy decode throughput; with --baseline, measured speedup vs the ideal L/(L-k)."""
    import gc

    import torch

    from ..errors import InputError
    from ..evaluate.speed import compare_speed, measure_speed, speed_table
    from ..evaluate.suite import SpeedSpec
    from ..io import write_result

    workload = SpeedSpec(prompt_len, gen_len, batch_size, warmup, repeats)
    workload.check()
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    json_out = check_json(json_out, model.model, baseline)
    for source in filter(None, (baseline, model.model)):
        check_model(source, ("--prompt-len + --gen-len", prompt_len + gen_len + 1))
    if threads:
        torch.set_num_threads(threads)

    def measure(source: str):
        loaded = model.load(source)
        ckpt = loaded.path if Path(loaded.path).is_dir() else None
        result = measure_speed(loaded.model, loaded.tokenizer, checkpoint_dir=ckpt, **vars(workload))
        del loaded
        gc.collect()
        return result

    dense = measure(baseline) if baseline else None
    pruned = measure(model.model)
    data: dict = {"model": model.model, "baseline": baseline, "threads": torch.get_num_threads(),
                  "result": pruned.to_dict()}
    if dense is None:
        size = f", checkpoint {pruned.checkpoint_bytes / 1e6:.1f} MB" if pruned.checkpoint_bytes else ""
        typer.echo(f"{pruned.num_layers} layers, {pruned.num_params / 1e6:.1f}M parameters{size}")
        typer.echo(f"prefill {pruned.prefill_latency_s * 1e3:.1f} ms ({pruned.prefill_tokens_per_s:.0f} tok/s), "
                   f"decode {pruned.decode_tokens_per_s:.1f} tok/s ({pruned.device} {pruned.dtype}, "
                   f"batch {batch_size}, prompt {prompt_len}, {gen_len} new tokens, median of {repeats})")
    else:
        typer.echo(speed_table(dense, pruned, labels=("baseline", "model")))
        data.update(baseline_result=dense.to_dict(), comparison=compare_speed(dense, pruned).to_dict())
    if json_out:
        write_result(json_out, data)


def parse_ratios(value: str) -> list[float]:
    from ..errors import InputError

    try:
        return [float(x) for x in split_list(value)]
    except ValueError:
        raise InputError(f"--ratios {value!r}: give comma-separated fractions such as 0.2,0.35") from None


@app.command(context_settings=METHOD_FLAGS, cls=MethodOptionsHelp)
@uses()
def bench(
    ctx: typer.Context,
    methods: Annotated[str, typer.Option(
        help="Comma-separated methods (see `depthprune methods`).")] = "shortgpt,angular",
    ratios: Annotated[str, typer.Option(help="Comma-separated fractions of layers to remove.")] = "0.25",
    out: Annotated[Optional[str], typer.Option(help="Directory for results.json/.md/.png and rows/.")] = None,
    speed: Annotated[bool, typer.Option(
        "--speed/--no-speed", help="Also time prefill and decode of every row.")] = False,
    compensate: Annotated[str, typer.Option(
        help=f"Compensation axis, comma separated: every row is run with each (none, {', '.join(FITS)}; see "
        "`depthprune fits`).")] = "none",
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Reuse finished rows in OUT/rows/ "
                                         "computed with the same settings.")] = True,
    batch_size: BatchOpt = 8,
    *,
    model: ModelGroup,
    calibration: CalibrationGroup,
    evaluation: EvaluationGroup = EvaluationGroup(eval_="ppl"),
    fit_settings: FitSettingsGroup,
) -> None:
    """Compare methods at several depths: every method x ratio plus dense, as a table, JSON and a plot.

    Method flags (e.g. --operator average) go to every listed method that takes them."""
    from ..bench import check_methods, results_table, run_bench, summary_line
    from ..errors import InputError

    names = check_methods(split_list(methods))
    options = {m: o for m, o in method_flags(ctx, names, "bench").items() if o}
    refuse_ignored(*fit_option_rules(split_list(compensate), axis=True))
    if out is None:
        raise InputError("--out is required: the directory for results.json, results.md and the plot")
    result = run_bench(
        model.model, names, parse_ratios(ratios), out,
        calibration=calibration.spec(),
        evaluation=evaluation.spec(model=model.model, batch_size=batch_size, seq_len=calibration.seq_len,
                                   seed=calibration.seed, speed=speed),
        method_options=options, compensations=split_list(compensate),
        compensation=fit_settings.compensation(),
        batch_size=batch_size,
        dtype=model.dtype, device=model.device, resume=resume, progress=not model.quiet,
    )
    typer.echo(results_table(result))
    typer.echo(summary_line(result))
    if not any(row.ok for row in result.rows):
        typer.secho("error: every pruned row failed (see the note column and results.json)", err=True,
                    fg=typer.colors.RED)
        raise typer.Exit(1)
