"""Calibration windows: sources, BOS handling, determinism, errors (on a tiny trained tokenizer, and on the real
models' tokenizers where their BOS conventions are the point)."""

from __future__ import annotations

import json

import pytest
import torch

from depthprune.data.calibration import (
    CalibrationError,
    HubText,
    consecutive_windows,
    read_hub_text,
    read_text,
    sample_windows,
    special_prefix,
)
from tiny import bpe_tokenizer, text_file


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


def test_default_text_is_shipped_and_split():
    cal, desc = read_text("default")
    held, held_desc = read_text("default-heldout")
    assert len(cal) > 300_000 and len(held) > 50_000
    assert "Pride and Prejudice" in desc and "heldout" in held_desc
    assert held[:200] not in cal


def test_windows_are_seeded_and_sized(tok):
    a = sample_windows(tok, num_windows=6, seq_len=64, seed=1)
    b = sample_windows(tok, num_windows=6, seq_len=64, seed=1)
    c = sample_windows(tok, num_windows=6, seq_len=64, seed=2)
    assert a.input_ids.shape == (6, 64)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert a.description["seed"] == 1 and a.description["num_windows"] == 6


def test_local_txt_and_jsonl(tmp_path, tok):
    text = text_file(tmp_path / "novel.txt", 60_000)
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": p}) for p in text.read_text().split("\n\n")[:400]))
    cal = sample_windows(tok, jl, num_windows=4, seq_len=32)
    assert cal.input_ids.shape == (4, 32)
    txt = sample_windows(tok, text, num_windows=4, seq_len=32)
    assert txt.description["source"].startswith("file:")


def test_hub_loader_code_path_on_local_files(tmp_path):
    """The real datasets.load_dataset path, pointed at a local file instead of the hub."""
    f = tmp_path / "train.txt"
    f.write_text("\n".join(f"line {i} of a local corpus" for i in range(500)))
    text = read_hub_text(HubText("text", None, "train", data_files=str(f), streaming=False))
    assert text.startswith("line 0 of a local corpus") and "line 499" in text


def test_hub_dataset_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalibrationError, match="Offline"):
        read_hub_text(HubText("definitely-not/a-dataset", None, "train"))


def test_bos_is_inside_the_window(gemma3_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma3_path)
    prefix = special_prefix(tok)
    assert prefix == [tok.bos_token_id]
    cal = sample_windows(tok, num_windows=3, seq_len=32)
    assert cal.input_ids.shape == (3, 32)
    assert (cal.input_ids[:, 0] == tok.bos_token_id).all()
    ppl_windows = consecutive_windows(tok, "default-heldout", seq_len=32, max_windows=2)
    assert (ppl_windows.input_ids[:, 0] == tok.bos_token_id).all()


def test_no_bos_for_smollm2(smollm2_readonly):
    assert special_prefix(smollm2_readonly.tokenizer) == []


def test_errors(tmp_path, tok):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    with pytest.raises(CalibrationError, match="shorter than one 128-token window"):
        sample_windows(tok, short)
    with pytest.raises(CalibrationError, match="only"):
        sample_windows(tok, short, num_windows=3, seq_len=2)
    with pytest.raises(CalibrationError, match="not found"):
        sample_windows(tok, tmp_path / "missing.txt")
    binary = tmp_path / "bad.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80" * 100)
    with pytest.raises(CalibrationError, match="cannot read"):
        sample_windows(tok, binary)
    with pytest.raises(CalibrationError, match="unknown text source"):
        sample_windows(tok, "nonsense-name")


def test_a_spec_tokenizes_its_text_once_for_every_window_set_it_draws(tok, monkeypatch):
    """Planning, held-out and fit windows and the fit's capacity all read one cut of the text; the windows are
    those a fresh cut gives."""
    from depthprune.data import calibration as module

    spec = module.CalibrationSpec(source="general", num_windows=4, seq_len=64, seed=3)
    cuts = []
    real = module._Slots.cut
    monkeypatch.setattr(module._Slots, "cut", classmethod(lambda cls, *a, **k: cuts.append(a[1]) or real(*a, **k)))
    planning, held = spec.windows(tok), spec.heldout(tok)
    fit = spec.fit_windows(tok, 5, seed=7)
    capacity = spec.fit_capacity(tok)
    assert len(cuts) == len(module.mixture_parts("general")), "each part of the mix cut once"
    fresh = sample_windows(tok, "general", num_windows=5, seq_len=64, seed=7, exclude=held.description["slots"])
    assert torch.equal(fit.input_ids, fresh.input_ids)
    assert capacity == len(module.cut_slots(tok, "general", None, 64)) - held.num_windows
    assert not set(planning.description["slots"]) & set(held.description["slots"])
