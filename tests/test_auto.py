"""--method auto: every candidate scored on held-out windows, the best applied, and the saved model is the candidate
that was scored."""

from __future__ import annotations

import json

import pytest
import torch

from depthprune import CalibrationSpec, DepthStage, Job, Target, run_job
from depthprune.methods import build_options
from depthprune.models.load import load_model
from depthprune.plan import PlanError
from tiny import LAYERS, save_tiny_checkpoint, text_file


@pytest.fixture()
def text(tmp_path):
    return text_file(tmp_path / "text.txt")


def test_auto_keeps_the_candidate_with_the_lowest_heldout_loss(tmp_path, text):
    src = save_tiny_checkpoint(tmp_path / "model", "llama", seed=3)
    spec = CalibrationSpec(str(text), num_windows=4, seq_len=32)
    options = build_options("auto", {"candidates": "shortgpt,angular,sleb", "compensate_tokens": 800})
    result = run_job(load_model(str(src)), Job([DepthStage("auto", Target(remove=2), options)], spec, progress=False),
                     out=tmp_path / "out")
    plan = json.loads((tmp_path / "out" / "depthprune_plan.json").read_text())
    table = plan["params"]["candidates"]
    assert [c["method"] for c in table if c["compensation"] == "none"] == ["shortgpt", "angular", "sleb"]
    compensated = [c for c in table if c["compensation"] == "linear"]
    assert compensated, "candidates with a gap after a kept layer are also tried compensated"
    assert all(c["dropped"] != list(range(len(c["dropped"]))) for c in compensated), "a leading gap has no map"
    ranked = [c for c in table if c["fidelity"] == "all"]
    assert {c["fidelity"] for c in table} <= {"all", "screen"}
    assert len({(c["method"], c["compensation"]) for c in ranked if "same_as" not in c}) <= 3
    best = min(ranked, key=lambda c: c["loss"])
    assert plan["params"]["heldout_loss"] == best["loss"]
    assert plan["params"]["chosen"] == best["method"] + ("+linear" if best["compensation"] == "linear" else "")
    assert sorted(set(range(LAYERS)) - set(plan["kept"])) == best["dropped"]
    assert (plan["compensation"] is not None) == (best["compensation"] == "linear")
    assert result.layers["after"] == LAYERS - 2

    saved = load_model(str(tmp_path / "out"))
    heldout = spec.heldout(saved.tokenizer)
    planning = set(spec.windows(saved.tokenizer).description["slots"])
    assert not planning & set(heldout.description["slots"]), "ranking windows are never planning windows"
    kl = _kl(load_model(str(src)).model, saved.model, heldout)
    assert kl == pytest.approx(best["loss"], rel=1e-4), "the saved model is the candidate that was scored"


def test_multi_fidelity_ranking_scores_the_best_screened_candidates_as_exact_does(tmp_path, text):
    """Screened candidates (4 of the 16 held-out windows) that make the rerank have the loss the exact ranking
    gives them, and the choice is the best of those."""
    src = save_tiny_checkpoint(tmp_path / "model", "llama", seed=5)
    spec = CalibrationSpec(str(text), num_windows=4, seq_len=32)
    tables = {}
    for exact in (False, True):
        options = build_options("auto", {"candidates": "shortgpt,angular,sleb", "compensate_tokens": 800,
                                         "exact": exact, "rerank": 2})
        result = run_job(load_model(str(src)), Job([DepthStage("auto", Target(remove=2), options)], spec,
                                                   progress=False))
        tables[exact] = result.plan.params
    fast, exact = tables[False], tables[True]
    assert exact["ranking"] == "exact" and {c["fidelity"] for c in exact["candidates"]} == {"all"}
    assert fast["ranking"].startswith("screened on 4 windows")
    distinct = [c for c in fast["candidates"] if "same_as" not in c]
    assert sum(c["fidelity"] == "all" for c in distinct) == 2 < len(distinct)
    by_key = {(c["method"], c["compensation"]): c["loss"] for c in exact["candidates"]}
    reranked = [c for c in fast["candidates"] if c["fidelity"] == "all"]
    for c in reranked:
        assert c["loss"] == pytest.approx(by_key[(c["method"], c["compensation"])], rel=1e-6)
    assert fast["heldout_loss"] == min(c["loss"] for c in reranked)


def _kl(dense, pruned, windows) -> float:
    with torch.no_grad():
        p = torch.log_softmax(dense(input_ids=windows.input_ids).logits[:, :-1].float(), -1)
        q = torch.log_softmax(pruned(input_ids=windows.input_ids).logits[:, :-1].float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_auto_options_and_errors(tmp_path):
    with pytest.raises(PlanError, match="unknown method"):
        build_options("auto", {"candidates": "shortgpt,nope"})
    with pytest.raises(PlanError, match="cannot include auto"):
        build_options("auto", {"candidates": "auto"})
    with pytest.raises(PlanError, match="unknown compensation"):
        build_options("auto", {"fits": "magic"})
    for name in ("screen_windows", "rerank", "recover_steps"):
        with pytest.raises(PlanError, match="must be at least 1"):
            build_options("auto", {name: 0})
    with pytest.raises(PlanError, match="decides compensation itself"):
        from depthprune.compensate import Compensation

        DepthStage("auto", Target(remove=1), compensation=Compensation()).check()
    from depthprune import Calibration, make_plan
    from tiny import tiny_model

    ids = torch.randint(3, 100, (2, 8))
    with pytest.raises(PlanError, match="held-out windows"):
        make_plan("auto", tiny_model("llama"), Calibration(ids, torch.ones_like(ids)), Target(remove=1),
                  progress=False)


def test_auto_on_gemma_ranks_rotation_and_scale_compensation(tmp_path, text):
    src = save_tiny_checkpoint(tmp_path / "gemma", "gemma3", seed=2)
    spec = CalibrationSpec(str(text), num_windows=4, seq_len=32)
    options = build_options("auto", {"candidates": "shortgpt,sleb"})
    run_job(load_model(str(src)), Job([DepthStage("auto", Target(remove=1), options)], spec, progress=False),
            out=tmp_path / "out")
    plan = json.loads((tmp_path / "out" / "depthprune_plan.json").read_text())
    assert {c["compensation"] for c in plan["params"]["candidates"]} == {"none", "linear"}
    assert plan["params"]["compensation_unsupported"] is None
    if plan["compensation"]:
        fits = json.loads((tmp_path / "out" / "depthprune_run.json").read_text())["stages"][0]["compensation"]
        assert {r["fold"] for r in fits if "fold" in r} == {"qd"}
