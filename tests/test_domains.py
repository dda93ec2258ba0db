"""Quality per domain and general calibration: several held-out texts measured in one pass equal each text
measured alone; ``general`` and ``a+b`` mixtures draw their windows from every part equally; ``self`` samples
the dense model (the cached sample equals a fresh one); named texts heal; bad entries are one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from depthprune import Evaluation, PerplexitySpec
from depthprune.data.calibration import (CalibrationError, CalibrationSpec, domain_windows, parse_eval_texts,
                                         sample_windows, stratified_sample)
from depthprune.data.selftext import SelfSampling, sample_tokens, self_text
from depthprune.evaluate.divergence import build_reference, measure_divergence
from depthprune.evaluate.perplexity import perplexity_on
from depthprune.evaluate.suite import DivergenceSpec
from depthprune.errors import InputError
from tiny import bpe_tokenizer, save_tiny_checkpoint, small_llama, tiny_model

TWO = {"fiction": "heldout-fiction", "code": "heldout-code"}


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer(512)


def test_texts_measured_together_equal_each_text_alone(tok):
    """One pass over two texts' windows gives each text the perplexity, KL and top-1 it has alone; the headline
    is their mean (geometric for perplexity)."""
    dense, pruned = small_llama(len(tok), seed=0), small_llama(len(tok), seed=1)
    both = domain_windows(tok, TWO, seq_len=24, max_windows=3)
    assert both.description["domains"] == {"fiction": [0, 3], "code": [3, 6]}
    together = perplexity_on(pruned, both, batch_size=4, progress=False)  # batches straddle the two texts
    kl, ppl = measure_divergence(pruned, both, build_reference(dense, both, progress=False), batch_size=4,
                                 progress=False)
    for name, source in TWO.items():
        alone = domain_windows(tok, {"": source}, seq_len=24, max_windows=3)
        assert together.domains[name]["perplexity"] == pytest.approx(
            perplexity_on(pruned, alone, progress=False).perplexity, rel=1e-5)
        one, _ = measure_divergence(pruned, alone, build_reference(dense, alone, progress=False), progress=False)
        assert kl.domains[name]["kl"] == pytest.approx(one.kl, rel=1e-5)
        assert kl.domains[name]["top1"] == pytest.approx(one.top1)
    assert together.perplexity == pytest.approx(math.sqrt(together.domains["fiction"]["perplexity"]
                                                          * together.domains["code"]["perplexity"]))
    assert kl.kl == pytest.approx((kl.domains["fiction"]["kl"] + kl.domains["code"]["kl"]) / 2)
    assert ppl.perplexity == pytest.approx(together.perplexity, rel=1e-5)
    assert set(kl.values()) == {"kl", "top1", "kl/fiction", "kl/code", "top1/fiction", "top1/code"}


def test_evaluation_reports_every_domain_and_the_mean(tok):
    spec = Evaluation(perplexity=PerplexitySpec("fiction=heldout-fiction,code=heldout-code", 24, 2, 4),
                      divergence=None).check()
    values = spec.run(small_llama(len(tok)), tok, progress=False).values()
    assert list(values) == ["perplexity", "perplexity/fiction", "perplexity/code"]
    text = PerplexitySpec("fiction=heldout-fiction,code=heldout-code", 24, 2, 4)
    spec = Evaluation(divergence=DivergenceSpec(["kl"], text)).check()
    spec.prepare("x", first_is_input=True)
    result = spec.run(small_llama(len(tok)), tok, progress=False)
    assert result.values()["kl"] == pytest.approx(0, abs=1e-6) and set(result.higher_is_better()) == {
        "kl", "kl/fiction", "kl/code"}


@pytest.mark.parametrize("value, message", [
    ("a=heldout-fiction,a=heldout-code", "named twice"),
    ("a=heldout-fiction,heldout-code", "is not NAME=SOURCE"),
    ("a/b=heldout-code", "may not hold '/'"),
    (",", "is empty"),
])
def test_bad_eval_texts_are_refused(value, message):
    with pytest.raises(CalibrationError, match=message):
        parse_eval_texts(value)


def test_default_eval_texts_are_the_three_shipped_domains():
    assert PerplexitySpec().texts() == {"fiction": "heldout-fiction", "encyclopedic": "heldout-encyclopedic",
                                        "code": "heldout-code"}
    assert PerplexitySpec("default-heldout").texts() == {"": "default-heldout"}


def test_bad_eval_texts_on_the_command_line_are_one_line_before_loading(run_cli, tmp_path):
    for value, message in [("a=/no/such.txt", "neither a file nor a known text"), ("f=fiction,f=code", "twice")]:
        result = run_cli("eval-ppl", "--model", tmp_path / "nothing-here", "--eval-texts", value, check=False)
        assert result.code == 2 and message in result.err and result.err.count("error:") == 1
    model = save_tiny_checkpoint(tmp_path / "m", family="llama")
    result = run_cli("prune", "--model", model, "--method", "shortgpt", "--remove-layers", "1", "--calib", "self:8",
                     "--seq-len", "32", "--out", tmp_path / "out", check=False)
    assert result.code == 2 and "less than one 32-token window" in result.err and "loading" not in result.err


def test_a_mixture_draws_its_windows_from_every_part_equally(tok):
    """``general`` is fiction + encyclopedic + code: 9 windows are 3 of each, whatever each text's length; a
    single text's draw is unchanged (the same seeded sample as before mixtures existed)."""
    mixed = sample_windows(tok, "general", num_windows=9, seq_len=32, seed=5)
    parts = mixed.description["parts"]
    assert [p.split(":")[0] for p in parts] == ["fiction", "encyclopedic", "code"]
    strata = CalibrationSpec("general", 9, 32, 5)  # the same strata the slots came from
    sizes = [sample_windows(tok, name, num_windows=1, seq_len=32).description["text_tokens"] // 32
             for name in ("fiction", "encyclopedic", "code")]
    bounds = [sum(sizes[:k]) for k in range(4)]
    shares = [sum(bounds[k] <= s < bounds[k + 1] for s in mixed.description["slots"]) for k in range(3)]
    assert shares == [3, 3, 3] and strata.num_windows == 9
    import random

    single = sample_windows(tok, "fiction", num_windows=5, seq_len=32, seed=5)
    assert single.description["slots"] == sorted(random.Random(5).sample(range(sizes[0]), 5))
    assert sorted(stratified_sample([range(0, 2), range(2, 10)], None, 6, 0))[:2] == [0, 1]  # a short part gives
    with pytest.raises(CalibrationError):  # what it has, the rest comes from the others
        stratified_sample([range(0, 2)], None, 3, 0)


def test_held_out_and_fit_windows_of_a_mixture_stay_disjoint(tok):
    spec = CalibrationSpec("fiction+code", num_windows=6, seq_len=32)
    planning = set(spec.windows(tok).description["slots"])
    heldout = set(spec.heldout(tok).description["slots"])
    fit = set(spec.fit_windows(tok, 20, 7).description["slots"])
    assert not planning & heldout and not heldout & fit


def test_self_sample_is_cached_and_equals_a_fresh_one(tok, tmp_path, monkeypatch):
    """The dense model's sample, cached on disk per model and settings, equals a fresh sample with the same
    seed; another seed is another sample; the windows cut from it carry the sampled ids unchanged."""
    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tmp_path))
    model = small_llama(len(tok))
    settings = SelfSampling(tokens=200, sample_len=40, batch_size=3, seed=9)
    first, record = self_text(model, tok, settings, progress=False)
    again, cached = self_text(model, tok, settings, progress=False)
    fresh, _ = sample_tokens(model, tok, settings, progress=False)
    assert first == again == fresh and len(first) == 200
    assert not record["cached"] and cached["cached"] and record["tokens_per_s"] > 0
    assert first[0] == tok.bos_token_id and first[40] == tok.bos_token_id  # every sample starts a document
    other, _ = sample_tokens(model, tok, SelfSampling(tokens=200, sample_len=40, batch_size=3, seed=10), False)
    assert other != first
    spec = CalibrationSpec("self:200", num_windows=2, seq_len=16)
    with pytest.raises(CalibrationError, match="needs the model"):
        spec.windows(tok)
    spec.sample_from(model, tok, progress=False)  # the same settings but the default seed
    windows = spec.windows(tok)
    sampled = spec.__dict__["_sampled"]["self:200"]
    for row, slot in zip(windows.input_ids.tolist(), windows.description["slots"]):
        assert row == sampled[slot * 16 : (slot + 1) * 16]
    assert windows.description["sampled"]["self:200"]["tokens"] == 200


@pytest.mark.parametrize("source, message", [("self:8", "less than one 32-token window"),
                                             ("self:64", "fewer than the"), ("self:x", "positive whole number")])
def test_self_with_too_few_tokens_is_refused_before_loading(source, message):
    with pytest.raises(InputError, match=message):
        CalibrationSpec(source, num_windows=4, seq_len=32).check()


def test_a_job_calibrates_on_the_models_own_text(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHPRUNE_CACHE", str(tmp_path / "cache"))
    model = save_tiny_checkpoint(tmp_path / "m", family="llama")
    run_cli("prune", "--model", model, "--method", "shortgpt", "--remove-layers", "1", "--calib", "general+self:2048",
            "--calib-samples", "4", "--seq-len", "32", "--out", tmp_path / "out", "-q")
    run = json.loads((tmp_path / "out" / "depthprune_run.json").read_text())
    calibration = run["stages"][0]["calibration"]
    assert "self:2048" in calibration["sampled"] and calibration["source"].startswith("general+self:2048")
    assert len(list((tmp_path / "cache" / "self").glob("*.safetensors"))) == 1


def test_heal_trains_on_a_named_text_in_equal_shares(tok):
    """``heal --data general``: the first N blocks are the three texts' first blocks, a third each."""
    from depthprune.heal.config import HealConfig
    from depthprune.heal.data import load_heal_data

    def blocks(name: str, count: int) -> set[tuple[int, ...]]:
        data = load_heal_data(name, tok, HealConfig(cutoff_len=64, max_items=count, val_size=0))
        assert data.kind == "text"
        return {tuple(item["input_ids"]) for item in data.train}

    parts = set().union(*(blocks(name, 3) for name in ("fiction", "encyclopedic", "code")))
    assert len(parts) == 9 and blocks("general", 9) == parts


def test_generation_metrics_on_hand_built_continuations():
    from depthprune.data.calibration import Calibration
    from depthprune.evaluate.generation import compare, matching_prefix, token_f1

    assert matching_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2 and matching_prefix([5], [6]) == 0
    assert token_f1([1, 2, 3, 4], [1, 2, 3, 4]) == 1 and token_f1([1, 1], [2, 2]) == 0
    assert token_f1([1, 2, 3, 4], [4, 3, 9, 9]) == pytest.approx(0.5)
    prompts = Calibration(torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long),
                          {"domains": {"a": [0, 1], "b": [1, 3]}})
    result = compare(prompts, [[1, 2], [1, 2], [3, 3]], [[1, 2], [1, 3], [3, 3]])
    assert result.domains == {"a": {"gen_prefix": 2, "gen_f1": 1.0}, "b": {"gen_prefix": 1.5, "gen_f1": 0.75}}
    assert result.gen_prefix == pytest.approx(1.75) and result.gen_f1 == pytest.approx(0.875)


def test_eval_gen_in_a_job_compares_with_the_dense_continuations(run_cli, tmp_path):
    """The dense model matches itself (every new token, F1 1); after removing layers it drifts; the values are
    per held-out text and their mean."""
    model = save_tiny_checkpoint(tmp_path / "m", family="llama")
    run_cli("prune", "--model", model, "--method", "shortgpt", "--remove-layers", "3", "--calib-samples", "2",
            "--seq-len", "32", "--eval", "gen", "--eval-texts", "fiction=heldout-fiction,code=heldout-code",
            "--out", tmp_path / "out", "-q")
    metrics = json.loads((tmp_path / "out" / "report.json").read_text())["metrics"]
    assert metrics["gen_prefix"]["before"] == 32 and metrics["gen_f1/code"]["before"] == 1
    assert metrics["gen_f1"]["after"] < 1 and set(metrics) == {
        "gen_prefix", "gen_f1", "gen_prefix/fiction", "gen_prefix/code", "gen_f1/fiction", "gen_f1/code"}


def test_hub_corpora_read_through_the_same_loader_and_fail_at_once_offline(tmp_path, monkeypatch):
    """FineWeb-Edu and SlimPajama are hub texts like the others: the loader streams their documents (here a
    local jsonl through the same datasets path); with no route to the Hub the error comes at once, not after
    half a minute of retries."""
    import time

    from depthprune.data import calibration as cal

    assert cal.HUB_TEXTS["fineweb-edu"].path == "HuggingFaceFW/fineweb-edu" and "slimpajama" in cal.HUB_TEXTS
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"document {i} " * 20}) for i in range(30)))
    local = cal.HubText("json", None, "train", data_files=str(docs), max_docs=5)
    text = cal.read_hub_text(local)
    assert text.count("document") == 5 * 20 and text.startswith("document 0")
    monkeypatch.setattr(cal, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(CalibrationError, match="could not load dataset 'HuggingFaceFW/fineweb-edu'"):
        cal.read_text("fineweb-edu")
    assert time.perf_counter() - start < 5


def test_the_report_has_a_text_by_metric_table():
    from depthprune.report import per_domain_table

    metrics = {name: {"before": b, "after": a} for name, b, a in [
        ("kl", 0.0, 0.5), ("kl/fiction", 0.0, 0.4), ("kl/code", 0.0, 0.6), ("top1", 1.0, 0.5),
        ("top1/fiction", 1.0, 0.6), ("top1/code", 1.0, 0.4)]}
    lines = per_domain_table(metrics).splitlines()
    assert lines[0].replace(" ", "") == "|text|kl|top1|"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["fiction", "code", "mean"]
    assert "0.6" in lines[3] and per_domain_table({"perplexity": {"before": 1, "after": 2}}) == ""


def test_a_file_with_a_plus_in_its_name_is_a_file_not_a_mixture(tok, tmp_path):
    from depthprune.data.calibration import mixture_parts

    text = tmp_path / "notes+more.txt"
    text.write_text("plain words of a local text file. " * 400)
    assert mixture_parts(str(text)) is None and mixture_parts("fiction+code") == ["fiction", "code"]
    windows = sample_windows(tok, str(text), num_windows=2, seq_len=32)
    assert windows.description["source"] == f"file:{text}"


def test_the_sampler_draws_only_inside_the_nucleus():
    """top-p keeps the smallest set of most likely tokens holding p; temperature 0 is greedy."""
    from depthprune.data.selftext import _draw

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 200))
    g = torch.Generator().manual_seed(0)
    assert set(_draw(logits, 1.0, 0.7, g).tolist()) == {0, 1}
    assert set(_draw(logits, 1.0, 0.4, g).tolist()) == {0}
    assert set(_draw(logits, 1.0, 1.0, g).tolist()) == {0, 1, 2, 3}
    assert set(_draw(logits, 0.0, 1.0, g).tolist()) == {0}
