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
    plan = make_plan("sleb", model, cal, Target(remove=3), objective=objective, batch_size=3, progress=False,
                     exact=True)
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
    got = engine.loss([engine.layers[i] for i in keep])
    pruned = tiny_model("llama", seed=4)
    apply_plan(pruned, Plan("x", LAYERS, remove=[2, 4]))
    want, _ = next_token_loss(pruned, cal.input_ids, cal.attention_mask, "kl", dense)
    assert got == pytest.approx(want, rel=1e-5)


def test_kl_teacher_beyond_its_budget_is_the_top_k_lower_bound_and_says_so():
    """Over its memory budget the dense model's distributions are kept as top-k + remainder: the kl objective is
    then a lower bound (equal when k covers the vocabulary), and the engine says which it used."""
    model, cal = tiny_model("qwen3", seed=5), _cal()
    keep = [1, 2, 3, 4, 5]
    exact = LossEngine(model, cal, objective="kl")
    top = LossEngine(model, cal, objective="kl", teacher_cache_mb=0, teacher_top_k=8)
    whole = LossEngine(model, cal, objective="kl", teacher_cache_mb=0, teacher_top_k=10**6)
    assert exact.teacher_note == "exact" == whole.teacher_note and "top-8" in top.teacher_note
    loss = exact.loss([exact.layers[i] for i in keep])
    assert top.loss([top.layers[i] for i in keep]) < loss
    assert whole.loss([whole.layers[i] for i in keep]) == pytest.approx(loss, rel=1e-9)


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
    plan = make_plan("sleb", model, cal, Target(remove=2), objective="kl", progress=False, exact=True)
    assert plan.remove == slow_sleb(model, cal.input_ids, cal.attention_mask, 2, "kl", 30)


def test_screened_rounds_rerank_the_best_on_all_windows():
    """Multi-fidelity rounds: every candidate screened on the first windows (its screening loss equals the exact
    loss on those windows), the best few decided on all windows; reranking everything is the exact search."""
    model, cal = tiny_model("llama", seed=3), tiny_calibration(6, 12, seed=7, source="random")
    exact = make_plan("sleb", model, cal, Target(remove=2), exact=True, progress=False)
    screened = make_plan("sleb", model, cal, Target(remove=2), screen_windows=2, rerank=2, progress=False)
    first = screened.log[0]
    assert set(first["screened"]) == {str(i) for i in range(LAYERS)} and len(first["losses"]) == 2
    assert "screened on 2 windows, the best 2 on all 6" in first["fidelity"]
    on_two = make_plan("sleb", model, cal.first(2), Target(remove=1), exact=True, progress=False)
    assert first["screened"] == on_two.log[0]["losses"]
    for layer, loss in first["losses"].items():
        assert loss == pytest.approx(exact.log[0]["losses"][layer], rel=1e-12)
    assert screened.params["exact"] is False and exact.params["exact"] is True
    everything = make_plan("sleb", model, cal, Target(remove=2), screen_windows=2, rerank=LAYERS, progress=False)
    assert everything.remove == exact.remove and everything.log[0]["losses"] == exact.log[0]["losses"]
