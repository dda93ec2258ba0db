"""Recovery and width commands: ``heal`` and ``width``, each one job of one stage."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .app import app
from .options import (
    CALIBRATION,
    EVALUATION,
    MODEL,
    PUSH,
    BatchOpt,
    DistillOpt,
    Given,
    MaxTokensOpt,
    OutOpt,
    OverwriteOpt,
    SeqLenOpt,
    TrainLayersOpt,
    check_model,
    refuse_ignored,
    require_out,
    uses,
)
from .prune import check_out


def recorded_source(model: str) -> str:
    """The dense model an input checkpoint was pruned from, as its run record says."""
    from ..evaluate.divergence import recorded_reference
    from ..heal import HealError
    from ..run_record import RUN_FILE

    source = recorded_reference(model)
    if not source:
        raise HealError(f"--distill needs the dense model as teacher: {model} records none in {RUN_FILE}; "
                        "pass --teacher")
    return source


@app.command("heal")
@uses(MODEL, EVALUATION, PUSH)
def heal_cmd(
    given: Given = None,
    data: Annotated[str, typer.Option(
        help="alpaca-cleaned (yahma/alpaca-cleaned via datasets; needs the Hub), another alpaca-layout hub "
        "id, a local alpaca .json/.jsonl file (instruction/input/output), or a .txt file (plain LM loss "
        "on cutoff-length blocks).")] = "alpaca-cleaned",
    out: OutOpt = None,
    max_steps: Annotated[int, typer.Option(help="Optimizer steps (0 = train for --epochs).")] = 0,
    max_tokens: MaxTokensOpt = None,
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
    train_layers: TrainLayersOpt = "lora",
    distill: DistillOpt = False,
    distill_alpha: Annotated[float, typer.Option(
        help="Distillation: weight of the KL term; 1 - alpha goes to the LM loss.")] = 1.0,
    temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = 1.0,
    distill_top_k: Annotated[Optional[int], typer.Option(
        help="Distillation: KL from the teacher's k most likely tokens only, renormalised (large "
        "vocabularies).")] = None,
    teacher_top_k: Annotated[int, typer.Option(
        help="Distillation: the teacher's distributions are computed once before training; when the full ones "
        "exceed 1 GiB, its k most likely tokens + the remaining mass are kept (the loss is then KL over those "
        "k tokens + one remainder bucket).")] = 64,
    teacher_cache: Annotated[Optional[str], typer.Option(
        help="Distillation: keep the teacher's cached distributions in this directory and reuse them in later "
        "runs with the same teacher, data and settings (default: inside the work directory).")] = None,
    live_teacher: Annotated[bool, typer.Option(
        help="Distillation: run the teacher on every step instead of caching its distributions once.")] = False,
    teacher: Annotated[Optional[str], typer.Option(
        help="Distillation teacher (the dense model; default: the source recorded in the input's plan).")] = None,
    overwrite: OverwriteOpt = False,
    seq_len: SeqLenOpt = 128,
) -> None:
    """Heal a pruned model (LoRA or its last layers, on LM loss or distilled from the dense model), save a plain
    checkpoint."""
    from ..evaluate.divergence import check_reference_vocab
    from ..heal import HealConfig
    from ..io import check_output_dir
    from ..job import HealStage, Job

    refuse_ignored(*[(name, distill, "needs --distill")
                     for name in ("distill_alpha", "temperature", "distill_top_k", "teacher")],
                   ("keep_checkpoints", work_dir is not None, "needs --work-dir (without it checkpoints live "
                    "in scratch space that is always removed)"))
    config = HealConfig(
        r=rank, alpha=alpha, dropout=dropout, preset=preset, lr=lr, epochs=epochs, max_steps=max_steps,
        batch_size=batch_size, grad_accum=grad_accum, cutoff_len=cutoff_len, val_size=val_size,
        eval_steps=eval_steps, train_on=train_on, max_items=max_items, seed=seed, qlora=qlora,
        train_layers=train_layers, distill=distill, distill_alpha=distill_alpha, temperature=temperature,
        distill_top_k=distill_top_k, max_tokens=max_tokens, teacher_cache=not live_teacher,
        teacher_top_k=teacher_top_k, teacher_cache_dir=teacher_cache, progress=not given.quiet,
    )
    if distill and teacher is None:
        teacher = recorded_source(given.model)
    stage = HealStage(data, config, work_dir=work_dir, resume=resume, save_adapter=save_adapter,
                      keep_checkpoints=keep_checkpoints, teacher=teacher)
    job = Job([stage], evaluation=given.evaluation_spec(batch_size=8, seq_len=seq_len, input_is_reference=False),
              progress=not given.quiet).check()
    out = check_out(require_out(out), given.model, overwrite, job)
    if work_dir is not None:
        check_output_dir(work_dir, inputs=[given.model, out], kind="work", option="--work-dir")
    if teacher is not None:
        check_model(teacher)
        check_reference_vocab(given.model, teacher, option="--teacher")
    if teacher_cache is not None:
        check_output_dir(teacher_cache, inputs=[given.model, out], kind="teacher-cache", option="--teacher-cache")
    given.run_job(job, out, overwrite)


@app.command("width")
@uses(MODEL, CALIBRATION, EVALUATION, PUSH)
def width_cmd(
    given: Given = None,
    out: OutOpt = None,
    ratio_mlp: Annotated[float, typer.Option(
        help="Fraction of MLP channels removed in every layer, in [0, 1).")] = 0.2,
    ratio_heads: Annotated[float, typer.Option(
        help="Fraction of key/value groups (with their query heads) removed in every layer, in [0, 1).")] = 0.0,
    scorer: Annotated[str, typer.Option(
        help="magnitude (weight L2 norm), wanda (|W| x input-activation norm) or taylor (|W x dL/dW|).")] = "magnitude",
    overwrite: OverwriteOpt = False,
    batch_size: BatchOpt = 8,
) -> None:
    """Structured width pruning: remove MLP channels / attention groups uniformly in every layer, save."""
    from ..job import Job, WidthStage

    job = Job([WidthStage(ratio_mlp, ratio_heads, scorer)], given.calibration_spec(),
              given.evaluation_spec(batch_size=batch_size), batch_size=batch_size, progress=not given.quiet).check()
    given.run_job(job, check_out(require_out(out), given.model, overwrite, job), overwrite)
