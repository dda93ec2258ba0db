"""Interface compensation: folding equals an explicit map, fits lower the residual, checkpoints reload exactly,
the virtual (PatchedLayer) stack equals in-place folding, and unfoldable cases are refused."""

from __future__ import annotations

import pytest
import torch

from depthprune import Calibration, Merge, Plan, apply_plan
from depthprune.backend import InMemoryBackend
from depthprune.compensate import (Compensation, CosineSettings, Interface, KLSettings, LayersSettings, fit_compensation,
                                   fold_in_place, interfaces)
from depthprune.errors import InputError
from depthprune.models.arch import get_layers, get_path, spec_for
from depthprune.models.forward import run_decoder
from depthprune.surgery import prune
from tiny import LAYERS, greedy, text_file, tiny_calibration, tiny_inputs, tiny_model

FOLDABLE = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox", "opt"]


def _batches(n: int = 4, seq: int = 16, seed: int = 3):
    return list(tiny_calibration(n, seq, seed=seed, padded={-1: -5}).batches(2))


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
    fitted = fit_compensation(model, plan, batches, Compensation(ridge=0.0))
    prune(InMemoryBackend(model), plan, fitted.overrides)
    records = fitted.records
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
    record = fit_compensation(model, plan, batches, Compensation(fit="cosine", cosine=CosineSettings(steps=50, lr=1e-2))).records[0]
    assert record["refine_tokens"] == 8 * 16 - 5 and "residual_linear" in record
    big_ridge = fit_compensation(model, plan, batches, Compensation(ridge=1e6)).records[0]
    assert big_ridge["residual_after"] == pytest.approx(big_ridge["residual_before"], rel=1e-3)


def test_virtual_stack_equals_in_place_folding():
    """What `auto` ranks (PatchedLayer candidates) is exactly what surgery then saves."""
    batches = _batches(6)
    plan = Plan("x", LAYERS, remove=[1, 4], merges=[Merge(2, 3, "average")])
    original = tiny_model("qwen2", seed=4)
    fitted = fit_compensation(original, plan, batches, Compensation())
    from depthprune.models.mutate import temporary_layer_stack

    with torch.no_grad(), temporary_layer_stack(original, fitted.stack, {}):
        got = [run_decoder(original, ids, mask) for ids, mask in batches]
    real = tiny_model("qwen2", seed=4)
    prune(InMemoryBackend(real), plan, fitted.overrides)
    with torch.no_grad():
        want = [run_decoder(real, ids, mask) for ids, mask in batches]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="unknown compensation"):
        Compensation(fit="magic").validate()
    with pytest.raises(InputError, match="--ridge"):
        Compensation(ridge=-1).validate()


def test_nearest_orthogonal_times_diagonal():
    from depthprune.compensate.fold import _nearest_qd

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
    config = Compensation(fit="kl", kl=KLSettings(steps=25, lr=1e-2, batch=2))
    fitted = fit_compensation(original, plan, batches, config)
    e2e = fitted.records[-1]["end_to_end"]
    assert e2e["kl_after"] < e2e["kl_before"], e2e
    real = tiny_model(family, seed=6)
    prune(InMemoryBackend(real), plan, fitted.overrides)
    virtual = fitted.stack
    from depthprune.models.arch import per_layer_config_values
    from depthprune.models.mutate import temporary_layer_stack

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
    run = json.loads((out / "depthprune_run.json").read_text())
    assert "compensation" not in plan["params"], "the plan is the decision; the fits are the run's record"
    fits = [r for r in run["stages"][0]["compensation"] if "residual_after" in r]
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
    fits = json.loads((gemma / "depthprune_run.json").read_text())["stages"][0]["compensation"]
    assert {r["fold"] for r in fits if "fold" in r} == {"qd"}
    assert AutoModelForCausalLM.from_pretrained(gemma).config.num_hidden_layers == LAYERS - 2


def test_cli_compensate_steps_sets_the_layers_fit(tmp_path, run_cli):
    import json

    from tiny import save_tiny_checkpoint

    src = save_tiny_checkpoint(tmp_path / "model", "llama", layers=10, seed=5)
    text = text_file(tmp_path / "text.txt", 40_000)
    out = tmp_path / "out"
    run_cli("prune", "--model", src, "--method", "angular", "--remove-layers", "2", "--compensate", "layers",
            "--compensate-steps", "3", "--compensate-above", "2", "--compensate-tokens", "600", "--calib", text,
            "--seq-len", "32", "--calib-samples", "4", "--out", out, "-q")
    plan = json.loads((out / "depthprune_plan.json").read_text())
    assert plan["compensation"]["layers_steps"] == 3 and plan["compensation"]["layers_after"] == 2
    stage = json.loads((out / "depthprune_run.json").read_text())["stages"][0]
    trained = next(r["layers"] for r in stage["compensation"] if "layers" in r)
    assert trained["steps"] == 3 and trained["tokens_trained"] > 0
    gap = min(plan["remove"]) - 1  # the kept layer before the only gap, as a pruned-model position
    assert plan["num_layers_after"] >= gap + 3 and trained["trained_positions"] == [gap, gap + 1, gap + 2]


def test_cli_layers_fit_sizes_its_steps_records_why_and_says_when_the_text_caps_them(tmp_path, run_cli, monkeypatch,
                                                                                      caplog):
    """Without --compensate-steps the job sizes the steps from the weights trained; the plan records the steps
    trained and the run record how they were chosen; a text too short for the budget trains what it holds, said
    in one line."""
    import json

    from depthprune.compensate import layers as layers_fit
    from transformers import AutoModelForCausalLM
    from tiny import save_tiny_checkpoint

    monkeypatch.setattr(layers_fit, "LAYERS_WEIGHTS_PER_TOKEN", 1)  # a tiny model's budget as a large one's
    src = save_tiny_checkpoint(tmp_path / "model", "llama", layers=10, seed=5)
    text = text_file(tmp_path / "text.txt", 20_000)
    out = tmp_path / "out"
    run_cli("prune", "--model", src, "--method", "angular", "--remove-layers", "2", "--compensate", "layers",
            "--calib", text, "--seq-len", "32", "--calib-samples", "4", "--out", out, "-q")
    plan = json.loads((out / "depthprune_plan.json").read_text())
    stage = json.loads((out / "depthprune_run.json").read_text())["stages"][0]
    sizing = stage["compensation_sizing"]
    trained = next(r["layers"] for r in stage["compensation"] if "layers" in r)
    layers = AutoModelForCausalLM.from_pretrained(src).model.layers
    kept = [i for i in range(10) if i not in plan["remove"]]
    assert sizing["trained_weights"] == sum(p.numel() for position in trained["trained_positions"]
                                            for p in layers[kept[position]].parameters())
    assert sizing["steps_wanted"] == -(-sizing["trained_weights"] // (4 * 32)) > sizing["steps"] > 100
    assert sizing["steps"] == (sizing["text_windows"] - 16) // 4 == plan["compensation"]["layers_steps"]
    assert "a longer --calib trains more" in caplog.text
    assert trained["steps"] == sizing["steps"] and trained["train_windows"] >= 4 * sizing["steps"]


def _summary(plan_dict):
    return Plan.from_dict(plan_dict).summary()


def test_apply_plan_refits_a_compensated_plan_to_the_saved_tensors_or_refuses(tmp_path, run_cli):
    """``apply_plan(model, Plan.load(checkpoint))`` on a compensated plan: with the job's calibration settings and
    tokenizer it re-fits the maps and reproduces the saved tensors exactly; without them it refuses (never a
    silently uncompensated model)."""
    import json

    from depthprune import load_model
    from depthprune.data.calibration import CalibrationSpec
    from depthprune.errors import InputError
    from test_streaming import tensors_of
    from tiny import save_tiny_checkpoint

    src = save_tiny_checkpoint(tmp_path / "model", "qwen2", seed=7)
    out = tmp_path / "out"
    run_cli("prune", "--model", src, "--method", "angular", "--remove-layers", "2", "--compensate", "linear",
            "--compensate-tokens", "300", "--calib", str(text_file(tmp_path / "text.txt", 40_000)), "--seq-len", "32",
            "--calib-samples", "4", "--batch-size", "3", "--out", out, "-q")
    plan = Plan.load(out)
    report = json.loads((out / "report.json").read_text())
    loaded = load_model(str(src), progress=False)
    with pytest.raises(InputError, match="re-fitting needs the calibration text"):
        apply_plan(loaded.model, plan)
    assert loaded.model.config.num_hidden_layers == LAYERS  # refused before any change
    depth = json.loads((out / "depthprune_run.json").read_text())["stages"][0]
    assert depth["calibration_spec"] == report["settings"]["calibration"]
    apply_plan(loaded.model, plan, calibration=CalibrationSpec(**depth["calibration_spec"]),
               tokenizer=loaded.tokenizer, batch_size=depth["batch_size"])
    saved = tensors_of(out)
    state = loaded.model.state_dict()
    assert all(torch.equal(state[name], saved[name]) for name in saved)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_layers_fit_lowers_heldout_kl_below_the_linear_fit(family):
    """Retraining the kept layer at the gap on the dense model's distributions beats the linear map on windows
    it was not trained on, and the folded result is exactly the candidate stack that was scored."""
    from depthprune.engine.loss import LossEngine

    batches = _batches(24, seq=24)
    heldout = Calibration(*[torch.cat(t) for t in zip(*_batches(6, seq=24, seed=11))])
    plan = Plan("x", LAYERS, remove=[2, 3])
    original = tiny_model(family, seed=6)
    linear = fit_compensation(original, plan, batches, Compensation())
    layers = fit_compensation(original, plan, batches,
                              Compensation(fit="layers", layers=LayersSettings(steps=30, lr=1e-3, holdout=4,
                                                                             patience=0)))  # the training itself, no early stop
    record = layers.records[-1]["layers"]
    assert record["trained_positions"] == [1, 2] and record["kl_after"] < record["kl_before"]
    assert record["kl_measured_on"] == min(16, record["train_windows"])
    assert set(layers.overrides[1]) == set(dict(get_layers(original)[1].named_parameters()))
    with LossEngine(original, heldout, objective="kl") as engine:
        assert engine.loss(layers.stack) < engine.loss(linear.stack)
    real = tiny_model(family, seed=6)
    prune(InMemoryBackend(real), plan, layers.overrides)
    from depthprune.models.mutate import temporary_layer_stack

    lists = {k: [v[i] for i in plan.kept] for k, v in InMemoryBackend(original).per_layer_config().items()}
    with torch.no_grad():
        with temporary_layer_stack(original, layers.stack, lists):
            got = [run_decoder(original, ids, mask) for ids, mask in batches]
        want = [run_decoder(real, ids, mask) for ids, mask in batches]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_layers_fit_keeps_its_best_weights_and_says_when_the_heldout_kl_rose():
    """A fit that only gets worse (a learning rate far too high) keeps the linear start it began from: it stops
    after ``layers_patience`` looks, its held-out KL is the start's, and the weights are the start's. With
    the watch off (patience 0) the same fit keeps its last weights and its record carries the one-line warning."""
    batches = _batches(24, seq=24)
    plan = Plan("x", LAYERS, remove=[2, 3])
    original = tiny_model("llama", seed=6)
    bad = dict(fit="layers", layers_steps=40, layers_lr=0.5, layers_holdout=4, layers_check_every=2,
               layers_patience=2)
    watched = fit_compensation(original, plan, batches, Compensation.of(**bad))
    record = watched.records[-1]["layers"]
    assert record["kept_step"] == 0 and record["stopped_early"] and record["steps_run"] == 4
    assert record["holdout_kl_after"] == pytest.approx(record["holdout_kl_before"], rel=1e-6)
    assert "warning" not in record
    start = fit_compensation(original, plan, batches, Compensation.of(**{**bad, "layers_steps": 0}))
    for position, changes in watched.overrides.items():
        for name, value in changes.items():
            torch.testing.assert_close(value, start.overrides[position][name], rtol=0, atol=0)
    unwatched = fit_compensation(original, plan, batches, Compensation.of(**{**bad, "layers_patience": 0}))
    record = unwatched.records[-1]["layers"]
    assert record["steps_run"] == 40 and record["holdout_kl_after"] > record["holdout_kl_before"]
    assert "held-out KL rose" in record["warning"]


def test_layers_fit_trains_the_requested_layers_above_every_gap():
    """``layers_after`` counts the kept layers above each gap that train beside the one before it; a plan
    recorded when it was a flag (True) trains the one after, as it did."""
    from depthprune.compensate.layers import trained_positions

    gaps = [Interface(position=1, layer=1, target=3), Interface(position=4, layer=6, target=7)]
    assert trained_positions(gaps, 8, 0) == [1, 4]
    assert trained_positions(gaps, 8, True) == trained_positions(gaps, 8, 1) == [1, 2, 4, 5]
    assert trained_positions(gaps, 8, 3) == [1, 2, 3, 4, 5, 6, 7]
    assert trained_positions(gaps, 6, 99) == [1, 2, 3, 4, 5]


def test_layers_fit_draws_one_pass_of_its_steps_and_old_plans_refit_as_recorded():
    """The layers fit draws enough windows that no training window is seen twice (steps x batch, plus the
    held-out windows), at least max(tokens, layers_tokens); a plan recorded before layers_tokens existed re-fits
    on its recorded tokens, and one recorded before the fit kept its best weights re-fits with repeated windows
    and no early stop, as it was fitted."""
    assert Compensation(fit="linear").fit_tokens(128) == 8192
    assert Compensation(fit="layers").fit_tokens(128) == (100 * 4 + 16) * 128
    assert Compensation(fit="layers", layers=LayersSettings(steps=10)).fit_tokens(128) == 16384
    assert Compensation(fit="layers", tokens=10**6).fit_tokens(128) == 10**6
    old = {k: v for k, v in Compensation(fit="layers").to_dict().items()
           if k not in ("layers_tokens", "layers_one_pass", "layers_patience", "layers_check_every")}
    assert Compensation.recorded(old).fit_tokens(128) == 8192
    assert Compensation.recorded(old).layers.patience == 0 and not Compensation.recorded(old).layers.one_pass
    assert Compensation.recorded(Compensation(fit="layers").to_dict()) == Compensation(fit="layers")
    with pytest.raises(InputError, match="positive"):
        Compensation.recorded({**old, "layers_tokens": 0})
