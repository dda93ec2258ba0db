"""What to measure on a model, declared once and run the same way everywhere.

:class:`Evaluation` bundles perplexity, KL / top-1 agreement against a reference (dense) model, lm-eval
zero-shot tasks and speed. A
prune job runs it before and after its stages, ``bench`` runs it on every row,
and each piece tokenizes its windows once and reuses them, so every model in a
comparison is measured on exactly the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable


from torch import nn

from ..backend import Backend, InMemoryBackend
from ..checks import require_finite
from ..data.calibration import (DEFAULT_EVAL_TEXTS, PPL_WINDOWS, Calibration, check_text_source, domain_windows,
                                parse_eval_texts, tokenizer_key)
from ..errors import InputError
from .divergence import (
    DEFAULT_TOP_K,
    EXACT_BUDGET_MB,
    METRICS as DIVERGENCE_METRICS,
    DistributionCache,
    DivergenceError,
    DivergenceResult,
    build_reference,
    load_reference,
    measure_divergence,
    reference_is_input,
    release_memory,
    same_model,
)
from .generation import GenerationResult, GenerationSpec
from .perplexity import PPL_DATASETS, PerplexityResult, perplexity_on
from .speed import SpeedResult
from .zeroshot import ZeroShotResult


@dataclass
class PerplexitySpec:
    """Perplexity on consecutive non-overlapping windows from the start of each text of ``dataset``: one source,
    or ``NAME=SOURCE,...`` (default: the shipped held-out fiction, encyclopedic and code texts), measured in one
    pass and reported per text and as their mean."""

    dataset: str = DEFAULT_EVAL_TEXTS
    seq_len: int = 128
    max_windows: int | None = PPL_WINDOWS
    batch_size: int = 8

    def texts(self) -> dict[str, str]:
        """{domain: source} ("" for a single unnamed text)."""
        return {name: PPL_DATASETS.get(source, source) for name, source in parse_eval_texts(self.dataset).items()}

    def check(self) -> None:
        if self.seq_len < 2:
            raise InputError(f"perplexity needs windows of at least 2 tokens, got --seq-len {self.seq_len}")
        if self.max_windows is not None and self.max_windows < 1:
            raise InputError(f"the number of perplexity windows must be positive (0 = all), got {self.max_windows}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        for name, source in parse_eval_texts(self.dataset).items():
            check_text_source(PPL_DATASETS.get(source, source), f"--eval-texts {name}=" if name else "--eval-texts")

    def windows(self, tokenizer: Any) -> Calibration:
        """Tokenized once per tokenizer: every model evaluated with this spec sees the same windows."""
        key = tokenizer_key(tokenizer)
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = domain_windows(tokenizer, self.texts(), seq_len=self.seq_len, max_windows=self.max_windows)
        return cache[key]

    def run(self, model: nn.Module, tokenizer: Any, progress: bool = True) -> PerplexityResult:
        return perplexity_on(model, self.windows(tokenizer), batch_size=self.batch_size, progress=progress)


NO_REFERENCE = ("--eval kl/top1 compare with the dense (reference) model, and none is known here: pass "
                "--reference DENSE (the model this one was made from)")


@dataclass
class DivergenceSpec:
    """KL(reference || model) and top-1 agreement on the perplexity windows ``text`` (see :mod:`.divergence`).

    ``reference`` is the dense model's source; None means the model measured first (in a job: the input, in
    its "before" pass, which builds the cache in the same pass). The reference's distributions are computed
    once and kept (exact when they fit ``exact_budget_mb``, else its ``top_k`` tokens + remainder);
    ``cache_file`` (safetensors) is read instead when it holds a matching cache, and written after a build.
    """

    metrics: list[str] = field(default_factory=lambda: list(DIVERGENCE_METRICS))
    text: PerplexitySpec = field(default_factory=PerplexitySpec)
    reference: str | None = None
    cache_file: str | None = None
    top_k: int = DEFAULT_TOP_K
    exact_budget_mb: float = EXACT_BUDGET_MB

    def check(self) -> None:
        unknown = [m for m in self.metrics if m not in DIVERGENCE_METRICS]
        if unknown or not self.metrics:
            raise InputError(f"unknown divergence metric(s) {unknown}: use {', '.join(DIVERGENCE_METRICS)}")
        if self.top_k < 1:
            raise InputError(f"the reference cache's top-k must be at least 1, got {self.top_k}")
        self.text.check()
        if self.cache_file is not None:
            from ..io import check_output_file

            path = Path(self.cache_file).expanduser()
            if path.is_file():
                DistributionCache.peek(path)  # only a cache depthprune wrote is read or replaced
                self.cache_file = str(path.resolve())
            else:
                self.cache_file = str(check_output_file(path, option="--reference-cache", suffix=".safetensors"))

    @property
    def cache(self) -> DistributionCache | None:
        """The reference's distributions, once prepared."""
        return self.__dict__.get("_reference")

    def _recorded(self) -> dict[str, Any]:
        """What a cache file must have been built with to be reused by this spec."""
        text = {k: v for k, v in asdict(self.text).items() if k != "batch_size"}
        return {"spec": {"text": text, "top_k": self.top_k, "exact_budget_mb": self.exact_budget_mb}}

    def prepare(self, input_source: str, input_path: str | None = None, *, first_is_input: bool,
                open_reference: "Callable[[str], Backend] | None" = None, progress: bool = True) -> None:
        """Make the reference ready before ``input_source`` is measured: read ``cache_file``, or open the
        reference (when it is another model than the input) with ``open_reference(source)`` (default: load it
        in memory on the CPU), build its cache and free it, or (reference = the input, ``first_is_input``) let
        the first measurement build it. No reference: a one-line error."""
        if self.cache is not None:
            return
        reference = self.reference or input_source
        if self.cache_file is not None:
            if Path(self.cache_file).is_file():
                recorded = DistributionCache.peek(self.cache_file)
                if same_model(recorded.get("reference"), reference) and \
                        all(recorded.get(k) == v for k, v in self._recorded().items()):
                    self.__dict__["_reference"] = DistributionCache.load(self.cache_file)
                    return
        if reference_is_input(self.reference, input_source, input_path, first_is_input, NO_REFERENCE):
            self.__dict__["_adopt_next"] = input_source
            return
        if open_reference is None:
            def open_reference(source: str) -> "Backend":
                return InMemoryBackend.of(load_reference(source, progress=progress))
        opened = open_reference(self.reference)
        self.adopt(opened, opened.tokenizer, self.reference, progress)
        del opened
        release_memory()

    def adopt(self, model: "nn.Module | Backend", tokenizer: Any, source: str | None,
              progress: bool = True) -> DistributionCache:
        """Build the reference cache from ``model`` (the dense model, or its backend) and keep it; written to
        ``cache_file``."""
        cache = build_reference(model, self.text.windows(tokenizer), source=source, top_k=self.top_k,
                                exact_budget_mb=self.exact_budget_mb, batch_size=self.text.batch_size,
                                progress=progress)
        cache.meta.update(self._recorded())
        self.__dict__["_reference"] = cache
        self.__dict__.pop("_adopt_next", None)
        if self.cache_file is not None:
            cache.save(self.cache_file)
        return cache

    def run(self, model: "nn.Module | Backend", tokenizer: Any, progress: bool = True
            ) -> tuple[DivergenceResult, PerplexityResult]:
        """KL and top-1 against the reference (and perplexity on the same windows, from the same pass)."""
        if self.cache is None:
            if "_adopt_next" not in self.__dict__:
                raise DivergenceError(NO_REFERENCE)
            self.adopt(model, tokenizer, self.__dict__["_adopt_next"], progress)
        result, ppl = measure_divergence(model, self.text.windows(tokenizer), self.cache,
                                         batch_size=self.text.batch_size, progress=progress)
        result.metrics = tuple(self.metrics)
        return result, ppl


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
        from .piqa import PIQA_LOCAL_TASK, resolve_piqa_dir
        from .zeroshot import check_tasks

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
    divergence: DivergenceResult | None = None
    generation: GenerationResult | None = None

    def values(self) -> dict[str, float]:
        """Every headline number by name: ``perplexity``, ``kl``, ``top1`` and one entry per task."""
        out: dict[str, float] = {}
        if self.perplexity is not None:
            out.update(self.perplexity.values())
        if self.divergence is not None:
            out.update(self.divergence.values())
        if self.generation is not None:
            out.update(self.generation.values())
        if self.zeroshot is not None:
            out.update(self.zeroshot.metrics)
        return out

    def higher_is_better(self) -> dict[str, bool]:
        """Direction of each value: perplexity and KL go down, top-1 agreement up, tasks as lm-eval declares."""
        out: dict[str, bool] = {}
        if self.perplexity is not None:
            out.update({name: False for name in self.perplexity.values()})
        if self.divergence is not None:
            out.update({name: name.split("/")[0] == "top1" for name in self.divergence.values()})
        if self.generation is not None:
            out.update({name: True for name in self.generation.values()})
        if self.zeroshot is not None:
            out.update({name: s.higher_is_better for name, s in self.zeroshot.scores.items()})
        return out

    @property
    def task_mean(self) -> float | None:
        return self.zeroshot.mean if self.zeroshot is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "perplexity": self.perplexity.to_dict() if self.perplexity else None,
            "divergence": self.divergence.to_dict() if self.divergence else None,
            "zeroshot": ({"scores": {k: asdict(v) for k, v in self.zeroshot.scores.items()},
                          "mean": self.zeroshot.mean, "n_samples": self.zeroshot.raw.get("n-samples")}
                         if self.zeroshot else None),
            "speed": self.speed.to_dict() if self.speed else None,
            **({"generation": self.generation.to_dict()} if self.generation else {}),
            "timings_s": self.timings,
        }


PARTS = ("perplexity", "divergence", "generation", "zeroshot", "speed")


@dataclass
class Evaluation:
    """Perplexity, KL / top-1 against a reference, zero-shot tasks and speed: each optional."""

    perplexity: PerplexitySpec | None = None
    zeroshot: ZeroShotSpec | None = None
    speed: SpeedSpec | None = None
    divergence: DivergenceSpec | None = None
    generation: GenerationSpec | None = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, name) is None for name in PARTS)

    def check(self) -> "Evaluation":
        for name in PARTS:
            if getattr(self, name) is not None:
                getattr(self, name).check()
        return self

    def prepare(self, input_source: str, input_path: str | None = None, *, first_is_input: bool,
                **how: Any) -> None:
        """Ready what must exist before the first measurement (the reference's distributions for kl/top1);
        see :meth:`DivergenceSpec.prepare`."""
        if self.divergence is not None:
            self.divergence.prepare(input_source, input_path, first_is_input=first_is_input, **how)
        if self.generation is not None:
            opener = how.get("open_reference") or (lambda source: load_reference(source))
            self.generation.prepare(input_source, input_path, first_is_input=first_is_input,
                                    open_reference=opener)

    def run(self, model: "nn.Module | Backend", tokenizer: Any, progress: bool = True) -> EvalResult:
        """Measure ``model`` (a model or a :class:`~depthprune.backend.Backend`: perplexity and kl/top1 run on
        any backend, lm-eval and speed on the model in memory)."""
        backend = InMemoryBackend.of(model)
        result = EvalResult()
        for name in PARTS:
            spec = getattr(self, name)
            if spec is None or (name == "perplexity" and self._shared_pass):
                continue
            start = time.perf_counter()
            if name == "divergence":
                result.divergence, ppl = spec.run(backend, tokenizer, progress)
                if self._shared_pass:
                    result.perplexity = ppl
            elif name == "perplexity":
                result.perplexity = spec.run(backend, tokenizer, progress)
            elif name == "generation":
                backend.require_memory("--eval gen")
                result.generation = spec.run(backend.model, tokenizer)
            else:
                backend.require_memory("lm-eval tasks and speed in --eval")
                setattr(result, name, spec.run(backend.model, tokenizer, progress))
            result.timings[name] = time.perf_counter() - start
        return result

    @property
    def _shared_pass(self) -> bool:
        """Perplexity on the divergence windows comes out of the same pass (the LM head runs once)."""
        return self.divergence is not None and self.perplexity is not None and self.perplexity == self.divergence.text

    def to_dict(self) -> dict[str, Any]:
        """Every part's settings (``divergence`` only when measured, so earlier records keep their fingerprint)."""
        return {name: asdict(getattr(self, name)) if getattr(self, name) else None for name in PARTS
                if name not in ("divergence", "generation") or getattr(self, name) is not None}
