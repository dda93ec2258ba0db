"""Healing: a short fine-tune after pruning, saved as plain weights.

The default recipe is SLM's and Shortened-LLaMA's (both reuse LLM-Pruner's
alpaca-lora script): LoRA r=8, alpha=16, dropout 0.05 on every projection (q,
k, v, o, gate, up, down), lr 1e-4, 2 epochs over alpaca-cleaned, effective
batch 64 (4 x 16 accumulation here), cutoff 256 tokens, a held-out validation
split, and the checkpoint with the lowest validation loss kept. The adapter is
then merged (``merge_and_unload``) so the result is an ordinary checkpoint that
loads without PEFT. Alternatives (:mod:`.distill`): distil from the dense
model instead of (or mixed with) the language-modelling loss, and train the
last layers instead of LoRA adapters.

Training runs through the transformers ``Trainer`` rather than a hand-written
loop, so ``accelerate launch`` / DeepSpeed configurations, mixed precision,
checkpointing and resuming work as they do for any Trainer job.

Modules: :mod:`.config` (settings), :mod:`.data` (alpaca / text data),
:mod:`.train` (the run), :mod:`.distill` (distillation loss, last-layer training), :mod:`.teacher` (the
teacher's distributions, computed once before training and cached).
"""

from .config import PRESETS, QLORA_NEEDS_CUDA, HealConfig, HealDataError, HealError
from .data import (
    HealData,
    PadCollator,
    alpaca_prompt,
    check_heal_data,
    data_paths,
    load_heal_data,
    read_alpaca_file,
    read_alpaca_hub,
    text_blocks,
    tokenize_alpaca,
)
from .distill import distill_trainer, distillation_loss_sum, rows_loss_sum, train_last_layers
from .teacher import Teacher, TeacherCache, teacher_cache
from .train import HealResult, heal, lora_targets, token_budget

__all__ = [
    "PRESETS",
    "QLORA_NEEDS_CUDA",
    "HealConfig",
    "HealData",
    "HealDataError",
    "HealError",
    "HealResult",
    "PadCollator",
    "Teacher",
    "TeacherCache",
    "alpaca_prompt",
    "check_heal_data",
    "data_paths",
    "distill_trainer",
    "distillation_loss_sum",
    "heal",
    "load_heal_data",
    "lora_targets",
    "read_alpaca_file",
    "read_alpaca_hub",
    "rows_loss_sum",
    "teacher_cache",
    "text_blocks",
    "token_budget",
    "tokenize_alpaca",
    "train_last_layers",
]
