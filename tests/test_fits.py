"""Compensation fits are a registry, like methods: what code asks of a fit comes from its registration."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import depthprune
from depthprune import Plan
from depthprune.compensate import (FITS, SHARED_SETTINGS, Compensation, CosineSettings, Fit, KLSettings, LayersSettings,
                                   fit_compensation, trained_fits)
from depthprune.compensate.registry import register_fit
from depthprune.errors import InputError, PlanError
from depthprune.io import write_json
from tiny import LAYERS, tiny_calibration, tiny_model


def test_the_fits_register_in_order_each_with_its_own_settings():
    assert list(FITS) == ["linear", "cosine", "kl", "layers"]
    assert trained_fits() == ("kl", "layers")
    assert [fit.options for fit in FITS.values()] == [None, CosineSettings, KLSettings, LayersSettings]
    for fit in FITS.values():
        if fit.options is not None:
            assert type(getattr(Compensation(), fit.name)) is fit.options, "recorded under the fit's name"
    recorded = list(Compensation().to_dict())
    read = [*SHARED_SETTINGS, *(name for fit in FITS.values() for name in fit.settings)]
    assert sorted(read) == sorted(recorded[1:]), "every recorded setting is read by exactly one fit, or all"


def test_a_fits_settings_check_their_own_fields():
    for bad, message in [({"steps": -1}, "steps must be 0 or more"), ({"refine_tokens": 0}, "counts must be")]:
        with pytest.raises(InputError, match=message):
            CosineSettings(**bad).validate()
    with pytest.raises(InputError, match="--kl-lr must be a finite number"):
        KLSettings(lr=float("nan")).validate()
    with pytest.raises(InputError, match="--compensate layers: steps"):
        LayersSettings(after=-1).validate()
    with pytest.raises(InputError, match="--layers-lr must be a finite number"):
        Compensation(fit="layers", layers=LayersSettings(lr=float("inf"))).validate()
    with pytest.raises(TypeError, match="no setting 'kl_step'"):
        Compensation.of(fit="kl", kl_step=3)


def test_flat_settings_are_each_fits_own():
    config = Compensation.of(fit="kl", tokens=512, steps=9, kl_steps=7, layers_after=2)
    assert (config.tokens, config.cosine.steps, config.kl.steps, config.layers.after) == (512, 9, 7, 2)
    assert config == Compensation(fit="kl", tokens=512, cosine=CosineSettings(steps=9), kl=KLSettings(steps=7),
                                  layers=LayersSettings(after=2))
    assert Compensation.from_dict(config.to_dict()) == config
    assert list(config.to_dict())[:4] == ["fit", "tokens", "ridge", "steps"] and list(config.to_dict())[-1] == "seed"


def test_a_plan_written_by_the_flat_settings_loads_typed_and_saves_byte_for_byte(tmp_path):
    """tests/data/plan_layers_fit.json was written by the single flat ``Compensation`` before each fit had its
    own settings; plans on disk load and save exactly as they were."""
    written = Path(__file__).parent / "data" / "plan_layers_fit.json"
    plan = Plan.load(written)
    assert isinstance(plan.compensation, Compensation) and plan.compensation.fit == "layers"
    assert (plan.compensation.layers.steps, plan.compensation.layers.after, plan.compensation.cosine.lr,
            plan.compensation.kl.windows, plan.compensation.layers.one_pass, plan.compensation.seed) == \
        (3, 2, 0.002, 8, False, 7)
    assert write_json(tmp_path / "plan.json", plan.to_dict()).read_text() == written.read_text()
    assert Plan.from_dict(json.loads(written.read_text())).to_json() == Plan.load(written).to_json()


def test_a_plans_compensation_must_be_settings():
    with pytest.raises(PlanError, match="no setting 'magic'"):
        Plan("x", LAYERS, remove=[1], compensation={"fit": "linear", "magic": 1})
    with pytest.raises(PlanError, match="not the fit's settings"):
        Plan("x", LAYERS, remove=[1], compensation=["linear"])
    assert Plan("x", LAYERS, remove=[1], compensation={"fit": "cosine"}).compensation == Compensation(fit="cosine")


def test_fit_tokens_and_old_plans_come_from_the_fit():
    assert Compensation().fit_tokens(128) == 8192
    layers = Compensation(fit="layers")
    assert layers.layers.steps is None and layers.layers.planned_steps == 100
    assert layers.fit_tokens(128) == (100 * layers.layers.batch + layers.layers.holdout) * 128
    old = Compensation.recorded({"fit": "layers", "tokens": 4096})
    assert (old.layers.one_pass, old.layers.patience, old.layers.holdout, old.layers.tokens) == (False, 0, 8, 4096)
    assert Compensation.recorded({"fit": "linear"}) == Compensation()


def test_no_code_compares_a_fit_name():
    """Code that treats fits differently asks the registry; a comparison with a fit's name is a fit not declared."""
    names = set(FITS)
    found = []
    for path in Path(depthprune.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            parts = [node.left, *node.comparators]
            constants = [p.value for p in parts if isinstance(p, ast.Constant) and isinstance(p.value, str)]
            constants += [e.value for p in parts if isinstance(p, (ast.Tuple, ast.List, ast.Set))
                          for e in p.elts if isinstance(e, ast.Constant)]
            others = " ".join(ast.unparse(p) for p in parts if not isinstance(p, ast.Constant))
            if names.intersection(constants) and any(word in others for word in ("fit", "compensat", "recover")):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "\n".join(found)


def test_a_fit_registered_from_outside_is_fitted_and_recorded():
    """The worked example of docs/adding-a-method.md: a refinement that halves each map's change."""
    def halfway(t, sample, config):
        return (t + torch.eye(len(t), dtype=t.dtype)) / 2

    register_fit(Fit("halfway", "linear, then each map moved halfway back to the identity", refine=halfway))
    try:
        model = tiny_model("llama", seed=2)
        batches = list(tiny_calibration(4, 16, seed=3).batches(2))
        plan = Plan("x", LAYERS, remove=[2, 3])
        linear = fit_compensation(model, plan, batches, Compensation()).records[-1]
        half = fit_compensation(model, plan, batches, Compensation(fit="halfway")).records[-1]
        assert half["fit"] == "halfway" and half["refine_tokens"] > 0
        assert half["residual_linear"] == pytest.approx(linear["residual_after"])
        assert linear["residual_after"] < half["residual_after"] < half["residual_before"]
    finally:
        FITS.pop("halfway")


def test_a_fits_options_are_recorded_under_its_name():
    with pytest.raises(ValueError, match="holds KLSettings as 'kl'"):
        register_fit(Fit("kl2", "kl again", options=KLSettings))
    assert "kl2" not in FITS


def test_fits_lists_every_fit_with_its_settings_and_flags(run_cli):
    out = run_cli("fits").out
    for fit in FITS.values():
        assert f"{fit.name}: {fit.summary}" in out
    assert "layers_steps (--compensate-steps): sized to the weights it trains" in out and "ridge (--ridge): 0.001" in out
    assert "kl_steps: 150" in out


def test_an_empty_compensation_in_a_plan_means_no_fit():
    """Plans written before the settings were typed read ``"compensation": {}`` as no compensation."""
    from depthprune import Plan

    assert Plan(method="manual", num_layers=4, remove=[1], compensation={}).compensation is None


def _trained_weights(model, layers) -> int:
    return sum(p.numel() for i in layers for p in model.model.layers[i].parameters())


def test_the_layers_fit_sizes_its_steps_from_the_weights_it_trains(monkeypatch):
    """One new token per LAYERS_WEIGHTS_PER_TOKEN trained weights, at least 100 steps, at most what the text holds
    (one pass); steps the user gave are kept as given."""
    from depthprune.backend import InMemoryBackend
    from depthprune.compensate import layers as layers_fit

    model = tiny_model("llama", seed=2)
    backend = InMemoryBackend(model)
    plan = Plan("x", LAYERS, remove=[2, 3])  # the gap after layer 1: layers 1 and 4 train (one above the gap)
    weights = _trained_weights(model, [1, 4])
    config = Compensation(fit="layers")
    room = lambda: 10**6  # noqa: E731

    sized, why = layers_fit.size(config, backend, plan, 16, room)
    assert sized.layers.steps == 100 and why["trained_weights"] == weights  # few weights: the floor

    monkeypatch.setattr(layers_fit, "LAYERS_WEIGHTS_PER_TOKEN", 1)
    wanted = -(-weights // (4 * 16))
    assert wanted > 100
    sized, why = layers_fit.size(config, backend, plan, 16, room)
    assert sized.layers.steps == wanted and "warning" not in why and sized.layers.lr == config.layers.lr

    short = 16 + 4 * (wanted - 7)
    sized, why = layers_fit.size(config, backend, plan, 16, lambda: short)
    assert sized.layers.steps == wanted - 7 and why["text_windows"] == short and "a longer --calib" in why["warning"]
    assert layers_fit.size(config, backend, plan, 16, lambda: 50)[0].layers.steps == 100  # below: as before

    given = Compensation.of(fit="layers", layers_steps=7)
    assert layers_fit.size(given, backend, plan, 16, room) == (given, {})


def test_a_sized_plan_records_its_steps_and_a_linear_plan_is_unchanged(tmp_path):
    """The plan a job saves holds the steps it trained, so re-applying it trains the same."""
    from depthprune.backend import InMemoryBackend
    from depthprune.data.calibration import CalibrationSpec
    from depthprune.surgery.apply import sized_plan
    from tiny import byte_tokenizer

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    spec = CalibrationSpec(str(text), 4, 16)
    tokenizer = byte_tokenizer()
    assert spec.fit_capacity(tokenizer) == len(text.read_text()) // 16 - CalibrationSpec.HELDOUT_WINDOWS
    backend = InMemoryBackend(tiny_model("llama", seed=2), tokenizer)
    plan = Plan("x", LAYERS, remove=[2, 3], compensation=Compensation(fit="layers"))
    sized, why = sized_plan(backend, plan, spec)
    assert sized.compensation.layers.steps == 100 == why["steps"] and sized.remove == plan.remove
    assert Plan.from_dict(sized.to_dict()).to_dict()["compensation"]["layers_steps"] == 100
    linear = Plan("x", LAYERS, remove=[2, 3], compensation=Compensation())
    assert sized_plan(backend, linear, spec) == (linear, {})
