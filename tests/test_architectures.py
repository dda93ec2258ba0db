"""Every supported architecture: prune two layers of a tiny random model, save, reload, generate."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthprune import Plan, apply_plan, save
from depthprune.models.arch import (
    UnsupportedArchitectureError,
    get_layers,
    spec_for,
    supported_model_types,
)
from tiny import CONFIGS, LAYERS, greedy, tiny_inputs, tiny_model

REMOVE = [1, 3]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_prune_save_reloadgreedy(family, tmp_path):
    model = tiny_model(family)
    types_before = list(getattr(model.config, "layer_types", None) or [])
    apply_plan(model, Plan(method="manual", num_layers=LAYERS, remove=REMOVE))

    assert len(get_layers(model)) == LAYERS - 2
    assert model.config.num_hidden_layers == LAYERS - 2
    for new_idx, layer in enumerate(get_layers(model)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                assert module.layer_idx == new_idx
    if types_before:
        assert model.config.layer_types == [t for i, t in enumerate(types_before) if i not in REMOVE]

    ids = tiny_inputs()
    cached, uncached = greedy(model, ids, True), greedy(model, ids, False)
    assert torch.equal(cached, uncached), "cached generation differs: stale layer_idx or config"

    save(model, None, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.num_hidden_layers == LAYERS - 2
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert torch.equal(greedy(reloaded, ids, True), cached)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_stale_layer_idx_breaks_cached_generation(family):
    """Control for the test above: without renumbering, cached generation must go wrong."""
    model = tiny_model(family)
    kept = [(i, layer) for i, layer in enumerate(get_layers(model)) if i not in REMOVE]
    ids = tiny_inputs()
    apply_plan(model, Plan(method="manual", num_layers=LAYERS, remove=REMOVE))
    good = greedy(model, ids, True)
    for stale_idx, layer in kept:
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = stale_idx
    try:
        bad = greedy(model, ids, True)
    except (IndexError, RuntimeError, KeyError):
        return
    assert not torch.equal(bad, good)


def test_every_family_has_a_spec():
    for family in CONFIGS:
        spec_for(tiny_model(family))
    assert "llama" in supported_model_types() and "gemma3_text" in supported_model_types()


def test_unknown_architecture_names_supported_ones():
    from transformers import BertConfig

    with pytest.raises(UnsupportedArchitectureError, match="llama.*"):
        spec_for(BertConfig())


def test_gpt2_with_index_dependent_attention_is_refused():
    from tiny import tiny_config

    config = tiny_config("gpt2")
    config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(UnsupportedArchitectureError, match="scale_attn_by_inverse_layer_idx"):
        spec_for(config)


def test_undeclared_per_layer_field_is_refused():
    from depthprune.plan import PlanError

    model = tiny_model("llama")
    model.config.my_layer_list = ["a"] * LAYERS
    with pytest.raises(PlanError, match="my_layer_list"):
        apply_plan(model, Plan(method="manual", num_layers=LAYERS, remove=[0]))
