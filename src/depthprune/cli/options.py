"""Options shared by several commands, declared once, and the helpers that turn them into API objects.

Options several commands share come in groups (:mod:`.groups`): frozen dataclasses whose fields are the
options (:class:`OptionGroup`), which a command takes as typed parameters (``model: ModelGroup``), so its
signature says which options it reads. The :func:`uses` decorator expands each such parameter into the group's
options for Typer and hands the command the group rebuilt from their values, with the builders on it
(``model.load()``, ``calibration.spec()``, ``evaluation.spec(...)``). A settings dataclass
whose fields declare their flags (``HealConfig``) becomes options through
:class:`SettingFlags`, so ``heal --lr`` and ``prune --heal-max-steps`` are
written once, on the field. The same word means
the same thing in every command: ``--batch-size`` is always sequences per
forward pass, and ``--max-steps 0`` always means "train for ``--epochs``
instead".
"""

from __future__ import annotations

import functools
import inspect
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional, Self, get_type_hints

import typer

from ..checks import flag_of, require_finite
from ..compensate import FITS, SHARED_SETTINGS
from ..fit_settings import declared_settings
from ..data.calibration import DEFAULT_EVAL_TEXTS, PPL_WINDOWS
from ..distributed import processes
from ..errors import InputError
from ..flags import OptionInfo, declared_options
from .app import ParameterSource, get_current_context

if TYPE_CHECKING:
    from ..data.calibration import CalibrationSpec
    from ..evaluate.suite import Evaluation

# ------------------------------------------------------------------ model

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="Hub id, local directory, .gguf file, or alias (smollm2-135m, gemma3-270m).")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="float32 (CPU default), bfloat16 or float16 (GPU default).")]
DeviceOpt = Annotated[Optional[str], typer.Option(
    help="cpu, cuda, cuda:N, or auto (accelerate device_map over all GPUs). Default: cuda when a GPU is available "
    "(bfloat16), else cpu (float32); the choice is printed.")]
BatchOpt = Annotated[int, typer.Option(
    "--batch-size", help="Sequences per forward pass (calibration, perplexity, lm-eval requests).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (transformers' own included).")]

# ------------------------------------------------------------------ calibration

CalibOpt = Annotated[str, typer.Option(
    "--calib", help="Calibration (and fitting) text: general (shipped: fiction, encyclopedic prose and code in "
    "equal shares), fiction, encyclopedic, code, default (the shipped novel), a mixture A+B, bookcorpus, pg19, c4, "
    "wikitext2, or a .txt/.jsonl file.")]
SamplesOpt = Annotated[int, typer.Option("--calib-samples", help="Number of calibration windows.")]
SeqLenOpt = Annotated[int, typer.Option(
    "--seq-len", help="Tokens per calibration / perplexity window (BOS included when the tokenizer adds one).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for sampling calibration windows.")]
SEQ_LEN = 128
"""``--seq-len`` by default, and the windows of a command that evaluates without calibration options (``run``)."""
SEED = 1234
"""``--seed`` by default, and the seed of a command that evaluates without calibration options."""

# ------------------------------------------------------------------ evaluation

EvalOpt = Annotated[Optional[str], typer.Option(
    "--eval", help="What to measure, comma separated: ppl; kl and top1 (mean KL(dense || model) per token and "
    "how often both predict the same next token, on the perplexity windows, against --reference); gen (greedy "
    "continuations of 8 held-out prompts per text, 32 new tokens, against the reference's: matching prefix "
    "and token F1); and/or "
    "lm-eval tasks ('paper' = the seven paper tasks; piqa = the offline piqa_local task when --piqa-dir or "
    "$DEPTHPRUNE_PIQA_DIR is set); none = nothing.")]
ReferenceOpt = Annotated[Optional[str], typer.Option(
    "--reference", help="kl/top1: the dense model to compare with (default: the source recorded in the input's "
    "depthprune_plan.json, else the input itself where it is evaluated before any change).")]
ReferenceCacheOpt = Annotated[Optional[Path], typer.Option(
    "--reference-cache", help="kl/top1: a .safetensors file for the reference's next-token distributions: "
    "read when it matches (the reference is then not loaded), written after they are computed.")]
PplDataOpt = Annotated[str, typer.Option(
    "--eval-texts", "--ppl-data",
    help="Held-out texts for ppl/kl/top1, measured in one pass and reported per text and as their mean: "
    "NAME=SOURCE,... (default: the shipped fiction, encyclopedic and code texts), or one SOURCE. A source is a "
    "shipped text (heldout-fiction, heldout-encyclopedic, heldout-code, default-heldout), wikitext2 or ptb (need "
    "the Hub) or a .txt/.jsonl file.")]
PplWindowsOpt = Annotated[int, typer.Option(help="Perplexity windows per held-out text, at most (0 = all).")]
LimitOpt = Annotated[Optional[float], typer.Option(
    help="Zero-shot: only the first N items of each task (a value below 1 is a fraction).")]
FewshotOpt = Annotated[int, typer.Option("--num-fewshot", help="Few-shot examples per item (the papers use 0).")]
TaskDirOpt = Annotated[Optional[Path], typer.Option(
    "--task-dir", help="Extra folder of lm-eval task YAMLs (e.g. tasks reading local files).")]
PiqaDirOpt = Annotated[Optional[Path], typer.Option(
    "--piqa-dir", help="Folder with PIQA's valid.jsonl + valid-labels.lst for piqa_local "
    "(default: $DEPTHPRUNE_PIQA_DIR).")]

# ------------------------------------------------------------------ compensation

CompensateOpt = Annotated[str, typer.Option(
    help="Fit a linear map at every gap the plan leaves and fold it into the layer before it: none, "
    + ", ".join(f"{fit.name} ({fit.summary})" for fit in FITS.values()) + " (see `depthprune fits`).")]

FIT_SETTING_INFOS = declared_settings()
FIT_SETTING_OPTIONS = {info.flag_name.replace("-", "_"): info.name for info in FIT_SETTING_INFOS}
"""The compensation options (the :class:`~depthprune.compensate.Compensation` settings declared with a flag)
and the setting each gives: an option is refused unless a chosen fit reads its setting (:func:`fit_option_rules`)."""


def fits_reading(setting: str) -> list[str]:
    """The registered fits that read ``setting``."""
    return [name for name, fit in FITS.items() if setting in (*SHARED_SETTINGS, *fit.settings)]


def fit_setting_help(info: OptionInfo) -> str:
    """A setting's help, prefixed with the fit that reads it when only one does (``--compensate layers: ...``)."""
    readers = fits_reading(info.name)
    return f"--compensate {readers[0]}: {info.help}" if len(readers) == 1 else info.help


def fit_option_rules(chosen: list[str], *, axis: bool = False) -> list[tuple[str, bool, str]]:
    """:func:`refuse_ignored` rules for the compensation options given the ``chosen`` fits (``none`` ignored);
    ``axis``: ``--compensate`` lists several fits (``bench``), so the message says which one to add."""
    rules = []
    for option, setting in FIT_SETTING_OPTIONS.items():
        readers = fits_reading(setting)
        if axis:
            why = f"needs {readers[0]} in --compensate" if len(readers) == 1 else "needs a fit in --compensate"
        else:
            why = "needs --compensate " + (", ".join(readers[:-1]) + " or " + readers[-1] if len(readers) > 1
                                           else readers[0])
        rules.append((option, any(fit in readers for fit in chosen), why))
    return rules


# ------------------------------------------------------------------ streaming and pushing (see .streaming)

StreamOpt = Annotated[Optional[bool], typer.Option(
    "--stream/--no-stream", help="Layer streaming: keep the weights on disk and load one decoder layer at a "
    "time (scoring, every method, linear/cosine compensation, surgery and ppl). Default: chosen when the weights "
    "would not fit in --max-memory or the available memory.", show_default=False)]
MaxMemoryOpt = Annotated[Optional[str], typer.Option(
    "--max-memory", help="Memory budget such as 8GB: decides streaming, and streamed calibration states that "
    "do not fit beside one layer and the embeddings spill to disk.")]
PushOpt = Annotated[Optional[str], typer.Option(
    "--push-to-hub", help="After saving, upload the checkpoint, plan and report with a generated model card "
    "(README.md) to this Hugging Face Hub repository (owner/name).")]

# ------------------------------------------------------------------ output

OutOpt = Annotated[Optional[str], typer.Option(help="Output checkpoint directory (never the input).")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing --out that depthprune wrote.")]
JsonOpt = Annotated[Optional[str], typer.Option("--json", help="Also write the result as JSON to this file.")]


def split_list(value: str | None) -> list[str]:
    return [x.strip() for x in (value or "").split(",") if x.strip()]


WINDOWED = ("ppl", "kl", "top1", "gen")
"""``--eval`` names measured on the held-out texts (``--eval-texts``); every other name is an lm-eval task."""


def eval_names(value: str | None) -> list[str]:
    """The ``--eval`` list; ``none`` (alone) measures nothing."""
    names = split_list(value)
    if "none" in names and len(names) > 1:
        raise InputError(f"--eval none measures nothing: drop it or the other names ({', '.join(names)})")
    return [] if names == ["none"] else names


def require_out(out: str | None, what: str = "the checkpoint") -> str:
    """Output paths stay strings until checked, so an empty ``--out ""`` is seen as empty (not as ".")."""
    if out is None:
        raise InputError(f"--out is required: the directory to write {what} to")
    return out


def default_device() -> str:
    """The GPU when there is one (in a launch of several processes, this process's own), else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    launch = processes()
    return f"cuda:{launch.local_rank}" if launch.several else "cuda"


def check_model(model: str, *seq_lens: tuple[str, int]) -> dict | None:
    """Check a model source on disk without loading it: a damaged checkpoint is named, and windows longer than
    its context are refused (``seq_lens`` are (option, length) pairs). Returns its config when on disk."""
    from ..models.load import check_context, local_config

    config = local_config(model)
    if config is not None:
        for option, length in seq_lens:
            check_context(config, length, option)
    return config


def reference_for(model: str, reference: str | None, input_is_reference: bool) -> str | None:
    """The dense model kl/top1 compare ``model`` with, checked before anything loads: ``--reference``, else
    the source recorded in the input's plan, else (None) the input itself where it is measured before any
    change; a command whose input is not the dense model and records none gets a one-line error."""
    from ..evaluate.reference import check_reference_vocab, recorded_reference
    from ..evaluate.suite import NO_REFERENCE, DivergenceError

    chosen = reference or recorded_reference(model)
    if chosen is None:
        if not input_is_reference:
            raise DivergenceError(f"{NO_REFERENCE}; {model} records none in its depthprune_plan.json")
        return None
    check_model(chosen)
    check_reference_vocab(model, chosen)
    return chosen


def check_json(path: str | None, *inputs: str | None) -> Path | None:
    """The ``--json`` file, checked before any work: never a file one of the models given reads."""
    from ..io import check_output_file

    return check_output_file(path, option="--json", inputs=[i for i in inputs if i]) if path is not None else None


def calibration(calib: str, samples: int, seq_len: int, seed: int,
                sentences_file: Path | None = None) -> "CalibrationSpec":
    from ..data.calibration import CalibrationSpec

    return CalibrationSpec(calib, samples, seq_len, seed, str(sentences_file) if sentences_file else None)


def parse_limit(limit: float | None) -> int | float | None:
    """lm-eval reads an int as a count and a float below 1 as a fraction."""
    if limit is None:
        return None
    require_finite(limit, "--limit")
    if limit <= 0:
        raise InputError(f"--limit must be positive, got {limit:g}")
    if limit >= 1:
        if not float(limit).is_integer():
            raise InputError(f"--limit {limit:g}: give a whole number of items, or a fraction below 1")
        return int(limit)
    return limit


def parse_tasks(names: list[str], piqa_dir: Path | None) -> list[str]:
    """lm-eval task names: ``paper`` expands to the papers' seven, ``piqa`` is the offline copy when it can be."""
    from ..evaluate.piqa import PIQA_LOCAL_TASK, resolve_piqa_dir
    from ..evaluate.zeroshot import PAPER_TASKS

    tasks: list[str] = []
    for name in names:
        tasks.extend(PAPER_TASKS if name == "paper" else [name])
    local = resolve_piqa_dir(str(piqa_dir) if piqa_dir else None) is not None
    return list(dict.fromkeys(PIQA_LOCAL_TASK if (t == "piqa" and local) else t for t in tasks))


def evaluation(
    what: str | None,
    *,
    ppl_data: str = DEFAULT_EVAL_TEXTS,
    ppl_windows: int = PPL_WINDOWS,
    seq_len: int = 128,
    limit: float | None = None,
    num_fewshot: int = 0,
    task_dir: Path | None = None,
    piqa_dir: Path | None = None,
    batch_size: int = 8,
    seed: int = 1234,
    speed: bool = False,
    windows_option: str = "--ppl-windows",
    reference: str | None = None,
    reference_cache: Path | None = None,
) -> "Evaluation":
    """The ``--eval`` list and its options as an :class:`~depthprune.evaluate.suite.Evaluation` (checked).

    ``windows_option`` is the option that gave ``ppl_windows`` (``eval-ppl`` calls it ``--max-windows``);
    ``reference`` is the dense model kl/top1 compare with (None: the model measured first)."""
    from ..evaluate.divergence import METRICS as DIVERGENCE_METRICS
    from ..evaluate.generation import GenerationSpec
    from ..evaluate.suite import DivergenceSpec, Evaluation, PerplexitySpec, SpeedSpec, ZeroShotSpec

    names = eval_names(what)
    if ppl_windows < 0:
        raise InputError(f"{windows_option} must be 0 (all) or more, got {ppl_windows}")
    tasks = parse_tasks([n for n in names if n not in WINDOWED], piqa_dir)
    windows = PerplexitySpec(ppl_data, seq_len, ppl_windows or None, batch_size)
    divergence = [n for n in DIVERGENCE_METRICS if n in names]
    result = Evaluation(
        perplexity=windows if "ppl" in names else None,
        generation=GenerationSpec(windows.texts()) if "gen" in names else None,
        divergence=DivergenceSpec(divergence, windows, reference, str(reference_cache) if reference_cache else None)
        if divergence else None,
        zeroshot=ZeroShotSpec(tasks, parse_limit(limit), batch_size, num_fewshot,
                              str(task_dir) if task_dir else None, str(piqa_dir) if piqa_dir else None,
                              seed) if tasks else None,
        speed=SpeedSpec() if speed else None,
    )
    return result.check()


# ------------------------------------------------------------------ option groups


@dataclass(frozen=True)
class OptionGroup:
    """Options several commands share, as a frozen dataclass whose fields are the options (annotated with their
    ``typer.Option``, defaulting to their defaults); the concrete groups are in :mod:`.groups`.

    A command takes a group as a parameter typed with it (``model: ModelGroup``); :func:`uses` recognises the
    type, lists the group's options in ``--help`` after the command's own, and rebuilds the group from their
    values. Where that parameter defaults to an instance of the group, its values are the option defaults of
    that command (``run``'s ``EvaluationGroup(eval_="ppl,kl,top1")``). A field typed with another group holds
    that group's options in its place (``EvaluationGroup.zeroshot``).
    """

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        """Each field's type with its ``typer.Option`` (the groups' modules postpone annotations)."""
        return get_type_hints(cls, include_extras=True)

    def parameters(self) -> list[inspect.Parameter]:
        """The group's options as keyword-only parameters whose defaults are this instance's values."""
        types = self.option_types()
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if is_group(types[f.name]):
                out.extend(value.parameters())
            else:
                out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=value,
                                             annotation=types[f.name]))
        return out

    @classmethod
    def taken_from(cls, values: dict[str, Any]) -> Self:
        """The group built from a command's keyword arguments, its options taken out of them."""
        types = cls.option_types()
        return cls(**{f.name: types[f.name].taken_from(values) if is_group(types[f.name]) else values.pop(f.name)
                      for f in fields(cls)})

    def resolved(self) -> Self:
        """The group as the command sees it, once parsed: a default that depends on the machine is decided."""
        return self

    def running(self) -> AbstractContextManager:
        """What stays in force while the command runs with this group's values."""
        return nullcontext()


def is_group(annotation: Any) -> bool:
    """Whether a parameter (or field) typed ``annotation`` stands for an :class:`OptionGroup`'s options."""
    return isinstance(annotation, type) and issubclass(annotation, OptionGroup)


@dataclass(frozen=True)
class SettingFlags:
    """The fields of a settings dataclass declared with :func:`depthprune.flags.option` (``HealConfig``), as
    options of a command: each flag's name, default, type and help come from the field.

    :func:`uses` puts them where the command's parameter ``into`` stands and hands that parameter the values
    as ``{field name: value}``, ready for ``cls(**values)``. ``prefix`` spells the flags for another command
    (``heal-``: ``prune --heal-max-steps``), ``names`` picks fields (in that order; default: every flag), and
    ``help_prefix`` starts each help text (``Healing: ``). A help text's ``{field}`` names that field's flag.
    """

    cls: type
    into: str
    prefix: str = ""
    names: tuple[str, ...] | None = None
    help_prefix: str = ""

    def infos(self) -> list[OptionInfo]:
        declared = {info.name: info for info in declared_options(self.cls)}
        return list(declared.values()) if self.names is None else [declared[name] for name in self.names]

    def flag(self, info: OptionInfo) -> str:
        return f"--{self.prefix}{info.flag_name}"

    def parameter(self, info: OptionInfo) -> str:
        return (self.prefix + info.flag_name).replace("-", "_")

    def help(self, info: OptionInfo) -> str:
        text = info.help.format_map({i.name: self.flag(i) for i in declared_options(self.cls)})
        if self.help_prefix and text.split(" ", 1)[0][1:].islower():  # "Optimizer steps", not "LoRA rank"
            text = text[0].lower() + text[1:]
        return self.help_prefix + text

    def parameters(self, kind: Any = inspect.Parameter.KEYWORD_ONLY) -> list[inspect.Parameter]:
        out = []
        for info in self.infos():
            flag = self.flag(info)
            declaration = f"{flag}/--no-{flag[2:]}" if info.type is bool else flag
            metavar = f"[{'|'.join(map(str, info.choices))}]" if info.choices else None
            value = Optional[info.type] if info.optional else info.type
            annotation = Annotated[value, typer.Option(declaration, help=self.help(info), metavar=metavar)]
            out.append(inspect.Parameter(self.parameter(info), kind, default=info.flag_default,
                                         annotation=annotation))
        return out

    def values(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Take this group's values out of a command's keyword arguments, as field values."""
        return {info.name: info.field_value(kwargs.pop(self.parameter(info))) for info in self.infos()}


def flag_for(name: str) -> str:
    """The option of the running command whose parameter is ``name``, as the user would type it."""
    ctx = get_current_context(silent=True)
    for param in ctx.command.params if ctx is not None else ():
        if param.name == name and param.opts:
            return max(param.opts, key=len)
    return flag_of(name)


def typed(name: str) -> bool:
    """Whether the user gave the option ``name`` (on the command line), rather than it keeping its default."""
    ctx = get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                                                  ParameterSource.ENVIRONMENT)


def refuse_ignored(*rules: tuple[str, bool, str]) -> None:
    """Refuse options the user typed that would have no effect: each rule is (parameter name, whether it has
    an effect here, why not), e.g. ``("ridge", fit is not None, "needs --compensate linear, cosine or kl")``.
    A silently ignored option is a run the user did not ask for."""
    for name, effective, why in rules:
        if typed(name) and not effective:
            raise InputError(f"{flag_for(name)} {why}; as given it would do nothing")


def check_numbers(values: dict[str, Any]) -> None:
    """Every float option of the running command is finite (``nan``/``inf`` parse as floats)."""
    for name, value in values.items():
        require_finite(value, flag_for(name))


def uses(*settings: SettingFlags) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the options of its group-typed parameters (:class:`OptionGroup`), listed in ``--help``
    after its own in the order of the parameters, and those of each :class:`SettingFlags` in ``settings``, listed
    where its parameter ``into`` stands; the command receives the groups rebuilt (and :meth:`~OptionGroup.resolved`)
    and each settings group's values as a dict.

    Every float option of the command (its own and the groups') is checked finite first. Each group's
    :meth:`~OptionGroup.running` is in force while the command runs (``--quiet``: transformers', the Hub's and
    datasets' progress bars off).
    """
    placed = {flags.into: flags for flags in settings}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        own: list[inspect.Parameter] = []
        groups: dict[str, type[OptionGroup]] = {}
        defaults: list[OptionGroup] = []
        for p in signature.parameters.values():
            if p.name in placed:
                own.extend(placed[p.name].parameters(p.kind))
            elif is_group(p.annotation):
                groups[p.name] = p.annotation
                defaults.append(p.annotation() if p.default is inspect.Parameter.empty else p.default)
            else:
                own.append(p)
        added = [q for default in defaults for q in default.parameters()]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            check_numbers(kwargs)
            built = {name: cls.taken_from(kwargs).resolved() for name, cls in groups.items()}
            values = {name: flags.values(kwargs) for name, flags in placed.items()}
            with ExitStack() as stack:
                for group in built.values():
                    stack.enter_context(group.running())
                return command(*args, **built, **values, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + added)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper

    return decorate
