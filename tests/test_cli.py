"""The command line: happy paths on the real model and every bad input's message."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest



def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "depthprune.cli", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "prune" in proc.stdout


def test_help_explains_commands(run_cli):
    out = run_cli("--help").stdout
    for command in ("score", "prune", "eval-ppl", "run"):
        assert command in out
    assert "--ratio" in run_cli("prune", "--help").stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "--ratio", "1.5", "--out", "X"], "between 0 and 1"),
        (["prune", "--ratio", "0", "--out", "X"], "between 0 and 1"),
        (["prune", "--method", "nope", "--ratio", "0.2", "--out", "X"], "unknown method"),
        (["prune", "--ratio", "0.2"], "--out is required"),
        (["prune", "--ratio", "0.2", "--keep-layers", "3", "--out", "X"], "only one"),
        (["score", "--metric", "nope"], "unknown metric"),
        (["prune", "--model", "/no/such/model", "--ratio", "0.2", "--out", "X"], "not found"),
        (["prune", "--model", "missing.gguf", "--ratio", "0.2", "--out", "X"], "GGUF file not found"),
        (["prune", "--ratio", "0.2", "--then-width", "1.5", "--out", "X"], "must be in [0, 1)"),
        (["prune", "--method", "shortgpt", "--ratio", "0.2", "--threshold", "0.5", "--out", "X"],
         "does not take --threshold"),
        (["prune", "--method", "slm", "--block", "3", "--out", "X"], "does not take --block"),
        (["prune", "--method", "slm", "--operator", "magic", "--out", "X"], "must be one of"),
        (["prune", "--ratio", "0.2", "--no-such-flag", "--out", "X"], "no such option --no-such-flag"),
        (["prune", "--method", "laco", "--merge-layers", "x", "--out", "X"], "takes a int"),
        (["prune", "--ratio", "0.2", "--then-width", "0.2", "--width-scorer", "x", "--out", "X"], "unknown width scorer"),
        (["prune", "--ratio", "0.2", "--heal", "/no/such.txt", "--out", "X"], "healing data file not found"),
        (["prune", "--method", "slm", "--threshold", "1.5", "--out", "X"], "between 0 and 1"),
        (["analyze", "--kernel", "poly"], "unknown kernel"),
    ],
)
def test_bad_input_messages(args, message, tmp_path, run_cli):
    args = [str(tmp_path / "out") if a == "X" else a for a in args]
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_score_prune_and_errors_on_real_model(smollm2_path, tmp_path, run_cli):
    scores_dir = tmp_path / "scores"
    run_cli("score", "--model", smollm2_path, "--metric", "angular", "--calib-samples", "4", "--out",
            str(scores_dir), "-q")
    data = json.loads((scores_dir / "scores.json").read_text())
    assert data["metric"] == "angular" and len(data["scores"]) == 30
    assert (scores_dir / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = tmp_path / "pruned"
    from conftest import PIQA_DIR

    proc = run_cli("prune", "--model", smollm2_path, "--method", "angular", "--block", "4", "--calib-samples",
                   "4", "--out", str(out), "--eval", "ppl,piqa", "--piqa-dir", str(PIQA_DIR), "--limit", "10",
                   "--ppl-windows", "2", "-q")
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) == {"perplexity", "piqa_local", "perplexity/fiction", "perplexity/encyclopedic",
                                      "perplexity/code"}
    assert report["after"]["perplexity"] > report["before"]["perplexity"]
    assert "| piqa_local" in (out / "report.md").read_text()
    assert "piqa_local:" in proc.stdout
    assert report["stages"][0]["stage"] == "depth" and report["layers"] == {"before": 30, "after": 26}
    plan = json.loads((out / "depthprune_plan.json").read_text())
    assert plan["method"] == "angular" and len(plan["remove"]) == 4 and plan["num_layers_after"] == 26
    assert plan["remove"] == list(range(plan["remove"][0], plan["remove"][0] + 4))
    assert "saved to" in proc.stdout

    again = run_cli("prune", "--model", smollm2_path, "--remove-layers", "2", "--out", str(out), check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    into_input = run_cli("prune", "--model", str(out), "--remove-layers", "2", "--out", str(out),
                         "--overwrite", check=False)
    assert into_input.returncode == 2 and "overlaps the input" in into_input.stderr
    for command in ("score", "analyze"):
        refused = run_cli(command, "--model", str(out), "--out", str(out / "scores"), check=False)
        assert refused.returncode == 2 and "overlaps the input" in refused.stderr, command
    too_many = run_cli("prune", "--model", str(out), "--remove-layers", "26", "--out", str(tmp_path / "x"),
                       check=False)
    assert too_many.returncode == 2 and "at least one layer must remain" in too_many.stderr

    ppl = run_cli("eval-ppl", "--model", str(out), "--dataset", "default-heldout", "--max-windows", "4",
                  "--json", str(tmp_path / "ppl.json"), "-q")
    assert "perplexity" in ppl.stdout
    assert json.loads((tmp_path / "ppl.json").read_text())["windows"] == 4
