"""Integration on the real SmolLM2-135M: ShortGPT 25%, save, reload, perplexity."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from depthprune import apply_plan, calibration_windows, perplexity, plan_shortgpt, save, score_layers
from depthprune.evaluate.perplexity import perplexity_on
from depthprune.data.calibration import consecutive_windows
from depthprune.methods import layers_to_remove
from test_scoring import slow_block_influence
from tiny import assert_reloads_exactly


def test_shortgpt_25_percent_end_to_end(smollm2, tmp_path, shared_data):
    model, tok = smollm2
    wiki = shared_data / "wikitext-2" / "test.txt"
    dense = perplexity(model, tok, wiki, max_windows=16, progress=False)

    cal = calibration_windows(tok, num_windows=10, seq_len=128, seed=1234)
    stats = score_layers(model, cal, progress=False)
    slow = slow_block_influence(model, cal.input_ids[:2], cal.attention_mask[:2])
    two = score_layers(model, cal.__class__(cal.input_ids[:2], cal.attention_mask[:2]), progress=False)
    assert two.bi == pytest.approx(slow, abs=1e-4)

    plan = plan_shortgpt(stats, layers_to_remove(30, ratio=0.25))
    assert len(plan.remove) == 7
    assert 0 not in plan.remove and 29 not in plan.remove, "first/last layers have the highest BI"
    apply_plan(model, plan)
    assert model.config.num_hidden_layers == 23

    pruned = perplexity(model, tok, wiki, max_windows=16, progress=False)
    assert math.isfinite(pruned.perplexity) and pruned.perplexity > dense.perplexity

    out = save(model, tok, tmp_path / "pruned", plan)
    ids = AutoTokenizer.from_pretrained(out)("It is a truth universally acknowledged", return_tensors="pt").input_ids
    assert_reloads_exactly(model, out, ids, new_tokens=12)
    assert (out / "depthprune_plan.json").exists() and (out / "generation_config.json").exists()


def test_chunked_perplexity_equals_transformers_loss(smollm2_readonly, shared_data):
    model, tok = smollm2_readonly
    windows = consecutive_windows(tok, shared_data / "wikitext-2" / "test.txt", seq_len=64, max_windows=4)
    ours = perplexity_on(model, windows, batch_size=3, chunk_tokens=17, progress=False)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows.input_ids]
    expected = math.exp(float(torch.stack(losses).mean()))
    assert ours.perplexity == pytest.approx(expected, rel=1e-4)
    assert ours.tokens == 4 * 63
