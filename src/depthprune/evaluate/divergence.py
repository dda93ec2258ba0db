"""How far a model's next-token distributions are from a reference (dense) model's: KL and top-1 agreement.

Perplexity moves little when a model loses a few percent, and zero-shot accuracy on a few hundred items is
inside its noise; llama.cpp judges quantised models instead by the mean per-token KL(reference || model) and
how often both models' most likely next token is the same. Both are measured here at exactly the positions
perplexity scores (:func:`~depthprune.evaluate.perplexity.prediction_pairs`: the special prefix is context,
padding never a target), on the same windows.

The reference's log-probabilities are computed once, from its final hidden states with the LM head applied a
chunk of tokens at a time, and kept in a :class:`DistributionCache`:

* ``exact``: every position's full-vocabulary log-probabilities, when they fit ``exact_budget_mb`` (1.5 GiB);
* ``top-k``: the reference's k most likely tokens (log-probabilities and ids) and the log of the probability
  mass outside them.

Over a top-k cache, KL is taken over k + 1 outcomes: the k tokens and one bucket for the rest (the model's
bucket is its mass outside the reference's top k). Merging outcomes never increases KL (the log-sum
inequality), so that value is a **lower bound** of the true KL, equal to it when k covers the vocabulary.
``top1`` is exact either way: the reference's argmax is stored.

Everything is a function of (model with its head, final states, ids, mask), like
:func:`~depthprune.evaluate.perplexity.nll_sum`, so any way of producing final states (the in-memory model,
layer streaming, cached states below a trained layer) can build a cache or be measured against one. The same
rows serve as a distillation teacher (:mod:`depthprune.heal.teacher`), where the loss needs gradients:
:func:`kl_per_token` is differentiable in the model's log-probabilities.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backend import Backend, InMemoryBackend, walk_layers
from ..data.calibration import Calibration
from ..errors import InputError
from ..models.forward import batches_of
from .perplexity import PerplexityResult, batch_spans, chunked_logits, first_target_of, per_domain, prediction_pairs

METRICS = ("kl", "top1")
DEFAULT_TOP_K = 64
EXACT_BUDGET_MB = 1536.0
CACHE_FORMAT = "depthprune-distribution-cache/1"
META_FILE = "meta.json"


class DivergenceError(InputError):
    """A reference that cannot be compared with the model measured (none given, another vocabulary, other windows)."""


# ---------------------------------------------------------------- rows: the reference at some positions


@dataclass
class CachedRows:
    """The reference's next-token distribution at ``n`` positions: full log-probabilities, or its top k.

    ``top1`` is the reference's most likely token; ``values``/``indices`` its k most likely tokens' log-probs
    (descending) and ids; ``rest`` the log of the mass outside them (``-inf`` when k covers the vocabulary).
    """

    top1: torch.Tensor
    logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    rest: torch.Tensor | None = None

    @property
    def exact(self) -> bool:
        return self.logprobs is not None

    def __len__(self) -> int:
        return int(self.top1.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def select(self, index: slice | torch.Tensor) -> "CachedRows":
        return CachedRows(**{name: t[index] for name, t in self.tensors().items()})

    def to(self, device: torch.device | str) -> "CachedRows":
        """On ``device``, with ids as int64 and values as float32 (what gather and the KL need)."""
        out = {}
        for name, t in self.tensors().items():
            t = torch.as_tensor(t)
            out[name] = t.to(device, torch.long if name in ("top1", "indices") else torch.float32)
        return CachedRows(**out)


def rows_from_logits(logits: torch.Tensor, top_k: int | None = None, temperature: float = 1.0) -> CachedRows:
    """The rows a cache keeps for (n, vocab) logits: full log-probabilities at ``temperature``, or the top k."""
    logits = logits.float()
    logp = F.log_softmax(logits / temperature, dim=-1)
    top1 = logits.argmax(dim=-1)
    if top_k is None:
        return CachedRows(top1, logprobs=logp)
    values, indices = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
    rest = torch.logsumexp(logp.scatter(-1, indices, float("-inf")), dim=-1)
    return CachedRows(top1, values=values, indices=indices, rest=rest)


def kl_per_token(log_q: torch.Tensor, rows: CachedRows) -> torch.Tensor:
    """KL(reference || model) at each position from the model's (n, vocab) log-probabilities (differentiable).

    Over top-k rows: the k tokens plus one remainder bucket, a lower bound of the full KL (equal when k covers
    the vocabulary).
    """
    if rows.exact:
        p = rows.logprobs
        return (p.exp() * (p - log_q)).sum(dim=-1)
    q_top = log_q.gather(-1, rows.indices)
    kl = (rows.values.exp() * (rows.values - q_top)).sum(dim=-1)
    if rows.indices.shape[-1] < log_q.shape[-1]:
        q_rest = torch.logsumexp(log_q.scatter(-1, rows.indices, float("-inf")), dim=-1)
        p_rest = rows.rest.exp()
        kl = kl + torch.where(p_rest > 0, p_rest * (rows.rest - q_rest), torch.zeros_like(kl))
    return kl


def renormalised_kl_per_token(log_q: torch.Tensor, rows: CachedRows) -> torch.Tensor:
    """KL from the reference's top k renormalised to sum to one, against the model's log-probs of those tokens
    (not renormalised): what ``--distill-top-k`` has always meant. Needs top-k rows."""
    log_p = F.log_softmax(rows.values, dim=-1)
    return (log_p.exp() * (log_p - log_q.gather(-1, rows.indices))).sum(dim=-1)


# ---------------------------------------------------------------- the cache


def _allocate(shape: tuple[int, ...], dtype: Any, directory: Path | None, name: str) -> torch.Tensor:
    if directory is None:
        return torch.from_numpy(np.empty(shape, dtype=dtype))
    return torch.from_numpy(np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=dtype,
                                                      shape=shape))


def cache_bytes(tokens: int, vocab: int, top_k: int | None) -> int:
    """Bytes of a cache of ``tokens`` positions (``top_k`` None: exact)."""
    return tokens * (vocab * 4 + 8) if top_k is None else tokens * (top_k * 8 + 12)


def choose_top_k(tokens: int, vocab: int, top_k: int, exact_budget_mb: float) -> int | None:
    """None (exact) when the full distributions fit the budget or k would cover the vocabulary, else ``top_k``."""
    if top_k >= vocab or cache_bytes(tokens, vocab, None) <= exact_budget_mb * 2**20:
        return None
    return top_k


@dataclass
class DistributionCache:
    """A reference's distributions at ``len(rows)`` positions, in order, with what they were computed on."""

    rows: CachedRows
    vocab_size: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def top_k(self) -> int | None:
        return None if self.rows.exact else int(self.rows.indices.shape[-1])

    @property
    def approximate(self) -> bool:
        """KL over this cache is a lower bound (top-k + remainder bucket), not the full-vocabulary value."""
        return self.top_k is not None and self.top_k < self.vocab_size

    def describe(self) -> str:
        if not self.approximate:
            return "exact (full vocabulary)"
        return (f"top-{self.top_k} + remainder: KL over the reference's {self.top_k} most likely tokens and one "
                "bucket for the rest, a lower bound of the full KL")

    @classmethod
    def allocate(cls, tokens: int, vocab: int, top_k: int | None, meta: dict[str, Any],
                 directory: Path | None = None) -> "DistributionCache":
        """An empty cache to fill with :meth:`write`; memory-mapped ``.npy`` files in ``directory`` when given."""
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / META_FILE).unlink(missing_ok=True)
        top1 = _allocate((tokens,), np.int64, directory, "top1")
        if top_k is None:
            rows = CachedRows(top1, logprobs=_allocate((tokens, vocab), np.float32, directory, "logprobs"))
        else:
            rows = CachedRows(top1, values=_allocate((tokens, top_k), np.float32, directory, "values"),
                              indices=_allocate((tokens, top_k), np.int32, directory, "indices"),
                              rest=_allocate((tokens,), np.float32, directory, "rest"))
        return cls(rows, vocab, {"format": CACHE_FORMAT, **meta, "tokens": tokens, "vocab_size": vocab,
                                 "top_k": top_k})

    def put(self, where: slice | torch.Tensor, rows: CachedRows) -> None:
        """Store ``rows`` at positions ``where`` (a slice or position ids)."""
        for name, t in rows.tensors().items():
            target = getattr(self.rows, name)
            target[where] = t.to("cpu", target.dtype)

    def write(self, start: int, rows: CachedRows) -> int:
        """Store ``rows`` at positions ``start..``; returns the next free position."""
        self.put(slice(start, start + len(rows)), rows)
        return start + len(rows)

    def take(self, index: slice | torch.Tensor, device: torch.device | str = "cpu") -> CachedRows:
        """Rows at ``index`` (a slice or position ids), ready for :func:`kl_per_token` on ``device``."""
        return self.rows.select(index).to(device)

    # -- files: one safetensors file (to reuse across runs), or a directory of memory-maps (large caches)

    def save(self, path: str | Path) -> Path:
        """One safetensors file, with :attr:`meta` in its header (written atomically)."""
        from safetensors.torch import save

        from ..io import atomic_write

        tensors = {name: t.contiguous() for name, t in self.rows.tensors().items()}
        return atomic_write(path, save(tensors, metadata={"depthprune": json.dumps(self.meta, default=str)}))

    @classmethod
    def load(cls, path: str | Path) -> "DistributionCache":
        meta, tensors = cls._read(path, tensors=True)
        return cls._checked(CachedRows(**tensors), meta, path)

    @classmethod
    def peek(cls, path: str | Path) -> dict[str, Any]:
        """What a cache file records, from its header alone (a file that is no cache is a one-line error)."""
        meta, _ = cls._read(path, tensors=False)
        if meta.get("format") != CACHE_FORMAT:
            raise DivergenceError(f"{path} is not a depthprune distribution cache ({CACHE_FORMAT}); remove it to "
                                  "rebuild")
        return meta

    @staticmethod
    def _read(path: str | Path, tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("depthprune", "{}"))
                return meta, {name: f.get_tensor(name) for name in f.keys()} if tensors else {}
        except (SafetensorError, OSError, ValueError) as err:
            raise DivergenceError(f"{path} is not a readable distribution cache ({err}); remove it to rebuild") \
                from err

    def finish(self, directory: Path) -> None:
        """Write ``meta.json`` last into the directory the cache was allocated in: a directory without it is
        incomplete (the memory-mapped rows are already in the files)."""
        from ..io import write_json

        write_json(directory / META_FILE, self.meta)

    @classmethod
    def open(cls, directory: str | Path) -> "DistributionCache | None":
        """The complete cache in ``directory`` (memory-mapped, copy-on-write), or None when there is none."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
        except (OSError, ValueError):
            return None
        names = [f.name for f in fields(CachedRows)]
        tensors = {name: torch.from_numpy(np.load(directory / f"{name}.npy", mmap_mode="c"))
                   for name in names if (directory / f"{name}.npy").is_file()}
        return cls._checked(CachedRows(**tensors), meta, directory)

    @classmethod
    def _checked(cls, rows: CachedRows, meta: dict[str, Any], where: Any) -> "DistributionCache":
        if meta.get("format") != CACHE_FORMAT or (rows.logprobs is None and rows.values is None):
            raise DivergenceError(f"{where} is not a depthprune distribution cache ({CACHE_FORMAT}); remove it "
                                  "to rebuild")
        return cls(rows, int(meta["vocab_size"]), meta)

    def mismatch(self, expected: dict[str, Any]) -> str | None:
        """The first recorded field that differs from ``expected``, said in words; None when all agree."""
        for key, value in expected.items():
            if self.meta.get(key) != value:
                return f"{key} {self.meta.get(key)!r} != {value!r}"
        return None


def tokens_sha256(*tensors: torch.Tensor) -> str:
    """Fingerprint of token ids (and masks): a cache is reused only for exactly the tokens it was built on."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def vocab_size_of(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


# ---------------------------------------------------------------- on windows (the metrics)


def windows_meta(windows: Calibration) -> dict[str, Any]:
    """What a reference cache on ``windows`` records and is checked against when reused."""
    keep = ("source", "seq_len", "num_windows", "special_prefix", "text_tokens")
    return {"windows": {k: windows.description.get(k) for k in keep},
            "windows_sha256": tokens_sha256(windows.input_ids, windows.attention_mask)}


@torch.inference_mode()
def write_reference(cache: DistributionCache, start: int, model: nn.Module, hidden: torch.Tensor,
                    ids: torch.Tensor, mask: torch.Tensor, first_target: int, chunk_tokens: int = 512) -> int:
    """Store the reference rows of one batch's predicted tokens (from its final states); the next position."""
    states, _ = prediction_pairs(hidden, ids, mask, first_target)
    for _, logits in chunked_logits(model, states, chunk_tokens):
        start = cache.write(start, rows_from_logits(logits, cache.top_k))
    return start


@dataclass
class DivergenceSums:
    """Sums over predicted tokens: KL(reference || model), same-argmax count, NLL, token count."""

    kl: float = 0.0
    same_top1: int = 0
    nll: float = 0.0
    tokens: int = 0

    def add(self, other: "DivergenceSums") -> "DivergenceSums":
        return DivergenceSums(self.kl + other.kl, self.same_top1 + other.same_top1, self.nll + other.nll,
                              self.tokens + other.tokens)


@torch.inference_mode()
def divergence_sum(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                   first_target: int, reference: DistributionCache, start: int,
                   chunk_tokens: int = 512) -> DivergenceSums:
    """KL, top-1 agreement and NLL sums of one batch given its final states, against ``reference`` rows
    ``start..`` (the batch's predicted tokens in order); the LM head runs once per chunk for all three."""
    states, targets = prediction_pairs(hidden, ids, mask, first_target)
    if start + targets.numel() > len(reference):
        raise DivergenceError(f"the reference cache holds {len(reference)} positions, fewer than these windows "
                              "predict; it was built on other windows")
    sums = DivergenceSums(tokens=int(targets.numel()))
    for part, logits in chunked_logits(model, states, chunk_tokens):
        rows = reference.take(slice(start + part.start, start + min(part.stop, len(targets))), logits.device)
        log_q = F.log_softmax(logits, dim=-1)
        sums.kl += float(kl_per_token(log_q, rows).sum())
        sums.same_top1 += int((logits.argmax(dim=-1) == rows.top1).sum())
        sums.nll += float(F.cross_entropy(logits, targets[part], reduction="sum"))
    return sums


@dataclass
class DivergenceResult:
    """Mean per-token KL(reference || model) and top-1 agreement, and how they were measured."""

    kl: float
    top1: float
    tokens: int
    windows: int
    seq_len: int
    source: str
    reference: str | None
    cache: str
    approximate: bool
    top_k: int | None
    metrics: tuple[str, ...] = METRICS
    domains: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each named text's kl, top1 and tokens; the headline kl and top1 are their means (one weight per text)."""

    def values(self) -> dict[str, float]:
        """The metrics asked for (both are measured in one pass, only these are reported): the means, then
        ``kl/NAME`` per text."""
        return {**{name: getattr(self, name) for name in self.metrics},
                **{f"{name}/{domain}": d[name] for name in self.metrics for domain, d in self.domains.items()}}

    @property
    def note(self) -> str:
        return (f"kl is a lower bound: the reference's top-{self.top_k} tokens + one remainder bucket"
                if self.approximate else "")

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "note": self.note}


def check_comparable(reference: DistributionCache, model: nn.Module, windows: Calibration) -> None:
    """The model must share the reference's vocabulary and tokenize the windows to the same ids."""
    where = reference.meta.get("reference") or "the reference"
    vocab = vocab_size_of(model)
    if vocab != reference.vocab_size:
        raise DivergenceError(f"{where} has a vocabulary of {reference.vocab_size:,} tokens and this model "
                              f"{vocab:,}: KL needs the same tokenizer; pass --reference with the dense model "
                              "this one was made from")
    if reference.meta.get("windows_sha256") != windows_meta(windows)["windows_sha256"]:
        raise DivergenceError(f"{where} was measured on other tokens than these windows (another tokenizer, or "
                              "other --ppl-data/--ppl-windows/--seq-len); rebuild the reference cache")


def measure_divergence(model: "nn.Module | Backend", windows: Calibration, reference: DistributionCache, *,
                       batch_size: int = 8, chunk_tokens: int = 512, progress: bool = True,
                       ) -> tuple[DivergenceResult, PerplexityResult]:
    """KL and top-1 agreement against ``reference`` on ``windows``, and perplexity from the same pass;
    ``model`` is a model or a :class:`~depthprune.backend.Backend` (streamed: one layer at a time)."""
    backend = InMemoryBackend.of(model)
    check_comparable(reference, backend.model, windows)
    first = first_target_of(windows)
    batches = batches_of(windows, batch_size)
    spans = batch_spans(windows, batches)
    sums = {name: DivergenceSums() for name, _, _ in windows.domains()}
    start = 0

    def on_output(b: int, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> None:
        nonlocal start
        hidden = backend.final_states(ids, mask, last)
        for name, rows in spans[b]:
            part = divergence_sum(backend.model, hidden[rows], ids[rows], mask[rows], first, reference, start,
                                  chunk_tokens)
            sums[name], start = sums[name].add(part), start + part.tokens

    walk_layers(backend, batches, on_output=on_output, head=True, progress=progress, desc="kl / top1")
    empty = [name or "the text" for name, total in sums.items() if total.tokens == 0]
    if empty:
        raise InputError(f"KL over zero predicted tokens means nothing: {', '.join(empty)} gave no window with a "
                         "target token; use a longer text or a smaller --seq-len")
    means = {name: {"kl": t.kl / t.tokens, "top1": t.same_top1 / t.tokens, "nll": t.nll / t.tokens,
                    "tokens": t.tokens} for name, t in sums.items()}
    named, mean = per_domain(means, lambda parts: {
        key: sum(p[key] for p in parts) / (1 if key == "tokens" else len(parts)) for key in parts[0]})
    common = dict(tokens=int(mean["tokens"]), windows=windows.num_windows, seq_len=int(windows.input_ids.shape[1]),
                  source=str(windows.description.get("source")))
    domains = {n: {"kl": d["kl"], "top1": d["top1"], "tokens": d["tokens"]} for n, d in named.items()}
    return (DivergenceResult(kl=mean["kl"], top1=mean["top1"], **common,
                             reference=reference.meta.get("reference"), cache=reference.describe(),
                             approximate=reference.approximate, top_k=reference.top_k, domains=domains),
            PerplexityResult(perplexity=math.exp(mean["nll"]), nll=mean["nll"], **common,
                             domains={n: {"perplexity": math.exp(d["nll"]), "nll": d["nll"], "tokens": d["tokens"]}
                                      for n, d in named.items()}))


def build_reference(model: "nn.Module | Backend", windows: Calibration, *, source: str | None = None,
                    top_k: int = DEFAULT_TOP_K, exact_budget_mb: float = EXACT_BUDGET_MB, batch_size: int = 8,
                    chunk_tokens: int = 512, progress: bool = True) -> DistributionCache:
    """The reference ``model``'s distributions at every predicted position of ``windows`` (one decoder pass;
    a model or a backend)."""
    backend = InMemoryBackend.of(model)
    first = first_target_of(windows)
    tokens = int(windows.attention_mask[:, first:].sum())
    vocab = vocab_size_of(backend.model)
    cache = DistributionCache.allocate(tokens, vocab, choose_top_k(tokens, vocab, top_k, exact_budget_mb),
                                       {"reference": source, **windows_meta(windows), "first_target": first})
    start = 0

    def on_output(b: int, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor) -> None:
        nonlocal start
        start = write_reference(cache, start, backend.model, backend.final_states(ids, mask, last), ids, mask,
                                first, chunk_tokens)

    walk_layers(backend, batches_of(windows, batch_size), on_output=on_output, head=True, progress=progress,
                desc="reference cache")
    assert start == tokens, (start, tokens)
    return cache


def load_reference(source: str, like: nn.Module | None = None, *, dtype: Any = None, device: str | None = "cpu",
                   progress: bool = True) -> Any:
    """Load a reference model (in ``like``'s dtype and device when given)."""
    from ..models.load import load_model

    if like is not None:
        params = next(like.parameters())
        dtype, device = params.dtype, str(params.device)
    return load_model(source, dtype=dtype, device=device, progress=progress)


def release_memory() -> None:
    """Return the memory of a model the caller just dropped (a reference, a teacher) before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two model sources name the same model (the same string, or the same directory on disk)."""
    if a is None or b is None:
        return False
    if a == b:
        return True
    from ..models.load import resolve_source

    try:
        return Path(str(resolve_source(a))).resolve() == Path(str(resolve_source(b))).resolve()
    except Exception:  # an unresolvable source (a hub id offline) is simply not the same one
        return False


def reference_is_input(reference: str | None, input_source: str, input_path: str | None,
                       first_is_input: bool, message: str) -> bool:
    """Whether the reference is the model measured first (none named, or the input itself), so that model's
    first measurement gives the reference; a one-line error (``message``) when it is but is not measured
    first."""
    if reference is None or same_model(reference, input_source) or same_model(reference, input_path):
        if not first_is_input:
            raise DivergenceError(message)
        return True
    return False


def recorded_reference(model: str) -> str | None:
    """The dense model a checkpoint was pruned from, as its run record says (else None; an unreadable record
    is a one-line error)."""
    from ..run_record import RunRecord

    path = Path(model).expanduser()
    run = RunRecord.of_checkpoint(path) if path.is_dir() else None
    return run.source if run is not None and run.source else None


def check_reference_vocab(model: str, reference: str, option: str = "--reference") -> None:
    """Before any model loads: a reference (or teacher) on disk with another vocabulary size is a one-line error."""
    from ..models.load import local_config

    mine, theirs = local_config(model), local_config(reference)
    if mine is None or theirs is None:
        return
    a, b = _config_vocab(mine), _config_vocab(theirs)
    if a is not None and b is not None and a != b:
        raise DivergenceError(f"{option} {reference} has a vocabulary of {b:,} tokens and --model {model} "
                              f"{a:,}: KL needs the same tokenizer; pass the dense model this one was made from")


def _config_vocab(config: dict[str, Any]) -> int | None:
    value = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return int(value) if isinstance(value, int) else None


__all__ = [
    "CachedRows",
    "DistributionCache",
    "DivergenceError",
    "DivergenceResult",
    "DivergenceSums",
    "build_reference",
    "check_comparable",
    "divergence_sum",
    "kl_per_token",
    "measure_divergence",
    "renormalised_kl_per_token",
    "rows_from_logits",
    "write_reference",
]
