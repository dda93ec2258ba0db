"""Interface compensation: folding equals an explicit map, fits lower the residual, checkpoints reload exactly,
the virtual (PatchedLayer) stack equals in-place folding, and unfoldable cases are refused."""

from __future__ import annotations

import pytest
import torch

from depthprune import Merge, Plan, apply_plan
from depthprune.compensate import (
    Compensation,
    Interface,
    capture_targets,
    compensate,
    compensated_stack,
    fold_in_place,
    interfaces,
)
from depthprune.errors import InputError
from depthprune.models.arch import get_layers, get_path, spec_for
from depthprune.models.forward import run_decoder
from tiny import LAYERS, greedy, text_file, tiny_calibration, tiny_inputs, tiny_model

FOLDABLE = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox", "opt"]


def _batches(n: int = 4):
    return list(tiny_calibration(n, 16, seed=3, padded={-1: -5}).batches(2))


@pytest.mark.parametrize("family", FOLDABLE)
def test_folded_map_equals_an_explicit_map_on_the_mlp_output(family):
    spec = spec_for(tiny_model(family))
    folded, explicit = tiny_model(family, seed=1), tiny_model(family, seed=1)
    t = torch.eye(64) + 0.1 * torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    fold_in_place(get_layers(folded)[2], t.double(), spec)
    down = get_path(get_layers(explicit)[2], spec.down_proj)
    down.register_forward_hook(lambda m, a, out: out @ t)
    ids = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, explicit(ids).logits, rtol=1e-4, atol=1e-4)


def test_interfaces_of_removals_and_merges():
    plan = Plan("x", 10, remove=[0, 4, 5, 9], merges=[Merge(6, 7, "average")])
    found, notes = interfaces(plan)
    assert plan.kept == [1, 2, 3, 6, 8]
    assert found == [Interface(2, 3, 5), Interface(3, 6, 7), Interface(4, 8, 9)]
    assert len(notes) == 1 and "layers 0..0" in notes[0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox"])
def test_fit_lowers_the_residual_and_the_loss_to_the_original(family):
    model = tiny_model(family, seed=2)
    batches = _batches(8)
    plan = Plan("x", LAYERS, remove=[2, 3])
    found, _ = interfaces(plan)
    targets = capture_targets(model, batches, {i.target for i in found})
    apply_plan(model, plan)
    records = compensate(model, plan, batches, targets, Compensation(ridge=0.0))
    assert len(records) == 1 and records[0]["layer"] == 1 and records[0]["target"] == 3
    assert records[0]["residual_after"] < records[0]["residual_before"]
    assert records[0]["tokens"] == 8 * 16 - 5
    with torch.no_grad():
        after = [run_decoder(model, ids, mask) for ids, mask in batches]
        plain = tiny_model(family, seed=2)
        apply_plan(plain, plan)
        before = [run_decoder(plain, ids, mask) for ids, mask in batches]
        dense = [run_decoder(tiny_model(family, seed=2), ids, mask) for ids, mask in batches]
    gap = lambda outs: sum(float((o - d).pow(2).sum()) for o, d in zip(outs, dense))  # noqa: E731
    assert gap(after) < gap(before)


def test_cosine_refinement_and_ridge():
    model = tiny_model("llama", seed=3)
    batches = _batches(8)
    plan = Plan("x", LAYERS, remove=[3, 4])
    targets = capture_targets(model, batches, {4})
    apply_plan(model, plan)
    record = compensate(model, plan, batches, targets, Compensation(fit="cosine", steps=50, lr=1e-2))[0]
    assert record["refine_tokens"] == 8 * 16 - 5 and "residual_linear" in record
    strong = tiny_model("llama", seed=3)
    apply_plan(strong, plan)
    big_ridge = compensate(strong, plan, batches, targets, Compensation(ridge=1e6))[0]
    assert big_ridge["residual_after"] == pytest.approx(big_ridge["residual_before"], rel=1e-3)


def test_virtual_stack_equals_in_place_folding():
    """What `auto` ranks (PatchedLayer candidates) is exactly what surgery then saves."""
    batches = _batches(6)
    plan = Plan("x", LAYERS, remove=[1, 4], merges=[Merge(2, 3, "average")])
    found, _ = interfaces(plan)
    original = tiny_model("qwen2", seed=4)
    targets = capture_targets(original, batches, {i.target for i in found})
    from depthprune.engine.merged import MergedLayer

    layers = list(get_layers(original))
    stack = [layers[0], MergedLayer([layers[2], layers[3]], "average", spec_for(original)), layers[5]]
    virtual = compensated_stack(original, plan, stack, batches, targets, Compensation())
    from depthprune.models.arch import temporary_layer_stack

    with torch.no_grad(), temporary_layer_stack(original, virtual, {}):
        got = [run_decoder(original, ids, mask) for ids, mask in batches]
    real = tiny_model("qwen2", seed=4)
    apply_plan(real, plan)
    compensate(real, plan, batches, targets, Compensation())
    with torch.no_grad():
        want = [run_decoder(real, ids, mask) for ids, mask in batches]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="unknown compensation"):
        Compensation(fit="magic").validate()
    with pytest.raises(InputError, match="--ridge"):
        Compensation(ridge=-1).validate()


def test_nearest_orthogonal_times_diagonal():
    from depthprune.compensate import _nearest_qd

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    d = torch.rand(32, generator=g, dtype=torch.float64) + 0.5
    found_q, found_d = _nearest_qd(q * d.unsqueeze(0))
    torch.testing.assert_close(found_q * found_d.unsqueeze(0), q * d.unsqueeze(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(found_q.T @ found_q, torch.eye(32, dtype=torch.float64), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_folds_a_rotation_and_scale_exactly(family):
    """Past Gemma's post-MLP norm only diag(g) T = Q D folds; for such a T the fold equals the explicit map."""
    spec = spec_for(tiny_model(family))
    folded_model, explicit = tiny_model(family, seed=1), tiny_model(family, seed=1)
    norm = get_path(get_layers(folded_model)[2], spec.post_mlp_norm)
    weights = torch.empty(64).uniform_(-0.5, 0.5)
    with torch.no_grad():
        for model in (folded_model, explicit):
            get_path(get_layers(model)[2], spec.post_mlp_norm).weight.copy_(weights)
    gain = norm.weight.detach().double() + spec.norm_gain_offset
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    d = torch.rand(64, generator=g, dtype=torch.float64) + 0.5
    t = (q * d.unsqueeze(0)) / gain.unsqueeze(1)
    record = fold_in_place(get_layers(folded_model)[2], t, spec)
    assert record["fold"] == "qd" and record["fold_error"] < 1e-6
    out = get_path(get_layers(explicit)[2], spec.post_mlp_norm)
    out.register_forward_hook(lambda m, a, o: (o.double() @ t).to(o.dtype))
    ids = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(folded_model(ids).logits, explicit(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_end_to_end_kl_lowers_the_kl_and_the_virtual_stack_agrees(family):
    batches = _batches(8)
    plan = Plan("x", LAYERS, remove=[2, 3])
    original = tiny_model(family, seed=6)
    found, _ = interfaces(plan)
    targets = capture_targets(original, batches, {i.target for i in found})
    config = Compensation(fit="kl", kl_steps=25, kl_lr=1e-2, kl_batch=2)
    real = tiny_model(family, seed=6)
    apply_plan(real, plan)
    records = compensate(real, plan, batches, targets, config)
    e2e = records[-1]["end_to_end"]
    assert e2e["kl_after"] < e2e["kl_before"], e2e
    layers = list(get_layers(original))
    virtual = compensated_stack(original, plan, [layers[i] for i in plan.kept], batches, targets, config)
    from depthprune.models.arch import per_layer_config_values, temporary_layer_stack

    lists = {k: [v[i] for i in plan.kept] for k, v in per_layer_config_values(original.config, spec_for(original)).items()}
    with torch.no_grad():
        with temporary_layer_stack(original, virtual, lists):
            got = [run_decoder(original, ids, mask) for ids, mask in batches]
        want = [run_decoder(real, ids, mask) for ids, mask in batches]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compensated_checkpoint_reloads_exactly_and_generates(tmp_path, run_cli):
    import json

    from transformers import AutoModelForCausalLM

    from tiny import save_tiny_checkpoint

    src = save_tiny_checkpoint(tmp_path / "model", "llama", seed=5)
    text = text_file(tmp_path / "text.txt", 40_000)  # enough windows for the byte-level tokenizer
    out = tmp_path / "out"
    run_cli("prune", "--model", src, "--method", "shortgpt", "--remove-layers", "2", "--compensate", "linear",
            "--compensate-tokens", "600", "--calib", text, "--seq-len", "32",
            "--calib-samples", "4", "--out", out, "-q")
    plan = json.loads((out / "depthprune_plan.json").read_text())
    assert plan["compensation"]["fit"] == "linear" and plan["compensation"]["tokens"] == 600
    fits = [r for r in plan["params"]["compensation"] if "residual_after" in r]
    assert fits and all(r["residual_after"] <= r["residual_before"] for r in fits)
    assert "compensate (linear)" in _summary(plan)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == LAYERS - 2
    ids = tiny_inputs(seq=10)
    assert torch.equal(greedy(reloaded, ids, True, 5), greedy(reloaded, ids, False, 5))
    gemma = tmp_path / "g"
    run_cli("prune", "--model", save_tiny_checkpoint(tmp_path / "gemma", "gemma3"), "--remove-layers", "2",
            "--compensate", "linear", "--compensate-tokens", "600", "--calib", text,
            "--seq-len", "32", "--calib-samples", "4", "--out", gemma, "-q")
    fits = json.loads((gemma / "depthprune_plan.json").read_text())["params"]["compensation"]
    assert {r["fold"] for r in fits if "fold" in r} == {"qd"}
    assert AutoModelForCausalLM.from_pretrained(gemma).config.num_hidden_layers == LAYERS - 2


def _summary(plan_dict):
    return Plan.from_dict(plan_dict).summary()
