"""Speed measurement: bookkeeping and formulas only; wall-clock ratios are never asserted."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from depthprune import Plan, apply_plan
from depthprune.evaluate.speed import (
    SpeedResult,
    checkpoint_size,
    compare_speed,
    greedy_decode,
    ideal_speedup,
    measure_speed,
)
from tiny import VOCAB, tiny_model

WORKLOAD = dict(prompt_len=16, gen_len=8, batch_size=2, warmup=1, repeats=3)


@pytest.fixture(scope="module")
def dense() -> torch.nn.Module:
    return tiny_model("llama", layers=4)


@pytest.fixture(scope="module")
def dense_speed(dense: torch.nn.Module) -> SpeedResult:
    return measure_speed(dense, **WORKLOAD)


def test_measure_speed_fields(dense: torch.nn.Module, dense_speed: SpeedResult) -> None:
    r = dense_speed
    assert r.num_params == sum(p.numel() for p in dense.parameters()) > 0
    assert r.num_layers == 4
    assert (r.device, r.dtype) == ("cpu", "float32")
    assert len(r.prefill_times_s) == len(r.decode_times_s) == WORKLOAD["repeats"]
    assert all(t > 0 for t in r.prefill_times_s + r.decode_times_s)
    assert r.prefill_latency_s == statistics.median(r.prefill_times_s)
    assert r.decode_latency_s == statistics.median(r.decode_times_s)
    assert r.decode_tokens_per_s == pytest.approx(2 * 8 / r.decode_latency_s)
    assert r.prefill_tokens_per_s == pytest.approx(2 * 16 / r.prefill_latency_s)
    assert r.decode_latency_per_token_s == pytest.approx(r.decode_latency_s / 8)
    assert r.peak_memory_bytes is None and r.checkpoint_bytes is None
    json.dumps(r.to_dict())


def test_measure_speed_restores_training_mode() -> None:
    model = tiny_model("llama", layers=2).train()
    measure_speed(model, prompt_len=4, gen_len=2, warmup=0, repeats=1)
    assert model.training


def test_measure_speed_rejects_empty_workload(dense: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="gen_len"):
        measure_speed(dense, gen_len=0)


def test_timed_loop_matches_generate(dense: torch.nn.Module) -> None:
    """The decode loop being timed must be real cached greedy decoding."""
    input_ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    ours = greedy_decode(dense, input_ids, steps=6)
    with torch.inference_mode():
        ref = dense.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=7,
            min_new_tokens=7,
            pad_token_id=0,
        )
    assert torch.equal(ours, ref[:, 10:])


def test_ideal_speedup() -> None:
    assert ideal_speedup(32, 24) == pytest.approx(32 / 24)
    assert ideal_speedup(4, 4) == 1.0
    for bad in ((4, 0), (4, 5)):
        with pytest.raises(ValueError):
            ideal_speedup(*bad)


def _result(prefill_s: float, tokens_per_s: float, layers: int, params: int, **kw) -> SpeedResult:
    fields = dict(
        num_params=params, num_layers=layers, device="cpu", dtype="float32", batch_size=1,
        prompt_len=128, gen_len=64, warmup=0, repeats=1, prefill_latency_s=prefill_s,
        decode_latency_s=64 / tokens_per_s, prefill_tokens_per_s=128 / prefill_s,
        decode_tokens_per_s=tokens_per_s, prefill_times_s=[prefill_s], decode_times_s=[64 / tokens_per_s],
    )
    return SpeedResult(**{**fields, **kw})


def test_compare_speed_formulas() -> None:
    dense = _result(0.2, 50.0, 32, 1000, checkpoint_bytes=4000)
    pruned = _result(0.16, 60.0, 24, 800, checkpoint_bytes=3300)
    c = compare_speed(dense, pruned, 32, 24)
    assert c.ideal_speedup == pytest.approx(32 / 24)
    assert c.prefill_speedup == pytest.approx(0.2 / 0.16)
    assert c.decode_speedup == pytest.approx(60 / 50)
    assert c.prefill_speedup_vs_ideal == pytest.approx(c.prefill_speedup / c.ideal_speedup)
    assert c.decode_speedup_vs_ideal == pytest.approx((60 / 50) / (32 / 24))
    assert c.param_ratio == pytest.approx(0.8)
    assert c.checkpoint_ratio == pytest.approx(3300 / 4000)
    assert compare_speed(dense, pruned).to_dict() == c.to_dict()


def test_compare_speed_refuses_different_workloads() -> None:
    with pytest.raises(ValueError, match="prompt_len"):
        compare_speed(_result(0.2, 50.0, 32, 1000), _result(0.2, 50.0, 24, 800, prompt_len=64))


def test_dense_vs_pruned_run(dense_speed: SpeedResult) -> None:
    pruned_speed = measure_speed(tiny_model("llama", layers=3), **WORKLOAD)
    assert pruned_speed.num_layers == 3
    assert pruned_speed.num_params < dense_speed.num_params
    c = compare_speed(dense_speed, pruned_speed)
    assert c.ideal_speedup == pytest.approx(4 / 3)
    assert c.prefill_speedup > 0 and c.decode_speedup > 0
    assert c.decode_speedup_vs_ideal == pytest.approx(c.decode_speedup * 3 / 4)
    json.dumps(c.to_dict())


def test_checkpoint_size(tmp_path, dense: torch.nn.Module) -> None:
    dense.save_pretrained(tmp_path / "ckpt")
    weights = list((tmp_path / "ckpt").glob("*.safetensors"))
    assert weights
    assert checkpoint_size(tmp_path / "ckpt") == sum(f.stat().st_size for f in weights)

    odd = tmp_path / "odd"
    (odd / "sub").mkdir(parents=True)
    (odd / "a.safetensors").write_bytes(b"x" * 10)
    (odd / "b.bin").write_bytes(b"x" * 5)
    (odd / "config.json").write_bytes(b"x" * 100)
    (odd / "sub" / "c.safetensors").write_bytes(b"x" * 1000)
    assert checkpoint_size(odd) == 15

    result = measure_speed(dense, prompt_len=4, gen_len=2, warmup=0, repeats=1, checkpoint_dir=odd)
    assert result.checkpoint_bytes == 15
    with pytest.raises(FileNotFoundError):
        checkpoint_size(tmp_path / "missing")


def test_real_model_dense_vs_pruned(smollm2_readonly, smollm2) -> None:
    """SmolLM2 (30 layers) against a copy with 4 layers removed: bookkeeping, not wall-clock ratios."""
    tiny_workload = dict(prompt_len=8, gen_len=4, warmup=0, repeats=1)
    dense_model, tok = smollm2_readonly
    dense_params = sum(p.numel() for p in dense_model.parameters())
    dense = measure_speed(dense_model, tok, **tiny_workload)
    assert (dense.num_layers, dense.num_params) == (30, dense_params)
    assert not dense_model.training

    model, tok = smollm2
    apply_plan(model, Plan("manual", 30, remove=[10, 11, 12, 13]))
    pruned = measure_speed(model, tok, **tiny_workload)
    assert pruned.num_layers == 26
    per_layer = sum(p.numel() for p in dense_model.model.layers[0].parameters())
    assert dense.num_params - pruned.num_params == 4 * per_layer
    assert compare_speed(dense, pruned).ideal_speedup == pytest.approx(30 / 26)
