"""Healing: a short LoRA fine-tune after pruning, merged back into plain weights.

The recipe of SLM and Shortened-LLaMA (both reuse LLM-Pruner's alpaca-lora
script): LoRA r=8, alpha=16, dropout 0.05 on every projection (q, k, v, o,
gate, up, down), lr 1e-4, 2 epochs over alpaca-cleaned, effective batch 64
(4 x 16 accumulation here), cutoff 256 tokens, a held-out validation split,
and the checkpoint with the lowest validation loss kept. The adapter is then
merged (``merge_and_unload``) so the result is an ordinary checkpoint that
loads without PEFT.

Training runs through the transformers ``Trainer`` rather than a hand-written
loop, so ``accelerate launch`` / DeepSpeed configurations, mixed precision,
checkpointing and resuming work as they do for any Trainer job.

Data, chosen by what ``data`` names:

* ``alpaca-cleaned`` (= ``yahma/alpaca-cleaned``) or another hub id: read with
  ``datasets.load_dataset`` (network; cached in the usual datasets cache);
* a local ``.json`` (a list of records) or ``.jsonl`` file in alpaca layout
  (``instruction``, optional ``input``, ``output``), formatted with the
  Stanford Alpaca / alpaca-lora prompt template;
* ``.txt`` files: plain language-modelling loss on consecutive blocks of
  ``cutoff_len`` tokens (the tokenizer's BOS, if any, starts each block).

Loss on alpaca records is over the *full* sequence (prompt and response) by
default, as alpaca-lora's ``train_on_inputs=True`` that LLM-Pruner, SLM and
Shortened-LLaMA run with: healing aims to restore general language modelling,
not to teach instruction following. ``train_on="response"`` masks the prompt.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .data.calibration import special_prefix
from .errors import InputError
from .io import write_json
from .models.arch import spec_for

log = logging.getLogger(__name__)

ALPACA_HUB = {"alpaca-cleaned": "yahma/alpaca-cleaned", "yahma/alpaca-cleaned": "yahma/alpaca-cleaned"}
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".json", ".jsonl")
PRESETS = ("default", "gromov")
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
CONFIG_FILE = "heal_config.json"

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

QLORA_NEEDS_CUDA = (
    "QLoRA needs a CUDA GPU: bitsandbytes 4-bit weights only run on CUDA, and this machine has none. "
    "Drop qlora (--qlora) to heal with plain LoRA, which runs on CPU."
)


class HealError(InputError):
    pass


class HealDataError(HealError):
    pass


@dataclass
class HealConfig:
    """LoRA healing hyperparameters; defaults follow SLM / Shortened-LLaMA (see the module docstring).

    ``preset="gromov"`` puts LoRA on the MLP projections only (gate/up/down),
    as Gromov et al. (arXiv 2403.17887) heal after removing a block of layers;
    they use QLoRA on C4 with their own (smaller) rank and learning rate, so
    set ``r``/``alpha``/``lr`` and the data to match their appendix when
    reproducing them; only the targets change here. ``target_modules``
    overrides both presets (PEFT module-name suffixes or one regex).

    ``max_steps > 0`` overrides ``epochs``. ``val_size`` below 1 is a fraction
    of the items, 1 or more a count, 0 disables validation (then the last
    state is kept instead of the best one). The effective batch is
    ``batch_size * grad_accum`` (times the number of processes).
    ``warmup_steps`` (alpaca-lora: 100) is capped at a tenth of the run so
    that short runs still reach the peak learning rate. Evaluation and
    checkpoints happen every ``eval_steps`` steps and at the last step.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    preset: str = "default"
    target_modules: list[str] | str | None = None
    lr: float = 1e-4
    epochs: float = 2.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 16
    eval_batch_size: int | None = None
    cutoff_len: int = 256
    val_size: float = 0.05
    eval_steps: int = 200
    eval_on_start: bool = True
    save_total_limit: int = 2
    warmup_steps: int = 100
    weight_decay: float = 0.0
    train_on: str = "full"
    max_items: int | None = None
    seed: int = 42
    logging_steps: int = 10
    qlora: bool = False
    gradient_checkpointing: bool = False
    progress: bool = True

    def validate(self) -> "HealConfig":
        if self.preset not in PRESETS:
            raise HealError(f"unknown preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        if self.train_on not in ("full", "response"):
            raise HealError(f"train_on must be 'full' or 'response', got {self.train_on!r}")
        if self.r < 1 or self.alpha <= 0:
            raise HealError(f"LoRA rank and alpha must be positive (got r={self.r}, alpha={self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise HealError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise HealError(f"learning rate must be positive, got {self.lr}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise HealError("give a positive number of epochs or max_steps")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise HealError("batch_size and grad_accum must be at least 1")
        if self.cutoff_len < 8:
            raise HealError(f"cutoff_len {self.cutoff_len} is too short; use at least 8 tokens (papers: 256)")
        if self.val_size < 0:
            raise HealError(f"val_size must be >= 0, got {self.val_size}")
        if self.eval_steps < 1 or self.logging_steps < 1:
            raise HealError("eval_steps and logging_steps must be at least 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


# ---------------------------------------------------------------- data


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca prompt (as alpaca-lora's template), up to and including '### Response:\\n'."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


@dataclass
class HealData:
    """Tokenized training and validation items (``input_ids`` and ``labels``, -100 = no loss)."""

    train: list[dict[str, list[int]]]
    val: list[dict[str, list[int]]]
    kind: str
    description: dict[str, Any] = field(default_factory=dict)


def _check_records(records: Sequence[Any], where: str) -> list[dict[str, str]]:
    if not records:
        raise HealDataError(f"{where} holds no records")
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str) \
                or not isinstance(rec.get("output"), str):
            raise HealDataError(
                f"record {i} of {where} is not in alpaca layout: each record needs string fields "
                "'instruction' and 'output' (and optionally 'input')"
            )
        inp = rec.get("input") or ""
        out.append({"instruction": rec["instruction"], "input": inp if isinstance(inp, str) else str(inp),
                    "output": rec["output"]})
    return out


def read_alpaca_file(path: Path) -> list[dict[str, str]]:
    """Records of a local alpaca .json (a list) or .jsonl (one object per line) file."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HealDataError(f"cannot read {path} as alpaca JSON ({err}); use UTF-8 .json (a list of "
                            "records) or .jsonl (one record per line)") from err
    if isinstance(records, dict) and isinstance(records.get("data"), list):
        records = records["data"]
    if not isinstance(records, list):
        raise HealDataError(f"{path} must hold a JSON list of alpaca records")
    return _check_records(records, str(path))


def read_alpaca_hub(name: str, max_items: int | None = None) -> list[dict[str, str]]:
    """Records of an alpaca-layout hub dataset (train split) via ``datasets.load_dataset``."""
    import datasets

    repo = ALPACA_HUB.get(name, name)
    try:
        ds = datasets.load_dataset(repo, split="train")
    except Exception as err:  # datasets raises many types when offline or the name is wrong
        raise HealDataError(
            f"could not load dataset {repo!r} ({type(err).__name__}: {err}). Offline? Pass a local "
            ".json/.jsonl file in alpaca layout or a .txt file"
        ) from err
    if max_items is not None:
        ds = ds.select(range(min(max_items, len(ds))))
    return _check_records(list(ds), repo)


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise HealDataError(f"cannot read {path} as UTF-8 text ({err})") from err


def tokenize_alpaca(records: Iterable[dict[str, str]], tokenizer: Any, cutoff_len: int,
                    train_on: str = "full") -> list[dict[str, list[int]]]:
    """alpaca-lora's tokenization: prompt + output, truncated to ``cutoff_len``, EOS appended if it fits."""
    eos = tokenizer.eos_token_id

    def encode(text: str, add_eos: bool) -> list[int]:
        ids = list(tokenizer(text, truncation=True, max_length=cutoff_len)["input_ids"])
        if add_eos and eos is not None and len(ids) < cutoff_len and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids

    items = []
    for rec in records:
        prompt = alpaca_prompt(rec["instruction"], rec["input"])
        ids = encode(prompt + rec["output"], add_eos=True)
        labels = list(ids)
        if train_on == "response":
            n_prompt = len(encode(prompt, add_eos=False))
            labels[:n_prompt] = [-100] * min(n_prompt, len(labels))
        if any(label != -100 for label in labels[1:]):
            items.append({"input_ids": ids, "labels": labels})
    return items


def text_blocks(texts: Sequence[str], tokenizer: Any, cutoff_len: int) -> list[dict[str, list[int]]]:
    """Consecutive ``cutoff_len``-token blocks of the joined texts (BOS, if the tokenizer adds one, first)."""
    prefix = special_prefix(tokenizer)
    body = cutoff_len - len(prefix)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*sequence length is longer than.*")
        ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    blocks = [prefix + ids[i : i + body] for i in range(0, len(ids) - body + 1, body)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def _split(items: list[dict[str, list[int]]], val_size: float, seed: int, where: str):
    n = len(items)
    n_val = 0 if val_size == 0 else (max(1, round(val_size * n)) if val_size < 1 else int(val_size))
    if n - n_val < 1:
        raise HealDataError(
            f"{where} gives {n} training items, too few for a validation split of {n_val}; "
            "use more data, a smaller val_size, or val_size=0"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = [items[i] for i in order[:n_val]]
    train = [items[i] for i in order[n_val:]]
    return train, val


def data_paths(data: str | Path | Sequence[str | Path]) -> list[Path] | None:
    """The local files ``data`` names, or None when it names a hub dataset."""
    if isinstance(data, (list, tuple)):
        return [Path(d).expanduser() for d in data]
    path = Path(data).expanduser()
    if isinstance(data, Path) or path.suffix in TEXT_SUFFIXES + JSON_SUFFIXES or path.exists() \
            or str(data).startswith((".", "/", "~")):
        return [path]
    return None


def load_heal_data(data: str | Path | Sequence[str | Path], tokenizer: Any, config: HealConfig) -> HealData:
    """Read, format, tokenize and split ``data`` (see the module docstring for what it may name)."""
    paths = data_paths(data)
    if paths is None:
        if str(data) not in ALPACA_HUB and str(data).count("/") != 1:
            raise HealDataError(
                f"unknown healing data {data!r}: pass 'alpaca-cleaned', a hub id in alpaca layout, a local "
                ".json/.jsonl file in alpaca layout, or .txt files"
            )
        records = read_alpaca_hub(str(data), config.max_items)
        items = tokenize_alpaca(records, tokenizer, config.cutoff_len, config.train_on)
        kind, desc = "alpaca", {"source": f"hub:{ALPACA_HUB.get(str(data), str(data))}", "records": len(records)}
    else:
        for p in paths:
            if not p.is_file():
                raise HealDataError(f"healing data file not found: {p}")
        suffixes = {p.suffix for p in paths}
        if suffixes <= set(JSON_SUFFIXES):
            records = [r for p in paths for r in read_alpaca_file(p)][: config.max_items]
            items = tokenize_alpaca(records, tokenizer, config.cutoff_len, config.train_on)
            kind, desc = "alpaca", {"source": [str(p) for p in paths], "records": len(records)}
        elif not suffixes & set(JSON_SUFFIXES):
            items = text_blocks([_read_text_file(p) for p in paths], tokenizer, config.cutoff_len)
            items = items[: config.max_items]
            kind, desc = "text", {"source": [str(p) for p in paths], "blocks": len(items)}
        else:
            raise HealDataError("do not mix alpaca .json/.jsonl files and plain text files in one run")
    if not items:
        raise HealDataError(
            f"{data} yields no training items of up to {config.cutoff_len} tokens; text must be longer "
            "than one block, alpaca records need a non-empty output"
        )
    train, val = _split(items, config.val_size, config.seed, str(data))
    desc.update(kind=kind, train_items=len(train), val_items=len(val), cutoff_len=config.cutoff_len,
                train_on=config.train_on if kind == "alpaca" else "full")
    return HealData(train, val, kind, desc)


class _Items(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, list[int]]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


@dataclass
class PadCollator:
    """Right-pad to the longest item (a multiple of 8); padding is masked and never a target."""

    pad_id: int
    multiple_of: int = 8

    def __call__(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        width = -(-width // self.multiple_of) * self.multiple_of
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, :n] = torch.tensor(it["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(it["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


# ---------------------------------------------------------------- training


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

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "model"}


def _make_callbacks():
    from transformers import ProgressCallback, TrainerCallback

    class EvaluateAtEnd(TrainerCallback):
        """Evaluate and checkpoint at the last step too, so the final weights compete for 'best'."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps and state.global_step >= state.max_steps:
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

    return EvaluateAtEnd, LossBar


def _steps_per_run(n_train: int, config: HealConfig) -> int:
    if config.max_steps > 0:
        return config.max_steps
    batches = math.ceil(n_train / config.batch_size)
    return max(1, math.ceil(config.epochs * math.ceil(batches / config.grad_accum)))


def _checkpoint_to_resume(ckpt_dir: Path, resume: bool) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
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

    tmp = workdir / "qlora-base"
    model.save_pretrained(tmp)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
            device_map={"": torch.cuda.current_device()},
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=config.gradient_checkpointing)


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
) -> HealResult:
    """Train a LoRA adapter on ``data``, merge it into ``model``'s weights, and return the merged model.

    ``model`` is changed in place (like :func:`depthprune.apply_plan`) and
    returned in ``HealResult.model`` without any PEFT module. Everything
    written goes under ``output_dir``: ``checkpoints/`` (Trainer checkpoints
    of the adapter, optimizer and scheduler, for ``resume=True``),
    ``heal_config.json`` and, with ``save_adapter=True``, ``adapter/`` (the
    best adapter alone, loadable with ``PeftModel.from_pretrained``). Saving
    the merged model is left to :func:`depthprune.save`.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments, set_seed

    config = (config or HealConfig()).validate()
    if config.qlora and not torch.cuda.is_available():
        raise HealError(QLORA_NEEDS_CUDA)
    spec_for(model)
    started = time.perf_counter()
    output_dir = Path(output_dir).expanduser().resolve()
    ckpt_dir = output_dir / CHECKPOINTS
    resume_from = _checkpoint_to_resume(ckpt_dir, resume)

    heal_data = load_heal_data(data, tokenizer, config)
    targets = config.target_modules or lora_targets(model, config.preset)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_run_config(output_dir, config, heal_data.description, resuming=resume_from is not None)

    lora = LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
        bias="none", task_type="CAUSAL_LM", fan_in_fan_out=spec_for(model).family == "gpt2",
    )
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    saved_use_cache = getattr(model.config, "use_cache", None)
    set_seed(config.seed)
    base = _quantized_copy(model, output_dir, config) if config.qlora else model
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(base, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    has_val = bool(heal_data.val)
    total = _steps_per_run(len(heal_data.train), config)
    every = min(config.eval_steps, total)
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        learning_rate=config.lr,
        warmup_steps=min(config.warmup_steps, total // 10),
        weight_decay=config.weight_decay,
        logging_steps=min(config.logging_steps, total),
        eval_strategy="steps" if has_val else "no",
        eval_steps=every if has_val else None,
        eval_on_start=config.eval_on_start and has_val and resume_from is None,
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
    )
    evaluate_at_end, loss_bar = _make_callbacks()
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=_Items(heal_data.train),
        eval_dataset=_Items(heal_data.val) if has_val else None,
        data_collator=PadCollator(_pad_id(tokenizer)),
        callbacks=[evaluate_at_end(), *callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    if config.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(loss_bar())
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    try:
        output = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        if saved_use_cache is not None:
            model.config.use_cache = saved_use_cache
    state = trainer.state

    adapter_dir = None
    if save_adapter and trainer.is_world_process_zero():
        adapter_dir = output_dir / ADAPTER
        peft_model.save_pretrained(adapter_dir)
    if config.qlora:
        weights = get_peft_model_state_dict(peft_model)
        peft_model = get_peft_model(model, lora)
        set_peft_model_state_dict(peft_model, weights)
    merged = peft_model.merge_and_unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(merged):
            delattr(merged, attr)
    leftover = [name for name, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
    if leftover:
        raise RuntimeError(f"PEFT modules left after merging: {leftover[:3]}")
    for p, flag in saved_flags.items():
        p.requires_grad_(flag)
    merged.eval()

    history = state.log_history
    return HealResult(
        model=merged,
        global_step=state.global_step,
        train_loss=getattr(output, "training_loss", None),
        train_losses=[(h["step"], h["loss"]) for h in history if "loss" in h],
        eval_losses=[(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h],
        best_eval_loss=state.best_metric,
        best_checkpoint=state.best_model_checkpoint,
        resumed_from=resume_from,
        adapter_dir=str(adapter_dir) if adapter_dir else None,
        target_modules=targets,
        trainable_parameters=trainable,
        data=heal_data.description,
        config=config.to_dict(),
        runtime_s=time.perf_counter() - started,
    )


__all__ = [
    "HealConfig",
    "HealData",
    "HealDataError",
    "HealError",
    "HealResult",
    "PadCollator",
    "alpaca_prompt",
    "data_paths",
    "heal",
    "load_heal_data",
    "lora_targets",
    "read_alpaca_file",
    "read_alpaca_hub",
    "text_blocks",
    "tokenize_alpaca",
]
