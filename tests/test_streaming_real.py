"""Layer streaming on real pretrained models (slow): the same statistics, plans and bytes as in memory."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from depthprune import DepthStage, Job, Merge, Plan, Target, apply_plan, load_model, run_job, save
from depthprune.analysis.stats import layer_statistics
from depthprune.data.calibration import sample_windows
from depthprune.evaluate.suite import Evaluation, PerplexitySpec
from depthprune.backend import load_streamed
from depthprune.compensate import Compensation
from depthprune.surgery.streamed import write_pruned_checkpoint
from test_streaming import tensors_of


@pytest.fixture(scope="module")
def gemma3_readonly(gemma3_path):
    """One Gemma-3 for the tests that only read it (loaded once; released after this module)."""
    return load_model(gemma3_path, progress=False)


def test_smollm2_streamed_job_equals_in_memory(smollm2_path, tmp_path):
    """Angular 25% with linear compensation and perplexity, streamed under a 200 MB budget (states spilled) vs
    in memory: same plan and fits, byte-identical tensors, same numbers, and the streamed output reloads in plain
    transformers with the in-memory pruned model's logits."""
    def job():
        return Job([DepthStage("angular", Target(ratio=0.25), compensation=Compensation("linear", tokens=2048))],
                   evaluation=Evaluation(perplexity=PerplexitySpec(max_windows=4)), progress=False)

    memory = load_model(smollm2_path, progress=False)
    expected = run_job(memory, job(), out=tmp_path / "memory")
    got = run_job(load_streamed(smollm2_path, progress=False, max_memory=200 * 2**20), job(),
                  out=tmp_path / "streamed")
    assert got.plan.compensation and any("residual_after" in r for r in got.stages[0]["compensation"])
    assert got.plan.to_dict() == expected.plan.to_dict()
    assert got.metrics() == expected.metrics()
    a, b = tensors_of(tmp_path / "memory"), tensors_of(tmp_path / "streamed")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert json.loads((tmp_path / "streamed" / "config.json").read_text()) == \
        json.loads((tmp_path / "memory" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    ids = memory.tokenizer("It is a truth universally acknowledged", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, memory.model(ids).logits)


def test_smollm2_streamed_merge_surgery_is_byte_identical(smollm2_path, tmp_path):
    plan = Plan("manual", 30, remove=[5], merges=[Merge(24, 27, "reference"), Merge(20, 27, "rdsc"),
                                                 Merge(10, 12, "average")])
    loaded = load_model(smollm2_path, progress=False)
    apply_plan(loaded.model, plan)
    save(loaded.model, loaded.tokenizer, tmp_path / "memory", plan)
    (tmp_path / "streamed").mkdir()
    write_pruned_checkpoint(load_streamed(smollm2_path, progress=False), plan, tmp_path / "streamed",
                            max_shard_size=100 * 10**6)
    a, b = tensors_of(tmp_path / "memory"), tensors_of(tmp_path / "streamed")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert len(list((tmp_path / "streamed").glob("model-*.safetensors"))) > 1


def test_gemma3_streamed_statistics_equal_in_memory(gemma3_path, gemma3_readonly):
    """Sliding-window and full-attention layers, tied 262k embeddings: BI and last-token states equal."""
    loaded = gemma3_readonly
    cal = sample_windows(loaded.tokenizer, num_windows=3, seq_len=64)
    expected = layer_statistics(loaded.model, cal, progress=False)
    got = layer_statistics(load_streamed(gemma3_path, progress=False, max_memory=1), cal, progress=False)
    assert got.bi == expected.bi and torch.equal(got.last_token_states, expected.last_token_states)


def test_gemma3_streamed_sleb_equals_in_memory(gemma3_path, gemma3_readonly, tmp_path):
    """SLEB's layer-major rounds on a real model (sliding and full attention layers, 262k vocabulary, kl
    objective), states spilled to disk: the in-memory search's losses and plan."""
    from depthprune import make_plan

    loaded = gemma3_readonly
    cal = sample_windows(loaded.tokenizer, num_windows=3, seq_len=32)
    expected = make_plan("sleb", loaded.model, cal, Target(remove=1), progress=False, batch_size=2, objective="kl")
    streamed = load_streamed(gemma3_path, progress=False, max_memory=1, scratch=tmp_path)
    got = make_plan("sleb", streamed, cal, Target(remove=1), progress=False, batch_size=2, objective="kl")
    assert got.to_dict() == expected.to_dict()


def test_smollm2_streamed_slm_equals_in_memory(smollm2_path, smollm2_readonly, tmp_path):
    """SLM's search on the streamed similarity engine (merged windows read from disk), states spilled."""
    from depthprune import make_plan

    loaded = smollm2_readonly
    cal = sample_windows(loaded.tokenizer, num_windows=2, seq_len=32)
    expected = make_plan("slm", loaded.model, cal, Target(remove=3), progress=False, batch_size=2)
    streamed = load_streamed(smollm2_path, progress=False, max_memory=1, scratch=tmp_path)
    got = make_plan("slm", streamed, cal, Target(remove=3), progress=False, batch_size=2)
    assert got.merges and got.to_dict() == expected.to_dict()
