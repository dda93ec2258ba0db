"""Width pruning: shapes and config agree, reload and generation are exact, scores equal direct computations."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

import depthprune as dp
from depthprune.analysis.importance import WidthError, score_units
from depthprune.data.calibration import Calibration
from depthprune.models.arch import get_layers
from depthprune.surgery.width import WIDTH_PLAN_FILE, WidthPlan, apply_width_plan, width_plan
from tiny import LAYERS, bpe_tokenizer, greedy, tiny_calibration, tiny_inputs, tiny_model

HEAD_DIM = 16  # tiny configs: hidden 64 / 4 heads


def _calibration(padded: bool = False) -> Calibration:
    return tiny_calibration(5, 16, seed=7, padded={1: 11, 3: 6} if padded else None, pad_id=0)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_shapes_and_config_agree_after_pruning():
    model = tiny_model("llama")
    plan = width_plan(model, None, ratio_mlp=0.25, ratio_heads=0.5, scorer="magnitude", progress=False)
    apply_width_plan(model, plan)
    c = model.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (96, 2, 1, HEAD_DIM)
    assert plan.sizes_after == {"intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1,
                                "head_dim": HEAD_DIM}
    for layer in get_layers(model):
        a, m = layer.self_attn, layer.mlp
        assert a.q_proj.weight.shape == (2 * HEAD_DIM, 64) and a.q_proj.out_features == 2 * HEAD_DIM
        assert a.k_proj.weight.shape == a.v_proj.weight.shape == (HEAD_DIM, 64)
        assert a.o_proj.weight.shape == (64, 2 * HEAD_DIM) and a.o_proj.in_features == 2 * HEAD_DIM
        assert a.num_key_value_groups == 2 and a.head_dim == HEAD_DIM
        assert m.gate_proj.weight.shape == m.up_proj.weight.shape == (96, 64)
        assert m.down_proj.weight.shape == (64, 96) and m.intermediate_size == 96
    assert _logits(model, tiny_inputs()).shape == (2, 12, 128)


@pytest.mark.parametrize("family, ratio_heads", [("llama", 0.5), ("qwen2", 0.5), ("qwen3", 0.5), ("gemma3", 0.5),
                                                 ("gpt2", 0.0), ("opt", 0.0), ("gpt_neox", 0.0)])
def test_save_reload_and_cached_generation(family, ratio_heads, tmp_path):
    model = tiny_model(family)
    plan = width_plan(model, _calibration(), ratio_mlp=0.3, ratio_heads=ratio_heads, scorer="wanda",
                      progress=False)
    apply_width_plan(model, plan)
    ids = tiny_inputs()
    cached, uncached = greedy(model, ids, True), greedy(model, ids, False)
    assert torch.equal(cached, uncached)

    dp.save(model, None, tmp_path / "out", extra_json={WIDTH_PLAN_FILE: plan.to_dict()})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))
    assert torch.equal(greedy(reloaded, ids, True), cached)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    if ratio_heads:
        assert saved["head_dim"] == HEAD_DIM and saved["num_key_value_heads"] == 1
    assert WidthPlan.load(tmp_path / "out").sizes_after == plan.sizes_after


def test_pruning_nothing_is_the_identity():
    model, reference = tiny_model("llama"), tiny_model("llama")
    ids = tiny_inputs()
    plan = width_plan(model, None, ratio_mlp=0.0, ratio_heads=0.0, progress=False)
    assert plan.keep_mlp is None and plan.keep_groups is None
    apply_width_plan(model, plan)
    assert torch.equal(_logits(model, ids), _logits(reference, ids))

    keep_all = WidthPlan("magnitude", 0.0, 0.0, LAYERS, dict(plan.sizes_before),
                         keep_mlp=[list(range(128))] * LAYERS, keep_groups=[[0, 1]] * LAYERS)
    apply_width_plan(model, keep_all)
    assert torch.equal(_logits(model, ids), _logits(reference, ids))


def test_pruning_equals_masking_and_gqa_groups_take_their_query_heads():
    """Removing kv group 0 of a 4-query/2-kv model removes query heads 0 and 1 (and nothing else):
    the pruned model computes what the full one computes with those heads' o_proj columns zeroed."""
    model, masked = tiny_model("llama"), tiny_model("llama")
    before = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in get_layers(model)]
    channels = [c for c in range(128) if c % 4 != 1]
    plan = WidthPlan("manual", 0.25, 0.5, LAYERS, {"intermediate_size": 128, "num_attention_heads": 4,
                                                   "num_key_value_heads": 2, "head_dim": HEAD_DIM},
                     keep_mlp=[channels] * LAYERS, keep_groups=[[1]] * LAYERS)
    apply_width_plan(model, plan)
    heads_1 = slice(2 * HEAD_DIM, 4 * HEAD_DIM)  # query heads 2 and 3 share kv head 1
    for layer, old in zip(get_layers(model), before):
        a = layer.self_attn
        assert torch.equal(a.q_proj.weight, old["self_attn.q_proj.weight"][heads_1])
        assert torch.equal(a.k_proj.weight, old["self_attn.k_proj.weight"][HEAD_DIM:])
        assert torch.equal(a.v_proj.weight, old["self_attn.v_proj.weight"][HEAD_DIM:])
        assert torch.equal(a.o_proj.weight, old["self_attn.o_proj.weight"][:, heads_1])
        assert torch.equal(layer.mlp.down_proj.weight, old["mlp.down_proj.weight"][:, channels])
    with torch.no_grad():
        for layer in get_layers(masked):
            layer.self_attn.o_proj.weight[:, : 2 * HEAD_DIM] = 0
            layer.mlp.down_proj.weight[:, [c for c in range(128) if c not in channels]] = 0
    ids = tiny_inputs()
    torch.testing.assert_close(_logits(model, ids), _logits(masked, ids), rtol=1e-5, atol=1e-5)


def _per_unit(layer, fn_w) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct per-channel and per-group sums of an elementwise quantity, written out for Llama."""
    a, m = layer.self_attn, layer.mlp
    e = {name: fn_w(name, mod) for name, mod in
         [("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj), ("o", a.o_proj),
          ("gate", m.gate_proj), ("up", m.up_proj), ("down", m.down_proj)]}
    channels = e["gate"].sum(1) + e["up"].sum(1) + e["down"].sum(0)
    groups = torch.stack([
        e["q"][g * 2 * HEAD_DIM:(g + 1) * 2 * HEAD_DIM].sum() + e["k"][g * HEAD_DIM:(g + 1) * HEAD_DIM].sum()
        + e["v"][g * HEAD_DIM:(g + 1) * HEAD_DIM].sum() + e["o"][:, g * 2 * HEAD_DIM:(g + 1) * 2 * HEAD_DIM].sum()
        for g in range(2)
    ])
    return channels, groups


def test_magnitude_scores_are_weight_norms():
    model = tiny_model("llama")
    scores = score_units(model, "magnitude")
    for i, layer in enumerate(get_layers(model)):
        channels, groups = _per_unit(layer, lambda n, mod: mod.weight.detach() ** 2)
        torch.testing.assert_close(scores.mlp[i], channels.sqrt())
        torch.testing.assert_close(scores.heads[i], groups.sqrt())


def test_taylor_scores_equal_direct_autograd():
    model = tiny_model("llama")
    cal = _calibration(padded=True)
    scores = score_units(model, "taylor", cal, batch_size=2, progress=False)
    assert all(p.grad is None for p in model.parameters())

    reference = tiny_model("llama")
    labels = cal.input_ids.masked_fill(cal.attention_mask == 0, -100)
    loss = reference(input_ids=cal.input_ids, attention_mask=cal.attention_mask, labels=labels).loss
    loss.backward()
    for i, layer in enumerate(get_layers(reference)):
        channels, groups = _per_unit(layer, lambda n, mod: (mod.weight * mod.weight.grad).abs().detach())
        torch.testing.assert_close(scores.mlp[i], channels, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(scores.heads[i], groups, rtol=1e-4, atol=1e-9)


@dataclass
class _Captured:
    inputs: dict

    def hook(self, name):
        def fn(module, args):
            self.inputs.setdefault(name, []).append(args[0].detach())
        return fn


def test_wanda_scores_equal_direct_computation():
    model = tiny_model("llama")
    cal = _calibration(padded=True)
    scores = score_units(model, "wanda", cal, batch_size=2, progress=False)

    layers = list(get_layers(model))
    cap = _Captured({})
    handles = []
    for i, layer in enumerate(layers):
        handles += [layer.self_attn.q_proj.register_forward_pre_hook(cap.hook((i, "attn_in"))),
                    layer.self_attn.o_proj.register_forward_pre_hook(cap.hook((i, "o_in"))),
                    layer.mlp.gate_proj.register_forward_pre_hook(cap.hook((i, "mlp_in")))]
    with torch.no_grad():
        model(input_ids=cal.input_ids, attention_mask=cal.attention_mask)  # one batch: all windows at once
    for h in handles:
        h.remove()
    keep = cal.attention_mask.bool()
    for i, layer in enumerate(layers):
        m = layer.mlp
        x_attn, x_o, x_mlp = (cap.inputs[(i, k)][0][keep] for k in ("attn_in", "o_in", "mlp_in"))
        x_down = m.act_fn(m.gate_proj(x_mlp)) * m.up_proj(x_mlp)
        norm = {"q": x_attn, "k": x_attn, "v": x_attn, "o": x_o, "gate": x_mlp, "up": x_mlp, "down": x_down}
        norm = {k: torch.linalg.vector_norm(v, dim=0) for k, v in norm.items()}
        channels, groups = _per_unit(layer, lambda n, mod: (mod.weight.abs() * norm[n][None, :]).detach())
        torch.testing.assert_close(scores.mlp[i], channels, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(scores.heads[i], groups, rtol=1e-4, atol=1e-6)


def test_plan_is_json_and_applies_to_another_copy():
    model = tiny_model("llama")
    plan = width_plan(model, _calibration(), ratio_mlp=0.2, ratio_heads=0.5, scorer="taylor", progress=False)
    again = WidthPlan.from_dict(json.loads(plan.to_json()))
    assert again.keep_mlp == plan.keep_mlp and again.keep_groups == plan.keep_groups
    assert len(plan.keep_mlp[0]) == 128 - int(0.2 * 128)
    assert "MLP 128 -> 103" in plan.summary()
    copy = tiny_model("llama")
    apply_width_plan(model, plan)
    apply_width_plan(copy, again)
    ids = tiny_inputs()
    assert torch.equal(_logits(model, ids), _logits(copy, ids))
    with pytest.raises(WidthError, match="made for intermediate_size=128"):
        apply_width_plan(model, plan)


def test_bad_input_is_refused_with_a_clear_message():
    model = tiny_model("llama")
    with pytest.raises(WidthError, match=r"\[0, 1\)"):
        width_plan(model, None, ratio_mlp=1.0)
    with pytest.raises(WidthError, match="unknown width scorer"):
        width_plan(model, None, scorer="random")
    with pytest.raises(WidthError, match="needs calibration"):
        width_plan(model, None, scorer="wanda")
    with pytest.raises(WidthError, match="head pruning is not implemented for gpt2.*llama"):
        width_plan(tiny_model("gpt2"), None, ratio_mlp=0.0, ratio_heads=0.5)
    with pytest.raises(WidthError, match="phi3.*Supported families"):
        width_plan(tiny_model("phi3"), None, ratio_mlp=0.2)
    with pytest.raises(WidthError, match="same width in every layer"):
        WidthPlan("manual", 0.1, 0.0, 2, {"intermediate_size": 8}, keep_mlp=[[0, 1], [0]])




def test_width_command(tmp_path, run_cli):
    tok = bpe_tokenizer()
    src = tmp_path / "src"
    dp.save(tiny_model("llama", layers=3, vocab_size=len(tok)), tok, src,
            dp.Plan(method="manual", num_layers=4, remove=[2]))
    out = tmp_path / "narrow"
    code, stdout, _ = run_cli("width", "--model", str(src), "--ratio-mlp", "0.25", "--ratio-heads", "0.5",
                              "--scorer", "wanda", "--calib-samples", "3", "--seq-len", "32", "--out", str(out),
                              "-q")
    assert "MLP 128 -> 96" in stdout and "saved to" in stdout
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.intermediate_size == 96 and reloaded.config.num_key_value_heads == 1
    report = json.loads((out / "report.json").read_text())
    assert report["parameters"]["after"] < report["parameters"]["before"]
    assert report["stages"][0]["sizes_after"]["intermediate_size"] == 96
    assert json.loads((out / "depthprune_run.json").read_text())["stages"][0]["stage"] == "width"
    assert WidthPlan.load(out).calibration["num_windows"] == 3

    for args, message in [
        (["--scorer", "nope"], "unknown width scorer"),
        (["--ratio-mlp", "1.5"], "must be in [0, 1)"),
        (["--ratio-mlp", "0"], "nothing to prune"),
        ([], "--out is required"),
    ]:
        code, _, err = run_cli("width", "--model", str(src), *args, check=False)
        assert code == 2 and message in err
