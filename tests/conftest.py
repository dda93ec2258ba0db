"""Shared fixtures: real models load once per test session; tiny random models per architecture."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
WIKITEXT = SHARED_DATA / "wikitext-2" / "test.txt"
EMMA = SHARED_DATA / "austen" / "emma.txt"
PIQA_DIR = SHARED_DATA / "piqa"


REAL_MODEL_FIXTURES = {"smollm2_path", "smollm2", "smollm2_readonly", "gemma3_path"}


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Every test that loads a real pretrained model is `slow`: `pytest -m "not slow"` is the fast unit set."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data not found at {SHARED_DATA} (the repository is expected beside ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The converted SmolLM2-135M directory (converted from GGUF once, then cached)."""
    from depthprune.models.load import resolve_source

    return str(resolve_source("smollm2-135m"))


@pytest.fixture()
def smollm2(smollm2_path):
    """A fresh SmolLM2-135M (tests prune it in place)."""
    from depthprune import load_model

    return load_model(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_readonly(smollm2_path):
    """One shared SmolLM2-135M that tests must not modify."""
    from depthprune import load_model

    return load_model(smollm2_path)


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    from depthprune.models.load import resolve_source

    return str(resolve_source("gemma3-270m"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models and short training gain nothing from a second one, and on a
    shared 2-core machine its spin-waiting makes them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    code = property(lambda self: self.returncode)
    out = property(lambda self: self.stdout)
    err = property(lambda self: self.stderr)

    def __iter__(self):
        return iter((self.returncode, self.stdout, self.stderr))


@pytest.fixture()
def run_cli(capsys):
    """Run the CLI in-process (loading torch per call would dominate the suite's time).

    ``check=True`` (default) fails the test on a non-zero exit; pass ``check=False`` to test errors.
    """
    from depthprune.cli import main

    def run(*args, check: bool = True) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        result = CliResult(code, captured.out, captured.err)
        if check and code != 0:
            raise AssertionError(f"exit {code}\n{result.stdout}\n{result.stderr}")
        return result

    return run
