"""Block Influence and angular distance: streamed statistics against slow references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from depthprune import plan_angular, plan_shortgpt, score_layers
from depthprune.models.arch import get_base_model, get_layers, spec_for, get_path
from tiny import LAYERS, tiny_calibration, tiny_model


def _slow_states(model, ids, mask):
    """h_0..h_L via output_hidden_states, with h_L taken before the final norm."""
    spec = spec_for(model)
    captured = {}
    norm = get_path(model, spec.final_norm)
    handle = norm.register_forward_pre_hook(lambda m, args: captured.setdefault("h_L", args[0]))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    handle.remove()
    return list(out.hidden_states[:-1]) + [captured["h_L"]]


def slow_block_influence(model, ids, mask):
    states = _slow_states(model, ids, mask)
    bi = []
    for i in range(len(states) - 1):
        sims, n = 0.0, 0
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                if mask[b, t]:
                    a, c = states[i][b, t], states[i + 1][b, t]
                    sims += float(a @ c / (a.norm() * c.norm()))
                    n += 1
        bi.append(1 - sims / n)
    return bi


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "opt"])
def test_block_influence_matches_slow_reference_with_padding(family):
    model = tiny_model(family)
    cal = tiny_calibration(3, 10, padded={1: 7, 2: 4})
    ids, mask = cal.input_ids, cal.attention_mask
    stats = score_layers(model, cal, batch_size=2, progress=False)
    expected = slow_block_influence(model, ids, mask)
    assert stats.tokens == int(mask.sum())
    assert stats.bi == pytest.approx(expected, abs=1e-5)


def test_angular_distance_matches_slow_reference():
    model = tiny_model("llama")
    cal = tiny_calibration(3, 10, padded={1: 6})
    ids, mask = cal.input_ids, cal.attention_mask
    stats = score_layers(model, cal, progress=False)
    states = _slow_states(model, ids, mask)
    last = [9, 5, 9]
    for n in (1, 2, 3):
        for l in range(LAYERS - n + 1):
            d = sum(
                math.acos(max(-1.0, min(1.0, float(F.cosine_similarity(states[l][b, last[b]],
                                                                        states[l + n][b, last[b]], dim=0)))))
                / math.pi
                for b in range(3)
            ) / 3
            assert stats.angular_distance(n)[l] == pytest.approx(d, abs=1e-5)


def _make_identity(layer, spec):
    """Zero the layer's residual branches: its output equals its input exactly."""
    with torch.no_grad():
        for role in ("o", "down"):
            get_path(layer, spec.projections[role]).weight.zero_()


def test_identity_layer_has_zero_bi_and_is_removed_first():
    model = tiny_model("llama")
    spec = spec_for(model)
    _make_identity(get_layers(model)[4], spec)
    stats = score_layers(model, tiny_calibration(4, 16), progress=False)
    assert stats.bi[4] == pytest.approx(0.0, abs=1e-6)
    assert min(stats.bi[:4] + stats.bi[5:]) > 1e-3
    plan = plan_shortgpt(stats, 1)
    assert plan.remove == [4]
    assert plan.scores["bi"] == stats.bi


def test_angular_plan_picks_identity_block():
    model = tiny_model("llama")
    spec = spec_for(model)
    for i in (2, 3):
        _make_identity(get_layers(model)[i], spec)
    stats = score_layers(model, tiny_calibration(4, 16), progress=False)
    plan = plan_angular(stats, block=2)
    assert plan.remove == [2, 3]
    assert plan.params["start"] == 2


def test_scoring_never_runs_the_lm_head():
    model = tiny_model("llama")
    head = model.get_output_embeddings()
    calls = []
    handle = head.register_forward_hook(lambda *a: calls.append(1))
    score_layers(model, tiny_calibration(), progress=False)
    handle.remove()
    assert calls == []
    assert get_base_model(model) is model.model


def test_unknown_metric():
    stats = score_layers(tiny_model("llama"), tiny_calibration(), progress=False)
    with pytest.raises(ValueError, match="unknown metric"):
        stats.scores("cosine")
    with pytest.raises(ValueError, match="block size"):
        stats.angular_distance(LAYERS)
