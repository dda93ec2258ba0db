"""SLEB: the engine's greedy removal equals the paper's slow loop (copy, remove, full forward) on tiny models of
several architectures and on SmolLM2, for both objectives; protection and errors."""

from __future__ import annotations

from functools import partial

import pytest

from depthprune import Target, make_plan
from depthprune.engine.loss import LossEngine
from depthprune.plan import PlanError
from reference_search import next_token_loss, slow_sleb
from tiny import LAYERS, tiny_calibration, tiny_model


_cal = partial(tiny_calibration, 4, 12, seed=7, source="random")


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "opt"])
@pytest.mark.parametrize("objective", ["nll", "kl"])
def test_engine_equals_slow_loop(family, objective):
    model, cal = tiny_model(family, seed=3), _cal(padded={-1: -3})
    plan = make_plan("sleb", model, cal, Target(remove=3), objective=objective, batch_size=3, progress=False)
    expected = slow_sleb(tiny_model(family, seed=3), cal.input_ids, cal.attention_mask, 3, objective, LAYERS)
    assert plan.remove == expected
    assert sorted(entry["removed"] for entry in plan.log) == plan.remove
    assert len(plan.log) == 3 and all(len(e["losses"]) == LAYERS - i for i, e in enumerate(plan.log))


def test_losses_equal_a_full_forward():
    """The engine's loss of a candidate equals the loss of that model built by surgery and run in full."""
    from depthprune import Plan, apply_plan

    model, cal = tiny_model("llama", seed=4), _cal()
    engine = LossEngine(model, cal, objective="kl")
    _, dense = next_token_loss(model, cal.input_ids, cal.attention_mask, "nll")
    assert engine.dense_loss == pytest.approx(0.0, abs=1e-6)
    keep = [0, 1, 3, 5]
    got = engine.loss_from(engine.original, 0, [engine.layers[i] for i in keep], engine.per_layer_of(keep))
    pruned = tiny_model("llama", seed=4)
    apply_plan(pruned, Plan("x", LAYERS, remove=[2, 4]))
    want, _ = next_token_loss(pruned, cal.input_ids, cal.attention_mask, "kl", dense)
    assert got == pytest.approx(want, rel=1e-5)


def test_kl_without_a_teacher_cache_gives_the_same_plan():
    model, cal = tiny_model("qwen3", seed=5), _cal()
    cached = LossEngine(model, cal, objective="kl")
    uncached = LossEngine(model, cal, objective="kl", teacher_cache_mb=0)
    assert cached._teacher is not None and uncached._teacher is None
    keep = [1, 2, 3, 4, 5]
    args = (0, [cached.layers[i] for i in keep], cached.per_layer_of(keep))
    assert cached.loss_from(cached.original, *args) == pytest.approx(uncached.loss_from(uncached.original, *args))


def test_protected_layers_are_never_removed():
    plan = make_plan("sleb", tiny_model("llama", seed=3), _cal(), Target(remove=3), protect_first=1,
                     protect_last=2, progress=False)
    assert all(1 <= i < LAYERS - 2 for i in plan.remove) and len(plan.remove) == 3
    with pytest.raises(PlanError, match="outside the protected"):
        make_plan("sleb", tiny_model("llama"), _cal(), Target(remove=3), protect_first=2, protect_last=2,
                  progress=False)
    with pytest.raises(PlanError, match="must be one of nll, kl"):
        make_plan("sleb", tiny_model("llama"), _cal(), Target(remove=1), objective="mse", progress=False)
    with pytest.raises(PlanError, match="needs a depth"):
        make_plan("sleb", tiny_model("llama"), _cal(), progress=False)


def test_engine_equals_slow_loop_on_smollm2(smollm2_readonly):
    from depthprune import calibration_windows

    model, tok = smollm2_readonly
    cal = calibration_windows(tok, "default", num_windows=3, seq_len=48, seed=3)
    plan = make_plan("sleb", model, cal, Target(remove=2), objective="kl", progress=False)
    assert plan.remove == slow_sleb(model, cal.input_ids, cal.attention_mask, 2, "kl", 30)
