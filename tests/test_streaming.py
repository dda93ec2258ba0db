"""Layer streaming on tiny models: the same numbers, plans and bytes as the in-memory path, one layer at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from depthprune import Merge, Plan, apply_plan, load_model, save
from depthprune.analysis.layer_cka import layer_similarity
from depthprune.analysis.stats import layer_statistics
from depthprune.data.calibration import Calibration, consecutive_windows, sample_windows
from depthprune.evaluate.perplexity import perplexity_on
from depthprune.backend import StateStore, StreamingError, load_streamed, parse_size, walk_layers
from depthprune.surgery.streamed import write_pruned_checkpoint
from depthprune.models.load import ModelLoadError
from tiny import CONFIGS, LAYERS, save_tiny_checkpoint

FAMILIES = ["llama", "gemma3", "gpt2", "opt", "qwen3"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved tiny checkpoint per family (with a byte tokenizer), shared by the module."""
    root = tmp_path_factory.mktemp("stream-models")
    return {family: str(save_tiny_checkpoint(root / family, family)) for family in CONFIGS}


def padded_calibration(tokenizer) -> Calibration:
    """Sampled windows with the last tokens of two windows masked out, so masks and last-token picks matter."""
    cal = sample_windows(tokenizer, num_windows=5, seq_len=24, seed=3)
    cal.attention_mask[1, -5:] = 0
    cal.attention_mask[3, -2:] = 0
    return cal


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
    return out


# ------------------------------------------------------------------ scoring


@pytest.mark.parametrize("family, spill", [(f, False) for f in sorted(CONFIGS)] + [(f, True) for f in FAMILIES[:3]])
def test_streamed_statistics_equal_in_memory(family, spill, checkpoints):
    loaded = load_model(checkpoints[family], progress=False)
    cal = padded_calibration(loaded.tokenizer)
    expected = layer_statistics(loaded.model, cal, batch_size=2, progress=False)
    messages = []
    sm = load_streamed(checkpoints[family], progress=False, max_memory=1 if spill else None,
                       report=messages.append)
    got = layer_statistics(sm, cal, batch_size=2, progress=False)
    assert got.bi == expected.bi
    assert torch.equal(got.last_token_states, expected.last_token_states)
    assert got.tokens == expected.tokens == int(cal.attention_mask.sum())
    assert ("spilled to disk" in messages[0]) == spill


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_streamed_cka_equals_in_memory(family, kernel, checkpoints):
    loaded = load_model(checkpoints[family], progress=False)
    cal = padded_calibration(loaded.tokenizer)
    expected = layer_similarity(loaded.model, cal, kernel=kernel, batch_size=2, progress=False)
    got = layer_similarity(load_streamed(checkpoints[family], progress=False, max_memory=1), cal, kernel=kernel,
                           batch_size=2, progress=False)
    assert np.array_equal(got.matrix, expected.matrix, equal_nan=True)
    assert got.tokens == expected.tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_perplexity_equals_in_memory(family, checkpoints):
    loaded = load_model(checkpoints[family], progress=False)
    windows = consecutive_windows(loaded.tokenizer, "default-heldout", seq_len=24, max_windows=5)
    expected = perplexity_on(loaded.model, windows, batch_size=2, chunk_tokens=7, progress=False)
    got = perplexity_on(load_streamed(checkpoints[family], progress=False), windows, batch_size=2,
                        chunk_tokens=7, progress=False)
    assert got.perplexity == expected.perplexity and got.tokens == expected.tokens


def test_one_layer_in_memory_at_a_time(checkpoints):
    """While layer i runs, it is the only decoder layer with real weights, on the chosen device; every weight is
    back on the meta device afterwards."""
    sm = load_streamed(checkpoints["gemma3"], device="cpu", progress=False)
    cal = padded_calibration(sm.tokenizer)
    seen = []

    def on_layer(i, b, mask, h_in, h_out):
        real = [j for j, layer in enumerate(sm.layers) if any(p.device.type != "meta" for p in layer.parameters())]
        devices = {p.device.type for p in sm.layers[i].parameters()}
        seen.append((i, real, devices))

    walk_layers(sm, list(cal.batches(2)), on_layer=on_layer)
    assert [(i, real) for i, real, _ in seen] == [(i, [i]) for i in range(LAYERS) for _ in range(3)]
    assert all(devices == {"cpu"} for *_, devices in seen)
    assert {p.device.type for p in sm.model.parameters()} == {"meta"}


def test_state_store_spills_exact_bytes(tmp_path):
    x = torch.randn(3, 5, 7).to(torch.bfloat16)
    with StateStore.spilling(tmp_path) as store:
        store.put(0, x)
        store.put(("kernel", 1, 2), x.double())
        assert list(store.spill_dir.iterdir()), "nothing was written to disk"
        assert torch.equal(store.get(0), x) and store.get(0).dtype == torch.bfloat16
        assert torch.equal(store.get(("kernel", 1, 2)), x.double())
        spill_dir = store.spill_dir
    assert not spill_dir.exists()


@pytest.mark.parametrize("text, size", [("8GB", 8 * 10**9), ("500mb", 500 * 10**6), ("1.5GiB", int(1.5 * 2**30)),
                                        ("1024", 1024)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "8 parsecs", "-1GB", "0"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(ValueError):
        parse_size(text)


# ------------------------------------------------------------------ surgery

PLANS = {
    "remove": Plan("manual", LAYERS, remove=[1, 4]),
    "rdsc+average": Plan("manual", LAYERS, merges=[Merge(3, 5, "rdsc"), Merge(0, 1, "average")]),
    "reference nested": Plan("manual", LAYERS, remove=[0], merges=[Merge(3, 4, "reference"), Merge(2, 4, "rdsc")]),
    "drop + remove": Plan("manual", LAYERS, remove=[5], merges=[Merge(1, 3, "drop")]),
    "average nested same low": Plan("manual", LAYERS, merges=[Merge(2, 3, "average"), Merge(2, 5, "average")]),
}


SURGERY_CASES = ([(family, plan) for family in ("llama", "gemma3") for plan in sorted(PLANS)]
                 + [(family, plan) for family in ("gpt2", "opt", "qwen3", "gpt_neox", "phi3")
                    for plan in ("remove", "reference nested")])


@pytest.mark.parametrize("family, plan_name", SURGERY_CASES)
def test_streamed_surgery_is_byte_identical(family, plan_name, checkpoints, tmp_path):
    plan = PLANS[plan_name]
    loaded = load_model(checkpoints[family], progress=False)
    apply_plan(loaded.model, plan)
    save(loaded.model, loaded.tokenizer, tmp_path / "memory", plan)
    streamed = tmp_path / "streamed"
    streamed.mkdir()
    info = write_pruned_checkpoint(load_streamed(checkpoints[family], progress=False), plan, streamed,
                                   max_shard_size=40_000)

    expected, got = tensors_of(tmp_path / "memory"), tensors_of(streamed)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name
    for name in ("config.json", "generation_config.json"):
        assert json.loads((streamed / name).read_text()) == json.loads((tmp_path / "memory" / name).read_text())
    assert len(info.files) > 1 and (streamed / "model.safetensors.index.json").is_file()
    assert info.num_layers == plan.num_layers_after

    reloaded = AutoModelForCausalLM.from_pretrained(streamed).eval()
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, loaded.model(ids).logits)


def test_streamed_surgery_keeps_or_casts_dtype(checkpoints, tmp_path):
    """Without a dtype each tensor keeps its stored dtype; with one, the result equals in-memory surgery at it."""
    plan = PLANS["rdsc+average"]
    bf16 = tmp_path / "bf16"
    loaded = load_model(checkpoints["llama"], dtype="bfloat16", progress=False)
    loaded.model.save_pretrained(bf16)
    loaded.tokenizer.save_pretrained(bf16)
    apply_plan(loaded.model, plan)
    save(loaded.model, loaded.tokenizer, tmp_path / "memory", plan)

    kept = tmp_path / "kept"
    kept.mkdir()
    write_pruned_checkpoint(load_streamed(str(bf16), progress=False), plan, kept)
    cast = tmp_path / "cast"
    cast.mkdir()
    write_pruned_checkpoint(load_streamed(checkpoints["llama"], progress=False), plan, cast, dtype=torch.bfloat16)
    expected = tensors_of(tmp_path / "memory")
    for directory in (kept, cast):
        got = tensors_of(directory)
        assert all(got[n].dtype == torch.bfloat16 and torch.equal(got[n], expected[n]) for n in expected)
        assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"


def _copy_with_tensors(source: Path, target: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """``source``'s checkpoint with its weights replaced by ``tensors`` (one shard), other files as they were."""
    from safetensors.torch import save_file

    target.mkdir()
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            (target / f.name).write_bytes(f.read_bytes())
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_checkpoint_without_base_prefix_is_read(checkpoints, tmp_path):
    """GPT-2's original hub checkpoints store ``h.0...`` instead of ``transformer.h.0...``."""
    source = Path(checkpoints["gpt2"])
    renamed = _copy_with_tensors(source, tmp_path / "gpt2-hub-layout",
                                 {n.removeprefix("transformer."): t for n, t in tensors_of(source).items()})
    loaded = load_model(str(source), progress=False)
    cal = padded_calibration(loaded.tokenizer)
    got = layer_statistics(load_streamed(str(renamed), progress=False), cal, progress=False)
    assert got.bi == layer_statistics(loaded.model, cal, progress=False).bi


def test_checkpoint_missing_a_tensor_is_named(checkpoints, tmp_path):
    source = Path(checkpoints["llama"])
    tensors = tensors_of(source)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    broken = _copy_with_tensors(source, tmp_path / "broken", tensors)
    with pytest.raises(ModelLoadError, match="model.layers.2.mlp.up_proj.weight"):  # named before any read
        load_streamed(str(broken), progress=False)


def test_safetensors_writer_output_reads_back(tmp_path):
    from safetensors.torch import load_file

    from depthprune.backend.checkpoint import TensorInfo
    from depthprune.surgery.safetensors_out import write_safetensors

    values = {"a": torch.randn(3, 4), "b.bias": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).half(),
              "d": torch.tensor(1.5, dtype=torch.bfloat16)}
    entries = [TensorInfo(n, v.dtype, tuple(v.shape)) for n, v in values.items()]
    write_safetensors(tmp_path / "x.safetensors", entries, lambda e: values[e.name], {"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == values.keys() and all(torch.equal(back[n], values[n]) for n in values)
    with pytest.raises(RuntimeError, match="declared"):
        write_safetensors(tmp_path / "y.safetensors", entries, lambda e: values["a"])


def test_when_to_stream(checkpoints):
    from depthprune.backend import weights_bytes
    from depthprune.backend.choose import choose_streaming

    path = checkpoints["llama"]
    size = weights_bytes(path)
    assert choose_streaming(path, None, max_memory=size // 2).stream
    assert "streaming chosen: the weights take" in choose_streaming(path, None, max_memory=size // 2).reason
    assert not choose_streaming(path, None, max_memory=size * 2).stream
    assert choose_streaming(path, True, max_memory=size * 100).stream
    assert not choose_streaming(path, False, max_memory=1).stream
    assert not choose_streaming("some-org/some-model", None, max_memory=1).stream  # not on disk: in memory
    assert weights_bytes(path, torch.bfloat16) * 2 == size  # the estimate follows the load dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback of --device auto")
def test_device_auto_streams_on_the_cpu_without_a_gpu(checkpoints):
    sm = load_streamed(checkpoints["llama"], device="auto", progress=False)
    assert str(sm.device) == "cpu" and sm.dtype == torch.float32
    with sm.layer(0) as layer:
        assert {p.device.type for p in layer.parameters()} == {"cpu"}
