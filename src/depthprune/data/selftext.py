"""``--calib self``: calibration text sampled from the dense model itself.

A pruned model is recovered towards the dense model's distributions, so the
dense model's own generations are text of exactly the distribution it should
keep, and need no external data (self-data distillation, arXiv 2410.09982).

Sampling is batched and KV-cached: a batch of sequences starts from the
tokenizer's document start (BOS, or end-of-text for tokenizers without one),
runs one prefill, then one single-token forward per new token with the cache,
the LM head on the last position only. The token ids are kept as they were
sampled (never decoded and re-tokenized) and cut into windows like any text.

Samples are cached on disk per model and settings (``$DEPTHPRUNE_CACHE``,
default ``~/.cache/depthprune``), so a second job on the same model reads them
instead of sampling; the same seed gives the same tokens, cached or not.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn
from tqdm.auto import tqdm

from ..errors import InputError
from ..io import atomic_write

SELF = "self"
SELF_TOKENS = 65536
"""Tokens ``self`` samples by default (``self:N`` for another count)."""


@dataclass(frozen=True)
class SelfSampling:
    """How the dense model's text is sampled (recorded in the calibration's description)."""

    tokens: int = SELF_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    sample_len: int = 512
    batch_size: int = 128
    seed: int = 1234

    @classmethod
    def parse(cls, source: str) -> "SelfSampling | None":
        """``self`` or ``self:N`` (N tokens), else None."""
        name, _, count = str(source).partition(":")
        if name != SELF:
            return None
        if not count:
            return cls()
        if not count.isdigit() or int(count) < 1:
            raise InputError(f"--calib {source}: self:N needs N, the tokens to sample, as a positive whole number")
        return cls(tokens=int(count))

    def check(self, seq_len: int, windows: int) -> None:
        """Before any model loads: the sample must hold the windows asked for."""
        if self.tokens < seq_len:
            raise InputError(f"--calib self:{self.tokens}: {self.tokens} tokens are less than one {seq_len}-token "
                             f"window; sample at least {seq_len} (default {SELF_TOKENS})")
        if windows * seq_len > self.tokens:
            raise InputError(f"--calib self:{self.tokens} holds about {self.tokens // seq_len} windows of {seq_len} "
                             f"tokens, fewer than the {windows} asked for; sample more (self:{windows * seq_len})")


def start_token(tokenizer: Any) -> int:
    """Where a document starts for this tokenizer: BOS, else end-of-text (what precedes a document in training)."""
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    raise InputError("--calib self needs a tokenizer with a BOS or EOS token to start sampling from")


def _draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else sampled from the nucleus holding ``top_p``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _cache_of(out: Any) -> dict[str, Any]:
    """The KV cache of a forward's output, as the keyword the next forward takes (``cache`` in newer
    transformers, ``past_key_values`` before)."""
    if "cache" in out:
        return {"cache": out["cache"]}
    return {"past_key_values": out.past_key_values}


@torch.inference_mode()
def sample_tokens(model: nn.Module, tokenizer: Any, settings: SelfSampling, progress: bool = True
                  ) -> tuple[list[int], dict[str, Any]]:
    """``settings.tokens`` sampled token ids (each sample led by the document start token), and a record with
    the throughput."""
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    first = start_token(tokenizer)
    new = settings.sample_len - 1
    samples = -(-settings.tokens // settings.sample_len)
    began, ids = time.perf_counter(), []
    with tqdm(total=samples * new, desc="sampling self", unit=" tok", disable=not progress) as bar:
        for at in range(0, samples, settings.batch_size):
            rows = min(settings.batch_size, samples - at)
            tokens = torch.full((rows, 1), first, dtype=torch.long, device=device)
            out = model(input_ids=tokens, use_cache=True, logits_to_keep=1)
            drawn = [tokens.cpu()]
            for step in range(new):
                nxt = _draw(out.logits[:, -1].cpu(), settings.temperature, settings.top_p, generator)
                drawn.append(nxt[:, None])
                bar.update(rows)
                if step + 1 < new:
                    out = model(input_ids=nxt[:, None].to(device), use_cache=True, logits_to_keep=1,
                                **_cache_of(out))
            ids.extend(torch.cat(drawn, dim=1).reshape(-1).tolist())
    seconds = time.perf_counter() - began
    ids = ids[: settings.tokens]
    return ids, {"sampled_tokens": len(ids), "seconds": round(seconds, 2),
                 "tokens_per_s": round(len(ids) / max(seconds, 1e-9), 1)}


def cache_dir() -> Path:
    return Path(os.environ.get("DEPTHPRUNE_CACHE", "~/.cache/depthprune")).expanduser() / "self"


def model_fingerprint(model: nn.Module) -> str:
    """The model's config and a digest of a few of its weights: another model, or the same one changed, is
    another cache entry."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    params = list(model.parameters())
    for p in (params[0], params[len(params) // 2], params[-1]):
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes()[: 1 << 20])
    return digest.hexdigest()


def self_text(model: nn.Module, tokenizer: Any, settings: SelfSampling, progress: bool = True
              ) -> tuple[list[int], dict[str, Any]]:
    """The sampled ids, read from the cache when this model and these settings were sampled before."""
    key = hashlib.sha256(json.dumps({"model": model_fingerprint(model), **asdict(settings),
                                     "torch": torch.__version__}, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir() / f"{key}.safetensors"
    record = {"source": SELF, **asdict(settings), "cache": str(path)}
    if path.is_file():
        try:
            ids = load_file(str(path))["ids"].tolist()
            if len(ids) == settings.tokens:
                return ids, {**record, "cached": True}
        except Exception:  # a damaged cache entry is sampled again
            pass
    ids, timing = sample_tokens(model, tokenizer, settings, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save({"ids": torch.tensor(ids, dtype=torch.int64)}))
    return ids, {**record, **timing, "cached": False}


__all__ = ["SELF", "SELF_TOKENS", "SelfSampling", "sample_tokens", "self_text", "start_token"]
