"""Distillation from a teacher cache: the same loss and gradients as the live teacher, reused across runs,
and the token budget (--max-tokens) that decides how long healing trains."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from depthprune.evaluate.divergence import rows_from_logits
from depthprune.heal import HealConfig, HealError, Teacher, distillation_loss_sum, heal, rows_loss_sum
from depthprune.heal.distill import label_positions
from tiny import byte_tokenizer, save_tiny_checkpoint, small_llama, text_file

@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def emma(tmp_path_factory):
    """Real English to heal on (the shipped novel's start)."""
    return text_file(tmp_path_factory.mktemp("distill") / "text.txt", 60_000)


def _tiny(tok, seed: int):
    return small_llama(len(tok), seed, positions=64)


def _config(**kw) -> HealConfig:
    base = dict(max_steps=3, batch_size=2, grad_accum=2, cutoff_len=32, max_items=16, val_size=2, eval_steps=3,
                logging_steps=1, lr=3e-3, distill=True, train_layers="last:1", eval_on_start=False, progress=False)
    base.update(kw)
    return HealConfig(**base)


@pytest.mark.parametrize("top_k", [None, 7])
def test_cached_rows_give_the_live_loss_and_gradients(top_k):
    torch.manual_seed(0)
    teacher = torch.randn(3, 6, 40)
    labels = torch.randint(0, 40, (3, 6))
    labels[2, 4:] = -100
    labels[0, :2] = -100
    student = torch.randn(3, 6, 40, requires_grad=True)
    live, count = distillation_loss_sum(student, teacher, labels, alpha=0.7, temperature=2.0, top_k=top_k)
    (live_grad,) = torch.autograd.grad(live, student)

    valid, targets = label_positions(labels)
    rows = rows_from_logits(teacher[:, :-1][valid], top_k, temperature=2.0)  # what the cache stores
    cached = rows_loss_sum(student[:, :-1][valid], targets, rows, alpha=0.7, temperature=2.0,
                           renormalised=top_k is not None)
    (cached_grad,) = torch.autograd.grad(cached, student)
    torch.testing.assert_close(cached, live)
    torch.testing.assert_close(cached_grad, live_grad)
    assert count == int(valid.sum()) and live_grad.abs().sum() > 0


def test_top_k_and_remainder_loss_is_a_lower_bound_equal_at_full_vocabulary():
    torch.manual_seed(1)
    teacher, student = torch.randn(20, 50), torch.randn(20, 50)
    targets = torch.zeros(20, dtype=torch.long)
    full = rows_loss_sum(student, targets, rows_from_logits(teacher, None, 1.5), temperature=1.5)
    assert rows_loss_sum(student, targets, rows_from_logits(teacher, 50, 1.5), temperature=1.5) == \
        pytest.approx(float(full), rel=1e-5)
    bounds = [float(rows_loss_sum(student, targets, rows_from_logits(teacher, k, 1.5), temperature=1.5))
              for k in (1, 5, 20, 40, 49)]
    assert bounds == sorted(bounds) and bounds[-2] < float(full) - 1e-3
    assert bounds[-1] == pytest.approx(float(full), rel=1e-5), "a remainder of one token is that token"


def _loads(tok, seed: int, calls: list):
    def load():
        calls.append(seed)
        return _tiny(tok, seed)

    return Teacher(f"teacher-{seed}", load)


@pytest.mark.parametrize("distill_top_k, train_layers", [(None, "last:1"), (5, "lora")])
def test_cached_teacher_trains_exactly_like_the_live_teacher(tok, tmp_path, distill_top_k, train_layers, emma):
    config = dict(distill_top_k=distill_top_k, train_layers=train_layers, temperature=1.5, distill_alpha=0.8)
    live = heal(_tiny(tok, 2), tok, emma, _config(teacher_cache=False, **config), tmp_path / "live",
                teacher=_tiny(tok, 1))
    calls: list = []
    cached = heal(_tiny(tok, 2), tok, emma, _config(**config), tmp_path / "cached", teacher=_loads(tok, 1, calls))
    assert calls == [1] and cached.teacher["mode"] == "cache" and live.teacher["mode"].startswith("live")
    assert cached.teacher["kind"] == ("exact" if distill_top_k is None else "top-k")
    assert ("renormalised" in cached.teacher["loss"]) == (distill_top_k is not None)
    assert len(cached.train_losses) == 3
    for (s1, a), (s2, b) in zip(live.train_losses + live.eval_losses, cached.train_losses + cached.eval_losses):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-4), (a, b)
    for (name, p), q in zip(live.model.named_parameters(), cached.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    changed = dict(_tiny(tok, 2).named_parameters())
    assert any(not torch.equal(p, changed[n]) for n, p in cached.model.named_parameters()), "it trained"


def test_a_teacher_cache_directory_is_reused_and_rebuilt_for_other_settings(tok, tmp_path, emma):
    calls: list = []
    shared = str(tmp_path / "teacher-cache")
    first = heal(_tiny(tok, 2), tok, emma, _config(teacher_cache_dir=shared), tmp_path / "a",
                 teacher=_loads(tok, 1, calls))
    again = heal(_tiny(tok, 2), tok, emma, _config(teacher_cache_dir=shared, train_layers="lora"), tmp_path / "b",
                 teacher=_loads(tok, 1, calls))
    assert calls == [1] and again.teacher["reused"] and not first.teacher["reused"]
    assert again.teacher["tokens"] == first.teacher["tokens"] == (14 + 2) * 31
    fewer = heal(_tiny(tok, 2), tok, emma, _config(teacher_cache_dir=shared, max_steps=0, max_tokens=128),
                 tmp_path / "f", teacher=_loads(tok, 1, calls))
    assert calls == [1] and fewer.teacher["reused"] and fewer.teacher["tokens"] == (4 + 2) * 31, \
        "a smaller budget reads a prefix of the same items"
    other = heal(_tiny(tok, 2), tok, emma, _config(teacher_cache_dir=shared, temperature=2.0), tmp_path / "c",
                 teacher=_loads(tok, 1, calls))
    assert calls == [1, 1] and not other.teacher["reused"]
    big = heal(_tiny(tok, 2), tok, emma, _config(teacher_cache_mb=0, teacher_top_k=9), tmp_path / "d",
               teacher=_loads(tok, 1, calls))
    assert big.teacher["kind"] == "top-k" and big.teacher["top_k"] == 9 and "lower bound" in big.teacher["loss"]
    with pytest.raises(HealError, match="vocabulary of 100 tokens and the student 259"):
        heal(_tiny(tok, 2), tok, emma, _config(), tmp_path / "e",
             teacher=tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(
                 vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)))


def test_max_tokens_decides_the_steps_and_stops_training(tok, tmp_path, emma):
    # 2 x 2 items of 32 tokens per step = 128 tokens; a budget of 300 takes 3 steps on the first 12 items
    result = heal(_tiny(tok, 2), tok, emma, _config(max_steps=0, max_tokens=300, distill=False), tmp_path / "a")
    assert result.global_step == 3 and result.tokens_seen == 384 and result.data["train_items_used"] == 12
    assert result.tokens_per_s > 0 and 0 < result.train_seconds < result.runtime_s
    # more than an epoch of the 8 training items: the budget, not the data, ends the run
    long = heal(_tiny(tok, 2), tok, emma, _config(max_steps=0, max_tokens=700, max_items=10, distill=False),
                tmp_path / "b")
    assert long.global_step == 6 and long.tokens_seen == 768 and long.data["train_items_used"] == 8
    with pytest.raises(HealError, match="less than one optimizer step .* = 128 tokens"):
        heal(_tiny(tok, 2), tok, emma, _config(max_steps=0, max_tokens=100, distill=False), tmp_path / "c")
    with pytest.raises(HealError, match="not both"):
        _config(max_tokens=1000).validate()


def test_heal_command_records_tokens_speed_and_teacher(tmp_path, run_cli, emma):
    text = tmp_path / "text.txt"
    text.write_text(emma.read_text()[:60000])
    dense = save_tiny_checkpoint(tmp_path / "dense", "llama", seed=3)
    pruned = tmp_path / "pruned"
    run_cli("prune", "--model", dense, "--method", "shortgpt", "--remove-layers", "2", "--calib", text,
            "--calib-samples", "4", "--seq-len", "32", "--out", pruned, "-q")
    code, _, err = run_cli("heal", "--model", pruned, "--data", text, "--out", tmp_path / "x", "--max-tokens", "100",
                           "--cutoff-len", "32", "--batch-size", "2", "--grad-accum", "2", check=False)
    assert code == 2 and "less than one optimizer step" in err and len(err.strip().splitlines()) == 1
    healed = tmp_path / "healed"
    res = run_cli("heal", "--model", pruned, "--data", text, "--out", healed, "--max-tokens", "256", "--cutoff-len",
                  "32", "--batch-size", "2", "--grad-accum", "2", "--max-items", "20", "--val-size", "2",
                  "--distill", "--eval", "kl,top1", "--seq-len", "32", "--ppl-data", text, "--ppl-windows", "4", "-q")
    assert "heal: 2 steps (256 tokens, " in res.out and " tokens/s) of LoRA" in res.out
    stage = json.loads((healed / "report.json").read_text())["stages"][0]
    assert stage["tokens"] == 256 and stage["max_tokens"] == 256 and stage["tokens_per_s"] > 0
    assert stage["teacher"]["mode"] == "cache" and stage["teacher"]["kind"] == "exact"
    assert stage["teacher"]["tokens"] == (8 + 2) * 31
    assert "256 tokens" in (healed / "report.md").read_text()
    assert not (healed / ".depthprune-work").exists()


def test_bench_heal_measures_layers_and_distillation_on_one_axis(tmp_path):
    """``benchmarks/bench_heal.py`` end to end on tiny checkpoints: every recipe gets a row per budget with its
    trained tokens and speed, the ``layers`` recipe re-applies the pruned checkpoint's plan to the dense model."""
    import subprocess
    import sys

    from conftest import ROOT
    from depthprune import CalibrationSpec, DepthStage, Job, Target, load_model, run_job

    dense = save_tiny_checkpoint(tmp_path / "dense", "llama", seed=4)
    text = text_file(tmp_path / "text.txt", 60_000)
    run_job(load_model(str(dense), progress=False),
            Job([DepthStage("angular", Target(remove=2))], CalibrationSpec(str(text), 4, 32), progress=False),
            out=tmp_path / "pruned")
    out = tmp_path / "curve"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_heal.py"), "--model", str(tmp_path / "pruned"),
                    "--teacher", str(dense), "--data", str(text), "--tokens", "0,1024",
                    "--recipes", "layers,last4-distill", "--batch-size", "2", "--grad-accum", "1",
                    "--cutoff-len", "32", "--ppl-data", str(text), "--ppl-windows", "2", "--out", str(out)],
                   check=True, capture_output=True, text=True)
    results = json.loads((out / "results.json").read_text())
    assert results["dense"]["kl"] == 0 and results["pruned"]["kl"] > 0
    for recipe in ("layers", "last4-distill"):
        row = results[f"{recipe}@1024"]
        assert row["recipe"] == recipe and 0 < row["tokens"] <= 1024 + 128 and row["tokens_per_s"] > 0
        assert row["kl"] != results["pruned"]["kl"], f"{recipe} changed nothing"
    assert results["layers@1024"]["steps"] == 1024 // (4 * 128)
    assert (out / "results.png").is_file()
