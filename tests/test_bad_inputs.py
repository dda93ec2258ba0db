"""Hostile and careless input: every command refuses it with one line and exit code 2, before any work, and
leaves every file it found byte for byte as it was (and adds none)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import depthprune.bench.runner  # noqa: F401  (bound before any test patches load_model)
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
    for name, remove in [("plan_float.json", [LAYERS - 3.3, LAYERS - 2]), ("plan_bool.json", [True, LAYERS - 2])]:
        (root / name).write_text(json.dumps({"method": "shortgpt", "num_layers": LAYERS, "remove": remove}))
    (root / "plan_operator.json").write_text(json.dumps(
        {"method": "slm", "num_layers": LAYERS, "merges": [{"low": 1, "high": 2, "operator": "bogus"}]}))
    for name, change in [("deep", {"num_hidden_layers": LAYERS + 2}), ("shallow", {"num_hidden_layers": LAYERS - 2}),
                         ("banana", {"dtype": "banana"}), ("heads", {"hidden_size": 66}),
                         ("wide", {"hidden_size": 96}), ("vocab", {"vocab_size": 300}),
                         ("mlp", {"intermediate_size": 96}), ("eps", {"rms_norm_eps": float("nan")}),
                         ("rope", {"rope_parameters": {"rope_type": "bogus", "rope_theta": 10000.0}}),
                         ("oldrope", {"rope_scaling": {"type": "warp", "factor": 2.0}}),
                         ("act", {"hidden_act": "sparkle"}), ("tokens", {"vocab_size": 200})]:
        shutil.copytree(root / "model", root / name)
        config = json.loads((root / name / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps({**config, **change}))
    _shrink_embedding(root / "tokens", 200)  # weights and config agree, the tokenizer has 259 tokens
    shutil.copytree(root / "model", root / "notok", ignore=shutil.ignore_patterns("tokenizer*"))
    (root / "short.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    _linked_model(root)
    (root / "loopA").symlink_to(root / "loopB")
    (root / "loopB").symlink_to(root / "loopA")
    (root / "random.gguf").write_bytes(os.urandom(4096))
    (root / "piqa").mkdir()
    (root / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n{broken\n')
    (root / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    (root / "empty.txt").write_text("\n  \n")
    (root / "binary.txt").write_bytes(bytes(range(128, 256)) * 8)
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{broken\n')
    (root / "alpaca_bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{broken\n')
    (root / "sentences.txt").write_text("One sentence.\nAnother one.\n")
    for out in ("o", "h", "victim"):  # a user's files named like depthprune's temporaries beside the outputs
        (root / f".{out}.tmp-99999-mine").mkdir()
        (root / f".{out}.tmp-99999-mine" / "keep.txt").write_text("mine")
        (root / f".{out}.old-99998-x").write_text("mine")
        (root / f".{out}.99997.abc123.tmp").write_text("mine")
    monkeypatch.chdir(root)
    monkeypatch.setenv("HOME", str(root / "home"))
    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tmp_path / "cache"))
    return root


def _shrink_embedding(directory: Path, rows: int) -> None:
    """Cut the stored embedding and head of ``directory`` to ``rows`` rows (its config already says so)."""
    from safetensors.torch import load_file, save_file

    weights = directory / "model.safetensors"
    tensors = load_file(str(weights))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            tensors[name] = tensors[name][:rows].clone()
    save_file(tensors, str(weights), metadata={"format": "pt"})


def _linked_model(root: Path) -> None:
    """``linked/`` reads its weights through a link into ``p/``, a checkpoint depthprune wrote (issue 26)."""
    save_tiny_checkpoint(root / "p")
    (root / "p" / ".depthprune").write_text('{"written_by": "depthprune 0", "kind": "checkpoint"}')
    shutil.copytree(root / "p", root / "linked", ignore=shutil.ignore_patterns("model.safetensors", ".depthprune"))
    (root / "linked" / "model.safetensors").symlink_to(root / "p" / "model.safetensors")
    (root / "gen.json").write_text(json.dumps({"written_by": "depthprune 0", **json.loads(
        (root / "linked" / "generation_config.json").read_text())}))
    (root / "linked" / "generation_config.json").unlink()
    (root / "linked" / "generation_config.json").symlink_to(root / "gen.json")


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
    (["heal", "--model", "{W}/model", "--data", "fiction", "--cutoff-len", "64", "--eval", "ppl", "--seq-len", "0",
      "--out", "{W}/h"],
     "at least 2"),
    (["heal", "--model", "{W}/model", "--data", "fiction", "--seq-len", "64", "--out", "{W}/h"],
     "--seq-len sets the evaluation windows and needs ppl, kl, top1 or gen in --eval; as given it would do nothing"),
    (["eval-ppl", "--model", "{W}/model", "--max-windows", "-1"], "--max-windows must be 0 (all) or more"),
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
    (["prune", "--model", "{W}/model", "--ratio", "0.2", "--eval", "none,ppl", "--out", "{W}/o"],
     "--eval none measures nothing"),
    (["prune", "--model", "{W}/model", "--ratio", "0.2", "--compensate", "linear", "--compensate-steps", "9",
      "--out", "{W}/o"], "--compensate-steps needs --compensate layers"),
    (["prune", "--model", "{W}/model", "--ratio", "0.2", "--compensate", "linear", "--compensate-above", "2",
      "--out", "{W}/o"], "--compensate-above needs --compensate layers"),
    (["prune", "--model", "{W}/model", "--ratio", "0.2", "--compensate", "layers", "--compensate-above", "-1",
      "--out", "{W}/o"], "layers after the gap must be 0 or more"),
    (["bench", "--model", "{W}/model", "--methods", "shortgpt", "--compensate", "none,linear",
      "--compensate-above", "3", "--out", "{W}/b"], "--compensate-above needs layers in --compensate"),
    (["heal", "--model", "{W}/model", "--data", str(EMMA), "--out", "{W}/h", "--resume"], "--work-dir"),
]
FAST = ["--calib-samples", "2", "--seq-len", "32"]
PRUNE = ["prune", "--model", "{W}/model", "--ratio", "0.34", *FAST]
HEAL = ["heal", "--model", "{W}/model", "--data", str(EMMA), "--cutoff-len", "16", "--out", "{W}/h"]
ZEROSHOT = ["eval-zeroshot", "--model", "{W}/model", "--tasks", "piqa_local", "--piqa-dir", str(PIQA_DIR)]
TOO_LONG = "n" * 300
# issue 18: what still got a traceback, saved a wrong model or was silently accepted
CASES += [
    # numbers that are not numbers
    ([*PRUNE, "--compensate", "linear", "--ridge", "nan", "--out", "{W}/o"], "--ridge must be a finite number"),
    ([*HEAL, "--lr", "nan"], "--lr must be a finite number"),
    ([*ZEROSHOT, "--limit", "nan"], "--limit must be a finite number"),
    (["prune", "--model", "{W}/model", "--method", "slm", "--threshold", "inf", *FAST, "--out", "{W}/o"],
     "--threshold must be a finite number"),
    ([*HEAL, "--max-steps", "-1"], "--max-steps must be 0 (train for --epochs) or more"),
    ([*ZEROSHOT, "--num-fewshot", "-1"], "--num-fewshot must be 0 (zero-shot) or more"),
    # a model that is not what its config says, read before loading
    (["prune", "--model", "{W}/deep", "--ratio", "0.34", *FAST, "--out", "{W}/o"],
     f"declares {LAYERS + 2} layers but the weights lack every tensor of layers {LAYERS}, {LAYERS + 1} "
     f"(model.layers.{LAYERS}.*)"),
    (["score", "--model", "{W}/shallow"], f"declares {LAYERS - 2} layers but the weights also hold layers "
     f"{LAYERS - 2}, {LAYERS - 1}"),
    (["eval-ppl", "--model", "{W}/banana"], "gives dtype 'banana', which is not a torch dtype"),
    (["eval-ppl", "--model", "{W}/heads"], "The hidden size (66) is not a multiple of the number of attention heads"),
    (["eval-ppl", "--model", "{W}/short.gguf"], "short.gguf is not a readable GGUF file"),
    (["eval-ppl", "--model", "{W}/random.gguf"], "random.gguf is not a readable GGUF file"),
    # names the file system cannot hold
    ([*PRUNE, "--out", TOO_LONG], "that name is 300 bytes, and the file system allows at most"),
    (["eval-ppl", "--model", "{W}/model", "--json", f"{{W}}/{TOO_LONG}.json"], "that name is 305 bytes"),
    (["analyze", "--model", "{W}/model", "--plan", f"{{W}}/{TOO_LONG}.json", "--out", "{W}/a"],
     "that name is 305 bytes"),
    # data read and judged before loading, with the line that is wrong
    ([*ZEROSHOT[:-1], "{W}/piqa"], "valid.jsonl: line 2 is not valid JSON"),
    ([*PRUNE, "--calib", "{W}/empty.txt", "--out", "{W}/o"], "--calib {W}/empty.txt holds no text"),
    ([*PRUNE, "--calib", "{W}/binary.txt", "--out", "{W}/o"], "binary.txt as calibration text ('utf-8' codec"),
    ([*PRUNE, "--calib", "{W}/bad.jsonl", "--out", "{W}/o"], "line 2 column 2"),
    (["prune", "--model", "{W}/model", "--ratio", "0.34", "--calib-samples", "100000000", "--seq-len", "32",
      "--out", "{W}/o"], "cannot hold 100000000 windows of 32 tokens"),
    (["heal", "--model", "{W}/model", "--data", "{W}/empty.txt", "--cutoff-len", "16", "--out", "{W}/h"],
     "empty.txt holds no text to train on"),
    (["heal", "--model", "{W}/model", "--data", "{W}/alpaca_bad.jsonl", "--cutoff-len", "16", "--out", "{W}/h"],
     "line 2 column 2"),
    # depths and ranges judged against the config's layer count before loading
    (["prune", "--model", "{W}/model", "--remove-layers", str(LAYERS), *FAST, "--out", "{W}/o"],
     f"cannot remove {LAYERS} of {LAYERS} layers"),
    (["prune", "--model", "{W}/model", "--keep-layers", str(LAYERS + 1), *FAST, "--out", "{W}/o"],
     f"nothing to remove: the model has {LAYERS} layers"),
    (["prune", "--model", "{W}/model", "--method", "angular", "--block", str(LAYERS), *FAST, "--out", "{W}/o"],
     f"--block must be between 1 and {LAYERS - 1}, got {LAYERS}"),
    ([*PRUNE, "--method", "laco", "--highest", "10", "--out", "{W}/o"], "LaCo layer range [1, 10]"),
    (["width", "--model", "{W}/model", "--ratio-mlp", "0.001", *FAST, "--out", "{W}/o"],
     "--ratio-mlp 0.001 removes nothing"),
    ([*PRUNE, "--then-width", "0.001", "--out", "{W}/o"], "--then-width 0.001 removes nothing"),
    # plans: whole layer numbers, known operators, the model's depth, for every consumer
    (["export", "mergekit", "{W}/plan_float.json", "--base-model", "x/y"], f"remove holds {LAYERS - 3.3}"),
    (["export", "mergekit", "{W}/plan_bool.json", "--base-model", "x/y"], "remove holds True"),
    (["export", "mergekit", "{W}/plan_other.json", "--base-model", "{W}/model"],
     f"made for a model of {LAYERS + 6} layers but --base-model {{W}}/model has {LAYERS}"),
    (["analyze", "--model", "{W}/model", "--plan", "{W}/plan_operator.json", "--out", "{W}/a"],
     "unknown merge operator 'bogus'"),
    (["export", "mergekit", "{W}/plan_operator.json"], "unknown merge operator 'bogus'"),
    # options that would do nothing
    ([*PRUNE, "--ridge", "0.1", "--out", "{W}/o"], "--ridge needs --compensate"),
    ([*PRUNE, "--heal-distill", "--out", "{W}/o"], "--heal-distill needs --heal"),
    ([*PRUNE, "--ppl-windows", "5", "--out", "{W}/o"], "--ppl-windows needs ppl, kl or top1 in --eval"),
    ([*HEAL, "--temperature", "2"], "--temperature needs --distill"),
    ([*PRUNE, "--push-to-hub", "", "--out", "{W}/o"], "--push-to-hub is empty"),
    (["prune", "--model", "{W}/model", "--method", "laco", "--ratio", "0.34", "--calib-sentences",
      "{W}/sentences.txt", "--calib-samples", "5", "--out", "{W}/o"], "--calib-samples is not used with"),
    (["bench", "--model", "{W}/model", "--methods", "shortgpt", "--ridge", "0.1", "--out", "{W}/b"],
     "--ridge needs a fit in --compensate"),
    # usage errors are one line too, and messages name the option typed
    ([*PRUNE[:4], "abc", "--out", "{W}/o"], "Invalid value for '--ratio'"),
    (["eval-ppl", "--nope"], "No such option: --nope"),
    ([*PRUNE, "--out"], "'--out' requires an argument"),
    (["export", "hub", "{W}/model", "--repo", "bad repo!!"], "error: --repo 'bad repo!!' is not a valid Hub"),
]
# issue 26: inputs resolved through links before the overlap checks, for every command
LINKED = "would replace {W}/p/model.safetensors, which the input {W}/linked reads"
CASES += [
    (["prune", "--model", "{W}/linked", "--ratio", "0.34", *FAST, "--out", "{W}/p", "--overwrite"], LINKED),
    (["score", "--model", "{W}/linked", *FAST, "--out", "{W}/p"], LINKED),
    (["heal", "--model", "{W}/linked", "--data", str(EMMA), "--out", "{W}/p", "--overwrite"], LINKED),
    (["eval-ppl", "--model", "{W}/linked", "--json", "{W}/gen.json"],
     "would replace {W}/gen.json, which the input {W}/linked reads"),
]
# issue 26: config.json judged against the safetensors headers and the tokenizer, before loading
CASES += [
    (["eval-ppl", "--model", "{W}/wide"], "config.json's hidden_size 96 implies model.embed_tokens.weight of "
     "shape [259, 96], but the weights hold [259, 64]"),
    ([*PRUNE[:1], "--model", "{W}/vocab", *PRUNE[3:], "--out", "{W}/o"],
     "config.json's vocab_size 300 implies model.embed_tokens.weight of shape [300, 64], but the weights hold"),
    (["score", "--model", "{W}/mlp"], "config.json's intermediate_size 96 implies model.layers.0.mlp.gate_proj"),
    ([*PRUNE[:1], "--model", "{W}/eps", *PRUNE[3:], "--out", "{W}/o"],
     "gives rms_norm_eps nan, which is not a finite number"),
    (["eval-ppl", "--model", "{W}/rope"], "gives rope_parameters rope type 'bogus', which transformers does not"),
    (["eval-ppl", "--model", "{W}/oldrope"], "gives rope_scaling rope type 'warp', which transformers does not"),
    (["heal", "--model", "{W}/act", "--data", str(EMMA), "--out", "{W}/h"],
     "gives hidden_act 'sparkle', which is not an activation transformers knows"),
    (["eval-ppl", "--model", "{W}/tokens"], "the tokenizer has 259 tokens but the embedding "
     "(model.embed_tokens.weight) has only 200 rows"),
    (["eval-ppl", "--model", "{W}/notok"], "{W}/notok has no tokenizer"),
    (["eval-speed", "--model", "{W}/model", "--baseline", "{W}/notok"], "{W}/notok has no tokenizer"),
]
# issue 26: paths that cannot be resolved
CASES += [([*PRUNE, "--out", "{W}/loopA/x"], "--out {W}/loopA/x cannot be resolved"),
          (["eval-ppl", "--model", "{W}/model", "--json", "{W}/loopB/r.json"], "--json {W}/loopB/r.json cannot be")]
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

    for where in ("depthprune.models.load.load_model", "depthprune.bench.runner.load_model"):
        monkeypatch.setattr(where, no_loading)
    before = snapshot(world)
    res = run_cli(*_args(args, world), check=False)
    assert res.code == 2, res.err
    lines = [line for line in res.err.splitlines() if line.strip() and not line.startswith("loading ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.err
    assert message.replace("{W}", str(world)) in lines[0]
    assert "upgrade" not in lines[0] and "Traceback" not in res.err
    assert snapshot(world) == before


def _dead_process_temporary(parent: Path, name: str) -> Path:
    """A marked temporary for ``name`` made by a process that has exited (what SIGKILL leaves)."""
    code = ("from pathlib import Path; from depthprune.io import make_temporary; "
            f"print(make_temporary(Path({str(parent)!r}), {name!r}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return Path(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                               text=True).stdout.strip())


def test_only_marked_temporaries_of_dead_processes_are_removed(world, run_cli):
    """A user's files named like temporaries stay; a marked temporary a killed run left for the same output
    goes."""
    leftover = _dead_process_temporary(world, "victim")
    other = _dead_process_temporary(world, "other-output")
    before = {name: snapshot(world)[name] for name in snapshot(world) if name.startswith(".victim.")
              and not name.startswith(leftover.name)}
    run_cli(*_args(PRUNE, world), "--out", world / "victim", "-q")
    assert not leftover.exists() and other.exists()
    after = snapshot(world)
    assert {name: after.get(name) for name in before} == before
    assert sorted(p.name for p in world.iterdir() if p.name.startswith(".victim.")) == [
        ".victim.99997.abc123.tmp", ".victim.old-99998-x", ".victim.tmp-99999-mine"]
    assert (world / "victim" / "model.safetensors").is_file()
    assert not (world / "victim" / ".depthprune-temporary").exists()


def test_a_renamed_or_added_to_leftover_is_kept(world, run_cli):
    """Issue 26: a leftover the user renamed (``.victim-rescued``), or one they put a file of theirs in, is no
    longer a temporary to clean up, even though its marker says it was one."""
    renamed = world / ".victim-rescued"
    _dead_process_temporary(world, "victim").rename(renamed)
    (renamed / "notes.txt").write_text("mine")
    added_to = _dead_process_temporary(world, "victim")
    (added_to / "notes.txt").write_text("mine")
    plain = _dead_process_temporary(world, "victim")
    (plain / "config.json").write_text("{}")
    kept = {name: digest for name, digest in snapshot(world).items() if name.startswith(
        (renamed.name, added_to.name))}
    run_cli(*_args(PRUNE, world), "--out", world / "victim", "-q")
    assert not plain.exists()
    assert {name: digest for name, digest in snapshot(world).items() if name.startswith(
        (renamed.name, added_to.name))} == kept


def test_temporaries_of_a_name_near_the_limit_fit(world, run_cli):
    out = world / ("y" * 250)
    run_cli(*_args(PRUNE, world), "--out", out, "-q")
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in world.iterdir() if p.name.startswith(".yyy")] == []

    from depthprune.io import TEMPORARY_MARKER, make_temporary

    temporary = make_temporary(world, "z" * 255)
    assert len(temporary.name.encode()) <= 255
    assert json.loads((temporary / TEMPORARY_MARKER).read_text())["temporary_for"] == "z" * 255


def test_a_broken_model_is_never_saved(world):
    """Every checkpoint is verified before it is committed: finite weights, the config's depth = the weights'."""
    import torch

    from depthprune import save
    from depthprune.io import CheckpointError
    from tiny import byte_tokenizer, tiny_model

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="1 weight tensors hold NaN or infinite values "
                                              r"\(model.layers.2.mlp.down_proj.weight\)"):
        save(model, byte_tokenizer(), world / "nan")
    model = tiny_model("llama")
    model.config.num_hidden_layers = LAYERS + 1
    with pytest.raises(Exception, match=f"declares {LAYERS + 1} layers but the weights lack every tensor of "
                                        f"layer {LAYERS}"):
        save(model, byte_tokenizer(), world / "deeper")
    assert not (world / "nan").exists() and not (world / "deeper").exists()
    assert [p.name for p in world.iterdir() if p.name.startswith((".nan", ".deeper"))] == []


@pytest.mark.parametrize("command", [[*PRUNE, "--out", "{W}/o"], [*PRUNE, "--stream", "--out", "{W}/o"],
                                     ["eval-ppl", "--model", "{W}/model", "--max-windows", "2", "--json", "{W}/r.json"]],
                         ids=["prune", "prune-stream", "eval-ppl"])
def test_non_finite_input_weights_are_named(command, world, run_cli):
    """Issue 26: a NaN in one input weight is refused naming the input's tensor, on the in-memory and the
    streamed path, before any score or perplexity (which would be NaN) is printed or written."""
    from safetensors.torch import load_file, save_file

    weights = world / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    before = snapshot(world)
    res = run_cli(*_args(command, world), "-q", check=False)
    lines = [line for line in res.err.splitlines() if line.strip() and not line.startswith(("loading ", "streaming "))]
    assert res.code == 2 and len(lines) == 1, res.err
    assert "1 weight tensors hold NaN or infinite values (model.layers.2.mlp.down_proj.weight)" in lines[0]
    assert "nan" not in res.out.lower() and snapshot(world) == before


def test_no_nan_result_is_reported():
    """Scores, perplexities and JSON results that are NaN are errors (exit 2), never answers."""
    import torch

    from depthprune import Target, make_plan
    from depthprune.errors import InputError
    from depthprune.evaluate.perplexity import perplexity_on
    from depthprune.io import write_result
    from tiny import tiny_calibration, tiny_model

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
        model.model.layers[0].input_layernorm.weight.fill_(float("nan"))
    with pytest.raises(InputError, match="layer scores is not a finite number"):
        make_plan("shortgpt", model, tiny_calibration(), Target(remove=2), progress=False)
    with pytest.raises(InputError, match="the perplexity is not a finite number"):
        perplexity_on(model, tiny_calibration(), progress=False)
    with pytest.raises(InputError, match=r"not a finite number \(kl NaN"):
        write_result(Path("never.json"), {"ppl": 3.0, "kl": float("nan")})
    assert not Path("never.json").exists()


def test_a_full_disk_is_one_line_and_the_old_output_stays(world, run_cli, monkeypatch):
    """Issue 26: ENOSPC while writing the checkpoint: one line naming the output, the temporary removed, the
    checkpoint that was there before byte for byte intact."""
    run_cli(*_args(PRUNE, world), "--out", world / "full", "-q")
    before = snapshot(world)

    def full(directory, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "depthprune_plan.json"))

    monkeypatch.setattr("depthprune.job.write_beside", full)
    res = run_cli(*_args(PRUNE, world), "--out", world / "full", "--overwrite", "-q", check=False)
    lines = [line for line in res.err.splitlines() if line.strip() and not line.startswith("loading ")]
    assert res.code == 2 and len(lines) == 1, res.err
    assert lines[0].startswith(f"error: cannot write {world / 'full'}: no space left on device"), lines[0]
    assert snapshot(world) == before


def test_ctrl_c_is_one_line(world, run_cli, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("depthprune.job.write_beside", interrupted)
    res = run_cli(*_args(PRUNE, world), "--out", world / "o2", "-q", check=False)
    lines = [line for line in res.err.splitlines() if line.strip() and not line.startswith("loading ")]
    assert res.code == 130 and lines == ["interrupted: nothing half-written was left at the output"], res.err
    assert not (world / "o2").exists() and _leftovers(world, "o2") == []


def test_reference_cache_parents_are_created(world, run_cli):
    """The docs promise missing parent folders of an output are created: --reference-cache too (issue 26)."""
    cache = world / "new" / "deeper" / "ref.safetensors"
    run_cli("eval-ppl", "--model", world / "model", "--reference", world / "other", "--reference-cache", cache,
            "--seq-len", "32", "--max-windows", "2", "-q")
    assert cache.is_file()


def test_resume_skips_a_checkpoint_cut_off_while_written(tmp_path):
    """Issue 26: SIGTERM during checkpointing leaves ``checkpoint-2/`` with only a README; ``--resume`` takes
    ``checkpoint-1``, the last one written to the end."""
    from depthprune.heal.train import last_complete_checkpoint

    for step, files in [(1, ["trainer_state.json", "adapter_model.safetensors"]), (2, ["README.md"]),
                        (10, [])]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        for name in files:
            (tmp_path / f"checkpoint-{step}" / name).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")
    assert last_complete_checkpoint(tmp_path / "absent") is None


def test_streamed_and_in_memory_agree_on_a_tied_head_over_a_stored_one(tmp_path):
    """Issue 26: ``tie_word_embeddings: true`` over a stored, different ``lm_head``: both paths use the stored
    head (transformers' rule) and say so in the config, so they give the same perplexity."""
    from depthprune import load_model
    from depthprune.backend.streamed import load_streamed
    from depthprune.evaluate.perplexity import perplexity_on
    from tiny import byte_tokenizer, tiny_calibration, tiny_config
    import transformers as tf

    config = tiny_config("llama", vocab_size=len(byte_tokenizer()))
    config.tie_word_embeddings = False
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    stored = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**stored, "tie_word_embeddings": True}))
    memory = load_model(str(tmp_path / "m"), progress=False)
    streamed = load_streamed(str(tmp_path / "m"), progress=False)
    windows = tiny_calibration(seq=16)
    assert perplexity_on(memory.model, windows, progress=False).perplexity == pytest.approx(
        perplexity_on(streamed, windows, progress=False).perplexity, rel=1e-5)
    assert memory.model.config.tie_word_embeddings is False and streamed.model.config.tie_word_embeddings is False


@pytest.mark.parametrize("family, warned", [("gemma3", True), ("llama", False)])
def test_mergekit_export_warns_about_per_layer_config_lists(family, warned, tmp_path, run_cli):
    """Issue 26: mergekit copies Gemma-3's layer_types unshortened; the export says so in one line."""
    base = save_tiny_checkpoint(tmp_path / family, family=family)
    (tmp_path / "plan.json").write_text(Plan("shortgpt", LAYERS, remove=[1]).to_json())
    res = run_cli("export", "mergekit", tmp_path / "plan.json", "--base-model", base)
    lines = [line for line in res.err.splitlines() if line.strip()]
    if warned:
        assert len(lines) == 1 and lines[0].startswith("warning: mergekit does not shorten the per-layer config "
                                                       f"field layer_types: its output keeps {LAYERS} entries for "
                                                       f"{LAYERS - 1} layers"), res.err
    else:
        assert lines == [], res.err
    assert "merge_method: passthrough" in res.out


def test_a_tensor_transformers_would_initialise_is_refused(world):
    """A missing tensor outside the layers (the final norm) gets past the header checks; loading names it."""
    from safetensors.torch import load_file, save_file

    from depthprune import load_model
    from depthprune.models.load import ModelLoadError

    weights = world / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.norm.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lacks 1 weight tensors its config needs \\(model.norm.weight\\)"):
        load_model(str(world / "model"), progress=False)


def test_bare_command_prints_help(run_cli):
    res = run_cli()
    assert res.code == 0 and "Usage: depthprune" in res.out and res.err == ""


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
    assert json.loads(result.read_text())["windows"] == 3 * 3 and "written_by" in json.loads(result.read_text())


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
    loading = f"loading {world / 'model'} on cpu (float32) ..."
    assert [line for line in res.err.splitlines() if line.strip()] == [loading]


SLOW_SAVE = textwrap.dedent("""
    import sys, time
    import depthprune.io as io
    real = io.write_beside

    def slow(directory, *args, **kwargs):
        real(directory, *args, **kwargs)
        print("WRITTEN", flush=True)
        time.sleep(60)

    io.write_beside = slow
    import depthprune.job
    depthprune.job.write_beside = slow
    from depthprune.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _start_slow_prune(world: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
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
    assert [line for line in res.err.splitlines() if line.strip()] == [f"loading {smollm2_path} on cpu (float32) ..."]
    assert "piqa_local" in res.out
