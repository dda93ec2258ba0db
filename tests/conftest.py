"""Shared fixtures and markers: real models load once per test session (the tiny random models, tokenizers and
other helpers are in tiny.py); every test runs on one torch thread (see pytest_configure).

Two markers are set here, never by hand:

- ``slow``: the test loads a real pretrained model (one of ``REAL_MODEL_FIXTURES``);
  ``pytest -m "not slow"`` is the unit set.
- ``needs_shared``: the test reads the data in ``../shared/data`` (WikiText-2, PIQA, Austen), which a clone of
  the repository does not have. It is skipped when that folder is absent, unless ``DEPTHPRUNE_REQUIRE_SHARED=1``
  (set by CI) makes the missing folder an error: CI runs beside ``../shared`` and must skip nothing.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
WIKITEXT = SHARED_DATA / "wikitext-2" / "test.txt"
EMMA = SHARED_DATA / "austen" / "emma.txt"
PIQA_DIR = SHARED_DATA / "piqa"


SHARED_PATH_NAMES = {"SHARED_DATA", "WIKITEXT", "EMMA", "PIQA_DIR"}
REQUIRE_SHARED_ENV = "DEPTHPRUNE_REQUIRE_SHARED"

REAL_MODEL_FIXTURES = {"smollm2_path", "smollm2", "smollm2_readonly", "gemma3_path"}


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One torch thread, in this process and the CLI processes tests start: tiny models gain nothing from a
    # second one, and on a busy 2-core machine spin-waiting threads make real-model forwards and deep copies
    # several times slower (a SmolLM2 forward on 3x48 tokens: 0.4 s of CPU on one thread, 2.6 s on two).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Every test that loads a real pretrained model is `slow`: `pytest -m "not slow"` is the fast unit set.
    Every test that reads ../shared/data is `needs_shared`, and skipped (or, under CI, refused) without it."""
    shared_missing = not SHARED_DATA.is_dir()
    missing = []
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if REAL_MODEL_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
        if _needs_shared(item, fixtures):
            item.add_marker(pytest.mark.needs_shared)
            if shared_missing:
                missing.append(item)
                item.add_marker(pytest.mark.skip(reason=f"needs the test data in {SHARED_DATA}, which is absent"))
    if missing and os.environ.get(REQUIRE_SHARED_ENV) == "1":
        raise pytest.UsageError(
            f"{REQUIRE_SHARED_ENV}=1 but the test data {SHARED_DATA} is absent ({len(missing)} tests need it); "
            "clone the repository beside ../shared, or unset the variable to skip those tests")


def _needs_shared(item, fixtures: set[str]) -> bool:
    """The test asks for `shared_data` (itself or through a fixture), names one of the path constants above, or
    is parametrized with a path under ../shared/data. A helper or fixture that reads ../shared must therefore
    take `shared_data` (the test's own code is all that is inspected)."""
    if "shared_data" in fixtures:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    if any(str(SHARED_DATA) in str(value) for value in _flatten(params.values())):
        return True
    function = getattr(item, "function", None)
    return function is not None and bool(SHARED_PATH_NAMES & _names_used(function.__code__))


def _flatten(values):
    for value in values:
        if isinstance(value, (list, tuple, set, dict)):
            yield from _flatten(value.values() if isinstance(value, dict) else value)
        else:
            yield value


def _names_used(code: types.CodeType) -> set[str]:
    """Global (and imported) names a function's code refers to, nested functions included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_used(const)
    return names


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; tests asking for it are `needs_shared` (skipped when it is absent, see the module doc)."""
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


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Back to one thread after a test that changed it (`eval-speed --threads`); see pytest_configure."""
    yield
    torch.set_num_threads(1)


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
