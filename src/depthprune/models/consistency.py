"""Is a checkpoint's config.json what its weights and tokenizer are? Judged from the files, before loading.

transformers finds a config that does not describe its weights late and badly: a ``hidden_size``, ``vocab_size``
or ``intermediate_size`` other than the stored shapes is a ``RuntimeError`` about ``ignore_mismatched_sizes``
after the whole model was built, an unknown rope type or activation a bare ``KeyError``, a tokenizer with more
tokens than the embedding has rows an ``IndexError`` in the first forward pass, and a ``NaN`` in the config
(``rms_norm_eps``) no error at all: every score is NaN and a meaningless plan is saved. Each is named here from
config.json, the safetensors headers and the tokenizer files, reading no weight.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from ..checks import named_list, non_finite_tensors
from ..errors import ModelLoadError, MissingInputError

ACTIVATION_FIELDS = ("hidden_act", "hidden_activation", "activation_function")
"""The config fields that name an activation function (transformers' ``ACT2FN``), by family."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
"""A model directory holding none of these has no tokenizer transformers can load."""


def _walk(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    """Every leaf of a JSON value with its dotted field name (``rope_parameters.factor``)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{where}[{index}]")
    else:
        yield where, value


def check_finite(config: dict[str, Any], path: Path) -> None:
    """Every number in the config is finite: ``NaN`` or ``Infinity`` (which JSON readers accept) would make
    every score and metric NaN without an error."""
    for field, value in _walk(config, ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise ModelLoadError(f"{path} gives {field} {value}, which is not a finite number; fix config.json")


def _rope_settings(config: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The rope settings a config gives (``rope_parameters`` or the older ``rope_scaling``), one per layer type
    where a family keeps one for each (Gemma-3's ``{"full_attention": {...}, "sliding_attention": {...}}``)."""
    for field in ("rope_parameters", "rope_scaling"):
        value = config.get(field)
        if not isinstance(value, dict):
            continue
        if "rope_type" in value or "type" in value:
            yield field, value
        else:
            yield from ((f"{field}.{key}", item) for key, item in value.items() if isinstance(item, dict))


def check_known_names(config: dict[str, Any], path: Path) -> None:
    """Rope types and activations are ones transformers implements (else a bare ``KeyError`` while building)."""
    from transformers.activations import ACT2FN
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for field, rope in _rope_settings(config):
        kind = rope.get("rope_type", rope.get("type"))
        if kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
            raise ModelLoadError(f"{path} gives {field} rope type {kind!r}, which transformers does not know "
                                 f"(known: default, {', '.join(ROPE_INIT_FUNCTIONS)}); fix config.json")
    for field in ACTIVATION_FIELDS:
        name = config.get(field)
        if name is not None and (not isinstance(name, str) or name not in ACT2FN):
            raise ModelLoadError(f"{path} gives {field} {name!r}, which is not an activation transformers knows "
                                 f"(e.g. {', '.join(list(ACT2FN)[:6])}); fix config.json")


def expected_shapes(built: Any, path: Path) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """The shape of every tensor the config implies (the model built on the meta device: no memory, no weights)
    and the name of the input embedding."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(built)
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as err:
        raise ModelLoadError(f"{path}: transformers cannot build a model from this config "
                             f"({type(err).__name__}: {err}); fix config.json") from err
    embedding = model.get_input_embeddings()
    embedding_name = next((f"{name}.weight" for name, module in model.named_modules() if module is embedding), None)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}, embedding_name


SIZE_FIELD_ENDINGS = ("_size", "_dim", "n_embd", "ffn_dim")
"""Config fields that are widths (``hidden_size``, ``head_dim``): named first when a shape is wrong, before
another field that happens to have the same value (``max_position_embeddings``)."""


def _fields_for(config: dict[str, Any], wanted: tuple[int, ...], found: tuple[int, ...]) -> list[str]:
    """The config fields whose values are the dimensions that differ (``vocab_size 300``)."""
    differing = {w for w, f in zip(wanted, found) if w != f} if len(wanted) == len(found) else set(wanted)
    fields = [(key, value) for key, value in config.items()
              if isinstance(value, int) and not isinstance(value, bool) and value in differing]
    sizes = [(key, value) for key, value in fields if key.endswith(SIZE_FIELD_ENDINGS)]
    return [f"{key} {value}" for key, value in sizes or fields]


def check_shapes(config: dict[str, Any], built: Any, stored: dict[str, tuple[int, ...]], path: Path) -> str | None:
    """Every stored tensor has the shape the config implies. Returns the input embedding's name."""
    wanted, embedding = expected_shapes(built, path)
    for name in wanted:
        shape = stored.get(name)
        if shape is not None and wanted[name] != shape:
            fields = _fields_for(config, wanted[name], shape)
            cause = f"config.json's {' and '.join(fields)} impl" + ("y" if len(fields) > 1 else "ies") \
                if fields else "config.json implies"
            raise ModelLoadError(f"{path}: {cause} {name} of shape {list(wanted[name])}, but the weights hold "
                                 f"{list(shape)}; fix config.json to match the weights")
    return embedding


def refuse_non_finite_weights(tensors: Iterable[tuple[str, torch.Tensor]], source: Any) -> None:
    """An input whose weights hold NaN or an infinity is refused, naming its tensors as stored: every score,
    plan and metric computed from it would be NaN."""
    bad = non_finite_tensors(tensors)
    if bad:
        raise ModelLoadError(f"{source}: {len(bad)} weight tensors hold NaN or infinite values ({named_list(bad)}); "
                             "every score would be NaN: re-download or re-save the model")


def _weight_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    return next((f"{name}.weight" for name, found in model.named_modules() if found is module), None)


def untie_stored_head(model: torch.nn.Module, stored: Callable[[list[str]], dict[str, torch.Tensor]]) -> None:
    """One rule for tied LM heads on every path, transformers' own: a config that ties the head
    (``tie_word_embeddings``) over a checkpoint that stores a *different* head uses the stored head, and the
    config is corrected so that a saved result reloads the same. ``stored(names)`` reads tensors by name
    (those the checkpoint lacks are absent from its answer)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None or head.weight is not embedding.weight:
        sync_tie_flag(model)
        return
    names = [_weight_name(model, head), _weight_name(model, embedding)]
    tensors = stored([n for n in names if n])
    if len(tensors) == 2 and not torch.equal(*tensors.values()):
        head.weight = torch.nn.Parameter(torch.empty_like(head.weight))
        sync_tie_flag(model)


def sync_tie_flag(model: torch.nn.Module) -> None:
    """``tie_word_embeddings`` says what the model does: False once the head is its own tensor."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embedding is not None and head.weight is not embedding.weight:
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False


def tokenizer_size(directory: Path) -> int | None:
    """How many token ids the tokenizer files give (the largest id + 1), or None when they do not say cheaply
    (a sentencepiece model). A directory without tokenizer files is an error: every command needs one."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise MissingInputError(f"{directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the "
                                "tokenizer beside the model (tokenizer.save_pretrained(dir))")
    ids: list[int] = []
    try:
        if (directory / "tokenizer.json").is_file():
            data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
            vocab = data.get("model", {}).get("vocab")
            ids += list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab or ())))
            ids += [token["id"] for token in data.get("added_tokens") or ()]
        elif (directory / "vocab.json").is_file():
            ids += list(json.loads((directory / "vocab.json").read_text(encoding="utf-8")).values())
        else:
            return None
        settings = directory / "tokenizer_config.json"
        if settings.is_file():
            ids += [int(i) for i in json.loads(settings.read_text(encoding="utf-8")).get("added_tokens_decoder", {})]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise ModelLoadError(f"{directory}: the tokenizer files are not readable ({type(err).__name__}: {err}); "
                             "re-save the tokenizer") from err
    return max(ids) + 1 if ids else None


def check_tokenizer(directory: Path, stored: dict[str, tuple[int, ...]], embedding: str | None) -> None:
    """The tokenizer exists and gives no id the embedding has no row for (an ``IndexError`` mid-run)."""
    size = tokenizer_size(directory)
    rows = stored.get(embedding, (None,))[0] if embedding else None
    if size is not None and rows is not None and size > rows:
        raise ModelLoadError(f"{directory}: the tokenizer has {size} tokens but the embedding ({embedding}) has "
                             f"only {rows} rows; use the tokenizer the model was trained with")
