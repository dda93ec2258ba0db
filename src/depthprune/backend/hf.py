"""The transformers internals depthprune relies on, in one place.

Everything else uses transformers' public API (``from_pretrained``,
``save_pretrained``, configs, the model classes' own forward). Streaming and
streamed surgery also need to know, tensor by tensor, how a checkpoint names a
model's parameters; transformers has no public API for that, so the private
functions it uses itself are called here. A transformers upgrade that moves
them breaks this module alone.
"""

from __future__ import annotations

from torch import nn


def saved_names(model: nn.Module) -> dict[str, str]:
    """Each state-dict entry ``save_pretrained`` writes, by model name -> the name it is written under.

    Tied copies (the LM head sharing the embeddings) are left out and transformers' own renamings reverted
    (GPT-NeoX's ``lm_head`` is stored as ``embed_out``), by transformers' own functions, so a streamed save
    names tensors exactly as an in-memory save would.
    """
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    by_id = {id(tensor): name for name, tensor in state.items()}
    return {by_id[id(tensor)]: saved for saved, tensor in revert_weight_conversion(model, state).items()}


def fused_on_load(model: nn.Module) -> bool:
    """Whether loading this model's checkpoint fuses or splits tensors (MoE experts), which a tensor-by-tensor
    reader cannot replay; plain renamings are fine."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    return any(not isinstance(t, WeightRenaming) for t in get_model_conversion_mapping(model))
