"""KL(dense || model) and top-1 agreement from a reference cache: equal to a direct full-logits computation,
top-k a lower bound, files reusable and checked; `--eval kl,top1` in jobs, reports, bench and eval-ppl."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from depthprune import CalibrationSpec, Evaluation, Job, PerplexitySpec, Plan, apply_plan, load_model, run_job
from depthprune.data.calibration import Calibration
from depthprune.evaluate.divergence import (
    DistributionCache,
    DivergenceError,
    build_reference,
    kl_per_token,
    measure_divergence,
    rows_from_logits,
)
from depthprune.evaluate.suite import DivergenceSpec
from tiny import VOCAB, save_tiny_checkpoint, shipped_text, tiny_model



def _windows(prefix: list[int] | None = None) -> Calibration:
    """Six windows of 12 tokens, the last two right-padded, optionally led by a special prefix."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (6, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[4, 9:] = 0
    mask[5, 5:] = 0
    if prefix:
        ids[:, : len(prefix)] = torch.tensor(prefix)
    return Calibration(ids, mask, {"source": "random", "seq_len": 12, "special_prefix": prefix or [],
                                   "num_windows": 6})


def _direct(reference, model, windows: Calibration) -> tuple[float, float]:
    """Mean KL(reference || model) and top-1 agreement from both models' full logits, position by position."""
    first = max(1, len(windows.description["special_prefix"]))
    with torch.no_grad():
        p = reference(input_ids=windows.input_ids, attention_mask=windows.attention_mask).logits[:, first - 1 : -1]
        q = model(input_ids=windows.input_ids, attention_mask=windows.attention_mask).logits[:, first - 1 : -1]
    valid = windows.attention_mask[:, first:].bool()
    p, q = p[valid].double(), q[valid].double()
    kl = F.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="sum") / valid.sum()
    return float(kl), float((p.argmax(-1) == q.argmax(-1)).double().mean())


@pytest.mark.parametrize("prefix", [None, [1]])
def test_exact_cache_equals_full_logits_and_top_k_is_a_lower_bound(prefix):
    dense, pruned = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    apply_plan(pruned, Plan("manual", 6, remove=[2, 3]))
    windows = _windows(prefix)
    kl, top1 = _direct(dense, pruned, windows)
    assert kl > 1e-3 and top1 < 1

    exact = build_reference(dense, windows, progress=False, batch_size=4)
    assert not exact.approximate and len(exact) == int(windows.attention_mask[:, max(1, len(prefix or [])):].sum())
    result, ppl = measure_divergence(pruned, windows, exact, batch_size=3, chunk_tokens=7, progress=False)
    assert result.kl == pytest.approx(kl, rel=1e-5) and result.top1 == top1
    assert not result.approximate and result.note == ""
    from depthprune.evaluate.perplexity import perplexity_on

    assert ppl.perplexity == pytest.approx(perplexity_on(pruned, windows, progress=False).perplexity, rel=1e-6)
    self_kl, _ = measure_divergence(dense, windows, exact, progress=False)
    assert self_kl.kl == 0 and self_kl.top1 == 1

    previous = 0.0
    for k in (1, 8, 64):
        top = build_reference(dense, windows, top_k=k, exact_budget_mb=0, progress=False)
        assert top.approximate and top.top_k == k
        bound, _ = measure_divergence(pruned, windows, top, batch_size=4, progress=False)
        assert previous <= bound.kl < kl, (k, bound.kl, kl)
        assert bound.top1 == top1 and bound.approximate and "lower bound" in bound.note
        previous = bound.kl
    whole = build_reference(dense, windows, top_k=VOCAB - 1, exact_budget_mb=0, progress=False)
    assert whole.approximate
    full_k = rows_from_logits(torch.randn(5, VOCAB), top_k=VOCAB)
    assert torch.isneginf(full_k.rest).all()


def test_top_k_rows_with_k_equal_to_the_vocabulary_give_the_exact_kl():
    torch.manual_seed(0)
    p, q = torch.randn(9, 30), torch.randn(9, 30)
    log_q = q.log_softmax(-1)
    exact = kl_per_token(log_q, rows_from_logits(p))
    torch.testing.assert_close(kl_per_token(log_q, rows_from_logits(p, top_k=30)), exact)
    torch.testing.assert_close(exact, F.kl_div(log_q, p.log_softmax(-1), log_target=True, reduction="none").sum(-1))
    assert (kl_per_token(log_q, rows_from_logits(p, top_k=5)) <= exact + 1e-6).all()


def test_cache_file_round_trip_and_mismatches(tmp_path):
    dense = tiny_model("llama")
    windows = _windows()
    for top_k, budget in ((None, 1024), (16, 0)):
        cache = build_reference(dense, windows, source="dense", progress=False,
                                **({"top_k": top_k, "exact_budget_mb": budget} if top_k else {}))
        path = cache.save(tmp_path / f"ref-{top_k}.safetensors")
        again = DistributionCache.load(path)
        assert again.meta == json.loads(json.dumps(cache.meta)) and again.top_k == top_k
        for name, tensor in cache.rows.tensors().items():
            assert torch.equal(getattr(again.rows, name), tensor)

    other_vocab = tiny_model("llama")
    other_vocab.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(DivergenceError, match="vocabulary of 128 tokens and this model 136"):
        measure_divergence(other_vocab, windows, again, progress=False)
    shifted = Calibration(windows.input_ids.roll(1, 1), windows.attention_mask, windows.description)
    with pytest.raises(DivergenceError, match="other tokens than these windows"):
        measure_divergence(dense, shifted, again, progress=False)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DivergenceError, match="not a readable distribution cache"):
        DistributionCache.load(tmp_path / "junk.safetensors")


@pytest.fixture()
def checkpoints(tmp_path):
    """A tiny dense checkpoint (byte tokenizer) and a short text for perplexity windows."""
    text = tmp_path / "text.txt"
    text.write_text(shipped_text(60000))
    return save_tiny_checkpoint(tmp_path / "dense", "llama", seed=3), text


def _evaluation(text, **kw) -> Evaluation:
    windows = PerplexitySpec(str(text), 32, 6, 4)
    return Evaluation(perplexity=windows, divergence=DivergenceSpec(text=windows, **kw))


def test_a_job_measures_against_its_input_and_reports_kl(checkpoints, tmp_path):
    from depthprune import DepthStage, Target

    src, text = checkpoints
    job = Job([DepthStage("shortgpt", Target(remove=2))], CalibrationSpec(str(text), 4, 32),
              _evaluation(text, cache_file=str(tmp_path / "ref.safetensors")), progress=False)
    result = run_job(load_model(str(src), progress=False), job, out=tmp_path / "pruned")
    assert result.before.divergence.kl == 0 and result.before.divergence.top1 == 1
    after = result.after.divergence
    assert after.kl > 0 and after.top1 < 1 and after.reference == str(src)
    assert "perplexity" not in result.after.timings, "perplexity came out of the divergence pass"
    report = json.loads((tmp_path / "pruned" / "report.json").read_text())
    assert report["metrics"]["kl"]["after"] == after.kl and report["metrics"]["kl"]["higher_is_better"] is False
    assert report["metrics"]["top1"]["higher_is_better"] is True
    assert "| kl (lower is better) | 0.0000 |" in (tmp_path / "pruned" / "report.md").read_text()

    # the saved reference is reused: a second spec measures the pruned model without loading the dense one
    spec = _evaluation(text, reference=str(src), cache_file=str(tmp_path / "ref.safetensors"))
    def no_loading(source):
        raise AssertionError(f"{source} was opened although its cache was saved")

    spec.prepare(str(tmp_path / "pruned"), first_is_input=False, open_reference=no_loading)
    assert spec.divergence.cache is not None
    loaded = load_model(str(tmp_path / "pruned"), progress=False)
    again = spec.run(loaded.model, loaded.tokenizer, progress=False).divergence
    assert again.kl == pytest.approx(after.kl, rel=1e-6) and again.top1 == after.top1

    with pytest.raises(DivergenceError, match="pass --reference DENSE"):
        _evaluation(text).prepare(str(tmp_path / "pruned"), first_is_input=False)


def _common(text) -> list[str]:
    return ["--seq-len", "32", "--ppl-data", str(text), "--ppl-windows", "4", "-q"]


def test_cli_prune_heal_width_and_eval_ppl_report_kl(checkpoints, tmp_path, run_cli, monkeypatch):
    src, text = checkpoints
    pruned = tmp_path / "pruned"
    res = run_cli("prune", "--model", src, "--method", "shortgpt", "--remove-layers", "2", "--calib", text,
                  "--calib-samples", "4", "--eval", "ppl,kl,top1", "--out", pruned, *_common(text))
    assert "kl: 0.0000 before -> " in res.out and "top1: 1.0000 before -> " in res.out
    assert "reference cache exact (full vocabulary)" in res.out
    report = json.loads((pruned / "report.json").read_text())
    kl, top1 = report["after"]["kl"], report["after"]["top1"]
    assert kl > 0 and 0 < top1 < 1
    assert "reference distributions exact" in (pruned / "report.md").read_text()

    # heal and eval-ppl compare with the dense source the pruned checkpoint records
    cache = tmp_path / "ref.safetensors"
    res = run_cli("eval-ppl", "--model", pruned, "--reference", src, "--reference-cache", cache,
                  "--dataset", text, "--max-windows", "4", "--seq-len", "32", "--json", tmp_path / "e.json", "-q")
    line = next(x for x in res.out.splitlines() if x.startswith("kl "))
    assert line.startswith(f"kl {kl:.4f}  top1 {top1:.4f}") and cache.is_file()
    assert json.loads((tmp_path / "e.json").read_text())["divergence"]["kl"] == pytest.approx(kl, rel=1e-6)

    import depthprune.models.load as load_module

    loads = []
    real_load = load_module.load_model
    monkeypatch.setattr(load_module, "load_model", lambda source, **kw: loads.append(source) or real_load(source, **kw))
    res = run_cli("eval-ppl", "--model", pruned, "--reference-cache", cache, "--dataset", text, "--max-windows", "4",
                  "--seq-len", "32", "-q")
    assert f"kl {kl:.4f}" in res.out and loads == [str(pruned)], "the cached reference was reused, not reloaded"

    healed = tmp_path / "healed"
    res = run_cli("heal", "--model", pruned, "--data", text, "--out", healed, "--max-steps", "1", "--batch-size",
                  "2", "--grad-accum", "1", "--cutoff-len", "32", "--max-items", "8", "--val-size", "0",
                  "--eval", "kl,top1", *_common(text))
    assert f"kl: {kl:.4f} before -> " in res.out
    width = run_cli("width", "--model", src, "--ratio-mlp", "0.5", "--eval", "top1", "--out", tmp_path / "w",
                    *_common(text))
    assert "top1: 1.0000 before -> " in width.out and "kl:" not in width.out


def test_cli_reference_errors_come_before_any_model_loads(checkpoints, tmp_path, run_cli, monkeypatch):
    import depthprune.models.load as load_module
    import transformers as tf

    src, text = checkpoints
    monkeypatch.setattr(load_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    config = tf.AutoConfig.from_pretrained(src)
    config.vocab_size = 300
    other = tmp_path / "other"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(other)
    tf.AutoTokenizer.from_pretrained(src).save_pretrained(other)  # a model needs its tokenizer (issue 26)
    (tmp_path / "user.safetensors").write_bytes(b"mine")
    for args, message in [
        (["heal", "--model", src, "--data", text, "--out", tmp_path / "h", "--eval", "kl"], "pass --reference DENSE"),
        (["eval-ppl", "--model", src, "--reference-cache", tmp_path / "c.safetensors"], "pass --reference DENSE"),
        (["prune", "--model", src, "--ratio", "0.3", "--eval", "kl", "--reference", other, "--out", tmp_path / "p"],
         "vocabulary of 300 tokens"),
        (["eval-ppl", "--model", src, "--reference", other], "vocabulary of 300 tokens"),
        (["prune", "--model", src, "--ratio", "0.3", "--eval", "kl", "--reference-cache", tmp_path / "user.safetensors",
          "--out", tmp_path / "p"], "not a readable distribution cache"),
    ]:
        code, _, err = run_cli(*args, check=False)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)


def test_bench_rows_are_measured_against_the_dense_row(checkpoints, tmp_path):
    from depthprune.bench import REFERENCE_FILE, RESULTS_MD, run_bench

    src, text = checkpoints
    calibration = CalibrationSpec(str(text), 4, 32)
    result = run_bench(str(src), ["shortgpt", "angular"], [0.34], tmp_path / "b", calibration=calibration,
                       evaluation=_evaluation(text), progress=False)
    assert result.dense.kl == 0 and result.dense.top1 == 1
    assert all(r.kl > 0 and r.top1 < 1 for r in result.rows), [r.error for r in result.rows]
    assert (tmp_path / "b" / REFERENCE_FILE).is_file()
    assert "| PPL | KL | top-1 |" in (tmp_path / "b" / RESULTS_MD).read_text()

    (tmp_path / "b" / "rows" / "shortgpt-0.34.json").unlink()
    again = run_bench(str(src), ["shortgpt", "angular"], [0.34], tmp_path / "b", calibration=calibration,
                      evaluation=_evaluation(text), progress=False)
    assert sorted(again.cached) == ["angular@0.34", "dense"], "the dense row and its reference were reused"
    assert again.rows[0].kl == pytest.approx(result.rows[0].kl, rel=1e-6)


def test_pruned_smollm2_drifts_from_its_dense_model(smollm2_path, tmp_path, run_cli):
    """SmolLM2-135M without 4 of its 30 layers: KL to the dense model above 0, top-1 agreement below 1."""
    out = tmp_path / "pruned"
    res = run_cli("prune", "--model", smollm2_path, "--method", "shortgpt", "--remove-layers", "4",
                  "--calib-samples", "4", "--eval", "ppl,kl,top1", "--ppl-windows", "8", "--out", out, "-q")
    report = json.loads((out / "report.json").read_text())
    before, after = report["before"], report["after"]
    assert before["kl"] == 0 and before["top1"] == 1
    assert after["kl"] > 0.05 and 0.3 < after["top1"] < 1, after
    assert after["perplexity"] > before["perplexity"]
    divergence = report["evaluation"]["after"]["divergence"]
    assert divergence["tokens"] == 3 * 8 * 127 and not divergence["approximate"]  # 8 windows of each held-out text
    assert f"kl:\n" in res.out and f"  mean          0.0000 before -> {after['kl']:.4f} after" in res.out


def test_cli_eval_none_measures_nothing(checkpoints, tmp_path, run_cli):
    src, text = checkpoints
    res = run_cli("prune", "--model", src, "--method", "shortgpt", "--remove-layers", "2", "--calib", text,
                  "--calib-samples", "4", "--seq-len", "32", "--eval", "none", "--out", tmp_path / "p", "-q")
    assert "perplexity" not in res.out and "kl:" not in res.out
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert not report.get("after") and not report.get("before")
