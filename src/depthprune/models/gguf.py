"""GGUF sources: transformers' GGUF loading is slow (it builds the tokenizer and dequantizes every tensor on one
core), so a GGUF file is converted once into a cached safetensors directory that later loads read in seconds."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_directory
from .validate import verify_checkpoint

log = logging.getLogger(__name__)


def _strip_gguf_quantizer(model: nn.Module) -> None:
    """After a GGUF load the weights are plain floats, but transformers still
    marks the model quantized and refuses to save it; the mark is all we drop."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]


def gguf_cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors directory (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if target.is_dir() and (target / "config.json").exists():
        return target
    if target.exists():
        shutil.rmtree(target)  # an incomplete conversion in depthprune's own cache
    log.warning("converting %s to safetensors in %s (one-time, about a minute)", gguf_path, target)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    _strip_gguf_quantizer(model)
    with atomic_directory(target, overwrite=True, kind="converted", verify=verify_checkpoint) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target
