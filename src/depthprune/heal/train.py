"""The healing run: LoRA (or the last layers) trained with the transformers ``Trainer``, merged into plain
weights; optionally distilled from the dense model (see :mod:`.distill`)."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..distributed import GROUP_TIMEOUT, check_launch, main_first, processes, requested_engine, wait_for_all
from ..io import write_json
from ..models.arch import spec_for
from .config import ADAPTER, CHECKPOINTS, CONFIG_FILE, PRESETS, QLORA_NEEDS_CUDA, HealConfig, HealError
from .data import HealData, Items, PadCollator, load_heal_data, pad_id
from .distill import IndexedItems, TeacherRowsCollator, distill_trainer, train_last_layers
from .teacher import TEACHER_CACHE, Teacher, TeacherCache, loss_name, teacher_cache

log = logging.getLogger(__name__)


def lora_targets(model: nn.Module, preset: str = "default") -> list[str] | str:
    """PEFT ``target_modules`` for the model's projections (all, or MLP only for ``gromov``).

    Module-name suffixes when they single out the chosen projections
    (``q_proj`` ... ``down_proj``); a regex over full paths when a suffix is
    shared with a projection that must stay frozen (GPT-2 names both its
    attention output and its MLP output ``c_proj``).
    """
    if preset not in PRESETS:
        raise HealError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    spec = spec_for(model)
    chosen = list(spec.projections.values()) if preset == "default" else spec.mlp_paths
    others = [p for p in spec.projections.values() if p not in chosen]
    if not chosen:
        raise HealError(f"the {spec.family} spec names no projections for preset {preset!r}")
    suffixes = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in chosen))
    if not set(suffixes) & {p.rsplit(".", 1)[-1] for p in others}:
        return suffixes
    alternatives = "|".join(re.escape(p) for p in chosen)
    return rf"{re.escape(spec.layers)}\.\d+\.(?:{alternatives})"


@dataclass
class HealResult:
    """The merged model (plain transformers, no PEFT modules) and what training reported."""

    model: nn.Module
    global_step: int
    train_loss: float | None
    train_losses: list[tuple[int, float]]
    eval_losses: list[tuple[int, float]]
    best_eval_loss: float | None
    best_checkpoint: str | None
    resumed_from: str | None
    adapter_dir: str | None
    target_modules: list[str] | str
    trainable_parameters: int
    data: dict[str, Any]
    config: dict[str, Any]
    runtime_s: float
    tokens_seen: int = 0
    train_seconds: float = 0.0
    tokens_per_s: float | None = None
    processes: int = 1
    engine: str = "single process"
    teacher: dict[str, Any] | None = None

    @property
    def tokens_per_s_per_process(self) -> float | None:
        return self.tokens_per_s / self.processes if self.tokens_per_s else None

    def to_dict(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in self.__dataclass_fields__ if name != "model"},
                "tokens_per_s_per_process": self.tokens_per_s_per_process}


def _make_callbacks(max_tokens: int | None = None):
    from transformers import ProgressCallback, TrainerCallback

    class EvaluateAtEnd(TrainerCallback):
        """Evaluate and checkpoint at the last step too, so the final weights compete for 'best'; the last step
        is the one at ``max_steps`` or the one that reaches the token budget ``max_tokens``."""

        def on_step_end(self, args, state, control, **kwargs):
            spent = max_tokens is not None and state.num_input_tokens_seen >= max_tokens
            if spent:
                control.should_training_stop = True
            if spent or (state.max_steps and state.global_step >= state.max_steps):
                control.should_save = True
                if args.eval_strategy != "no":
                    control.should_evaluate = True
            return control

    class LossBar(ProgressCallback):
        """The Trainer's progress bar, with the latest loss in its postfix instead of printed dicts."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                shown = {k: f"{logs[k]:.4f}" for k in ("loss", "eval_loss") if k in logs}
                if shown:
                    self.training_bar.set_postfix(shown, refresh=False)

    class StepClock(TrainerCallback):
        """Seconds spent in optimizer steps (forward, backward, update; not evaluation or saving) and the tokens
        they saw, for the training throughput of this session."""

        def __init__(self):
            self.seconds, self.tokens, self._since = 0.0, 0, None

        def on_step_begin(self, args, state, control, **kwargs):
            self._since = (time.perf_counter(), state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, **kwargs):
            if self._since is not None:
                self.seconds += time.perf_counter() - self._since[0]
                self.tokens += state.num_input_tokens_seen - self._since[1]

    return EvaluateAtEnd, LossBar, StepClock


def engine_of(trainer: Any) -> str:
    """How the Trainer ran: one process, data-parallel (DDP), FSDP or DeepSpeed, as accelerate set it up."""
    kind = trainer.accelerator.distributed_type.value
    return {"NO": "single process", "MULTI_CPU": "DDP (gloo)", "MULTI_GPU": "DDP (NCCL)"}.get(kind, kind)


SHARDED_ENGINES = ("FSDP", "DEEPSPEED")
"""Engines that leave each process only a shard of the trained weights (FSDP; DeepSpeed, whose ZeRO-3 does)."""


def unsharded_copy(model: nn.Module, state: dict[str, torch.Tensor], lora: Any | None) -> nn.Module:
    """A new model of ``model``'s architecture holding ``state`` (the trained model's full state dict as
    accelerate gathers it): with ``lora``, the PEFT model those weights come from, ready to merge.

    Needs one whole copy of the model in the main process's CPU memory, in the model's dtype."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = next(p.dtype for p in state.values() if p.is_floating_point())
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    if lora is not None:
        fresh = get_peft_model(fresh, lora)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    allowed = TIED_HEADS if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - allowed:
        raise RuntimeError(f"gathered weights do not fit the model: missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}")
    fresh.tie_weights()
    return fresh.train(model.training)


TIED_HEADS = {"lm_head.weight", "base_model.model.lm_head.weight"}
"""A tied LM head is the embedding matrix: a gathered state dict may leave it out."""


def _steps_per_run(n_train: int, config: HealConfig) -> int:
    if config.max_steps > 0:
        return config.max_steps
    batches = math.ceil(n_train / config.batch_size)
    return max(1, math.ceil(config.epochs * math.ceil(batches / config.grad_accum)))


def token_budget(train: list[dict[str, list[int]]], config: HealConfig) -> tuple[list[dict[str, list[int]]], int]:
    """The training items a run reads and its optimizer steps. With ``max_tokens``: steps = the budget over the
    tokens of one step (the items' mean length x items per step); when that is less than an epoch, only the
    first items of the shuffled split are used, each once."""
    if config.max_tokens is None:
        return train, _steps_per_run(len(train), config)
    mean = sum(len(it["input_ids"]) for it in train) / len(train)
    config.check_budget(mean)
    steps = math.ceil(config.max_tokens / (mean * config.items_per_step))
    return train[: steps * config.items_per_step], steps


CHECKPOINT_NAME = re.compile(r"checkpoint-([0-9]+)")
COMPLETE_CHECKPOINT = "trainer_state.json"
"""The Trainer writes it after the weights, optimizer and scheduler of a checkpoint: a checkpoint without it
was cut off while being written (a SIGTERM leaves ``checkpoint-2/`` holding only a README)."""


def last_complete_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest Trainer checkpoint in ``ckpt_dir`` that was written to the end; incomplete newer ones are
    skipped (transformers' ``get_last_checkpoint`` takes the highest number and then fails to read it)."""
    if not ckpt_dir.is_dir():
        return None
    found = sorted(((int(m[1]), entry) for entry in ckpt_dir.iterdir()
                    if entry.is_dir() and (m := CHECKPOINT_NAME.fullmatch(entry.name))), reverse=True)
    for _, entry in found:
        if (entry / COMPLETE_CHECKPOINT).is_file():
            return str(entry)
        log.warning("skipping %s: it was not written to the end (no %s)", entry, COMPLETE_CHECKPOINT)
    return None


def _checkpoint_to_resume(ckpt_dir: Path, resume: bool) -> str | None:
    last = last_complete_checkpoint(ckpt_dir)
    if resume:
        if last is None:
            log.warning("resume requested but %s holds no checkpoint; starting from the beginning", ckpt_dir)
        return last
    if last is not None:
        raise HealError(
            f"{ckpt_dir} already holds {Path(last).name} from an earlier run: pass resume=True (--resume) "
            "to continue it, or use a new output directory"
        )
    return None


def _write_run_config(output_dir: Path, config: HealConfig, data: dict[str, Any], resuming: bool) -> None:
    path = output_dir / CONFIG_FILE
    record = {"config": config.to_dict(), "data": data}
    if resuming and path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k, v in record["config"].items()
                         if k != "progress" and before.get("config", {}).get(k) != v)
        if changed:
            log.warning("resuming with changed settings %s; the checkpoint was made with %s", changed,
                        {k: before["config"].get(k) for k in changed})
    write_json(path, record)


def _quantized_copy(model: nn.Module, workdir: Path, config: HealConfig) -> nn.Module:
    """A 4-bit NF4 copy of ``model`` for QLoRA training (the float model is merged afterwards)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise HealError("QLoRA needs bitsandbytes: pip install bitsandbytes") from err
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    launch = processes()
    tmp = workdir / f"qlora-base-{launch.rank}"
    model.save_pretrained(tmp)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
            device_map={"": launch.local_rank if launch.several else torch.cuda.current_device()},
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=config.gradient_checkpointing)


@dataclass
class HealSetup:
    """What training reads, made ready before it starts: the data within its budget, the teacher or its cached
    distributions, where checkpoints go and which one a resumed run continues."""

    config: HealConfig
    data: HealData
    train_items: list[dict[str, list[int]]]
    steps: int
    output_dir: Path
    resume_from: str | None
    cache: TeacherCache | None = None
    teacher: nn.Module | None = None
    teacher_record: dict[str, Any] | None = None


@dataclass
class Trainee:
    """The model as it trains: a PEFT model around it (LoRA), or itself with only its last layers trainable."""

    model: nn.Module
    lora: Any | None
    targets: list[str] | str
    parameters: int


def prepare(model: nn.Module, tokenizer: Any, data: str | Path | Sequence[str | Path], config: HealConfig,
            output_dir: Path, *, resume: bool, save_adapter: bool,
            teacher: nn.Module | Teacher | None) -> HealSetup:
    """Check the request, read and tokenize the data, and build (main process) or read (the others) the
    teacher's cache."""
    if config.qlora and not torch.cuda.is_available():
        raise HealError(QLORA_NEEDS_CUDA)
    if config.distill and teacher is None:
        raise HealError("distillation needs the dense model as teacher (--teacher, or heal inside prune)")
    if save_adapter and config.last_layers() is not None:
        raise HealError("--save-adapter needs LoRA; --train-layers last:N trains the weights themselves")
    spec_for(model)
    launch = processes()
    check_launch(batch_size=config.batch_size, eval_batch_size=config.eval_batch_size, stream=None)
    resume_from = _checkpoint_to_resume(output_dir / CHECKPOINTS, resume)

    heal_data = load_heal_data(data, tokenizer, config)
    train_items, steps = token_budget(heal_data.train, config)
    heal_data.description["train_items_used"] = len(train_items)
    output_dir.mkdir(parents=True, exist_ok=True)
    if launch.main:
        _write_run_config(output_dir, config, heal_data.description, resuming=resume_from is not None)
    setup = HealSetup(config, heal_data, train_items, steps, output_dir, resume_from)

    if config.distill and config.teacher_cache:
        where = Path(config.teacher_cache_dir).expanduser() if config.teacher_cache_dir else output_dir / TEACHER_CACHE
        with main_first():
            setup.cache = teacher_cache(teacher, [*heal_data.val, *train_items], where, config,
                                        vocab_size=model.get_output_embeddings().weight.shape[0],
                                        pad=pad_id(tokenizer), progress=config.progress and launch.main,
                                        built_by_main=not launch.main)
        setup.teacher_record = {"mode": "cache", **setup.cache.record}
    elif config.distill:
        setup.teacher = teacher.load() if isinstance(teacher, Teacher) else teacher
        setup.teacher_record = {"mode": "live: the teacher runs on every step"}
    if setup.teacher_record is not None:
        setup.teacher_record["loss"] = loss_name(setup.cache.cache if setup.cache else None, config)
    return setup


def trainee(model: nn.Module, config: HealConfig, output_dir: Path) -> Trainee:
    """LoRA adapters on the chosen projections (on a 4-bit copy for QLoRA), or the last layers unfrozen."""
    from peft import LoraConfig, get_peft_model

    last = config.last_layers()
    if last is not None:
        train_last_layers(model, last)
        return Trainee(model, None, [f"the LM head and the last {last} layers"],
                       sum(p.numel() for p in model.parameters() if p.requires_grad))
    targets = config.target_modules or lora_targets(model, config.preset)
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM", fan_in_fan_out=spec_for(model).conv1d)
    base = _quantized_copy(model, output_dir, config) if config.qlora else model
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        trained = get_peft_model(base, lora)
    return Trainee(trained, lora, targets, sum(p.numel() for p in trained.parameters() if p.requires_grad))


def training_arguments(setup: HealSetup) -> Any:
    """The Trainer's arguments: the recipe of :class:`HealConfig`, evaluation and checkpoints every
    ``eval_steps`` with the best kept, and in a launch of several processes each batch split across them."""
    from transformers import TrainingArguments

    config, steps, has_val = setup.config, setup.steps, bool(setup.data.val)
    every = min(config.eval_steps, steps)
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(setup.output_dir / CHECKPOINTS),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps > 0 else (steps if config.max_tokens else -1),
        include_num_input_tokens_seen="non_padding",
        learning_rate=config.lr,
        warmup_steps=min(config.warmup_steps, steps // 10),
        weight_decay=config.weight_decay,
        logging_steps=min(config.logging_steps, steps),
        eval_strategy="steps" if has_val else "no",
        eval_steps=every if has_val else None,
        eval_on_start=config.eval_on_start and has_val and setup.resume_from is None,
        save_strategy="steps",
        save_steps=every,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss" if has_val else None,
        greater_is_better=False if has_val else None,
        report_to="none",
        push_to_hub=False,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=not config.progress,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        accelerator_config={"split_batches": processes().several},
        ddp_find_unused_parameters=False,
        ddp_timeout=int(GROUP_TIMEOUT.total_seconds()),
    )


def make_trainer(student: Trainee, setup: HealSetup, tokenizer: Any, callbacks: Sequence[Any]) -> tuple[Any, Any]:
    """The Trainer (the distillation one with a teacher) and the clock that times its optimizer steps."""
    from transformers import PrinterCallback, ProgressCallback, Trainer

    config, cache, val = setup.config, setup.cache, setup.data.val
    evaluate_at_end, loss_bar, step_clock = _make_callbacks(config.max_tokens)
    clock = step_clock()
    distill = {"teacher": setup.teacher, "cache": cache, "alpha": config.distill_alpha,
               "temperature": config.temperature, "top_k": config.distill_top_k} if config.distill else {}
    collator = PadCollator(pad_id(tokenizer))
    trainer = (distill_trainer() if config.distill else Trainer)(
        model=student.model,
        args=training_arguments(setup),
        train_dataset=IndexedItems(setup.train_items, len(val)) if cache else Items(setup.train_items),
        eval_dataset=(IndexedItems(val) if cache else Items(val)) if val else None,
        data_collator=TeacherRowsCollator(collator, cache) if cache else collator,
        callbacks=[evaluate_at_end(), clock, *callbacks],
        **distill,
    )
    trainer.remove_callback(PrinterCallback)
    if config.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(loss_bar())
    return trainer, clock


def run_training(trainer: Any, model: nn.Module, resume_from: str | None) -> Any:
    """Train (without the KV cache, which training never reads) and wait for every process to finish."""
    saved_use_cache = getattr(model.config, "use_cache", None)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    try:
        output = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        if saved_use_cache is not None:
            model.config.use_cache = saved_use_cache
    wait_for_all()  # every process has read the best checkpoint before the main one may remove it
    return output


def plain_weights(trainer: Any, model: nn.Module, student: Trainee, setup: HealSetup,
                  save_adapter: bool) -> tuple[nn.Module, Path | None]:
    """The trained model as plain weights (LoRA merged), gathered whole first when the engine sharded it;
    with ``save_adapter`` the adapter alone is written too. Returns the model and the adapter's folder."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    main, trained, lora = processes().main, student.model, student.lora
    engine = engine_of(trainer)
    if requested_engine() not in (None, engine) and main:
        log.warning("the launch's accelerate config asks for %s, but accelerate ran %s (it shards only on GPUs): "
                    "every process held the whole model", requested_engine(), engine)
    sharded = engine in SHARDED_ENGINES
    if sharded:  # every process sends its shard; the main process gets whole weights to merge and save
        full = trainer.accelerator.get_state_dict(trainer.model)
        trained = unsharded_copy(model, full, lora) if main else trained
    adapter_dir = None
    if save_adapter and trainer.is_world_process_zero():
        adapter_dir = setup.output_dir / ADAPTER
        trained.save_pretrained(adapter_dir)
    if sharded and not main:
        return model, adapter_dir  # only the main process's copy is merged and written
    if lora is None:
        return trained, adapter_dir
    if setup.config.qlora:
        weights = get_peft_model_state_dict(trained)
        trained = get_peft_model(model, lora)
        set_peft_model_state_dict(trained, weights)
    merged = trained.merge_and_unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(merged):
            delattr(merged, attr)
    leftover = [name for name, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
    if leftover:
        raise RuntimeError(f"PEFT modules left after merging: {leftover[:3]}")
    return merged, adapter_dir


def heal(
    model: nn.Module,
    tokenizer: Any,
    data: str | Path | Sequence[str | Path],
    config: HealConfig | None = None,
    output_dir: str | Path = "heal-run",
    *,
    resume: bool = False,
    save_adapter: bool = False,
    callbacks: Sequence[Any] = (),
    teacher: nn.Module | Teacher | None = None,
) -> HealResult:
    """Heal ``model`` on ``data`` and return it as plain weights (LoRA merged, or its last layers trained).

    ``model`` is changed in place (like :func:`depthprune.apply_plan`) and
    returned in ``HealResult.model`` without any PEFT module. Everything
    written goes under ``output_dir``: ``checkpoints/`` (Trainer checkpoints
    of the trained weights, optimizer and scheduler, for ``resume=True``),
    ``heal_config.json`` and, with ``save_adapter=True`` (LoRA only),
    ``adapter/`` (the best adapter alone, loadable with
    ``PeftModel.from_pretrained``). ``teacher`` is the dense model the loss
    distils from when ``config.distill`` is set: a model, or a
    :class:`~.teacher.Teacher` that loads it only when its cache must be built
    (then ``teacher-cache/`` holds its distributions, unless
    ``config.teacher_cache_dir`` names another place). Saving the healed model
    is left to :func:`depthprune.save`.

    Three steps: :func:`prepare` (data, teacher), training (:func:`trainee`, :func:`make_trainer`,
    :func:`run_training`), :func:`plain_weights` (merge, or gather and merge).
    """
    from transformers import set_seed

    started = time.perf_counter()
    config = (config or HealConfig()).validate()
    setup = prepare(model, tokenizer, data, config, Path(output_dir).expanduser().resolve(), resume=resume,
                    save_adapter=save_adapter, teacher=teacher)

    saved_flags = {p: p.requires_grad for p in model.parameters()}
    set_seed(config.seed)
    student = trainee(model, config, setup.output_dir)
    trainer, clock = make_trainer(student, setup, tokenizer, callbacks)
    output = run_training(trainer, model, setup.resume_from)

    merged, adapter_dir = plain_weights(trainer, model, student, setup, save_adapter)
    for p, flag in saved_flags.items():
        p.requires_grad_(flag)
    merged.eval()
    state = trainer.state
    history = state.log_history
    return HealResult(
        model=merged,
        global_step=state.global_step,
        train_loss=getattr(output, "training_loss", None),
        train_losses=[(h["step"], h["loss"]) for h in history if "loss" in h],
        eval_losses=[(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h],
        best_eval_loss=state.best_metric,
        best_checkpoint=state.best_model_checkpoint,
        resumed_from=setup.resume_from,
        adapter_dir=str(adapter_dir) if adapter_dir else None,
        target_modules=student.targets,
        trainable_parameters=student.parameters,
        data=setup.data.description,
        config=config.to_dict(),
        runtime_s=time.perf_counter() - started,
        tokens_seen=int(state.num_input_tokens_seen),
        train_seconds=clock.seconds,
        tokens_per_s=clock.tokens / clock.seconds if clock.seconds else None,
        processes=processes().world,
        engine=engine_of(trainer),
        teacher=setup.teacher_record,
    )
