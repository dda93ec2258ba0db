"""Recovery and width commands: ``heal`` and ``width``, each one job of one stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app
from .options import (
    BatchOpt,
    CalibOpt,
    DeviceOpt,
    DtypeOpt,
    EvalOpt,
    FewshotOpt,
    LimitOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    PiqaDirOpt,
    PplDataOpt,
    PplWindowsOpt,
    QuietOpt,
    SamplesOpt,
    SeedOpt,
    SeqLenOpt,
    TaskDirOpt,
    calibration,
    evaluation,
    load,
    quiet_when_asked,
    require_out,
)
from .prune import check_out
from .streaming import PushOpt, run_checkpoint_job


@app.command("heal")
@quiet_when_asked
def heal_cmd(
    model: ModelOpt = "smollm2-135m",
    data: Annotated[str, typer.Option(
        help="alpaca-cleaned (yahma/alpaca-cleaned via datasets; needs the Hub), another alpaca-layout hub "
        "id, a local alpaca .json/.jsonl file (instruction/input/output), or a .txt file (plain LM loss "
        "on cutoff-length blocks).")] = "alpaca-cleaned",
    out: OutOpt = None,
    max_steps: Annotated[int, typer.Option(help="Optimizer steps (0 = train for --epochs).")] = 0,
    epochs: Annotated[float, typer.Option(help="Passes over the training split when --max-steps is 0 "
                                          "(SLM: 2).")] = 2.0,
    lr: Annotated[float, typer.Option(help="Peak learning rate (SLM / Shortened-LLaMA: 1e-4).")] = 1e-4,
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 8,
    alpha: Annotated[int, typer.Option(help="LoRA alpha (scale = alpha / r).")] = 16,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    preset: Annotated[str, typer.Option(
        help="default: LoRA on every projection (q,k,v,o,gate,up,down); gromov: MLP projections only.")] = "default",
    cutoff_len: Annotated[int, typer.Option(help="Tokens per training item (longer ones are truncated).")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass: training items "
                                            "per micro-batch.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step (4 x 16 = 64, as SLM).")] = 16,
    val_size: Annotated[float, typer.Option(
        help="Validation split: a fraction (<1) or a number of items; 0 = none (keep the last state).")] = 0.05,
    eval_steps: Annotated[int, typer.Option(help="Evaluate and checkpoint every N steps (and at the end).")] = 200,
    train_on: Annotated[str, typer.Option(
        help="alpaca data: loss on the 'full' sequence (alpaca-lora default) or the 'response' only.")] = "full",
    max_items: Annotated[Optional[int], typer.Option(help="Use only the first N records / text blocks.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the split, LoRA init and data order.")] = 42,
    qlora: Annotated[bool, typer.Option(help="Train on a 4-bit (NF4) copy of the model (needs CUDA + "
                                        "bitsandbytes); the adapter is merged into the float weights.")] = False,
    save_adapter: Annotated[bool, typer.Option(help="Also write the adapter alone to OUT/adapter.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in --work-dir.")] = False,
    work_dir: Annotated[Optional[str], typer.Option(
        help="Keep Trainer checkpoints here (needed for --resume); default: scratch space inside the output "
        "being written, removed when the job ends.")] = None,
    keep_checkpoints: Annotated[bool, typer.Option(help="Keep --work-dir after a successful run.")] = False,
    overwrite: OverwriteOpt = False,
    eval_: EvalOpt = None,
    ppl_data: PplDataOpt = "default-heldout",
    ppl_windows: PplWindowsOpt = 40,
    limit: LimitOpt = None,
    num_fewshot: FewshotOpt = 0,
    task_dir: TaskDirOpt = None,
    piqa_dir: PiqaDirOpt = None,
    seq_len: SeqLenOpt = 128,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
    push_to_hub: PushOpt = None,
) -> None:
    """Heal a pruned model with LoRA (PEFT + transformers Trainer), merge the adapter, save a plain checkpoint."""
    from ..heal import HealConfig
    from ..io import check_output_dir
    from ..job import HealStage, Job

    config = HealConfig(
        r=rank, alpha=alpha, dropout=dropout, preset=preset, lr=lr, epochs=epochs, max_steps=max_steps,
        batch_size=batch_size, grad_accum=grad_accum, cutoff_len=cutoff_len, val_size=val_size,
        eval_steps=eval_steps, train_on=train_on, max_items=max_items, seed=seed, qlora=qlora,
        progress=not quiet,
    )
    stage = HealStage(data, config, work_dir=work_dir, resume=resume, save_adapter=save_adapter,
                      keep_checkpoints=keep_checkpoints)
    job = Job([stage], evaluation=evaluation(eval_, ppl_data=ppl_data, ppl_windows=ppl_windows, seq_len=seq_len,
                                             limit=limit, num_fewshot=num_fewshot, task_dir=task_dir,
                                             piqa_dir=piqa_dir),
              progress=not quiet).check()
    out = check_out(require_out(out), model, overwrite, job)
    if work_dir is not None:
        check_output_dir(work_dir, inputs=[model, out], kind="work", option="--work-dir")
    run_checkpoint_job(job, load=load, model=model, out=out, overwrite=overwrite, dtype=dtype, device=device,
                       quiet=quiet, push_to_hub=push_to_hub)


@app.command("width")
@quiet_when_asked
def width_cmd(
    model: ModelOpt = "smollm2-135m",
    out: OutOpt = None,
    ratio_mlp: Annotated[float, typer.Option(
        help="Fraction of MLP channels removed in every layer, in [0, 1).")] = 0.2,
    ratio_heads: Annotated[float, typer.Option(
        help="Fraction of key/value groups (with their query heads) removed in every layer, in [0, 1).")] = 0.0,
    scorer: Annotated[str, typer.Option(
        help="magnitude (weight L2 norm), wanda (|W| x input-activation norm) or taylor (|W x dL/dW|).")] = "magnitude",
    overwrite: OverwriteOpt = False,
    eval_: EvalOpt = None,
    ppl_data: PplDataOpt = "default-heldout",
    ppl_windows: PplWindowsOpt = 40,
    limit: LimitOpt = None,
    num_fewshot: FewshotOpt = 0,
    task_dir: TaskDirOpt = None,
    piqa_dir: PiqaDirOpt = None,
    calib: CalibOpt = "default",
    calib_samples: SamplesOpt = 10,
    seq_len: SeqLenOpt = 128,
    seed: SeedOpt = 1234,
    batch_size: BatchOpt = 8,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
    push_to_hub: PushOpt = None,
) -> None:
    """Structured width pruning: remove MLP channels / attention groups uniformly in every layer, save."""
    from ..job import Job, WidthStage

    job = Job([WidthStage(ratio_mlp, ratio_heads, scorer)], calibration(calib, calib_samples, seq_len, seed),
              evaluation(eval_, ppl_data=ppl_data, ppl_windows=ppl_windows, seq_len=seq_len, limit=limit,
                         num_fewshot=num_fewshot, task_dir=task_dir, piqa_dir=piqa_dir, batch_size=batch_size,
                         seed=seed),
              batch_size=batch_size, progress=not quiet).check()
    out = check_out(require_out(out), model, overwrite, job)
    run_checkpoint_job(job, load=load, model=model, out=out, overwrite=overwrite, dtype=dtype, device=device,
                       quiet=quiet, push_to_hub=push_to_hub)
