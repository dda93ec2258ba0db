"""Architecture facts, described as data, in one place.

Every method, the search engine and surgery ask this module where a model's
decoder layers live instead of hard-coding ``model.model.layers``. Adding a
family means adding one :class:`ArchSpec` to ``ARCHITECTURES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InputError


@dataclass(frozen=True)
class ArchSpec:
    """Where the pieces of one model family live.

    Paths are dotted attribute paths from the ``*ForCausalLM`` module.
    ``per_layer_config`` names config fields holding one entry per layer
    (e.g. ``layer_types``: sliding vs full attention); surgery must shorten
    them, or the saved checkpoint describes layers that no longer exist.
    ``projections`` maps the role of each weight matrix in a decoder layer to
    its dotted path inside the layer; merge operators, width pruning, LoRA and
    compensation use it. Every other parameter of a layer (its norms) is never
    merged.

    Width and compensation facts:

    * ``mlp_size_field``: the config field holding the MLP width (``None``: MLP
      width pruning unsupported, e.g. Phi-3 fuses gate and up into one matrix);
    * ``head_pruning``: separate q/k/v projections and a config ``head_dim``,
      so removing key/value groups leaves a loadable config;
    * ``conv1d``: projections are GPT-2 ``Conv1D`` modules storing W as (in, out);
    * ``post_mlp_norm``: a norm applied to the MLP output *before* the residual
      add (Gemma 2/3); a linear map on the MLP output cannot be folded past it,
      only a rotation (into the down projection) and a scale (into the norm's
      gain); ``norm_gain_offset`` is what the norm adds to its weight (Gemma's
      RMSNorm multiplies by ``1 + weight``).
    """

    family: str
    model_types: tuple[str, ...]
    base_model: str
    layers: str
    final_norm: str | None
    attention: str
    num_layers_field: str = "num_hidden_layers"
    per_layer_config: tuple[str, ...] = ("layer_types",)
    projections: dict[str, str] = field(default_factory=dict)
    mlp_size_field: str | None = "intermediate_size"
    head_pruning: bool = False
    conv1d: bool = False
    post_mlp_norm: str | None = None
    norm_gain_offset: float = 0.0

    def paths(self, roles: tuple[str, ...]) -> list[str]:
        """Paths (inside a layer) of the projections with these roles, in declaration order."""
        return [path for role, path in self.projections.items() if role in roles]

    @property
    def mlp_paths(self) -> list[str]:
        return self.paths(MLP_ROLES)

    @property
    def down_proj(self) -> str:
        """The MLP's output projection: the last matrix before the MLP output joins the residual stream."""
        return self.projections["down"]


#: Projection roles that belong to the MLP (``gate_up`` is Phi-3's fused gate and up).
MLP_ROLES = ("gate", "up", "down", "gate_up")


_LLAMA_PROJ = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def _llama_like(family: str, *model_types: str, **kw: Any) -> ArchSpec:
    kw.setdefault("projections", _LLAMA_PROJ)
    kw.setdefault("head_pruning", True)
    return ArchSpec(
        family=family,
        model_types=model_types,
        base_model="model",
        layers="model.layers",
        final_norm="model.norm",
        attention="self_attn",
        **kw,
    )


ARCHITECTURES: tuple[ArchSpec, ...] = (
    _llama_like("llama", "llama"),
    _llama_like("mistral", "mistral"),
    _llama_like("qwen2", "qwen2"),
    _llama_like("qwen3", "qwen3"),
    _llama_like("gemma2", "gemma2", post_mlp_norm="post_feedforward_layernorm", norm_gain_offset=1.0),
    _llama_like("gemma3", "gemma3_text", post_mlp_norm="post_feedforward_layernorm", norm_gain_offset=1.0),
    _llama_like(
        "phi3",
        "phi3",
        mlp_size_field=None,
        head_pruning=False,
        projections={
            "qkv": "self_attn.qkv_proj",
            "o": "self_attn.o_proj",
            "gate_up": "mlp.gate_up_proj",
            "down": "mlp.down_proj",
        },
    ),
    ArchSpec(
        family="gpt2",
        model_types=("gpt2",),
        base_model="transformer",
        layers="transformer.h",
        final_norm="transformer.ln_f",
        attention="attn",
        num_layers_field="n_layer",
        mlp_size_field="n_inner",
        conv1d=True,
        projections={
            "qkv": "attn.c_attn",
            "o": "attn.c_proj",
            "up": "mlp.c_fc",
            "down": "mlp.c_proj",
        },
    ),
    ArchSpec(
        family="gpt_neox",
        model_types=("gpt_neox",),
        base_model="gpt_neox",
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        attention="attention",
        projections={
            "qkv": "attention.query_key_value",
            "o": "attention.dense",
            "up": "mlp.dense_h_to_4h",
            "down": "mlp.dense_4h_to_h",
        },
    ),
    ArchSpec(
        family="opt",
        model_types=("opt",),
        base_model="model.decoder",
        layers="model.decoder.layers",
        final_norm="model.decoder.final_layer_norm",
        attention="self_attn",
        mlp_size_field="ffn_dim",
        projections={
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.out_proj",
            "up": "fc1",
            "down": "fc2",
        },
    ),
)

_BY_MODEL_TYPE = {mt: spec for spec in ARCHITECTURES for mt in spec.model_types}


class UnsupportedArchitectureError(InputError):
    pass


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def spec_for(model_or_config: nn.Module | Any) -> ArchSpec:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = _BY_MODEL_TYPE.get(model_type)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"depthprune does not know the architecture {model_type!r}. "
            f"Supported model types: {', '.join(supported_model_types())}. "
            "Add an ArchSpec to depthprune/models/arch.py to support it."
        )
    _check_layer_idx_semantics(config)
    return spec


def _check_layer_idx_semantics(config: Any) -> None:
    """Refuse configs where a layer's *number* enters its math.

    GPT-2 can scale attention by 1/(layer_idx+1); renumbering layers after
    pruning would silently change what the kept layers compute.
    """
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise UnsupportedArchitectureError(
            "this GPT-2 config sets scale_attn_by_inverse_layer_idx=True: attention depends on "
            "the layer's index, so removing layers would change the remaining layers' outputs."
        )


def get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(root: nn.Module, path: str, value: Any) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    setattr(parent, name, value)


def layer_tensor(name: str, spec: ArchSpec) -> tuple[int, str] | None:
    """(layer index, name inside the layer) of a stored decoder-layer tensor, None for any other tensor.

    Checkpoints name layer tensors under the layers' path (``model.layers.3.mlp.up_proj.weight``), or without
    the base model's prefix when other tools wrote them (``layers.3...``).
    """
    parts = spec.layers.split(".")
    for start in range(len(parts)):
        prefix = ".".join(parts[start:]) + "."
        if name.startswith(prefix):
            index, _, inner = name[len(prefix):].partition(".")
            return (int(index), inner) if index.isdigit() and inner else None
    return None


def get_layers(model: nn.Module) -> nn.ModuleList:
    return get_path(model, spec_for(model).layers)


def get_base_model(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head: searches never need the head."""
    return get_path(model, spec_for(model).base_model)


def num_layers(model: nn.Module) -> int:
    return len(get_layers(model))


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once, as ``parameters()`` deduplicates them)."""
    return sum(p.numel() for p in model.parameters())


def per_layer_config_values(config: Any, spec: ArchSpec) -> dict[str, list]:
    """Per-layer config lists present on this config (absent ones are skipped)."""
    values = {}
    for name in spec.per_layer_config:
        value = getattr(config, name, None)
        if value is not None:
            values[name] = list(value)
    return values


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
