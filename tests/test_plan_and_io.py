"""Plans (validation, JSON round trip, targets) and safe saving."""

from __future__ import annotations

import json

import pytest
import torch

from depthprune import Merge, Plan, layers_to_remove, save
from depthprune.io import OutputError, atomic_directory, check_output_dir
from depthprune.methods import Target, make_plan
from depthprune.plan import PLAN_FILE, PlanError
from tiny import tiny_inputs, tiny_model


def test_plan_round_trip(tmp_path):
    plan = Plan(method="x", num_layers=10, remove=[7, 2], merges=[Merge(3, 5, "rdsc")],
                params={"a": 1}, scores={"bi": [0.1] * 10})
    assert plan.remove == [2, 7]
    assert plan.dropped == [2, 4, 5, 7]
    assert plan.kept == [0, 1, 3, 6, 8, 9]
    assert plan.num_layers_after == 6
    (tmp_path / PLAN_FILE).write_text(plan.to_json())
    again = Plan.load(tmp_path)
    assert again.to_dict() == plan.to_dict()
    assert again.merges == [Merge(3, 5, "rdsc")]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"remove": [10]}, "outside"),
        ({"remove": [1, 1]}, "twice"),
        ({"merges": [Merge(4, 4, "rdsc")]}, "not a window"),
        ({"remove": [3], "merges": [Merge(2, 4, "rdsc")]}, "overlaps"),
        ({"remove": list(range(10))}, "removes all"),
    ],
)
def test_invalid_plans(kwargs, message):
    with pytest.raises(PlanError, match=message):
        Plan(method="x", num_layers=10, **kwargs)


def test_layers_to_remove():
    assert layers_to_remove(30, ratio=0.25) == 7
    assert layers_to_remove(32, ratio=0.25) == 8
    assert layers_to_remove(30, remove=7) == 7
    assert layers_to_remove(30, keep=23) == 7
    for kwargs, message in [
        ({"ratio": 0.0}, "between 0 and 1"),
        ({"ratio": 1.0}, "between 0 and 1"),
        ({"remove": 30}, "at least one layer"),
        ({"keep": 0}, "at least one layer"),
        ({"keep": 31}, "nothing to remove"),
        ({}, "exactly one"),
        ({"ratio": 0.2, "remove": 3}, "exactly one"),
    ]:
        with pytest.raises(PlanError, match=message):
            layers_to_remove(30, **kwargs)
    with pytest.raises(PlanError, match="only one"):
        Target(ratio=0.2, keep=3).validate()


def test_unknown_method_lists_known():
    with pytest.raises(PlanError, match="shortgpt"):
        make_plan("nope", tiny_model("llama"), None)


def test_plan_for_other_depth_is_refused():
    from depthprune import apply_plan

    with pytest.raises(PlanError, match="made for 8 layers"):
        apply_plan(tiny_model("llama"), Plan(method="x", num_layers=8, remove=[1]))


def test_out_equal_to_input_is_refused(tmp_path):
    model_dir = tmp_path / "model"
    save(tiny_model("llama"), None, model_dir)
    for out in (model_dir, model_dir / "sub", tmp_path):
        with pytest.raises(OutputError, match="overlaps the input"):
            check_output_dir(out, inputs=[model_dir], overwrite=True)


def test_non_empty_out_needs_overwrite_and_must_be_ours(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="depthprune did not write it"):
            save(tiny_model("llama"), None, out, overwrite=overwrite)
    assert (out / "keep.txt").read_text() == "user data"
    ours = tmp_path / "ours"
    save(tiny_model("llama"), None, ours)
    with pytest.raises(OutputError, match="--overwrite"):
        save(tiny_model("llama"), None, ours)
    (ours / "stale.txt").write_text("from the last run")
    save(tiny_model("llama"), None, ours, overwrite=True)
    assert not (ours / "stale.txt").exists() and (ours / "config.json").exists()


def test_failed_write_leaves_previous_output_intact(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous result")
    (out / ".depthprune").write_text('{"kind": "checkpoint"}')
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "partial.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert (out / "old.txt").read_text() == "previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_saved_plan_file(tmp_path):
    model = tiny_model("llama")
    plan = Plan(method="manual", num_layers=6, remove=[2])
    save(model, None, tmp_path / "o", plan)
    data = json.loads((tmp_path / "o" / PLAN_FILE).read_text())
    assert data["remove"] == [2] and data["num_layers_after"] == 5 and data["version"]
    assert tiny_inputs().shape[0] == 2


def test_a_depth_stage_reapplies_a_plan_without_a_target(tmp_path):
    """``DepthStage(method, plan=...)`` re-applies a decision (as bench_heal's layers recipe does): no depth
    target is asked for, the result equals the first run's, and a plan for another depth is refused."""
    from safetensors.torch import load_file

    from depthprune import CalibrationSpec, DepthStage, Job, Target, load_model, run_job
    from tiny import LAYERS, save_tiny_checkpoint, shipped_text

    src = save_tiny_checkpoint(tmp_path / "model", "llama", seed=2)
    text = tmp_path / "text.txt"
    text.write_text(shipped_text(40000))
    calib = CalibrationSpec(str(text), 4, 32)
    first = run_job(load_model(str(src), progress=False),
                    Job([DepthStage("angular", Target(remove=2))], calib, progress=False), out=tmp_path / "a")
    again = run_job(load_model(str(src), progress=False),
                    Job([DepthStage("angular", plan=first.plan)], calib, progress=False), out=tmp_path / "b")
    assert again.plan.remove == first.plan.remove and again.layers["after"] == LAYERS - 2
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = save_tiny_checkpoint(tmp_path / "deeper", "llama", layers=LAYERS + 2)
    config = json.loads((other / "config.json").read_text())
    with pytest.raises(PlanError, match="made for a model of"):  # up front, from the config, before loading
        DepthStage("angular", plan=first.plan).check(config)
    with pytest.raises(PlanError, match="the plan was made for"):
        run_job(load_model(str(other), progress=False),
                Job([DepthStage("angular", plan=first.plan)], calib, progress=False))
