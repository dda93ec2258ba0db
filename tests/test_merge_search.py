"""Merge operators against their formulas; SLM/LaCo engine plans against slow reference loops."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from depthprune import Merge, Plan, apply_plan
from depthprune.engine.search import SimilarityEngine
from depthprune.methods import Target, make_plan
from depthprune.methods.laco import laco_search
from depthprune.methods.slm import slm_search
from depthprune.models.arch import get_layers, get_path, spec_for
from depthprune.plan import PlanError
from depthprune.surgery.merge import OPERATORS
from reference_search import CandidateSimilarities, slow_laco, slow_slm
from tiny import LAYERS, tiny_calibration, tiny_inputs, tiny_model


def _hand_built_layers(model):
    """Give every projection of layer i the constant value i+1 (biases i+1 too): formulas become arithmetic."""
    spec = spec_for(model)
    with torch.no_grad():
        for i, layer in enumerate(get_layers(model)):
            for path in spec.projections.values():
                for p in get_path(layer, path).parameters():
                    p.fill_(i + 1.0)
            for name, p in layer.named_parameters():
                if not any(name.startswith(path + ".") for path in spec.projections.values()):
                    p.fill_(100.0 + i)
    return spec


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize(
    "operator, expected",
    [
        ("rdsc", 2 + (3 - 2) + (4 - 2) + (5 - 2)),  # theta_low + sum(theta_k - theta_low), layers 1..4 hold 2..5
        ("reference", 5.0),  # telescopes to layer high
        ("average", (2 + 3 + 4 + 5) / 4),
        ("drop", 2.0),
    ],
)
def test_operators_match_formula(family, operator, expected):
    model = tiny_model(family)
    spec = _hand_built_layers(model)
    apply_plan(model, Plan(method="t", num_layers=LAYERS, merges=[Merge(1, 4, operator)]))
    merged = get_layers(model)[1]
    for path in spec.projections.values():
        for p in get_path(merged, path).parameters():
            assert torch.all(p == expected), (path, operator)
    for name, p in merged.named_parameters():
        if not any(name.startswith(path + ".") for path in spec.projections.values()):
            assert torch.all(p == 101.0), f"{name} should keep layer low's norm"
    assert len(get_layers(model)) == LAYERS - 3


def test_reference_operator_is_bit_exact_telescoping():
    ts = [torch.randn(50, 50) for _ in range(4)]
    base = ts[0].clone()
    for t in ts[1:]:
        base += t - base
    assert torch.equal(OPERATORS["reference"](ts), base)
    assert torch.allclose(OPERATORS["reference"](ts), ts[-1], atol=1e-5)


def test_nested_merge_applies_in_order():
    model = tiny_model("llama")
    spec = _hand_built_layers(model)
    plan = Plan(method="t", num_layers=LAYERS, merges=[Merge(3, 4, "rdsc"), Merge(1, 5, "rdsc")])
    assert plan.merge_members(1) == [1, 2, 3, 5]
    assert plan.kept == [0, 1]
    apply_plan(model, plan)
    inner = 4 + (5 - 4)  # layers 3, 4 hold 4, 5
    outer = 2 + (3 - 2) + (inner - 2) + (6 - 2)
    q = get_path(get_layers(model)[1], spec.projections["q"]).weight
    assert torch.all(q == outer)
    with pytest.raises(PlanError, match="cuts through"):
        Plan(method="t", num_layers=LAYERS, merges=[Merge(3, 4, "rdsc"), Merge(1, 3, "rdsc")])


_cal = partial(tiny_calibration, 3, 12, padded={1: 9})


DEEP = 10


def _thresholds_between(engine, search, count: int = 4, **kw) -> list[float]:
    """Thresholds halfway between similarities the search meets, so every decision path gets exercised."""
    sims = sorted({round(e["similarity"], 6) for t in (0.3, 0.6, 0.9) for e in search(engine, t, **kw).log})
    mids = [(a + b) / 2 for a, b in zip(sims, sims[1:])]
    return mids[:: max(1, len(mids) // count)]


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("operator", ["reference", "rdsc", "average"])
def test_slm_engine_equals_slow_reference(family, operator):
    model = tiny_model(family, seed=3, layers=DEEP)
    cal = _cal()
    engine = SimilarityEngine(model, cal, batch_size=2)
    sims = CandidateSimilarities(model, cal.input_ids, cal.attention_mask, DEEP)
    shapes = set()
    for threshold in _thresholds_between(engine, slm_search, operator=operator):
        expected = slow_slm(model, cal.input_ids, cal.attention_mask, threshold, operator, DEEP, sims)
        for final_window in ("commit", "skip"):
            plan = slm_search(engine, threshold, operator=operator, final_window=final_window)
            assert plan.merges == expected[final_window], (threshold, final_window, plan.log)
            shapes.add(tuple(plan.merges))
    assert len(shapes) >= 3, "thresholds should produce several different plans"


@pytest.mark.parametrize("family, operator", [("llama", "rdsc"), ("gemma3", "reference")])
def test_laco_engine_equals_slow_reference(family, operator):
    model = tiny_model(family, seed=5, layers=DEEP)
    cal = _cal()
    engine = SimilarityEngine(model, cal)
    sims = CandidateSimilarities(model, cal.input_ids, cal.attention_mask, DEEP)
    nested = 0
    for C, interval in ((2, 1), (3, 2)):
        opts = dict(operator=operator, merge_layers=C, interval=interval)
        for threshold in _thresholds_between(engine, laco_search, count=3, **opts):
            plan = laco_search(engine, threshold, **opts)
            expected = slow_laco(model, cal.input_ids, cal.attention_mask, threshold, operator, DEEP,
                                 C, interval, 1, DEEP, sims)
            assert plan.merges == expected, (operator, threshold, C, interval)
            nested += any(a.low <= b.low and b.high <= a.high
                          for i, a in enumerate(plan.merges) for b in plan.merges[:i])
    assert nested, "some plans should collapse an already merged layer again"


def test_engine_cache_matches_full_forward_states():
    model = tiny_model("gemma3")
    cal = _cal()
    engine = SimilarityEngine(model, cal, batch_size=2)
    with torch.no_grad():
        states = model(input_ids=cal.input_ids, attention_mask=cal.attention_mask, output_hidden_states=True)
    for i in reversed(range(LAYERS)):
        got = torch.cat([engine.walker.store.get((("enter", "original", i), b)) for b in range(2)])
        assert torch.allclose(got, states.hidden_states[i], atol=1e-6), i


def test_engine_never_runs_lm_head_and_leaves_model_intact():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    make_plan("slm", model, _cal(), threshold=0.3, progress=False)
    make_plan("laco", model, _cal(), threshold=0.3, progress=False)
    hook.remove()
    assert calls == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.num_hidden_layers == LAYERS and len(get_layers(model)) == LAYERS


@pytest.mark.parametrize("method", ["slm", "laco"])
def test_depth_target_finds_threshold(method):
    model = tiny_model("llama", seed=2)
    plan = make_plan(method, model, _cal(), Target(remove=2), progress=False)
    assert plan.num_layers_after == LAYERS - 2
    threshold = plan.params["threshold"]
    assert 0.0 <= threshold < 1.0
    assert plan.params["threshold_search"]["target_remove"] == 2
    stricter = make_plan(method, tiny_model("llama", seed=2), _cal(), threshold=min(threshold + 0.01, 0.999),
                         progress=False)
    assert stricter.num_layers_after >= LAYERS - 2


def test_bad_search_options():
    model = tiny_model("llama")
    cal = _cal()
    for kwargs, message in [
        ({"threshold": 1.2}, "between 0 and 1"),
        ({"threshold": 0.0}, "between 0 and 1"),
        ({"operator": "magic", "threshold": 0.5}, "must be one of"),
    ]:
        with pytest.raises((PlanError, ValueError), match=message):
            make_plan("slm", model, cal, progress=False, **kwargs)
    for kwargs, message in [
        ({"merge_layers": 1}, "C >= 2"),
        ({"lowest": 4, "highest": 4}, "empty"),
        ({"interval": 0}, "at least 1"),
    ]:
        with pytest.raises(PlanError, match=message):
            make_plan("laco", model, cal, threshold=0.5, progress=False, **kwargs)
    with pytest.raises(PlanError, match="not both"):
        make_plan("slm", model, cal, Target(remove=1), threshold=0.5, progress=False)
    with pytest.raises(PlanError, match="unreachable"):
        make_plan("laco", model, cal, Target(remove=5), merge_layers=2, lowest=3, progress=False)


def test_plan_log_records_every_window():
    model = tiny_model("llama")
    plan = make_plan("slm", model, _cal(), threshold=0.5, progress=False)
    assert plan.log and all({"low", "high", "similarity", "decision"} <= set(e) for e in plan.log)
    assert plan.params["candidates_evaluated"] == len(plan.log)


def test_drop_merge_equals_removing_the_window_tail():
    ids = tiny_inputs()
    merged, removed = tiny_model("gemma3"), tiny_model("gemma3")
    apply_plan(merged, Plan(method="t", num_layers=LAYERS, merges=[Merge(1, 3, "drop")]))
    apply_plan(removed, Plan(method="t", num_layers=LAYERS, remove=[2, 3]))
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, removed(ids).logits)
    assert merged.config.layer_types == removed.config.layer_types
