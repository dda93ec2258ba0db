"""Streaming through the job runner and the command line: same plans, files and numbers as in memory; what needs
the model in memory is refused before any work; peak memory does not grow with depth."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PIQA_DIR, ROOT
from depthprune import DepthStage, Job, Target, load_model, make_plan, run_job
from depthprune.backend import NeedsMemoryError, load_streamed
from depthprune.data.calibration import sample_windows
from test_streaming import tensors_of
from tiny import save_tiny_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("job") / "model", "gemma3", layers=8))


@pytest.mark.parametrize("method, target, options", [
    ("shortgpt", Target(ratio=0.25), {}),
    ("shortgpt", Target(remove=3), {"metric": "angular"}),
    ("angular", Target(keep=5), {}),
    ("angular", None, {"block": 2}),
    ("sleb", Target(remove=3), {}),
    ("sleb", Target(ratio=0.25), {"objective": "kl", "protect_first": 1}),
    ("slm", Target(remove=3), {}),
    ("slm", None, {"threshold": 0.9, "operator": "average"}),
    ("laco", Target(remove=3), {"merge_layers": 3, "interval": 1}),
])
@pytest.mark.parametrize("max_memory", [None, 1000])
def test_streamed_plan_equals_make_plan(method, target, options, max_memory, model_dir, tmp_path):
    """Same plan as in memory, with the states in memory or spilled to disk (``max_memory`` 1 kB)."""
    loaded = load_model(model_dir, progress=False)
    cal = sample_windows(loaded.tokenizer, num_windows=5, seq_len=24)
    cal.attention_mask[1, -4:] = 0
    expected = make_plan(method, loaded.model, cal, target, progress=False, batch_size=2, **options)
    told = []
    streamed = load_streamed(model_dir, progress=False, max_memory=max_memory, scratch=tmp_path, report=told.append)
    got = make_plan(method, streamed, cal, target, progress=False, batch_size=2, **options)
    assert got.to_dict() == expected.to_dict()
    assert ("spilled to disk" in told[0]) == (max_memory is not None)
    assert not list(tmp_path.iterdir())


COMMON = ["--calib-samples", "4", "--seq-len", "24", "-q"]


def _without_timings(record):
    """A run record without its wall-clock times."""
    if isinstance(record, dict):
        return {k: _without_timings(v) for k, v in record.items() if not k.endswith("seconds")}
    if isinstance(record, list):
        return [_without_timings(v) for v in record]
    return record


@pytest.mark.parametrize("method, extra", [
    ("shortgpt", ["--eval", "ppl,kl,top1"]),
    ("sleb", []),
    ("laco", []),
    ("angular", ["--compensate", "linear", "--compensate-tokens", "200"]),
    ("auto", []),
])
def test_prune_stream_equals_in_memory(method, extra, model_dir, tmp_path, run_cli):
    """Same plan (compensation fits included), same tensors, same perplexities (and kl/top1 against the dense
    model's cached distributions); the report says it was streamed."""
    args = ["prune", "--model", model_dir, "--method", method, "--ratio", "0.3", "--eval", "ppl",
            "--ppl-windows", "3", *extra, *COMMON]
    run_cli(*args, "--out", tmp_path / "memory", "--no-stream")
    proc = run_cli(*args, "--out", tmp_path / "streamed", "--stream", "--max-memory", "1kB")
    assert f"{method}: 8 -> " in proc.stdout
    memory, streamed = (json.loads((tmp_path / d / "depthprune_plan.json").read_text()) for d in ("memory", "streamed"))
    assert streamed == memory
    runs = [_without_timings(json.loads((tmp_path / d / "depthprune_run.json").read_text())) for d in ("memory", "streamed")]
    assert runs[1]["stages"][0].pop("streamed") is True and runs[1] == runs[0]
    expected, got = tensors_of(tmp_path / "memory"), tensors_of(tmp_path / "streamed")
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in expected)
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("memory", "streamed")]
    assert reports[1]["metrics"] == reports[0]["metrics"]
    assert reports[1]["metrics"]["perplexity"]["after"] > 0
    if "kl" in reports[0]["metrics"]:
        assert reports[1]["metrics"]["kl"]["after"] > 0 and reports[1]["metrics"]["top1"]["after"] < 1
    assert reports[1]["layers"] == reports[0]["layers"] and reports[1]["parameters"] == reports[0]["parameters"]
    assert reports[1]["settings"]["streaming"]["max_memory"] == 1000
    assert reports[1]["stages"][0]["streamed"] is True
    names = sorted(p.name for p in (tmp_path / "streamed").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "memory").iterdir())
    assert not any(n.startswith(".depthprune-work") for n in names)


def test_streaming_is_chosen_when_the_weights_do_not_fit(model_dir, tmp_path, run_cli):
    proc = run_cli("prune", "--model", model_dir, "--ratio", "0.25", "--out", tmp_path / "auto", "--max-memory",
                   "100kB", *COMMON)
    assert "streaming chosen: the weights take" in proc.stderr and "--max-memory" in proc.stderr
    assert json.loads((tmp_path / "auto" / "report.json").read_text())["stages"][0].get("streamed") is True
    proc = run_cli("prune", "--model", model_dir, "--ratio", "0.25", "--out", tmp_path / "fits", "--max-memory",
                   "1GB", *COMMON)
    assert "streaming" not in proc.stderr
    assert "streamed" not in json.loads((tmp_path / "fits" / "report.json").read_text())["stages"][0]


REFUSED = [
    (["--method", "shortgpt", "--ratio", "0.25", "--compensate", "kl"], "--compensate kl needs the model in memory"),
    (["--ratio", "0.25", "--then-width", "0.2"], "--then-width (width pruning) needs the model in memory"),
    (["--ratio", "0.25", "--eval", "ppl,piqa_local", "--piqa-dir", str(PIQA_DIR)],
     "lm-eval tasks in --eval needs the model in memory"),
]


@pytest.mark.parametrize("extra, message, how", [
    *[(extra, message, ["--stream"]) for extra, message in REFUSED],
    *[(extra, message, ["--max-memory", "10kB"]) for extra, message in REFUSED],
    (["--ratio", "0.25", "--stream", "--max-memory", "lots"], "give a size such as 8GB", []),
])
def test_what_streaming_cannot_do_is_refused_before_work(extra, message, how, model_dir, tmp_path, run_cli):
    """With --stream, or when streaming is chosen because the weights exceed --max-memory."""
    proc = run_cli("prune", "--model", model_dir, "--out", tmp_path / "out", *extra, *how, check=False)
    assert proc.returncode == 2, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and message in error[0]
    assert not (tmp_path / "out").exists()


def test_only_the_kl_compensation_is_refused():
    from depthprune.compensate import Compensation

    Job([DepthStage("shortgpt", Target(ratio=0.25), compensation=Compensation("cosine"))]).check_backend("streamed")
    job = Job([DepthStage("shortgpt", Target(ratio=0.25), compensation=Compensation("kl"))])
    job.check_backend("in-memory")
    with pytest.raises(NeedsMemoryError, match="--compensate kl needs the model in memory"):
        job.check_backend("streamed")


def test_heal_and_width_stages_are_refused():
    from depthprune import HealStage, WidthStage

    job = Job([DepthStage("shortgpt", Target(ratio=0.2)), WidthStage(), HealStage(str(ROOT / "README.md"))])
    with pytest.raises(NeedsMemoryError, match=r"--then-width \(width pruning\), --heal \(healing\) need the model"):
        job.check_backend("streamed")


def test_score_and_analyze_stream_equal_in_memory(model_dir, tmp_path, run_cli):
    for metric in ("bi", "angular"):
        run_cli("score", "--model", model_dir, "--metric", metric, "--out", tmp_path / f"m-{metric}", *COMMON)
        run_cli("score", "--model", model_dir, "--metric", metric, "--out", tmp_path / f"s-{metric}", "--stream",
                *COMMON)
        memory, streamed = (json.loads((tmp_path / f"{w}-{metric}" / "scores.json").read_text())["scores"]
                            for w in "ms")
        assert streamed == memory
    run_cli("analyze", "--model", model_dir, "--out", tmp_path / "cka-m", *COMMON)
    run_cli("analyze", "--model", model_dir, "--out", tmp_path / "cka-s", "--stream", "--max-memory", "1", *COMMON)
    assert np.array_equal(np.load(tmp_path / "cka-s" / "cka.npy"), np.load(tmp_path / "cka-m" / "cka.npy"),
                          equal_nan=True)


def test_streamed_prune_leaves_nothing_when_interrupted(model_dir, tmp_path, monkeypatch):
    """An error during streamed surgery leaves no output and no temporary directory."""
    from depthprune.surgery import streamed as streamed_surgery

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(streamed_surgery, "write_pruned_checkpoint", explode)
    with pytest.raises(KeyboardInterrupt):
        run_job(load_streamed(model_dir, progress=False), Job([DepthStage("shortgpt", Target(ratio=0.25))],
                                                              progress=False), out=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    from depthprune.data.calibration import sample_windows
    path, mode = sys.argv[1], sys.argv[2]
    if mode == "stream":
        from depthprune import score_layers
        from depthprune.backend import load_streamed
        sm = load_streamed(path, progress=False)
        cal = sample_windows(sm.tokenizer, num_windows=4, seq_len=64)
        base = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
        score_layers(sm, cal, batch_size=4, progress=False)
    else:
        from depthprune import load_model, score_layers
        from depthprune.models.load import resolve_device
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
        cal = sample_windows(tok, num_windows=4, seq_len=64)
        base = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
        model, _ = load_model(path, progress=False)
        score_layers(model, cal, batch_size=4, progress=False)
    print(json.dumps({"extra_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base}))
""")


def _peak_mb(path: Path, mode: str) -> float:
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), mode], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra_mb"]


def test_streamed_scoring_peak_does_not_grow_with_depth(tmp_path):
    """Peak RSS of streamed scoring on a 4- and a 16-layer model (17 MB per layer) in fresh processes: streaming
    stays within a layer of itself, while the in-memory path (the control) grows by the 12 extra layers."""
    import transformers as tf

    from depthprune.models.load import quiet_transformers
    from tiny import byte_tokenizer

    paths = {}
    for layers in (4, 16):
        config = tf.LlamaConfig(vocab_size=259, hidden_size=512, intermediate_size=2048, num_hidden_layers=layers,
                                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128)
        torch.manual_seed(0)
        with quiet_transformers():
            tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / f"l{layers}")
        byte_tokenizer().save_pretrained(tmp_path / f"l{layers}")
        paths[layers] = tmp_path / f"l{layers}"
    layer_mb = (4 * 512 * 512 + 3 * 512 * 2048) * 4 / 2**20
    stream_4, stream_16 = _peak_mb(paths[4], "stream"), _peak_mb(paths[16], "stream")
    memory_16 = _peak_mb(paths[16], "memory")
    assert stream_16 - stream_4 < layer_mb, (stream_4, stream_16)
    assert memory_16 - stream_16 > 10 * layer_mb, (memory_16, stream_16)
