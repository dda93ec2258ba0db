"""A reference model's next-token distributions at some positions, and KL against them.

:class:`CachedRows` are the reference's rows at a batch of positions: every token's log-probability
(``exact``) or its k most likely tokens and the log of the mass outside them (``top-k``); :func:`kl_per_token`
is KL(reference || model) over them (differentiable in the model's log-probabilities, so a distillation
loss); :class:`DistributionCache` keeps them for every position of a set of windows, in memory or on disk, so
the reference runs once (evaluation, ``auto``'s ranking, the distillation teacher all read it). See
:mod:`.divergence` for the metrics measured with them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..io import atomic_write, write_json

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
