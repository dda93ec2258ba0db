"""What to measure on a model, declared once and run the same way everywhere.

:class:`Evaluation` bundles perplexity, lm-eval zero-shot tasks and speed. A
prune job runs it before and after its stages, ``bench`` runs it on every row,
and each piece tokenizes its windows once and reuses them, so every model in a
comparison is measured on exactly the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from torch import nn

from ..checks import require_finite
from ..data.calibration import Calibration, check_text_source, consecutive_windows, tokenizer_key
from ..errors import InputError
from .perplexity import PPL_DATASETS, PerplexityResult, perplexity_on
from .speed import SpeedResult
from .zeroshot import ZeroShotResult

if TYPE_CHECKING:
    from ..backend import Backend


@dataclass
class PerplexitySpec:
    """Perplexity on consecutive non-overlapping windows from the start of ``dataset``."""

    dataset: str = "default-heldout"
    seq_len: int = 128
    max_windows: int | None = 40
    batch_size: int = 8

    def check(self) -> None:
        if self.seq_len < 2:
            raise InputError(f"perplexity needs windows of at least 2 tokens, got --seq-len {self.seq_len}")
        if self.max_windows is not None and self.max_windows < 1:
            raise InputError(f"the number of perplexity windows must be positive (0 = all), got {self.max_windows}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        check_text_source(self.dataset, "--ppl-data")

    def windows(self, tokenizer: Any) -> Calibration:
        """Tokenized once per tokenizer: every model evaluated with this spec sees the same windows."""
        key = tokenizer_key(tokenizer)
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = consecutive_windows(tokenizer, PPL_DATASETS.get(self.dataset, self.dataset),
                                             seq_len=self.seq_len, max_windows=self.max_windows)
        return cache[key]

    def run(self, model: nn.Module, tokenizer: Any, progress: bool = True) -> PerplexityResult:
        return perplexity_on(model, self.windows(tokenizer), batch_size=self.batch_size, progress=progress)


@dataclass
class ZeroShotSpec:
    """lm-eval tasks and how to run them (see :func:`depthprune.evaluate.zeroshot.evaluate_zeroshot`)."""

    tasks: list[str]
    limit: int | float | None = None
    batch_size: int = 8
    num_fewshot: int = 0
    task_dir: str | None = None
    piqa_dir: str | None = None
    seed: int = 1234

    def check(self) -> None:
        """Validate before any model work; pin folders (and ``$DEPTHPRUNE_PIQA_DIR``) to absolute paths
        so the settings recorded, and compared on resume, say which data was used."""
        from .zeroshot import PIQA_LOCAL_TASK, check_tasks, resolve_piqa_dir

        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        require_finite(self.limit, "--limit")
        if self.limit is not None and self.limit <= 0:
            raise InputError(f"--limit must be positive, got {self.limit}")
        if self.num_fewshot < 0:
            raise InputError(f"--num-fewshot must be 0 (zero-shot) or more, got {self.num_fewshot}")
        check_tasks(self.tasks, task_dir=self.task_dir, piqa_dir=self.piqa_dir)
        if self.task_dir is not None:
            self.task_dir = str(Path(self.task_dir).resolve())
        piqa = resolve_piqa_dir(self.piqa_dir) if PIQA_LOCAL_TASK in self.tasks else None
        self.piqa_dir = str(piqa.resolve()) if piqa is not None else None

    def run(self, model: nn.Module, tokenizer: Any, progress: bool = False) -> ZeroShotResult:
        from .zeroshot import evaluate_zeroshot

        return evaluate_zeroshot(model, tokenizer, self.tasks, limit=self.limit, batch_size=self.batch_size,
                                 num_fewshot=self.num_fewshot, task_dir=self.task_dir, piqa_dir=self.piqa_dir,
                                 seed=self.seed, progress=progress)


@dataclass
class SpeedSpec:
    """One fixed workload for :func:`depthprune.evaluate.speed.measure_speed`, the same for every model."""

    prompt_len: int = 128
    gen_len: int = 64
    batch_size: int = 1
    warmup: int = 1
    repeats: int = 3

    def check(self) -> None:
        for name in ("prompt_len", "gen_len", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise InputError(f"--warmup must be 0 or more, got {self.warmup}")

    def run(self, model: nn.Module, tokenizer: Any, progress: bool = False) -> SpeedResult:
        from .speed import measure_speed

        return measure_speed(model, tokenizer, **asdict(self))


@dataclass
class EvalResult:
    """What one :class:`Evaluation` measured on one model."""

    perplexity: PerplexityResult | None = None
    zeroshot: ZeroShotResult | None = None
    speed: SpeedResult | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def values(self) -> dict[str, float]:
        """Every headline number by name: ``perplexity`` and one entry per task."""
        out: dict[str, float] = {}
        if self.perplexity is not None:
            out["perplexity"] = self.perplexity.perplexity
        if self.zeroshot is not None:
            out.update(self.zeroshot.metrics)
        return out

    def higher_is_better(self) -> dict[str, bool]:
        """Direction of each value: perplexity goes down, tasks as lm-eval declares them."""
        out: dict[str, bool] = {}
        if self.perplexity is not None:
            out["perplexity"] = False
        if self.zeroshot is not None:
            out.update({name: s.higher_is_better for name, s in self.zeroshot.scores.items()})
        return out

    @property
    def task_mean(self) -> float | None:
        return self.zeroshot.mean if self.zeroshot is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "perplexity": self.perplexity.to_dict() if self.perplexity else None,
            "zeroshot": ({"scores": {k: asdict(v) for k, v in self.zeroshot.scores.items()},
                          "mean": self.zeroshot.mean, "n_samples": self.zeroshot.raw.get("n-samples")}
                         if self.zeroshot else None),
            "speed": self.speed.to_dict() if self.speed else None,
            "timings_s": self.timings,
        }


@dataclass
class Evaluation:
    """Perplexity, zero-shot tasks and speed: each optional."""

    perplexity: PerplexitySpec | None = None
    zeroshot: ZeroShotSpec | None = None
    speed: SpeedSpec | None = None

    @property
    def empty(self) -> bool:
        return self.perplexity is None and self.zeroshot is None and self.speed is None

    def check(self) -> "Evaluation":
        for part in (self.perplexity, self.zeroshot, self.speed):
            if part is not None:
                part.check()
        return self

    def run(self, model: "nn.Module | Backend", tokenizer: Any, progress: bool = True) -> EvalResult:
        """Measure ``model`` (a model or a :class:`~depthprune.backend.Backend`: perplexity runs on any backend,
        lm-eval and speed on the model in memory)."""
        from ..backend import InMemoryBackend

        backend = InMemoryBackend.of(model)
        result = EvalResult()
        for name in ("perplexity", "zeroshot", "speed"):
            spec = getattr(self, name)
            if spec is not None:
                if name != "perplexity":
                    backend.require_memory("lm-eval tasks and speed in --eval")
                start = time.perf_counter()
                setattr(result, name, spec.run(backend if name == "perplexity" else backend.model, tokenizer,
                                               progress))
                result.timings[name] = time.perf_counter() - start
        return result

    def to_dict(self) -> dict[str, Any]:
        return {name: asdict(getattr(self, name)) if getattr(self, name) else None
                for name in ("perplexity", "zeroshot", "speed")}
