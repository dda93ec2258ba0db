"""Hostile and careless input: every command refuses it with one line and exit code 2, before any work, and
leaves every file it found byte for byte as it was (and adds none)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import depthprune.bench  # noqa: F401  (bound before any test patches load_model)
from conftest import EMMA, PIQA_DIR, ROOT
from depthprune import Plan
from tiny import LAYERS, save_tiny_checkpoint

COMMANDS_WRITING_DIRS = {
    "prune": ["--ratio", "0.2"],
    "run": [],
    "width": [],
    "heal": ["--data", str(EMMA)],
    "score": [],
    "analyze": [],
    "bench": ["--methods", "shortgpt"],
}
COMMANDS_WRITING_JSON = {
    "eval-ppl": [],
    "eval-zeroshot": ["--tasks", "piqa_local", "--piqa-dir", str(PIQA_DIR)],
    "eval-speed": [],
}


@pytest.fixture()
def world(tmp_path, monkeypatch):
    """A working directory holding a user's model, another model, a user's folder, broken checkpoints and plans."""
    root = tmp_path / "world"
    root.mkdir()
    save_tiny_checkpoint(root / "model")
    save_tiny_checkpoint(root / "other", seed=1)
    (root / "user").mkdir()
    (root / "user" / "notes.txt").write_text("my notes")
    (root / "user" / "notes.json").write_text('{"mine": true}')
    (root / "calib_dir").mkdir()
    (root / "home").mkdir()
    for name, damage in [("trunc", "truncate"), ("garbage", "garbage"), ("badconfig", "config"),
                         ("noweights", "noweights"), ("unknown", "model_type")]:
        broken = save_tiny_checkpoint(root / name)
        weights = broken / "model.safetensors"
        if damage == "truncate":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif damage == "garbage":
            weights.write_bytes(os.urandom(4096))
        elif damage == "config":
            (broken / "config.json").write_text("{not json")
        elif damage == "noweights":
            weights.unlink()
        else:
            config = json.loads((broken / "config.json").read_text())
            (broken / "config.json").write_text(json.dumps({**config, "model_type": "mamba_xyz"}))
    (root / "plan_other.json").write_text(Plan("shortgpt", LAYERS + 6, remove=[1]).to_json())
    (root / "plan_bad.json").write_text("{oops")
    (root / "plan_incomplete.json").write_text('{"method": "shortgpt", "remove": [1]}')
    (root / "plan_wrong.json").write_text('{"method": "x", "num_layers": 6, "remove": ["a"]}')
    monkeypatch.chdir(root)
    monkeypatch.setenv("HOME", str(root / "home"))
    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tmp_path / "cache"))
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _args(args: list[str], world: Path) -> list[str]:
    return [a.replace("{W}", str(world)) for a in args]


CASES = [
    # the four cases that destroyed data
    (["eval-zeroshot", "--model", "{W}/model", "--tasks", "piqa_local", "--piqa-dir", str(PIQA_DIR), "--json",
      "{W}/model/model.safetensors"], "inside the model directory"),
    (["eval-ppl", "--model", "{W}/model", "--json", "{W}/model/config.json"], "inside the model directory"),
    (["heal", "--model", "{W}/model", "--data", str(EMMA), "--out", "{W}/healed", "--work-dir", "{W}/user"],
     "depthprune did not write it as work output"),
    (["prune", "--model", "{W}/model", "--ratio", "0.2", "--out", "", "--overwrite"], "--out is empty"),
    # other outputs that are never right
    (["prune", "--model", "{W}/model", "--ratio", "0.2", "--out", ".", "--overwrite"], "would be replaced"),
    (["prune", "--model", "{W}/model", "--ratio", "0.2", "--out", "{W}/home", "--overwrite"], "would be replaced"),
    (["prune", "--model", "{W}/model", "--ratio", "0.2", "--out", "/", "--overwrite"], "would be replaced"),
    (["prune", "--model", "{W}/model", "--ratio", "0.2", "--out", "{W}/user", "--overwrite"],
     "depthprune did not write it"),
    (["prune", "--model", "{W}/model", "--ratio", "0.2", "--out", "{W}/other", "--overwrite"],
     "is a model directory"),
    (["prune", "--model", "{W}/model", "--ratio", "0.2", "--out", "{W}/user/notes.txt/x"], "is a file"),
    (["eval-ppl", "--model", "{W}/model", "--json", "{W}/user"], "is a directory"),
    (["eval-ppl", "--model", "{W}/model", "--json", "{W}/user/result.txt"], "must end in .json"),
    (["eval-ppl", "--model", "{W}/model", "--json", "{W}/user/notes.json"], "not a result depthprune wrote"),
    (["eval-speed", "--model", "{W}/model", "--json", ""], "--json is empty"),
    # broken inputs, named
    (["prune", "--model", "{W}/trunc", "--ratio", "0.2", "--out", "{W}/o"], "truncated or corrupt"),
    (["eval-ppl", "--model", "{W}/garbage"], "truncated or corrupt"),
    (["prune", "--model", "{W}/badconfig", "--ratio", "0.2", "--out", "{W}/o"], "config.json is not valid JSON"),
    (["score", "--model", "{W}/noweights"], "no weights"),
    (["eval-ppl", "--model", "{W}/unknown"], "does not know the architecture 'mamba_xyz'"),
    (["eval-ppl", "--model", "{W}/user/notes.txt"], "is a file, not a model directory"),
    (["prune", "--model", "{W}/model", "--ratio", "0.2", "--calib", "{W}/calib_dir", "--out", "{W}/o"],
     "is a directory"),
    (["analyze", "--model", "{W}/model", "--plan", "{W}/plan_other.json", "--out", "{W}/a"],
     f"made for a model of {LAYERS + 6} layers but --model"),
    (["analyze", "--model", "{W}/model", "--plan", "{W}/plan_bad.json", "--out", "{W}/a"], "not a readable"),
    (["analyze", "--model", "{W}/model", "--plan", "{W}/plan_incomplete.json", "--out", "{W}/a"],
     "missing num_layers"),
    (["analyze", "--model", "{W}/model", "--plan", "{W}/plan_wrong.json", "--out", "{W}/a"], "malformed plan"),
    (["analyze", "--model", "{W}/model", "--plan", "{W}/nothing.json", "--out", "{W}/a"], "no depthprune plan"),
    # numbers that cannot mean anything
    (["prune", "--model", "{W}/model", "--ratio", "0.2", "--seq-len", "100000", "--out", "{W}/o"],
     "longer than the model's context of 128"),
    (["eval-ppl", "--model", "{W}/model", "--seq-len", "129"], "longer than the model's context of 128"),
    (["eval-ppl", "--model", "{W}/model", "--seq-len", "1"], "at least 2"),
    (["bench", "--model", "{W}/model", "--methods", "shortgpt", "--seq-len", "1", "--out", "{W}/b"], "at least 2"),
    (["eval-ppl", "--model", "{W}/model", "--max-windows", "-1"], "--ppl-windows must be 0 (all) or more"),
    (["bench", "--model", "{W}/model", "--methods", "shortgpt", "--ppl-windows", "-3", "--out", "{W}/b"],
     "must be 0 (all) or more"),
    (["prune", "--model", "{W}/model", "--ratio", "0.2", "--calib-samples", "0", "--out", "{W}/o"],
     "--calib-samples must be at least 1"),
    (["prune", "--model", "{W}/model", "--ratio", "0.2", "--batch-size", "0", "--out", "{W}/o"],
     "--batch-size must be at least 1"),
    (["score", "--model", "{W}/model", "--batch-size", "-2"], "--batch-size must be at least 1"),
    (["eval-ppl", "--model", "{W}/model", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["eval-speed", "--model", "{W}/model", "--gen-len", "0"], "--gen-len must be at least 1"),
    (["prune", "--model", "{W}/model", "--method", "nope", "--ratio", "0.2", "--out", "{W}/o"], "unknown method"),
    (["heal", "--model", "{W}/model", "--data", str(EMMA), "--out", "{W}/h", "--resume"], "--work-dir"),
]
# every path option of every command, pointed into a model directory that is not the input
CASES += [([command, "--model", "{W}/model", *extra, "--out", "{W}/other/sub"], "inside the model directory")
          for command, extra in COMMANDS_WRITING_DIRS.items()]
CASES += [([command, "--model", "{W}/model", *extra, "--json", "{W}/other/r.json"], "inside the model directory")
          for command, extra in COMMANDS_WRITING_JSON.items()]
CASES += [(["heal", "--model", "{W}/model", "--data", str(EMMA), "--out", "{W}/h", "--work-dir", "{W}/other/w"],
           "inside the model directory")]


@pytest.mark.parametrize("args, message", CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(CASES)])
def test_refused_with_one_line_and_nothing_touched(args, message, world, run_cli, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    for where in ("depthprune.models.load.load_model", "depthprune.bench.load_model"):
        monkeypatch.setattr(where, no_loading)
    before = snapshot(world)
    res = run_cli(*_args(args, world), check=False)
    assert res.code == 2, res.err
    lines = [line for line in res.err.splitlines() if line.strip() and not line.startswith("loading ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.err
    assert message in lines[0]
    assert "upgrade" not in lines[0] and "Traceback" not in res.err
    assert snapshot(world) == before


def test_overwrite_replaces_only_what_depthprune_wrote(world, run_cli):
    out = world / "pruned"
    run_cli("prune", "--model", world / "model", "--ratio", "0.34", "--calib-samples", "2", "--seq-len", "32",
            "--out", out, "-q")
    assert (out / ".depthprune").is_file() and json.loads((out / ".depthprune").read_text())["kind"] == "checkpoint"
    again = run_cli("prune", "--model", world / "model", "--ratio", "0.34", "--calib-samples", "2",
                    "--seq-len", "32", "--out", out, check=False)
    assert again.code == 2 and "--overwrite" in again.err
    run_cli("prune", "--model", world / "model", "--ratio", "0.5", "--calib-samples", "2", "--seq-len", "32",
            "--out", out, "--overwrite", "-q")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == LAYERS - 3
    score = world / "scores"
    run_cli("score", "--model", world / "model", "--calib-samples", "2", "--seq-len", "32", "--out", score, "-q")
    run_cli("score", "--model", world / "model", "--calib-samples", "2", "--seq-len", "32", "--out", score, "-q")
    refused = run_cli("analyze", "--model", world / "model", "--out", score, check=False)
    assert refused.code == 2 and "did not write it as analysis output" in refused.err
    result = world / "r.json"
    run_cli("eval-ppl", "--model", out, "--seq-len", "32", "--max-windows", "2", "--json", result, "-q")
    run_cli("eval-ppl", "--model", out, "--seq-len", "32", "--max-windows", "3", "--json", result, "-q")
    assert json.loads(result.read_text())["windows"] == 3 and "written_by" in json.loads(result.read_text())


def test_work_dir_is_marked_and_removed_only_when_depthprune_made_it(world, run_cli):
    work = world / "work"
    common = ["heal", "--model", world / "model", "--data", EMMA, "--max-steps", "1", "--batch-size", "1",
              "--grad-accum", "1", "--cutoff-len", "16", "--max-items", "6", "--val-size", "0", "-q"]
    run_cli(*common, "--out", world / "h1", "--work-dir", work)
    assert not work.exists(), "a work dir depthprune created is removed after success"
    run_cli(*common, "--out", world / "h2", "--work-dir", work, "--keep-checkpoints")
    assert json.loads((work / ".depthprune").read_text())["kind"] == "work"
    assert (work / "checkpoints").is_dir()


def test_bench_fails_when_every_pruned_row_fails(world, run_cli, monkeypatch):
    from dataclasses import replace

    from depthprune.methods import METHODS

    def broken(*a, **k):
        raise RuntimeError("broken on purpose")

    monkeypatch.setitem(METHODS, "shortgpt", replace(METHODS["shortgpt"], plan=broken))
    res = run_cli("bench", "--model", world / "model", "--methods", "shortgpt", "--ratios", "0.34",
                  "--seq-len", "32", "--ppl-windows", "2", "--calib-samples", "2", "--out", world / "b", "-q",
                  check=False)
    assert res.code == 1 and "every pruned row failed" in res.err
    assert "error: RuntimeError: broken on purpose" in (world / "b" / "results.md").read_text()


def test_perplexity_over_zero_tokens_is_refused():
    import torch

    from depthprune import Calibration
    from depthprune.errors import InputError
    from depthprune.evaluate.perplexity import perplexity_on
    from tiny import tiny_model

    ids = torch.ones((2, 1), dtype=torch.long)
    with pytest.raises(InputError, match="nothing to predict"):
        perplexity_on(tiny_model("llama"), Calibration(ids, torch.ones_like(ids)), progress=False)
    ids = torch.ones((2, 4), dtype=torch.long)
    with pytest.raises(InputError, match="zero scored tokens"):
        perplexity_on(tiny_model("llama"), Calibration(ids, torch.zeros_like(ids)), progress=False)


def test_quiet_silences_transformers_too(world, run_cli):
    res = run_cli("prune", "--model", world / "model", "--ratio", "0.34", "--calib-samples", "2", "--seq-len", "32",
                  "--eval", "ppl", "--ppl-windows", "2", "--out", world / "q", "-q")
    assert [line for line in res.err.splitlines() if line.strip()] == [f"loading {world / 'model'} ..."]


SLOW_SAVE = textwrap.dedent("""
    import sys, time
    import depthprune.io as io
    real = io.write_checkpoint

    def slow(directory, *args, **kwargs):
        real(directory, *args, **kwargs)
        print("WRITTEN", flush=True)
        time.sleep(60)

    io.write_checkpoint = slow
    import depthprune.job
    depthprune.job.write_checkpoint = slow
    from depthprune.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _start_slow_prune(world: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, "prune", "--model", str(world / "model"), "--ratio", "0.34",
         "--calib-samples", "2", "--seq-len", "32", "--out", str(out), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=world)
    deadline = time.time() + 240
    while time.time() < deadline:
        line = proc.stdout.readline()
        if "WRITTEN" in line:
            return proc
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
    proc.kill()
    raise AssertionError("the prune never reached its save")


def _leftovers(world: Path, name: str) -> list[str]:
    return sorted(p.name for p in world.iterdir() if p.name.startswith(f".{name}."))


def test_sigterm_during_save_cleans_up(world):
    proc = _start_slow_prune(world, world / "out")
    assert _leftovers(world, "out"), "the checkpoint is being written into a temporary sibling"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 143 and "interrupted" in proc.stderr.read()
    assert _leftovers(world, "out") == [] and not (world / "out").exists()


def test_a_killed_runs_temporaries_are_removed_by_the_next_run(world, run_cli):
    proc = _start_slow_prune(world, world / "out")
    proc.kill()
    proc.wait(timeout=60)
    assert _leftovers(world, "out"), "SIGKILL leaves the temporary directory behind"
    run_cli("prune", "--model", world / "model", "--ratio", "0.34", "--calib-samples", "2", "--seq-len", "32",
            "--out", world / "out", "-q")
    assert _leftovers(world, "out") == [] and (world / "out" / "model.safetensors").is_file()


def test_quiet_silences_lm_eval_too(smollm2_path, shared_data, run_cli):
    """lm-eval's request-building bars and its warnings about how it was called go too (numbers still print)."""
    res = run_cli("eval-zeroshot", "--model", smollm2_path, "--tasks", "piqa", "--piqa-dir", shared_data / "piqa",
                  "--limit", "3", "-q")
    assert [line for line in res.err.splitlines() if line.strip()] == [f"loading {smollm2_path} ..."]
    assert "piqa_local" in res.out
