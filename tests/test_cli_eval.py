"""eval-zeroshot and eval-speed on the command line: same numbers as the API, clear errors, exit code 2."""

from __future__ import annotations

import json

import pytest

from conftest import PIQA_DIR
from depthprune import Plan, apply_plan
from depthprune.evaluate.zeroshot import evaluate_zeroshot
from tiny import LAYERS, byte_tokenizer, save_tiny_checkpoint, tiny_model

LIMIT = 10


def test_eval_zeroshot_equals_api(smollm2_readonly, smollm2_path, shared_data, tmp_path, run_cli):
    res = run_cli("eval-zeroshot", "--model", smollm2_path, "--tasks", "piqa_local", "--piqa-dir", PIQA_DIR,
                  "--limit", LIMIT, "--batch-size", 20, "--json", tmp_path / "zs.json", "-q")
    assert res.code == 0, res.err
    model, tok = smollm2_readonly
    api = evaluate_zeroshot(model, tok, ["piqa_local"], limit=LIMIT, batch_size=20, piqa_dir=PIQA_DIR,
                            progress=False)
    saved = json.loads((tmp_path / "zs.json").read_text())
    assert saved["scores"]["piqa_local"]["value"] == api.metrics["piqa_local"]
    assert saved["scores"]["piqa_local"]["stderr"] == api.scores["piqa_local"].stderr
    assert saved["mean"] == api.mean and saved["settings"]["limit"] == LIMIT
    assert f"piqa_local  acc      {api.metrics['piqa_local']:.4f}" in res.out
    assert "mean" in res.out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "piqa_local", "--piqa-dir", "/no/such/piqa"], "does not exist"),
        (["--tasks", ""], "no tasks given"),
        (["--tasks", "piqa_local", "--piqa-dir", str(PIQA_DIR), "--limit", "2.5"], "whole number"),
        (["--tasks", "piqa_local", "--piqa-dir", str(PIQA_DIR), "--task-dir", "/no/such/dir"], "task directory"),
    ],
)
def test_eval_zeroshot_bad_input(args, message, run_cli):
    res = run_cli("eval-zeroshot", "--model", "/no/such/model", *args, check=False)
    assert res.code == 2 and message in res.err


def test_eval_zeroshot_hub_task_offline_is_an_input_error(run_cli, monkeypatch, tmp_path):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    model = save_tiny_checkpoint(tmp_path / "model")
    res = run_cli("eval-zeroshot", "--model", model, "--tasks", "boolq", "--limit", 2, "-q", check=False)
    assert res.code == 2
    assert "Hugging Face Hub" in res.err and "--task-dir" in res.err and "Traceback" not in res.err


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny random Llama and the same model with two layers removed, saved with a tokenizer."""
    root = tmp_path_factory.mktemp("speed")
    tok = byte_tokenizer()
    dense = tiny_model("llama", vocab_size=len(tok))
    dense.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    apply_plan(dense, Plan("manual", LAYERS, remove=[1, 2]))
    dense.save_pretrained(root / "pruned")
    tok.save_pretrained(root / "pruned")
    return root / "dense", root / "pruned"


def test_eval_speed_baseline_side_by_side(tiny_pair, tmp_path, run_cli):
    dense, pruned = tiny_pair
    res = run_cli("eval-speed", "--model", pruned, "--baseline", dense, "--prompt-len", 8, "--gen-len", 4,
                  "--repeats", 2, "--warmup", 0, "--json", tmp_path / "speed.json")
    assert res.code == 0, res.err
    kept = LAYERS - 2
    for line in ("layers", "parameters", "checkpoint", "prefill latency", "decode"):
        assert any(row.startswith(line) for row in res.out.splitlines()), line
    assert f"ideal decoder speedup L/(L-k) = {LAYERS}/{kept} = {LAYERS / kept:.2f}x" in res.out
    assert "measured / ideal: prefill" in res.out
    data = json.loads((tmp_path / "speed.json").read_text())
    c = data["comparison"]
    assert c["ideal_speedup"] == pytest.approx(LAYERS / kept)
    assert c["decode_speedup_vs_ideal"] == pytest.approx(c["decode_speedup"] / c["ideal_speedup"])
    assert c["param_ratio"] < 1 and c["checkpoint_ratio"] < 1
    assert data["result"]["num_layers"] == kept and data["baseline_result"]["num_layers"] == LAYERS
    assert data["result"]["checkpoint_bytes"] < data["baseline_result"]["checkpoint_bytes"]


def test_eval_speed_single_model_and_bad_input(tiny_pair, run_cli):
    _, pruned = tiny_pair
    res = run_cli("eval-speed", "--model", pruned, "--prompt-len", 8, "--gen-len", 2, "--repeats", 1,
                  "--warmup", 0)
    assert res.code == 0 and f"{LAYERS - 2} layers" in res.out and "decode" in res.out
    bad = run_cli("eval-speed", "--model", "/no/such/model", "--gen-len", 0, check=False)
    assert bad.code == 2 and "--gen-len must be at least 1" in bad.err
