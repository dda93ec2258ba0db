"""Healing settings and errors.

A :class:`HealConfig` field declared with :func:`~depthprune.flags.option` is a command-line flag: ``heal``
offers every one (``--lr``), ``prune`` some with the ``--heal-`` prefix (``--heal-max-steps``), their help
from the field's. In a help text ``{max_steps}`` names another setting's flag as the command spells it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from ..checks import flag_of, require_finite_fields
from ..errors import InputError
from ..flags import OptionInfo, declared_options, option

PRESETS = ("default", "gromov")
TRAIN_ON = ("full", "response")
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
CONFIG_FILE = "heal_config.json"

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

    ``max_steps > 0`` overrides ``epochs`` (0: train for ``epochs``). ``val_size`` below 1 is a fraction
    of the items, 1 or more a count, 0 disables validation (then the last
    state is kept instead of the best one). The effective batch is
    ``batch_size * grad_accum``, however many processes share it (each takes its part of every batch).
    ``warmup_steps`` (alpaca-lora: 100) is capped at a tenth of the run so
    that short runs still reach the peak learning rate. Evaluation and
    checkpoints happen every ``eval_steps`` steps and at the last step.

    What is trained and on what loss (see :mod:`depthprune.heal.distill`):
    ``train_layers="lora"`` (default) trains LoRA adapters and merges them;
    ``"last:N"`` fine-tunes the LM head and the last N layers instead (no
    adapter). ``distill=True`` replaces the language-modelling loss with the
    KL divergence from the dense (teacher) model's next-token distribution at
    ``temperature``, mixed as ``distill_alpha * KL + (1 - distill_alpha) * LM``;
    ``distill_top_k`` keeps only the teacher's k most likely tokens, renormalised
    (for large vocabularies).

    The teacher's distributions are computed once before training and cached
    (``teacher_cache``; see :mod:`depthprune.heal.teacher`): exact when they fit
    ``teacher_cache_mb``, else its ``teacher_top_k`` tokens + remainder, in
    ``teacher_cache_dir`` (default: the work directory), where a later run with
    the same teacher, data and settings reuses them. ``teacher_cache=False``
    runs the teacher on every step instead.

    ``max_tokens`` is the training budget in tokens (non-padding input tokens,
    counted over every micro-batch): steps are derived from it (the items'
    mean length x ``batch_size`` x ``grad_accum`` per step) and training stops
    once that many were seen. Below one budget, a run that fits one epoch
    trains on the first items of the (shuffled) training split only, each
    once, so a teacher cache covers just those.
    """

    r: int = option(8, "LoRA rank r.", flag="rank")
    alpha: int = option(16, "LoRA alpha (scale = alpha / r).")
    dropout: float = option(0.05, "LoRA dropout.")
    preset: str = option("default", "default: LoRA on every projection (q,k,v,o,gate,up,down); gromov: MLP "
                         "projections only.", choices=PRESETS)
    target_modules: list[str] | str | None = None
    lr: float = option(1e-4, "Peak learning rate (SLM / Shortened-LLaMA: 1e-4).")
    epochs: float = option(2.0, "Passes over the training split when {max_steps} is 0 (SLM: 2).")
    max_steps: int = option(0, "Optimizer steps (0 = train for {epochs}).")
    batch_size: int = option(4, "Training items per micro-batch; in a launch of several processes the global "
                             "micro-batch, split evenly across them.")
    grad_accum: int = option(16, "Micro-batches per optimizer step (4 x 16 = 64, as SLM).")
    eval_batch_size: int | None = None
    cutoff_len: int = option(256, "Tokens per training item (longer ones are truncated).")
    val_size: float = option(0.05, "Validation split: a fraction (<1) or a number of items; 0 = none (keep the "
                             "last state).")
    eval_steps: int = option(200, "Evaluate and checkpoint every N steps (and at the end).")
    eval_on_start: bool = True
    save_total_limit: int = 2
    warmup_steps: int = 100
    weight_decay: float = 0.0
    train_on: str = option("full", "alpaca data: loss on the 'full' sequence (alpaca-lora default) or the "
                           "'response' only.", choices=TRAIN_ON)
    max_items: int | None = option(None, "Use only the first N records / text blocks.")
    seed: int = option(42, "Seed for the split, LoRA init and data order.")
    logging_steps: int = 10
    qlora: bool = option(False, "Train on a 4-bit (NF4) copy of the model (needs CUDA + bitsandbytes); the "
                         "adapter is merged into the float weights.")
    gradient_checkpointing: bool = False
    train_layers: str = option("lora", "What to train: lora (adapters on every projection, merged after) or "
                               "last:N (the LM head and the last N layers, in full).")
    distill: bool = option(False, "Distil from the dense model: KL from its next-token distribution instead of "
                           "the LM loss.")
    distill_alpha: float = option(1.0, "Distillation: weight of the KL term; 1 - alpha goes to the LM loss.")
    temperature: float = option(1.0, "Distillation temperature.")
    distill_top_k: int | None = option(None, "Distillation: KL from the teacher's k most likely tokens only, "
                                       "renormalised (large vocabularies).")
    max_tokens: int | None = option(None, "Training budget in tokens (non-padding, every micro-batch): the steps "
                                    "follow from it and training stops once that many were seen (instead of "
                                    "{max_steps} / {epochs}).")
    teacher_cache: bool = option(True, "Distillation: run the teacher on every step instead of caching its "
                                 "distributions once.", flag="live-teacher", inverted=True)
    teacher_top_k: int = option(64, "Distillation: the teacher's distributions are computed once before "
                                "training; when the full ones exceed 1 GiB, its k most likely tokens + the "
                                "remaining mass are kept (the loss is then KL over those k tokens + one remainder "
                                "bucket).")
    teacher_cache_mb: float = 1024.0
    teacher_cache_dir: str | None = option(None, "Distillation: keep the teacher's cached distributions in this "
                                           "directory and reuse them in later runs with the same teacher, data "
                                           "and settings (default: inside the work directory).",
                                           flag="teacher-cache")
    progress: bool = True

    def validate(self, flag: Callable[[str], str] = flag_of) -> "HealConfig":
        """Check every setting; messages name a setting as ``flag(field name)`` (``--lr``; ``prune`` passes
        ``--heal-max-steps`` for ``max_steps``)."""
        require_finite_fields(self, flag)
        if self.preset not in PRESETS:
            raise HealError(f"unknown preset {flag('preset')} {self.preset!r}: use one of {', '.join(PRESETS)}")
        if self.train_on not in TRAIN_ON:
            raise HealError(f"{flag('train_on')} must be 'full' or 'response', got {self.train_on!r}")
        if self.r < 1 or self.alpha <= 0:
            raise HealError(f"LoRA rank and alpha must be positive (got {flag('rank')} {self.r}, {flag('alpha')} "
                            f"{self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise HealError(f"{flag('dropout')} must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise HealError(f"{flag('lr')} (the learning rate) must be positive, got {self.lr}")
        if self.max_steps < 0:
            raise HealError(f"{flag('max_steps')} must be 0 (train for {flag('epochs')}) or more, got "
                            f"{self.max_steps}")
        if self.epochs < 0 or (self.max_steps == 0 and self.epochs == 0):
            raise HealError(f"give a positive {flag('epochs')} or {flag('max_steps')} (got {self.epochs} and "
                            f"{self.max_steps})")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise HealError(f"{flag('batch_size')} and {flag('grad_accum')} must be at least 1")
        if self.cutoff_len < 8:
            raise HealError(f"{flag('cutoff_len')} {self.cutoff_len} is too short; use at least 8 tokens "
                            "(papers: 256)")
        if self.val_size < 0:
            raise HealError(f"{flag('val_size')} must be 0 or more, got {self.val_size}")
        if self.eval_steps < 1 or self.logging_steps < 1:
            raise HealError(f"{flag('eval_steps')} and logging_steps must be at least 1")
        if self.max_items is not None and self.max_items < 1:
            raise HealError(f"{flag('max_items')} must be at least 1, got {self.max_items}")
        self.last_layers(flag)
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise HealError(f"{flag('distill_alpha')} must be in [0, 1], got {self.distill_alpha}")
        if self.temperature <= 0:
            raise HealError(f"{flag('temperature')} must be positive, got {self.temperature}")
        if self.distill_top_k is not None and self.distill_top_k < 1:
            raise HealError(f"{flag('distill_top_k')} must be at least 1, got {self.distill_top_k}")
        if self.teacher_top_k < 1 or self.teacher_cache_mb < 0:
            raise HealError(f"{flag('teacher_top_k')} must be at least 1 (got {self.teacher_top_k}) and the "
                            f"exact-cache budget 0 or more (got {self.teacher_cache_mb})")
        if self.max_tokens is not None:
            if self.max_tokens < 1:
                raise HealError(f"{flag('max_tokens')} must be positive, got {self.max_tokens}")
            if self.max_steps > 0:
                raise HealError(f"give {flag('max_steps')} or {flag('max_tokens')}, not both: the token budget "
                                "decides the steps")
        if self.qlora and self.last_layers() is not None:
            raise HealError(f"{flag('qlora')} trains LoRA adapters on a 4-bit copy; it cannot be combined with "
                            f"{flag('train_layers')} last:N")
        return self

    @classmethod
    def infos(cls) -> list[OptionInfo]:
        """The settings that are command-line flags (see :func:`depthprune.flags.declared_options`)."""
        return declared_options(cls)

    @property
    def items_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def check_budget(self, tokens_per_item: float) -> None:
        """A ``max_tokens`` budget below one optimizer step (items of ``tokens_per_item`` on average) is an error."""
        step = self.items_per_step * tokens_per_item
        if self.max_tokens is not None and self.max_tokens < step:
            raise HealError(f"--max-tokens {self.max_tokens:,} is less than one optimizer step (--batch-size "
                            f"{self.batch_size} x --grad-accum {self.grad_accum} items of {tokens_per_item:,.0f} "
                            f"tokens = {step:,.0f} tokens); give a larger budget or a smaller --batch-size / "
                            "--grad-accum")

    def last_layers(self, flag: Callable[[str], str] = flag_of) -> int | None:
        """N of ``train_layers="last:N"``, or None for LoRA."""
        if self.train_layers == "lora":
            return None
        kind, _, count = self.train_layers.partition(":")
        if kind != "last" or not count.isdigit() or int(count) < 1:
            raise HealError(f"{flag('train_layers')} must be 'lora' or 'last:N' with N >= 1, got "
                            f"{self.train_layers!r}")
        return int(count)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
