"""Recovery and width commands: ``heal`` and ``width``, registered on :data:`depthprune.cli.app`.

Like :mod:`depthprune.cli`, each command checks its input before loading a
model, calls the Python API (:func:`depthprune.heal.heal`,
:func:`depthprune.surgery.width.width_plan` / ``apply_width_plan``) and
prints; the checkpoint is written atomically with :func:`depthprune.io.save`,
never over the input. A depth plan found beside the input model is carried
into the output with one more entry in its ``stages``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

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
    _calib,
    _fail,
    _load,
    _ppl_spec,
    app,
)
from .pipeline import heal_work_dir

HEAL_REPORT = "heal_report.json"
WIDTH_REPORT = "width_report.json"

OutOpt = Annotated[Optional[Path], typer.Option(help="Output checkpoint directory (must not be the input).")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace a non-empty --out.")]
EvalPplOpt = Annotated[bool, typer.Option("--eval-ppl/--no-eval-ppl", help="Perplexity before and after.")]
PplDataOpt = Annotated[str, typer.Option(help="Perplexity text: default-heldout, wikitext2, ptb or a file.")]
PplWindowsOpt = Annotated[int, typer.Option(help="Maximum perplexity windows (0 = all).")]
PresetOpt = Annotated[str, typer.Option(
    help="default: LoRA on every projection (q,k,v,o,gate,up,down); gromov: MLP projections only.")]
GradAccumOpt = Annotated[int, typer.Option(help="Micro-batches per optimizer step (4 x 16 = 64, as SLM).")]
EvalStepsOpt = Annotated[int, typer.Option(help="Evaluate and checkpoint every N steps (and at the end).")]
MaxItemsOpt = Annotated[Optional[int], typer.Option(help="Use only the first N records / text blocks.")]
RatioHeadsOpt = Annotated[float, typer.Option(
    help="Fraction of key/value groups (with their query heads) removed in every layer, in [0, 1).")]
ScorerOpt = Annotated[str, typer.Option(
    help="magnitude (weight L2 norm), wanda (|W| x input-activation norm) or taylor (|W x dL/dW|).")]


def _carried_plan(model_dir: str, stage: dict[str, Any]):
    """The depth plan saved beside the input model, with ``stage`` appended (None if there is none)."""
    from .plan import PLAN_FILE, Plan

    path = Path(model_dir) / PLAN_FILE
    if not path.is_file():
        return None
    plan = Plan.load(path)
    plan.stages.append(stage)
    return plan


def _copy_from_input(model_dir: str, names: list[str]) -> Callable[[Path], None]:
    """A save() writer copying provenance files (e.g. an earlier width plan) from the input model."""

    def write(tmp: Path) -> None:
        for name in names:
            src = Path(model_dir) / name
            if src.is_file() and not (tmp / name).exists():
                shutil.copy2(src, tmp / name)

    return write


def _check_inputs(model: str, out: Path | None, overwrite: bool) -> Path:
    from .io import check_output_dir

    if out is None:
        _fail("--out is required: the directory to write the checkpoint to")
    return check_output_dir(out, inputs=[model], overwrite=overwrite)


@app.command("heal")
def heal_cmd(
    model: ModelOpt = "smollm2-135m",
    data: Annotated[str, typer.Option(
        help="alpaca-cleaned (yahma/alpaca-cleaned via datasets; needs the Hub), another alpaca-layout hub "
        "id, a local alpaca .json/.jsonl file (instruction/input/output), or a .txt file (plain LM loss "
        "on cutoff-length blocks).")] = "alpaca-cleaned",
    out: OutOpt = None,
    max_steps: Annotated[int, typer.Option(help="Optimizer steps; 0 = run --epochs instead.")] = 0,
    epochs: Annotated[float, typer.Option(help="Passes over the training split (SLM: 2).")] = 2.0,
    lr: Annotated[float, typer.Option(help="Peak learning rate (SLM / Shortened-LLaMA: 1e-4).")] = 1e-4,
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 8,
    alpha: Annotated[int, typer.Option(help="LoRA alpha (scale = alpha / r).")] = 16,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    preset: PresetOpt = "default",
    cutoff_len: Annotated[int, typer.Option(help="Tokens per training item (longer ones are truncated).")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Items per device per micro-batch.")] = 4,
    grad_accum: GradAccumOpt = 16,
    val_size: Annotated[float, typer.Option(
        help="Validation split: a fraction (<1) or a number of items; 0 = none (keep the last state).")] = 0.05,
    eval_steps: EvalStepsOpt = 200,
    train_on: Annotated[str, typer.Option(
        help="alpaca data: loss on the 'full' sequence (alpaca-lora default) or the 'response' only.")] = "full",
    max_items: MaxItemsOpt = None,
    seed: Annotated[int, typer.Option(help="Seed for the split, LoRA init and data order.")] = 42,
    qlora: Annotated[bool, typer.Option(help="Train on a 4-bit (NF4) copy of the model (needs CUDA + "
                                        "bitsandbytes); the adapter is merged into the float weights.")] = False,
    save_adapter: Annotated[bool, typer.Option(help="Also write the adapter alone to OUT/adapter.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in --work-dir.")] = False,
    work_dir: Annotated[Optional[Path], typer.Option(
        help="Trainer checkpoints (for --resume); default: OUT.heal-work beside --out.")] = None,
    keep_checkpoints: Annotated[bool, typer.Option(help="Keep --work-dir after a successful run.")] = False,
    overwrite: OverwriteOpt = False,
    eval_ppl: EvalPplOpt = False,
    ppl_data: PplDataOpt = "default-heldout",
    ppl_windows: PplWindowsOpt = 40,
    seq_len: SeqLenOpt = 128,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """Heal a pruned model with LoRA (PEFT + transformers Trainer), merge the adapter, save a plain checkpoint."""
    import torch

    from .heal import QLORA_NEEDS_CUDA, HealConfig, HealDataError, data_paths
    from .heal import heal as run_heal
    from .io import check_output_dir, save
    from .surgery.width import WIDTH_PLAN_FILE, count_parameters

    out = _check_inputs(model, out, overwrite)
    config = HealConfig(
        r=rank, alpha=alpha, dropout=dropout, preset=preset, lr=lr, epochs=epochs, max_steps=max_steps or -1,
        batch_size=batch_size, grad_accum=grad_accum, cutoff_len=cutoff_len, val_size=val_size,
        eval_steps=eval_steps, train_on=train_on, max_items=max_items, seed=seed, qlora=qlora,
        progress=not quiet,
    ).validate()
    if qlora and not torch.cuda.is_available():
        raise UserError(QLORA_NEEDS_CUDA)
    for path in data_paths(data) or []:
        if not path.is_file():
            raise HealDataError(f"healing data file not found: {path}")
    work = check_output_dir(work_dir or heal_work_dir(out), inputs=[model, out],
                            overwrite=True)

    loaded = _load(model, dtype, device)
    ppl = _ppl_spec(eval_ppl, ppl_data, seq_len, ppl_windows)
    timings: dict[str, float] = {}
    ppl_before = ppl.run(loaded.model, loaded.tokenizer, not quiet) if ppl else None
    t = time.perf_counter()
    result = run_heal(loaded.model, loaded.tokenizer, data, config, work, resume=resume, save_adapter=save_adapter)
    timings["heal"] = time.perf_counter() - t
    ppl_after = ppl.run(result.model, loaded.tokenizer, not quiet) if ppl else None

    summary = result.to_dict()
    if not keep_checkpoints and result.best_checkpoint:
        summary["best_checkpoint"] = Path(result.best_checkpoint).name  # its work dir is removed below
    report = {
        "model": model,
        "data": data,
        "parameters": count_parameters(result.model),
        "heal": summary,
        "perplexity_before": ppl_before.to_dict() if ppl_before else None,
        "perplexity_after": ppl_after.to_dict() if ppl_after else None,
        "timings_s": timings,
    }
    stage = {"stage": "heal", "data": result.data, "steps": result.global_step,
             "best_eval_loss": result.best_eval_loss, "config": result.config}
    writers = [_copy_from_input(loaded.path, [WIDTH_PLAN_FILE])]
    if result.adapter_dir:
        adapter = Path(result.adapter_dir)
        writers.append(lambda tmp: shutil.copytree(adapter, tmp / "adapter"))
    saved = save(result.model, loaded.tokenizer, out, _carried_plan(loaded.path, stage), inputs=[loaded.path],
                 overwrite=overwrite, extra_json={HEAL_REPORT: report}, writers=writers)
    if not keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)

    typer.echo(f"healed {result.global_step} steps on {result.data.get('kind')} data "
               f"({result.data.get('train_items')} train / {result.data.get('val_items')} val items)")
    if result.eval_losses:
        first, best = result.eval_losses[0][1], result.best_eval_loss
        typer.echo(f"validation loss {first:.4f} -> {best:.4f} (best)")
    if ppl_before and ppl_after:
        typer.echo(f"perplexity ({ppl_after.source}, {ppl_after.windows} x {ppl_after.seq_len} tokens): "
                   f"{ppl_before.perplexity:.2f} before -> {ppl_after.perplexity:.2f} healed")
    typer.echo(f"saved to {saved}")


@app.command("width")
def width_cmd(
    model: ModelOpt = "smollm2-135m",
    out: OutOpt = None,
    ratio_mlp: Annotated[float, typer.Option(
        help="Fraction of MLP channels removed in every layer, in [0, 1).")] = 0.2,
    ratio_heads: RatioHeadsOpt = 0.0,
    scorer: ScorerOpt = "magnitude",
    overwrite: OverwriteOpt = False,
    eval_ppl: EvalPplOpt = False,
    ppl_data: PplDataOpt = "default-heldout",
    ppl_windows: PplWindowsOpt = 40,
    calib: CalibOpt = "default",
    calib_samples: SamplesOpt = 10,
    seq_len: SeqLenOpt = 128,
    seed: SeedOpt = 1234,
    batch_size: BatchOpt = 4,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
) -> None:
    """Structured width pruning: remove MLP channels / attention groups uniformly in every layer, save."""
    from .analysis.importance import SCORERS
    from .io import save
    from .surgery.width import WIDTH_PLAN_FILE, apply_width_plan, count_parameters, width_plan

    if scorer not in SCORERS:
        _fail(f"unknown scorer {scorer!r}: use one of {', '.join(SCORERS)}")
    for name, ratio in (("--ratio-mlp", ratio_mlp), ("--ratio-heads", ratio_heads)):
        if not 0.0 <= ratio < 1.0:
            _fail(f"{name} must be in [0, 1), got {ratio}")
    if ratio_mlp == 0 and ratio_heads == 0:
        _fail("nothing to prune: give --ratio-mlp and/or --ratio-heads above 0")
    out = _check_inputs(model, out, overwrite)

    loaded = _load(model, dtype, device)
    tok = loaded.tokenizer
    windows = _calib(calib, calib_samples, seq_len, seed).windows(tok) if scorer != "magnitude" else None
    ppl = _ppl_spec(eval_ppl, ppl_data, seq_len, ppl_windows)
    ppl_before = ppl.run(loaded.model, tok, not quiet) if ppl else None
    params_before = count_parameters(loaded.model)
    t = time.perf_counter()
    try:
        plan = width_plan(loaded.model, windows, ratio_mlp, ratio_heads, scorer, batch_size=batch_size,
                          progress=not quiet)
    except NotImplementedError as err:
        raise UserError(str(err)) from err
    plan.model = model
    apply_width_plan(loaded.model, plan)
    elapsed = time.perf_counter() - t
    ppl_after = ppl.run(loaded.model, tok, not quiet) if ppl else None
    params_after = count_parameters(loaded.model)

    report = {
        "model": model,
        "plan": plan.summary(),
        "sizes_before": plan.sizes_before,
        "sizes_after": plan.sizes_after,
        "parameters_before": params_before,
        "parameters_after": params_after,
        "perplexity_before": ppl_before.to_dict() if ppl_before else None,
        "perplexity_after": ppl_after.to_dict() if ppl_after else None,
        "timings_s": {"plan_and_surgery": elapsed},
    }
    stage = {"stage": "width", "summary": plan.summary(), "file": WIDTH_PLAN_FILE}
    saved = save(loaded.model, tok, out, _carried_plan(loaded.path, stage), inputs=[loaded.path],
                 overwrite=overwrite, extra_json={WIDTH_PLAN_FILE: plan.to_dict(), WIDTH_REPORT: report})

    typer.echo(plan.summary())
    typer.echo(f"parameters {params_before:,} -> {params_after:,} ({params_after / params_before:.1%})")
    if ppl_before and ppl_after:
        typer.echo(f"perplexity ({ppl_after.source}, {ppl_after.windows} x {ppl_after.seq_len} tokens): "
                   f"{ppl_before.perplexity:.2f} before -> {ppl_after.perplexity:.2f} pruned")
    typer.echo(f"saved to {saved}")
