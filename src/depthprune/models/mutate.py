"""Changing a model's decoder stack and config so they stay consistent (what surgery and the searches share).

Architecture *facts* live in :mod:`.arch`; this module holds the few operations that *change* a model by them:
install a stack of layers (renumbering ``layer_idx``, resizing per-layer config lists), set config fields on
the model and its base model alike, and run the model with another stack temporarily.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .arch import ArchSpec, get_base_model, get_path, per_layer_config_values, set_path, spec_for


def renumber_layers(layers: nn.ModuleList) -> None:
    """Set ``layer_idx`` on every submodule to the layer's new position.

    The KV cache is indexed by ``layer_idx``; a stale index makes cached
    generation read and write another layer's keys and values.
    """
    for new_idx, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx


def set_layer_stack(
    model: nn.Module, modules: list[nn.Module], per_layer: dict[str, list] | None = None
) -> None:
    """Install ``modules`` as the decoder stack and make the config agree.

    ``per_layer`` gives the new per-layer config lists (one entry per module).
    Used both by surgery (permanently) and by the search engine (temporarily,
    see :func:`temporary_layer_stack`).
    """
    spec = spec_for(model)
    new_layers = nn.ModuleList(modules)
    set_path(model, spec.layers, new_layers)
    renumber_layers(new_layers)
    setattr(model.config, spec.num_layers_field, len(modules))
    for name, values in (per_layer or {}).items():
        if len(values) != len(modules):
            raise RuntimeError(f"config.{name} needs {len(modules)} entries, got {len(values)}")
        setattr(model.config, name, list(values))
    _sync_sub_configs(model)


def set_config(model: nn.Module, **values: Any) -> None:
    """Set config fields on the model's config (and the base model's, when that is a distinct object)."""
    for name, value in values.items():
        setattr(model.config, name, value)
    _sync_sub_configs(model)


def _sync_sub_configs(model: nn.Module) -> None:
    """Keep the base model's config object in step when it is a distinct object."""
    base = get_base_model(model)
    if getattr(base, "config", model.config) is not model.config:
        base.config = model.config


def stale_per_layer_fields(config: Any, old_num_layers: int, spec: ArchSpec) -> list[str]:
    """Config list fields still sized for the old depth that the spec does not declare.

    A guard, not a fix: surgery raises naming the field, so the spec gets it.
    """
    stale = []
    for name, value in vars(config).items():
        if name in spec.per_layer_config or name.startswith("_"):
            continue
        if isinstance(value, (list, tuple)) and len(value) == old_num_layers:
            stale.append(name)
    return stale


class temporary_layer_stack:
    """Context manager: run the model with another decoder stack, then restore.

    The search engine evaluates a candidate by swapping in a list of existing
    modules (plus one freshly merged layer) rather than deep-copying the model.
    """

    def __init__(self, model: nn.Module, modules: list[nn.Module], per_layer: dict[str, list]):
        self.model = model
        self.modules = modules
        self.per_layer = per_layer

    def __enter__(self) -> nn.Module:
        spec = spec_for(self.model)
        self._saved_layers = get_path(self.model, spec.layers)
        self._saved_n = getattr(self.model.config, spec.num_layers_field)
        self._saved_lists = per_layer_config_values(self.model.config, spec)
        self._saved_idx = [
            [(m, m.layer_idx) for m in layer.modules() if hasattr(m, "layer_idx")]
            for layer in self.modules
        ]
        set_layer_stack(self.model, self.modules, self.per_layer)
        return self.model

    def __exit__(self, *exc: object) -> None:
        spec = spec_for(self.model)
        set_path(self.model, spec.layers, self._saved_layers)
        setattr(self.model.config, spec.num_layers_field, self._saved_n)
        for name, values in self._saved_lists.items():
            setattr(self.model.config, name, values)
        for saved in self._saved_idx:
            for module, idx in saved:
                module.layer_idx = idx
