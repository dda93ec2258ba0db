"""SLM and LaCo on real models: fewer layers, plain-transformers reload, cached generation, perplexity."""

from __future__ import annotations

import math

import pytest
from transformers import AutoTokenizer

from depthprune import calibration_windows, load_model, perplexity, save
from depthprune.engine.search import SimilarityEngine
from depthprune.methods import Target, make_plan
from depthprune.methods.slm import slm_search
from depthprune.surgery import apply_plan
from reference_search import CandidateSimilarities, slow_slm
from tiny import assert_reloads_exactly


def _check_checkpoint(model, tok, plan, tmp_path, layers_before):
    apply_plan(model, plan)
    assert model.config.num_hidden_layers == plan.num_layers_after < layers_before
    out = save(model, tok, tmp_path / plan.method, plan)
    ids = AutoTokenizer.from_pretrained(out)("Mr. Darcy walked into the room and", return_tensors="pt").input_ids
    return assert_reloads_exactly(model, out, ids, new_tokens=10)


def test_slm_engine_equals_slow_reference_on_smollm2(smollm2_readonly):
    model, tok = smollm2_readonly
    cal = calibration_windows(tok, num_windows=2, seq_len=32, seed=7)
    engine = SimilarityEngine(model, cal)
    sims = CandidateSimilarities(model, cal.input_ids, cal.attention_mask, 30)
    for threshold in (0.95, 0.8):
        plan = slm_search(engine, threshold)
        expected = slow_slm(model, cal.input_ids, cal.attention_mask, threshold, "reference", 30, sims)
        assert plan.merges == expected["commit"], threshold
        assert plan.merges, "these thresholds merge something on SmolLM2"


@pytest.mark.parametrize("method, options", [("slm", {"threshold": 0.9}),
                                             ("laco", {"threshold": 0.9, "operator": "reference"})])
def test_merge_methods_on_smollm2(smollm2, tmp_path, shared_data, method, options):
    model, tok = smollm2
    wiki = shared_data / "wikitext-2" / "test.txt"
    dense = perplexity(model, tok, wiki, max_windows=8, progress=False).perplexity
    cal = calibration_windows(tok, num_windows=4, seq_len=64)
    plan = make_plan(method, model, cal, progress=False, **options)
    assert plan.merges and all(m.operator == plan.params["operator"] for m in plan.merges)
    _check_checkpoint(model, tok, plan, tmp_path, 30)
    pruned = perplexity(model, tok, wiki, max_windows=8, progress=False).perplexity
    assert math.isfinite(pruned) and pruned > dense


def test_slm_target_on_gemma3(gemma3_path, tmp_path):
    model, tok = load_model(gemma3_path)
    cal = calibration_windows(tok, num_windows=2, seq_len=32)
    assert (cal.input_ids[:, 0] == tok.bos_token_id).all()
    types = list(model.config.layer_types)
    plan = make_plan("slm", model, cal, Target(remove=3), progress=False)
    assert plan.num_layers_after == 15
    assert 0 < plan.params["threshold"] < 1
    reloaded = _check_checkpoint(model, tok, plan, tmp_path, 18)
    assert reloaded.config.layer_types == [types[i] for i in plan.kept]
