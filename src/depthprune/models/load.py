"""Load a causal LM and its tokenizer from a hub id, a directory, a .gguf file or an alias.

Where a source is and how it is checked: :mod:`.sources` (aliases in :mod:`.aliases`, GGUF conversion in
:mod:`.gguf`, checkpoint checks in :mod:`.validate`); their names are also importable from here.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import InputError, ModelLoadError
from .aliases import ALIASES, DEFAULT_MODEL, Alias
from .arch import spec_for
from .consistency import refuse_non_finite_weights, sync_tie_flag
from .gguf import convert_gguf
from .sources import check_plan_depth, local_config, resolve_source
from .validate import (check_checkpoint, check_context, check_gguf, check_layer_tensors, config_num_layers,
                       context_length, read_config)

__all__ = ["ALIASES", "Alias", "DEFAULT_MODEL", "LoadedModel", "ModelLoadError", "check_checkpoint",
           "check_context", "check_gguf", "check_layer_tensors", "check_plan_depth", "config_num_layers",
           "context_length", "convert_gguf", "load_model", "local_config", "quiet_transformers", "read_config",
           "resolve_device", "resolve_dtype", "resolve_source"]


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """float32 on CPU by default (bf16 matmuls are slow there), bfloat16 on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device == "cpu" else torch.bfloat16
    table = {
        "float32": torch.float32, "fp32": torch.float32,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16,
    }
    if dtype not in table:
        raise InputError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return table[dtype]


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but no CUDA device is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto")
    return device


@contextmanager
def quiet_transformers(quiet: bool = True) -> Iterator[None]:
    """Silence transformers', huggingface_hub's and datasets' progress bars for the block (``-q``)."""
    if not quiet:
        yield
        return
    import datasets
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    shown = (hf_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled(),
             datasets.is_progress_bar_enabled())
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for was_shown, enable in zip(shown, (hf_logging.enable_progress_bar, hub_utils.enable_progress_bars,
                                             datasets.enable_progress_bars)):
            if was_shown:
                enable()


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    source: str
    path: str

    def __iter__(self):
        return iter((self.model, self.tokenizer))


def load_model(
    source: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = "cpu",
    progress: bool = True,
) -> LoadedModel:
    """Load ``source`` (alias, directory, .gguf file or hub id) for pruning.

    Returns a :class:`LoadedModel`, which unpacks as ``model, tokenizer``.
    ``device="auto"`` spreads a large model over the available GPUs with
    accelerate's ``device_map="auto"``. ``progress=False`` also silences
    transformers' own loading bars.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device_req = device
    device = resolve_device("auto" if device == "auto" else device)
    torch_dtype = resolve_dtype(dtype, device)
    where = resolve_source(source)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_req == "auto" and device != "cpu":
        kwargs["device_map"] = "auto"
    try:
        with quiet_transformers(not progress):
            tokenizer = AutoTokenizer.from_pretrained(where)  # first: a missing tokenizer fails in seconds
            model, info = AutoModelForCausalLM.from_pretrained(where, output_loading_info=True, **kwargs)
    except OSError as err:
        raise ModelLoadError(
            f"could not load {source!r}: {err}\nOffline? Use a local directory, a .gguf file or an alias "
            f"({', '.join(ALIASES)})."
        ) from err
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelLoadError(f"{source} lacks {len(missing)} weight tensors its config needs ({shown}); "
                             "transformers would initialise them at random, so depthprune does not use it")
    refuse_non_finite_weights(model.named_parameters(), source)
    sync_tie_flag(model)  # transformers keeps a stored head that differs from the embedding: say so
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    spec_for(model)
    return LoadedModel(model, tokenizer, source, str(where))
