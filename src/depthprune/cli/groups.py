"""The option groups commands share, as typed parameters: ``model: ModelGroup``, ``calibration:
CalibrationGroup``, ``evaluation: EvaluationGroup`` and so on.

Each group is a frozen :class:`~.options.OptionGroup` whose fields are its options, and whose methods build what
those options describe (a loaded model, a calibration spec, an evaluation), so a command's signature names every
option it reads and a default lives on one field. What a method needs from another group (the calibration's
``seq_len`` for an evaluation) is passed to it by the command, never looked up. ``--compensate``'s fit settings
are generated from the settings the fits declare (:data:`~.options.FIT_SETTING_INFOS`): a new setting is a new
option of every command that fits, with no change here.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field, make_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..compensate import Compensation
from ..data.calibration import DEFAULT_CALIBRATION, DEFAULT_EVAL_TEXTS, PPL_WINDOWS
from ..distributed import processes
from .options import (
    FIT_SETTING_INFOS,
    FIT_SETTING_OPTIONS,
    SEED,
    SEQ_LEN,
    WINDOWED,
    CalibOpt,
    CompensateOpt,
    DeviceOpt,
    DtypeOpt,
    EvalOpt,
    FewshotOpt,
    LimitOpt,
    MaxMemoryOpt,
    ModelOpt,
    OptionGroup,
    PiqaDirOpt,
    PplDataOpt,
    PplWindowsOpt,
    PushOpt,
    QuietOpt,
    ReferenceCacheOpt,
    ReferenceOpt,
    SamplesOpt,
    SeedOpt,
    SeqLenOpt,
    StreamOpt,
    TaskDirOpt,
    calibration,
    check_model,
    default_device,
    eval_names,
    evaluation,
    fit_setting_help,
    reference_for,
    refuse_ignored,
)

if TYPE_CHECKING:
    from ..data.calibration import CalibrationSpec
    from ..evaluate.suite import Evaluation
    from ..models.load import LoadedModel


def load(model: str, dtype: str | None, device: str, quiet: bool) -> "LoadedModel":
    """Load a model in memory, saying so: every in-memory load of the command line goes through here."""
    from ..models.load import load_model, resolve_dtype

    if processes().main:
        typer.echo(f"loading {model} on {device} ({str(resolve_dtype(dtype, device)).replace('torch.', '')}) ...",
                   err=True)
    return load_model(model, dtype=dtype, device=device, progress=not quiet)


@dataclass(frozen=True)
class ModelGroup(OptionGroup):
    """The model a command reads and how it is loaded (``--model``, ``--dtype``, ``--device``, ``--quiet``)."""

    model: ModelOpt = "smollm2-135m"
    dtype: DtypeOpt = None
    device: DeviceOpt = None
    quiet: QuietOpt = False

    def resolved(self) -> ModelGroup:
        """No ``--device``: the GPU when there is one; in a launch of several processes, one progress bar per
        launch (the main process's)."""
        return replace(self, device=default_device() if self.device is None else self.device,
                       quiet=self.quiet or not processes().main)

    def running(self) -> AbstractContextManager:
        """``--quiet``: transformers', the Hub's and datasets' progress bars off while the command runs."""
        from ..models.load import quiet_transformers

        return quiet_transformers(self.quiet)

    def load(self, source: str | None = None) -> "LoadedModel":
        """The model, or another source (a baseline, a reference) with the same dtype, device and progress."""
        return load(self.model if source is None else source, self.dtype, self.device, self.quiet)

    def check(self, *seq_lens: tuple[str, int]) -> dict | None:
        """See :func:`~.options.check_model`."""
        return check_model(self.model, *seq_lens)


@dataclass(frozen=True)
class CalibrationGroup(OptionGroup):
    """The calibration windows (``--calib``, ``--calib-samples``, ``--seq-len``, ``--seed``)."""

    calib: CalibOpt = DEFAULT_CALIBRATION
    calib_samples: SamplesOpt = 10
    seq_len: SeqLenOpt = SEQ_LEN
    seed: SeedOpt = SEED

    def spec(self, sentences_file: Path | None = None) -> "CalibrationSpec":
        """The windows to calibrate on, or one sample per line of ``sentences_file`` (``--calib-sentences``)."""
        return calibration(self.calib, self.calib_samples, self.seq_len, self.seed, sentences_file)


@dataclass(frozen=True)
class ZeroShotGroup(OptionGroup):
    """How lm-eval tasks are run (``--limit``, ``--num-fewshot``, ``--task-dir``, ``--piqa-dir``)."""

    limit: LimitOpt = None
    num_fewshot: FewshotOpt = 0
    task_dir: TaskDirOpt = None
    piqa_dir: PiqaDirOpt = None


@dataclass(frozen=True)
class EvaluationGroup(OptionGroup):
    """What a job measures before and after (``--eval`` and the options of what it names)."""

    eval_: EvalOpt = None
    ppl_data: PplDataOpt = DEFAULT_EVAL_TEXTS
    ppl_windows: PplWindowsOpt = PPL_WINDOWS
    reference: ReferenceOpt = None
    reference_cache: ReferenceCacheOpt = None
    zeroshot: ZeroShotGroup = field(default_factory=ZeroShotGroup)

    def spec(self, *, model: str, batch_size: int, seq_len: int, seed: int, speed: bool = False,
             input_is_reference: bool = True) -> "Evaluation":
        """The evaluation of ``model``, checked, on windows of ``seq_len`` tokens (lm-eval seeded with ``seed``);
        for kl/top1/gen with its reference resolved (see :func:`~.options.reference_for`). An option the
        ``--eval`` list gives nothing to do is refused."""
        from ..evaluate.divergence import METRICS as DIVERGENCE_METRICS

        names = eval_names(self.eval_)
        windowed = any(n in names for n in WINDOWED)
        tasks = [n for n in names if n not in WINDOWED]
        refuse_ignored(("ppl_data", windowed, "needs ppl, kl, top1 or gen in --eval"),
                       ("ppl_windows", any(n in names for n in ("ppl", *DIVERGENCE_METRICS)),
                        "needs ppl, kl or top1 in --eval"),
                       *[(name, bool(tasks), "needs lm-eval tasks in --eval")
                         for name in ("limit", "num_fewshot", "task_dir", "piqa_dir")])
        zeroshot = self.zeroshot
        spec = evaluation(self.eval_, ppl_data=self.ppl_data, ppl_windows=self.ppl_windows, seq_len=seq_len,
                          limit=zeroshot.limit, num_fewshot=zeroshot.num_fewshot, task_dir=zeroshot.task_dir,
                          piqa_dir=zeroshot.piqa_dir, batch_size=batch_size, seed=seed, speed=speed,
                          reference_cache=self.reference_cache)
        if spec.divergence is not None or spec.generation is not None:
            reference = reference_for(model, self.reference, input_is_reference)
            for part in (spec.divergence, spec.generation):
                if part is not None:
                    part.reference = reference
        return spec


@dataclass(frozen=True)
class StreamingGroup(OptionGroup):
    """Layer streaming (``--stream``, ``--max-memory``); see :mod:`.streaming`."""

    stream: StreamOpt = None
    max_memory: MaxMemoryOpt = None


@dataclass(frozen=True)
class PushGroup(OptionGroup):
    """Uploading the written checkpoint (``--push-to-hub``)."""

    push_to_hub: PushOpt = None


@dataclass(frozen=True)
class FitSettings(OptionGroup):
    """How compensation fits are fitted: the base of :class:`FitSettingsGroup`, whose fields are generated."""

    def compensation(self, fit: str = "linear") -> Compensation:
        """These settings as ``fit``'s (unchecked)."""
        return Compensation.of(fit=fit, **{setting: getattr(self, option)
                                           for option, setting in FIT_SETTING_OPTIONS.items()})


FitSettingsGroup = make_dataclass(
    "FitSettingsGroup",
    [(info.flag_name.replace("-", "_"), Annotated[info.type, typer.Option(info.flag, help=fit_setting_help(info))],
      info.default) for info in FIT_SETTING_INFOS],
    bases=(FitSettings,), frozen=True)
"""One option per declared fit setting (:data:`~.options.FIT_SETTING_OPTIONS`), for commands that choose fits
their own way (``bench``)."""
FitSettingsGroup.__module__ = __name__


@dataclass(frozen=True)
class CompensationGroup(OptionGroup):
    """``--compensate`` and how its fit is fitted."""

    compensate: CompensateOpt = "none"
    settings: FitSettingsGroup = field(default_factory=FitSettingsGroup)

    def spec(self) -> Compensation | None:
        """``--compensate`` and its settings, checked, or None for ``none``."""
        return None if self.compensate == "none" else self.settings.compensation(self.compensate).validate()
