"""What is wrong with a checkpoint, said before transformers loads it or before depthprune commits one.

Loading a damaged checkpoint fails deep inside transformers, or worse, succeeds with layers initialised at
random; saving one (a NaN fit, a config whose depth is not the weights') would hand the damage on. These checks
read the config and the safetensors headers only, except :func:`verify_checkpoint`, which also reads every
weight of a checkpoint about to be committed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..checks import named_list, non_finite_tensors
from ..errors import CheckpointError, InputError, MissingInputError, MissingPackageError, ModelLoadError
from .aliases import ALIASES
from .arch import layer_tensor, spec_for
from .consistency import check_finite, check_known_names, check_shapes, check_tokenizer


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


def check_context(config: Any, seq_len: int, option: str = "--seq-len") -> None:
    """Refuse windows longer than the model's context: they are slow (quadratic attention) and meaningless."""
    limit = context_length(config)
    if limit is not None and seq_len > limit:
        raise InputError(f"{option} {seq_len} is longer than the model's context of {limit} positions; use at "
                         f"most {limit}")


def verify_checkpoint(directory: Path) -> None:
    """Refuse a checkpoint that is not what it claims: the checks :func:`check_checkpoint` makes before
    loading (a config transformers accepts, exactly the layers it declares), and every weight finite (a NaN fit
    or a diverged heal must not be saved as a model)."""
    from safetensors import safe_open

    check_checkpoint(directory)
    bad: list[str] = []
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            bad += non_finite_tensors((name, handle.get_tensor(name)) for name in handle.keys())
    if bad:
        raise CheckpointError(f"not saving the checkpoint: {len(bad)} weight tensors hold NaN or infinite "
                              f"values ({named_list(bad)}); the run diverged or an option made the fit meaningless")
