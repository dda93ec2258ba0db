"""Compensation fits are a registry, like methods: what code asks of a fit comes from its registration."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import depthprune
from depthprune import Plan
from depthprune.compensate import FITS, SHARED_SETTINGS, Compensation, Fit, fit_compensation, trained_fits
from depthprune.compensate.registry import register_fit
from tiny import LAYERS, tiny_calibration, tiny_model


def test_the_fits_register_in_order_with_settings_of_the_recorded_settings():
    assert list(FITS) == ["linear", "cosine", "kl", "layers"]
    assert trained_fits() == ("kl", "layers")
    recorded = {f.name for f in fields(Compensation)}
    for fit in FITS.values():
        assert set(SHARED_SETTINGS) | set(fit.settings) <= recorded, fit.name
    read = set(SHARED_SETTINGS).union(*(fit.settings for fit in FITS.values()))
    assert read == recorded - {"fit"}, "every recorded setting is read by some fit"


def test_fit_tokens_and_old_plans_come_from_the_fit():
    assert Compensation().fit_tokens(128) == 8192
    layers = Compensation(fit="layers")
    assert layers.fit_tokens(128) == (layers.layers_steps * layers.layers_batch + layers.layers_holdout) * 128
    old = Compensation.recorded({"fit": "layers", "tokens": 4096})
    assert (old.layers_one_pass, old.layers_patience, old.layers_holdout, old.layers_tokens) == (False, 0, 8, 4096)
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


def test_fits_lists_every_fit_with_its_settings_and_flags(run_cli):
    out = run_cli("fits").out
    for fit in FITS.values():
        assert f"{fit.name}: {fit.summary}" in out
    assert "layers_steps (--compensate-steps): 100" in out and "ridge (--ridge): 0.001" in out
    assert "kl_steps: 150" in out
