"""Evaluation commands: ``eval-zeroshot``, ``eval-speed`` and ``bench``, registered on :data:`depthprune.cli.app`.

Like :mod:`depthprune.cli`, each command checks its input, calls the Python
API and prints; input errors are raised as ``ValueError``/``FileNotFoundError``
(or :class:`~depthprune.cli.UserError`) so ``depthprune.cli.main`` prints one
line and exits with 2, before any model is loaded where that is possible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli import (
    BatchOpt,
    CalibOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    QuietOpt,
    SamplesOpt,
    SeedOpt,
    SeqLenOpt,
    UserError,
    _load,
    _ppl_spec,
    app,
)

TasksOpt = Annotated[str, typer.Option(
    "--tasks", help="Comma-separated lm-eval tasks. 'paper' = the seven paper tasks (boolq, piqa, hellaswag, "
    "winogrande, arc_easy, arc_challenge, openbookqa; need the Hugging Face Hub); 'piqa_local' = PIQA "
    "from local files (--piqa-dir).")]
LimitOpt = Annotated[Optional[float], typer.Option(
    help="Evaluate only the first N items of each task (a value below 1 is a fraction).")]
FewshotOpt = Annotated[int, typer.Option("--num-fewshot", help="Few-shot examples per item (the papers use 0).")]
TaskDirOpt = Annotated[Optional[Path], typer.Option(
    "--task-dir", help="Extra folder of lm-eval task YAMLs (e.g. tasks reading local files).")]
PiqaDirOpt = Annotated[Optional[Path], typer.Option(
    "--piqa-dir", help="Folder with PIQA's valid.jsonl + valid-labels.lst for piqa_local "
    "(default: $DEPTHPRUNE_PIQA_DIR).")]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON.")]


def _split(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def parse_tasks(value: str) -> list[str]:
    """Comma list of tasks; ``paper`` expands to the papers' seven."""
    from .evaluate.zeroshot import PAPER_TASKS

    tasks: list[str] = []
    for name in _split(value):
        tasks.extend(PAPER_TASKS if name == "paper" else [name])
    return list(dict.fromkeys(tasks))


def parse_limit(limit: float | None) -> int | float | None:
    """lm-eval reads an int as a count and a float below 1 as a fraction."""
    if limit is None:
        return None
    if limit <= 0:
        raise UserError(f"--limit must be positive, got {limit:g}")
    if limit >= 1:
        if not float(limit).is_integer():
            raise UserError(f"--limit {limit:g}: give a whole number of items, or a fraction below 1")
        return int(limit)
    return limit


def parse_ratios(value: str) -> list[float]:
    try:
        return [float(x) for x in _split(value)]
    except ValueError:
        raise UserError(f"--ratios {value!r}: give comma-separated fractions such as 0.2,0.35") from None


def _zeroshot(model, tok, tasks, **kwargs):
    """Turn the Hub being unreachable into an input error: it is fixed by options, not by code."""
    from .evaluate.zeroshot import HubTaskUnavailableError, evaluate_zeroshot

    try:
        return evaluate_zeroshot(model, tok, tasks, **kwargs)
    except HubTaskUnavailableError as err:
        raise UserError(str(err)) from err


@app.command("eval-zeroshot")
def eval_zeroshot_cmd(
    model: ModelOpt = "smollm2-135m",
    tasks: TasksOpt = "paper",
    limit: LimitOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Requests per forward pass.")] = 8,
    num_fewshot: FewshotOpt = 0,
    task_dir: TaskDirOpt = None,
    piqa_dir: PiqaDirOpt = None,
    seed: SeedOpt = 1234,
    json_out: JsonOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """Zero-shot accuracy through lm-evaluation-harness (the metric each paper reports, and the mean)."""
    from .evaluate.zeroshot import check_tasks
    from .io import write_json

    task_list = parse_tasks(tasks)
    check_tasks(task_list, task_dir=task_dir, piqa_dir=piqa_dir)
    n = parse_limit(limit)
    loaded = _load(model, dtype, device)
    result = _zeroshot(loaded.model, loaded.tokenizer, task_list, limit=n, batch_size=batch_size,
                       num_fewshot=num_fewshot, task_dir=task_dir, piqa_dir=piqa_dir, seed=seed,
                       progress=not quiet)
    width = max(len(t) for t in task_list)
    for name, score in result.scores.items():
        stderr = f" +- {score.stderr:.4f}" if score.stderr is not None else ""
        typer.echo(f"{name:{width}s}  {score.metric:8s} {score.value:.4f}{stderr}")
    typer.echo(f"{'mean':{width}s}  {'':8s} {result.mean:.4f}  ({len(task_list)} task{'s' * (len(task_list) > 1)}, "
               f"{num_fewshot}-shot, limit {n if n is not None else 'none'})")
    if json_out:
        write_json(json_out, {"model": model, **result.to_dict()})


@app.command("eval-speed")
def eval_speed_cmd(
    model: ModelOpt = "smollm2-135m",
    baseline: Annotated[Optional[str], typer.Option(
        help="Dense model to compare with (same sources as --model): prints both side by side.")] = None,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens (random ids, seeded).")] = 128,
    gen_len: Annotated[int, typer.Option(help="Generated tokens timed in the decode loop.")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts decoded together.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed runs; the median is reported.")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 2,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's choice).")] = None,
    json_out: JsonOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Prefill latency and greedy decode throughput; with --baseline, measured speedup vs the ideal L/(L-k)."""
    import gc

    import torch

    from .evaluate.speed import compare_speed, measure_speed, speed_table
    from .io import write_json

    for name, value in (("--prompt-len", prompt_len), ("--gen-len", gen_len), ("--batch-size", batch_size),
                        ("--repeats", repeats), ("--threads", threads or 1)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {warmup}")
    if threads:
        torch.set_num_threads(threads)
    workload = dict(prompt_len=prompt_len, gen_len=gen_len, batch_size=batch_size, repeats=repeats, warmup=warmup)

    def measure(source: str):
        loaded = _load(source, dtype, device)
        ckpt = loaded.path if Path(loaded.path).is_dir() else None
        result = measure_speed(loaded.model, loaded.tokenizer, checkpoint_dir=ckpt, **workload)
        del loaded
        gc.collect()
        return result

    dense = measure(baseline) if baseline else None
    pruned = measure(model)
    data: dict = {"model": model, "baseline": baseline, "threads": torch.get_num_threads(),
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
        write_json(json_out, data)


@app.command()
def bench(
    model: ModelOpt = "smollm2-135m",
    methods: Annotated[str, typer.Option(
        help="Comma-separated methods (see `depthprune methods`).")] = "shortgpt,angular",
    ratios: Annotated[str, typer.Option(help="Comma-separated fractions of layers to remove.")] = "0.25",
    out: Annotated[Optional[Path], typer.Option(help="Directory for results.json/.md/.png and rows/.")] = None,
    ppl_data: Annotated[str, typer.Option(
        help="Perplexity text: default-heldout, wikitext2, ptb or a file.")] = "default-heldout",
    ppl_windows: Annotated[int, typer.Option(help="Maximum perplexity windows (0 = all).")] = 40,
    no_ppl: Annotated[bool, typer.Option("--no-ppl", help="Skip perplexity.")] = False,
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated lm-eval tasks (piqa_local, 'paper', ...); "
                                       "empty = none.")] = "",
    limit: LimitOpt = None,
    eval_batch_size: Annotated[int, typer.Option(help="lm-eval requests per forward pass.")] = 8,
    num_fewshot: FewshotOpt = 0,
    task_dir: TaskDirOpt = None,
    piqa_dir: PiqaDirOpt = None,
    speed: Annotated[bool, typer.Option(
        "--speed/--no-speed", help="Also time prefill and decode of every row.")] = False,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Reuse finished rows in OUT/rows/ "
                                         "computed with the same settings.")] = True,
    calib: CalibOpt = "default",
    calib_samples: SamplesOpt = 10,
    seq_len: SeqLenOpt = 128,
    seed: SeedOpt = 1234,
    batch_size: BatchOpt = 4,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """Compare methods at several depths: every method x ratio plus dense, as a table, JSON and a plot."""
    from .bench import SpeedSpec, ZeroShotSpec, run_bench, summary_line
    from .evaluate.zeroshot import HubTaskUnavailableError
    from .pipeline import CalibrationSpec

    if out is None:
        raise UserError("--out is required: the directory for results.json, results.md and the plot")
    task_list = parse_tasks(tasks)
    zeroshot = None
    if task_list:
        zeroshot = ZeroShotSpec(task_list, parse_limit(limit), eval_batch_size, num_fewshot,
                                str(task_dir) if task_dir else None, str(piqa_dir) if piqa_dir else None, seed)
    try:
        result = run_bench(
            model, _split(methods), parse_ratios(ratios), out,
            calibration=CalibrationSpec(calib, calib_samples, seq_len, seed),
            ppl=_ppl_spec(not no_ppl, ppl_data, seq_len, ppl_windows),
            zeroshot=zeroshot, speed=SpeedSpec() if speed else None, dtype=dtype, device=device,
            method_options={"batch_size": batch_size}, resume=resume, progress=not quiet,
        )
    except HubTaskUnavailableError as err:
        raise UserError(str(err)) from err
    typer.echo(result.markdown())
    typer.echo(summary_line(result))
