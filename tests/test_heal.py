"""LoRA healing: data formats, targets, resume, clear errors (on tiny random models with a tiny trained
tokenizer), and a real heal of a pruned SmolLM2-135M."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from transformers import AutoModelForCausalLM, TrainerCallback

import depthprune as dp
from depthprune.heal import (
    HealConfig,
    HealDataError,
    HealError,
    heal,
    load_heal_data,
    lora_targets,
)
from tiny import bpe_tokenizer, text_file, tiny_model

EXPECTED_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate to French."
    "\n\n### Input:\nGood morning\n\n### Response:\nBonjour"
)
EXPECTED_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nName a primary colour.\n\n### Response:\nRed"
)
RECORDS = [
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red"},
]


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """Real English, enough for every healing run here (tokenizing the whole novel would cost seconds)."""
    return text_file(tmp_path_factory.mktemp("heal-data") / "text.txt", 20_000)


def _tiny_llama(tok, seed: int = 0):
    """A 2-layer random Llama for the tiny tokenizer (so real text can be tokenized)."""
    return tiny_model("llama", seed, layers=2, vocab_size=len(tok))


def _tiny_config(**kw) -> HealConfig:
    base = dict(max_steps=4, batch_size=2, grad_accum=1, cutoff_len=32, max_items=24, val_size=4, eval_steps=2,
                logging_steps=1, lr=1e-3, progress=False)
    base.update(kw)
    return HealConfig(**base)


def test_alpaca_json_is_formatted_with_the_alpaca_prompt(tok, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    data = load_heal_data(path, tok, HealConfig(val_size=0, cutoff_len=256))
    assert data.kind == "alpaca" and len(data.train) == 2 and data.val == []
    texts = sorted(tok.decode(item["input_ids"]) for item in data.train)
    assert texts == sorted([EXPECTED_WITH_INPUT + tok.eos_token, EXPECTED_NO_INPUT + tok.eos_token])
    assert all(item["labels"] == item["input_ids"] for item in data.train)

    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in RECORDS))
    response_only = load_heal_data(jsonl, tok, HealConfig(val_size=0, train_on="response"))
    for item in response_only.train:
        targets = [t for t, label in zip(item["input_ids"], item["labels"]) if label != -100]
        assert tok.decode(targets) in ("Bonjour" + tok.eos_token, "Red" + tok.eos_token)


def test_alpaca_cleaned_goes_through_datasets_load_dataset(tok, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, *args, **kwargs):
        calls.append((path, kwargs.get("split")))
        return datasets.Dataset.from_list(RECORDS * 10)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_heal_data("alpaca-cleaned", tok, HealConfig(max_items=5, val_size=1))
    assert calls == [("yahma/alpaca-cleaned", "train")]
    assert (len(data.train), len(data.val)) == (4, 1) and data.description["source"] == "hub:yahma/alpaca-cleaned"

    monkeypatch.undo()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HealDataError, match="could not load dataset 'yahma/alpaca-cleaned'.*local .json"):
        load_heal_data("alpaca-cleaned", tok, HealConfig())


def test_text_files_become_cutoff_length_blocks(tok, text):
    data = load_heal_data(text, tok, HealConfig(cutoff_len=64, max_items=50, val_size=0.1))
    assert data.kind == "text" and (len(data.train), len(data.val)) == (45, 5)
    assert all(len(item["input_ids"]) == 64 and item["labels"] == item["input_ids"] for item in data.train)


@pytest.mark.parametrize("data, message", [
    ("missing.json", "not found"),
    ("no/such/dir/data.txt", "not found"),
    ("nonsense", "unknown healing data"),
])
def test_bad_data_is_a_clear_error(tok, data, message):
    with pytest.raises(HealDataError, match=message):
        load_heal_data(data, tok, HealConfig())


def test_malformed_alpaca_records_are_refused(tok, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"question": "?", "answer": "!"}]))
    with pytest.raises(HealDataError, match="alpaca layout"):
        load_heal_data(path, tok, HealConfig())
    path.write_text("{not json")
    with pytest.raises(HealDataError, match="cannot read"):
        load_heal_data(path, tok, HealConfig())


def test_lora_targets_follow_the_architecture():
    assert lora_targets(tiny_model("llama")) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"]
    assert lora_targets(tiny_model("llama"), "gromov") == ["gate_proj", "up_proj", "down_proj"]
    assert lora_targets(tiny_model("gpt2")) == ["c_attn", "c_proj", "c_fc"]
    import re

    gromov_gpt2 = lora_targets(tiny_model("gpt2"), "gromov")
    assert re.fullmatch(gromov_gpt2, "transformer.h.3.mlp.c_proj")
    assert not re.fullmatch(gromov_gpt2, "transformer.h.3.attn.c_proj")


def test_qlora_without_cuda_is_a_clear_error(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HealError, match="QLoRA needs a CUDA GPU"):
        heal(_tiny_llama(tok), tok, "unused.txt", HealConfig(qlora=True), tmp_path / "run")
    assert not (tmp_path / "run").exists()


class _Interrupt(TrainerCallback):
    """Simulates a crash right after the checkpoint at ``step`` is written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def _lora_free(model) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return not any(isinstance(m, BaseTunerLayer) for m in model.modules()) and \
        not any("lora" in name for name, _ in model.named_parameters())


def test_interrupted_run_resumes_and_writes_only_its_output_dir(tok, text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    straight = heal(_tiny_llama(tok), tok, text, _tiny_config(), tmp_path / "straight")

    with pytest.raises(KeyboardInterrupt):
        heal(_tiny_llama(tok), tok, text, _tiny_config(), tmp_path / "run", callbacks=[_Interrupt(2)])
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()
    with pytest.raises(HealError, match="resume"):
        heal(_tiny_llama(tok), tok, text, _tiny_config(), tmp_path / "run")
    resumed = heal(_tiny_llama(tok), tok, text, _tiny_config(), tmp_path / "run", resume=True,
                   save_adapter=True)

    assert resumed.resumed_from.endswith("checkpoint-2") and resumed.global_step == 4
    assert [s for s, _ in resumed.eval_losses] == [0, 2, 4]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert _lora_free(resumed.model) and isinstance(resumed.model, tf.LlamaForCausalLM)
    untouched = _tiny_llama(tok).model.layers[0].mlp.down_proj.weight
    assert not torch.equal(resumed.model.model.layers[0].mlp.down_proj.weight, untouched), "adapter not merged"
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "straight"]


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()




def test_heal_command(tok, text, tmp_path, run_cli, monkeypatch):
    src = tmp_path / "pruned"
    dp.save(_tiny_llama(tok), tok, src, dp.Plan(method="manual", num_layers=3, remove=[1]))
    before = _digest(src)
    out = tmp_path / "healed"
    _, stdout, _ = run_cli("heal", "--model", str(src), "--data", str(text),
                           "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1",
                           "--cutoff-len", "32", "--max-items", "12", "--val-size", "2", "--eval-steps", "2",
                           "--save-adapter", "-q")
    assert "heal: 2 steps (128 tokens, " in stdout and "tokens/s) of LoRA" in stdout and "saved to" in stdout
    assert _digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed", "pruned"], "no work directory left behind"
    assert not (out / ".depthprune-work").exists()
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][0]
    assert stage["stage"] == "heal" and stage["steps"] == 2 and stage["data"]["kind"] == "text"
    assert stage["result"]["best_checkpoint"] == "checkpoint-2"
    assert json.loads((out / "depthprune_run.json").read_text())["stages"][0]["stage"] == "heal"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args, message in [
        (["--out", str(tmp_path / "q"), "--qlora"], "QLoRA needs a CUDA GPU"),
        (["--out", str(tmp_path / "q"), "--data", str(tmp_path / "none.txt")], "not found"),
        (["--out", str(tmp_path / "q"), "--preset", "attention"], "unknown preset"),
        (["--out", str(src)], "overlaps the input"),
        (["--out", str(tmp_path / "q"), "--resume"], "--work-dir"),
        (["--out", str(tmp_path / "q"), "--distill"], "pass --teacher"),
        (["--out", str(tmp_path / "q"), "--train-layers", "last:x"], "last:N"),
        ([], "--out is required"),
    ]:
        code, _, err = run_cli("heal", "--model", str(src), *args, check=False)
        assert code == 2 and message in err, err


API_ONLY = {"target_modules", "eval_batch_size", "eval_on_start", "save_total_limit", "warmup_steps", "weight_decay",
            "logging_steps", "gradient_checkpointing", "teacher_cache_mb", "progress"}
"""HealConfig fields that are settings of the API only, not flags (progress comes from --quiet)."""


def _click_command(name: str):
    import typer

    from depthprune.cli import app

    return typer.main.get_command(app).commands[name]


def test_every_heal_setting_flag_has_help_and_is_listed(run_cli):
    """HealConfig's flags are generated from its fields: each has help, ``heal --help`` lists it with the field's
    default, and every other field is deliberately API-only."""
    from dataclasses import fields

    infos = HealConfig.infos()
    assert {f.name for f in fields(HealConfig)} - {i.name for i in infos} == API_ONLY
    listed = " ".join(run_cli("heal", "--help").stdout.split())
    params = {p.name: p for p in _click_command("heal").params}
    for info in infos:
        assert info.help.strip(), f"{info.name} has no help"
        assert info.flag in listed, f"heal --help does not list {info.flag}"
        param = params[info.flag_name.replace("-", "_")]
        assert param.opts == [info.flag] and param.default == info.flag_default
        assert param.secondary_opts == ([f"--no-{info.flag_name}"] if info.type is bool else [])
        assert "{" not in param.help and param.help.split()[0] in " ".join(info.help.split())
    assert "--rank" in listed and "--live-teacher / --no-live-teacher" in listed and "--teacher-cache" in listed
    assert "--preset [default|gromov]" in listed


def test_heal_flags_set_the_fields_they_name(tmp_path):
    """Renamed (--rank sets r) and inverted (--live-teacher clears teacher_cache) flags reach the right field;
    prune's --heal-* flags are the same settings, spelled with the prefix in their help."""
    from depthprune.cli.prune import HEAL_SETTINGS as PRUNE_HEAL
    from depthprune.cli.recover import HEAL_SETTINGS

    ctx = _click_command("heal").make_context("heal", ["--rank", "4", "--live-teacher", "--teacher-cache",
                                                       str(tmp_path), "--lr", "0.5", "--no-distill"])
    config = HealConfig(**HEAL_SETTINGS.values(dict(ctx.params)))
    assert (config.r, config.teacher_cache, config.teacher_cache_dir, config.lr) == (4, False, str(tmp_path), 0.5)
    assert HealConfig(**HEAL_SETTINGS.values(dict(_click_command("heal").make_context("heal", []).params))) \
        == HealConfig()

    prune = _click_command("prune")
    ctx = prune.make_context("prune", ["--heal", "x.txt", "--heal-max-steps", "3", "--heal-distill"])
    values = PRUNE_HEAL.values(dict(ctx.params))
    assert values == {"max_steps": 3, "max_tokens": None, "epochs": 2.0, "train_layers": "lora", "distill": True}
    helps = {p.name: p.help for p in prune.params}
    assert helps["heal_max_steps"] == "Healing: optimizer steps (0 = train for --heal-epochs)."
    assert "(instead of --heal-max-steps / --heal-epochs)" in helps["heal_max_tokens"]


def test_heal_setting_errors_name_the_flag_typed(tok, text, tmp_path, run_cli):
    src = tmp_path / "pruned"
    dp.save(_tiny_llama(tok), tok, src, dp.Plan(method="manual", num_layers=3, remove=[1]))
    for args, message in [
        (["heal", "--data", str(text), "--rank", "0"], "(got --rank 0, --alpha 16)"),
        (["heal", "--data", str(text), "--max-steps", "-1"], "--max-steps must be 0 (train for --epochs) or more"),
        (["prune", "--ratio", "0.3", "--heal", str(text), "--heal-max-steps", "-1"],
         "--heal-max-steps must be 0 (train for --heal-epochs) or more"),
        (["prune", "--ratio", "0.3", "--heal", str(text), "--heal-train-layers", "top"],
         "--heal-train-layers must be 'lora' or 'last:N'"),
    ]:
        code, _, err = run_cli(*args, "--model", str(src), "--out", str(tmp_path / "o"), check=False)
        assert code == 2 and message in err, err
        assert not (tmp_path / "o").exists()


def test_healing_lowers_perplexity_of_pruned_smollm2(smollm2, shared_data, tmp_path):
    """Remove 7 of SmolLM2's 30 layers, heal briefly on Emma, measure WikiText-2 (never trained on)."""
    model, tok = smollm2
    dp.apply_plan(model, dp.Plan(method="manual", num_layers=30, remove=list(range(20, 27))))
    wikitext = shared_data / "wikitext-2" / "test.txt"
    before = dp.perplexity(model, tok, wikitext, max_windows=8, progress=False).perplexity

    config = HealConfig(max_steps=12, batch_size=2, grad_accum=1, cutoff_len=128, lr=1e-3, max_items=200,
                        val_size=4, eval_steps=12, eval_on_start=False, progress=False)
    result = heal(model, tok, shared_data / "austen" / "emma.txt", config, tmp_path / "run")
    after = dp.perplexity(result.model, tok, wikitext, max_windows=8, progress=False).perplexity
    assert after < 0.8 * before, (before, after)
    assert result.global_step == 12 and result.best_eval_loss is not None
    assert _lora_free(result.model)

    dp.save(result.model, tok, tmp_path / "healed")
    assert not (tmp_path / "healed" / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "healed").eval()
    ids = tok("It is a truth universally acknowledged", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, rtol=0, atol=1e-5)


def test_prune_then_width_then_heal_records_every_stage(smollm2, shared_data, tmp_path):
    """The combined pipeline (depth -> width -> LoRA) in one call, as `prune --then-width --heal` runs it."""
    import json

    config = HealConfig(max_steps=2, batch_size=1, grad_accum=1, cutoff_len=64, val_size=4, eval_steps=2,
                        max_items=40, distill=True, progress=False)
    out = tmp_path / "combined"
    job = dp.Job([dp.DepthStage("shortgpt", dp.Target(remove=4)), dp.WidthStage(0.25, 0.0, "magnitude"),
                  dp.HealStage(str(shared_data / "austen" / "emma.txt"), config)],
                 calibration=dp.CalibrationSpec(num_windows=4, seq_len=64), progress=False)
    result = dp.run_job(smollm2, job, out=out)
    plan = json.loads((out / "depthprune_plan.json").read_text())
    run = json.loads((out / "depthprune_run.json").read_text())
    assert [s["stage"] for s in run["stages"]] == ["depth", "width", "heal"]
    assert plan["num_layers_after"] == 26 and run["stages"][2]["steps"] == 2
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 1152
    assert (out / "depthprune_width_plan.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["combined"], "trainer checkpoints are cleaned up"
    assert result.layers == {"before": 30, "after": 26}
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert [r["stage"] for r in stages] == ["depth", "width", "heal"]
    assert "distillation from the input model" in stages[2]["summary"]


def test_distillation_loss_equals_its_formula():
    from depthprune.heal import distillation_loss_sum

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100
    total, count = distillation_loss_sum(student, teacher, labels, alpha=0.7, temperature=2.0)
    valid = labels[:, 1:] != -100
    s, t = student[:, :-1][valid], teacher[:, :-1][valid]
    p = torch.softmax(t / 2, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(s / 2, -1))).sum()
    lm = torch.nn.functional.cross_entropy(s, labels[:, 1:][valid], reduction="sum")
    assert count == int(valid.sum()) == 6
    torch.testing.assert_close(total, 0.7 * kl * 4 + 0.3 * lm)
    top, _ = distillation_loss_sum(student, teacher, labels, top_k=11)
    full, _ = distillation_loss_sum(student, teacher, labels)
    torch.testing.assert_close(top, full)
    assert distillation_loss_sum(student, student, labels)[0].abs() < 1e-5


def test_distilled_and_last_layer_healing(tok, text, tmp_path):
    """Distillation pulls the student towards the teacher; last:N trains only the head and the last layers."""
    teacher = _tiny_llama(tok, seed=1)
    student = _tiny_llama(tok, seed=2)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    config = _tiny_config(max_steps=6, train_layers="last:1", distill=True, lr=5e-3, val_size=4, eval_steps=6)
    result = heal(student, tok, text, config, tmp_path / "run", teacher=teacher)
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("model.layers.1.", "lm_head")) for n in changed), changed
    assert result.eval_losses[-1][1] < result.eval_losses[0][1], "the KL to the teacher went down"
    assert all(p.requires_grad == before_flag for p, before_flag in
               zip(result.model.parameters(), [True] * len(before)))
    with pytest.raises(HealError, match="teacher"):
        heal(_tiny_llama(tok), tok, text, _tiny_config(distill=True), tmp_path / "x")
    with pytest.raises(HealError, match="last:N"):
        _tiny_config(train_layers="first:2").validate()
    with pytest.raises(HealError, match="--save-adapter needs LoRA"):
        heal(_tiny_llama(tok), tok, text, _tiny_config(train_layers="last:1"), tmp_path / "y", save_adapter=True)
