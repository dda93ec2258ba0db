"""Inference cost of a (pruned) causal LM: parameters, prefill latency, decode throughput.

Depth pruning removes whole decoder layers, so the ideal speedup of the decoder
stack is ``L / (L - k)``; embeddings and the LM head are untouched, which is
why measured speedups fall short of it.  :func:`compare_speed` reports both.

Method
------
Decode is timed with a hand-written greedy loop over the KV cache rather than
``model.generate``: one prefill forward (``use_cache=True``, logits for the last
position only, as ``generate`` does), then ``gen_len`` single-token forwards
that each feed the previous argmax back with the cache.  The prefill and the
decode loop are timed separately within each repeat, so decode time contains no
prefill and no ``generate`` bookkeeping (logits processors, stopping criteria),
and EOS can never end it early.  The loop produces the same tokens as
``generate(do_sample=False, min_new_tokens=max_new_tokens=gen_len + 1)``.
Reported figures are medians over ``repeats`` after ``warmup`` untimed runs.
Prompts are random token ids from a seeded generator: content doesn't change
the cost of a dense transformer, and it keeps the workload identical between
the dense and the pruned model.
"""

from __future__ import annotations

import functools
import inspect
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError, MissingInputError
from ..models.arch import count_parameters, num_layers

CHECKPOINT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class SpeedResult:
    """Timings of one model on one fixed workload."""

    num_params: int
    num_layers: int | None
    device: str
    dtype: str
    batch_size: int
    prompt_len: int
    gen_len: int
    warmup: int
    repeats: int
    prefill_latency_s: float
    decode_latency_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_times_s: list[float]
    decode_times_s: list[float]
    peak_memory_bytes: int | None = None
    checkpoint_bytes: int | None = None

    @property
    def decode_latency_per_token_s(self) -> float:
        return self.decode_latency_s / self.gen_len

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decode_latency_per_token_s": self.decode_latency_per_token_s}


@dataclass
class SpeedComparison:
    """Measured speedups of a pruned model over its dense parent, against the layer-count ideal."""

    dense_layers: int
    pruned_layers: int
    ideal_speedup: float
    prefill_speedup: float
    decode_speedup: float
    prefill_speedup_vs_ideal: float
    decode_speedup_vs_ideal: float
    param_ratio: float
    checkpoint_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def checkpoint_size(directory: str | os.PathLike[str]) -> int:
    """Bytes of weight files (``*.safetensors``, ``*.bin``) directly in ``directory``.

    Top level only: HF checkpoints are flat, and subfolders tend to hold
    optimizer states or other runs that are not part of the model.
    """
    path = Path(directory)
    if not path.is_dir():
        raise MissingInputError(f"checkpoint directory {path} does not exist")
    weights = [f for f in path.iterdir() if f.is_file() and f.name.endswith(CHECKPOINT_SUFFIXES)]
    return sum(f.stat().st_size for f in weights)


def ideal_speedup(dense_layers: int, pruned_layers: int) -> float:
    """``L / (L - k)``: the speedup of the decoder stack alone when k of L layers are removed."""
    if not 0 < pruned_layers <= dense_layers:
        raise ValueError(f"need 0 < pruned_layers <= dense_layers, got {pruned_layers} and {dense_layers}")
    return dense_layers / pruned_layers


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _prompt_ids(
    model: nn.Module, tokenizer: Any, batch_size: int, prompt_len: int, seed: int, device: torch.device
) -> torch.Tensor:
    """Seeded random ids within both the embedding table and the tokenizer's vocabulary."""
    vocab = model.get_input_embeddings().num_embeddings
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, prompt_len), generator=generator).to(device)


@functools.cache
def _accepts_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def prefill(model: nn.Module, input_ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """One forward over the prompt; returns the KV cache and the greedy next token, shape (batch, 1)."""
    kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(type(model)) else {}
    out = model(input_ids=input_ids, use_cache=True, **kwargs)
    return out.past_key_values, out.logits[:, -1:].argmax(dim=-1)


def decode(model: nn.Module, cache: Any, token: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` cached single-token greedy forwards; returns the (batch, steps) tokens they produce."""
    produced = []
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(dim=-1)
        produced.append(token)
    return torch.cat(produced, dim=1)


@torch.inference_mode()
def greedy_decode(model: nn.Module, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """The timed code path as a generator: ``steps + 1`` new tokens (one from prefill)."""
    cache, first = prefill(model, input_ids)
    return torch.cat([first, decode(model, cache, first, steps)], dim=1)


def _time_once(
    model: nn.Module, input_ids: torch.Tensor, gen_len: int, device: torch.device
) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one prompt."""
    _synchronize(device)
    start = time.perf_counter()
    cache, token = prefill(model, input_ids)
    _synchronize(device)
    prefilled = time.perf_counter()
    decode(model, cache, token, gen_len)
    _synchronize(device)
    return prefilled - start, time.perf_counter() - prefilled


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")


def measure_speed(
    model: nn.Module,
    tokenizer: Any = None,
    *,
    prompt_len: int = 128,
    gen_len: int = 64,
    batch_size: int = 1,
    warmup: int = 2,
    repeats: int = 5,
    device: str | torch.device | None = None,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
) -> SpeedResult:
    """Time prefill and cached greedy decode of ``model`` (see the module docstring for the method).

    ``device=None`` uses the device the model is on; otherwise the model is
    moved there in place (a copy would double memory).  The model is put in
    eval mode for the measurement and its previous mode restored.  No global
    thread settings are touched, so CPU numbers reflect the caller's setup.
    ``checkpoint_dir``, if given, fills ``checkpoint_bytes`` via :func:`checkpoint_size`.
    """
    _check_positive(prompt_len=prompt_len, gen_len=gen_len, batch_size=batch_size, repeats=repeats)
    if warmup < 0:
        raise InputError(f"warmup must be >= 0, got {warmup}")
    if device is not None:
        model.to(device)
    param = next(model.parameters())
    device = param.device
    input_ids = _prompt_ids(model, tokenizer, batch_size, prompt_len, seed, device)

    was_training = model.training
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                _time_once(model, input_ids, gen_len, device)
            timings = [_time_once(model, input_ids, gen_len, device) for _ in range(repeats)]
    finally:
        model.train(was_training)

    prefill_times = [t[0] for t in timings]
    decode_times = [t[1] for t in timings]
    prefill_s = statistics.median(prefill_times)
    decode_s = statistics.median(decode_times)
    return SpeedResult(
        num_params=count_parameters(model),
        num_layers=num_layers(model),
        device=str(device),
        dtype=str(param.dtype).removeprefix("torch."),
        batch_size=batch_size,
        prompt_len=prompt_len,
        gen_len=gen_len,
        warmup=warmup,
        repeats=repeats,
        prefill_latency_s=prefill_s,
        decode_latency_s=decode_s,
        prefill_tokens_per_s=batch_size * prompt_len / prefill_s,
        decode_tokens_per_s=batch_size * gen_len / decode_s,
        prefill_times_s=prefill_times,
        decode_times_s=decode_times,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        checkpoint_bytes=checkpoint_size(checkpoint_dir) if checkpoint_dir is not None else None,
    )


_WORKLOAD_FIELDS = ("device", "dtype", "batch_size", "prompt_len", "gen_len")


def compare_speed(
    dense: SpeedResult,
    pruned: SpeedResult,
    dense_layers: int | None = None,
    pruned_layers: int | None = None,
) -> SpeedComparison:
    """Speedups of ``pruned`` over ``dense`` and their fraction of the ideal ``L / (L - k)``.

    Layer counts default to those recorded in the results.  Results from
    different workloads are refused: their ratio would not be a speedup.
    """
    mismatched = [f for f in _WORKLOAD_FIELDS if getattr(dense, f) != getattr(pruned, f)]
    if mismatched:
        raise ValueError(f"dense and pruned were measured on different workloads: {mismatched}")
    dense_layers = dense.num_layers if dense_layers is None else dense_layers
    pruned_layers = pruned.num_layers if pruned_layers is None else pruned_layers
    if dense_layers is None or pruned_layers is None:
        raise ValueError("layer counts unknown: pass dense_layers and pruned_layers")
    ideal = ideal_speedup(dense_layers, pruned_layers)
    prefill_speedup = dense.prefill_latency_s / pruned.prefill_latency_s
    decode_speedup = pruned.decode_tokens_per_s / dense.decode_tokens_per_s
    checkpoint_ratio = None
    if dense.checkpoint_bytes and pruned.checkpoint_bytes is not None:
        checkpoint_ratio = pruned.checkpoint_bytes / dense.checkpoint_bytes
    return SpeedComparison(
        dense_layers=dense_layers,
        pruned_layers=pruned_layers,
        ideal_speedup=ideal,
        prefill_speedup=prefill_speedup,
        decode_speedup=decode_speedup,
        prefill_speedup_vs_ideal=prefill_speedup / ideal,
        decode_speedup_vs_ideal=decode_speedup / ideal,
        param_ratio=pruned.num_params / dense.num_params,
        checkpoint_ratio=checkpoint_ratio,
    )


def _megabytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def speed_table(dense: SpeedResult, pruned: SpeedResult, labels: tuple[str, str] = ("dense", "pruned")) -> str:
    """Dense and pruned side by side, then the measured speedups against the ideal ``L / (L - k)``."""
    c = compare_speed(dense, pruned)
    rows = [
        ("", labels[0], labels[1], f"{labels[1]} vs {labels[0]}"),
        ("layers", str(c.dense_layers), str(c.pruned_layers), f"{c.pruned_layers / c.dense_layers:.3f}x"),
        ("parameters", f"{dense.num_params / 1e6:.1f}M", f"{pruned.num_params / 1e6:.1f}M", f"{c.param_ratio:.3f}x"),
        ("checkpoint", _megabytes(dense.checkpoint_bytes), _megabytes(pruned.checkpoint_bytes),
         "-" if c.checkpoint_ratio is None else f"{c.checkpoint_ratio:.3f}x"),
        ("prefill latency", f"{dense.prefill_latency_s * 1e3:.1f} ms", f"{pruned.prefill_latency_s * 1e3:.1f} ms",
         f"{c.prefill_speedup:.2f}x faster"),
        ("decode", f"{dense.decode_tokens_per_s:.1f} tok/s", f"{pruned.decode_tokens_per_s:.1f} tok/s",
         f"{c.decode_speedup:.2f}x faster"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(f"ideal decoder speedup L/(L-k) = {c.dense_layers}/{c.pruned_layers} = {c.ideal_speedup:.2f}x")
    lines.append(f"measured / ideal: prefill {c.prefill_speedup_vs_ideal:.2f}, decode {c.decode_speedup_vs_ideal:.2f}")
    lines.append(f"workload: {dense.device} {dense.dtype}, batch {dense.batch_size}, prompt {dense.prompt_len}, "
                 f"{dense.gen_len} generated tokens, median of {dense.repeats} after {dense.warmup} warm-up")
    return "\n".join(lines)
