"""Recovery and width commands: ``heal`` and ``width``, each one job of one stage."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from ..data.calibration import DEFAULT_CALIBRATION
from ..heal.config import HealConfig
from .app import app
from .groups import CalibrationGroup, EvaluationGroup, ModelGroup, PushGroup
from .options import (
    SEED,
    SEQ_LEN,
    BatchOpt,
    OutOpt,
    OverwriteOpt,
    SeqLenOpt,
    WINDOWED,
    SettingFlags,
    check_model,
    eval_names,
    refuse_ignored,
    require_out,
    uses,
)
from .prune import check_out
from .streaming import finish


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


HEAL_SETTINGS = SettingFlags(HealConfig, into="training")
"""Every :class:`HealConfig` flag, as ``heal`` offers it (``--lr``, ``--rank``, ...)."""


DISTILL_DATA = DEFAULT_CALIBRATION
"""What ``heal --distill`` trains on by default: the dense model's distributions need no labels, so a general
mix of the shipped texts, offline."""


@app.command("heal")
@uses(HEAL_SETTINGS)
def heal_cmd(
    data: Annotated[Optional[str], typer.Option(
        help="A shipped text (general: fiction, encyclopedic prose and code in equal shares; fiction, "
        "encyclopedic, code), alpaca-cleaned (yahma/alpaca-cleaned via datasets; needs the Hub), another "
        "alpaca-layout hub id, a local alpaca .json/.jsonl file (instruction/input/output), or a .txt file "
        "(plain LM loss on cutoff-length blocks). Default: general with --distill, else alpaca-cleaned.")] = None,
    out: OutOpt = None,
    training: dict[str, Any] = None,
    save_adapter: Annotated[bool, typer.Option(help="Also write the adapter alone to OUT/adapter.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in --work-dir.")] = False,
    work_dir: Annotated[Optional[str], typer.Option(
        help="Keep Trainer checkpoints here (needed for --resume); default: scratch space inside the output "
        "being written, removed when the job ends.")] = None,
    keep_checkpoints: Annotated[bool, typer.Option(help="Keep --work-dir after a successful run.")] = False,
    teacher: Annotated[Optional[str], typer.Option(
        help="Distillation teacher (the dense model; default: the source recorded in the input's plan).")] = None,
    overwrite: OverwriteOpt = False,
    seq_len: SeqLenOpt = SEQ_LEN,
    *,
    model: ModelGroup,
    evaluation: EvaluationGroup,
    push: PushGroup,
) -> None:
    """Heal a pruned model (LoRA or its last layers, on LM loss or distilled from the dense model), save a plain
    checkpoint."""
    from ..evaluate.divergence import check_reference_vocab
    from ..io import check_output_dir
    from ..job import HealStage, Job

    config = HealConfig(**training, progress=not model.quiet)
    refuse_ignored(*[(name, config.distill, "needs --distill")
                     for name in ("distill_alpha", "temperature", "distill_top_k", "teacher")],
                   ("keep_checkpoints", work_dir is not None, "needs --work-dir (without it checkpoints live "
                    "in scratch space that is always removed)"),
                   ("seq_len", any(n in WINDOWED for n in eval_names(evaluation.eval_)),
                    "sets the evaluation windows and needs ppl, kl, top1 or gen in --eval"))
    if config.distill and teacher is None:
        teacher = recorded_source(model.model)
    if data is None:
        data = DISTILL_DATA if config.distill else "alpaca-cleaned"
    stage = HealStage(data, config, work_dir=work_dir, resume=resume, save_adapter=save_adapter,
                      keep_checkpoints=keep_checkpoints, teacher=teacher)
    measured = evaluation.spec(model=model.model, batch_size=8, seq_len=seq_len, seed=SEED,
                               input_is_reference=False)
    job = Job([stage], evaluation=measured, progress=not model.quiet).check()
    out = check_out(require_out(out), model.model, overwrite, job)
    if work_dir is not None:
        check_output_dir(work_dir, inputs=[model.model, out], kind="work", option="--work-dir")
    if teacher is not None:
        check_model(teacher)
        check_reference_vocab(model.model, teacher, option="--teacher")
    if config.teacher_cache_dir is not None:
        check_output_dir(config.teacher_cache_dir, inputs=[model.model, out], kind="teacher-cache",
                         option="--teacher-cache")
    finish(job, model, None, push, out, overwrite)


@app.command("width")
@uses()
def width_cmd(
    out: OutOpt = None,
    ratio_mlp: Annotated[float, typer.Option(
        help="Fraction of MLP channels removed in every layer, in [0, 1).")] = 0.2,
    ratio_heads: Annotated[float, typer.Option(
        help="Fraction of key/value groups (with their query heads) removed in every layer, in [0, 1).")] = 0.0,
    scorer: Annotated[str, typer.Option(
        help="magnitude (weight L2 norm), wanda (|W| x input-activation norm) or taylor (|W x dL/dW|).")] = "magnitude",
    overwrite: OverwriteOpt = False,
    batch_size: BatchOpt = 8,
    *,
    model: ModelGroup,
    calibration: CalibrationGroup,
    evaluation: EvaluationGroup,
    push: PushGroup,
) -> None:
    """Structured width pruning: remove MLP channels / attention groups uniformly in every layer, save."""
    from ..job import Job, WidthStage

    job = Job([WidthStage(ratio_mlp, ratio_heads, scorer)], calibration.spec(),
              evaluation.spec(model=model.model, batch_size=batch_size, seq_len=calibration.seq_len,
                              seed=calibration.seed),
              batch_size=batch_size, progress=not model.quiet).check()
    finish(job, model, None, push, check_out(require_out(out), model.model, overwrite, job), overwrite)
