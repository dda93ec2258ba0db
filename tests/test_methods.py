"""The method registry: declared options, refused foreign options, flags, and errors that keep tracebacks."""

from __future__ import annotations

from functools import partial

import pytest

import depthprune.bench.runner  # noqa: F401  (bound before any test patches load_model)
from depthprune.cli import main
from depthprune.errors import DepthpruneError
from depthprune.methods import METHODS, Target, build_options, describe_methods, make_plan, parse_flags
from depthprune.plan import PlanError
from tiny import tiny_calibration, tiny_model


_cal = partial(tiny_calibration, 3, 10, seed=5, source="random")


def _foreign_option(method: str) -> str:
    """An option some other method declares and ``method`` does not."""
    own = {i.name for i in METHODS[method].options.infos()}
    for other in METHODS.values():
        for info in other.options.infos():
            if info.name not in own:
                return info.name
    raise AssertionError("every method takes every option")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_option_the_method_does_not_take_is_refused(method):
    foreign = _foreign_option(method)
    own = [i.flag for i in METHODS[method].options.infos()]
    with pytest.raises(PlanError, match=f"does not take --{foreign.replace('_', '-')}") as err:
        build_options(method, {foreign: 1})
    assert all(flag in str(err.value) for flag in own), "the message names the options it does take"
    with pytest.raises(PlanError, match="does not take"):
        make_plan(method, tiny_model("llama"), _cal(), Target(remove=1), progress=False, **{foreign: 1})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cli_refuses_a_foreign_option_before_loading(method, run_cli, tmp_path, monkeypatch):
    for where in ("depthprune.models.load.load_model", "depthprune.bench.runner.load_model"):
        monkeypatch.setattr(where, _no_loading)
    foreign = _foreign_option(method)
    flag = "--" + foreign.replace("_", "-")
    res = run_cli("prune", "--model", "/no/such/model", "--method", method, "--ratio", "0.2", flag, "1",
                  "--out", tmp_path / "out", check=False)
    assert res.code == 2 and f"does not take {flag}" in res.err
    assert len(res.err.strip().splitlines()) == 1


def _no_loading(*args, **kwargs):
    raise AssertionError("the model was loaded before the options were checked")


def test_every_method_describes_its_options(run_cli):
    text = describe_methods()
    printed = run_cli("methods").out
    for method in METHODS.values():
        assert f"{method.name}: {method.summary}" in printed
        for info in method.options.infos():
            assert info.flag in text and info.help in printed
    assert "[default: reference]" in printed and "[default: 4]" in printed
    assert "Method options" in run_cli("prune", "--help").out


def test_flags_are_typed_and_go_to_the_methods_that_declare_them():
    got = parse_flags(["--threshold", "0.7", "--operator=average", "--merge-layers", "3", "--highest", "none"],
                      ["slm", "laco"], command="bench")
    assert got["slm"] == {"threshold": 0.7, "operator": "average"}
    assert got["laco"] == {"threshold": 0.7, "operator": "average", "merge_layers": 3, "highest": None}
    with pytest.raises(PlanError, match="takes a int"):
        parse_flags(["--merge-layers", "three"], ["laco"], command="prune")
    with pytest.raises(PlanError, match="needs a value"):
        parse_flags(["--threshold"], ["slm"], command="prune")
    with pytest.raises(PlanError, match="unexpected argument"):
        parse_flags(["stray"], ["slm"], command="prune")


def test_options_are_validated_when_built():
    with pytest.raises(PlanError, match="must be one of bi, angular"):
        build_options("shortgpt", {"metric": "nope"})
    with pytest.raises(PlanError, match="between 0 and 1"):
        build_options("slm", {"threshold": 1.5})
    with pytest.raises(PlanError, match="--block must be at least 1"):
        build_options("angular", {"block": 0})
    with pytest.raises(PlanError, match="needs a depth"):
        make_plan("shortgpt", tiny_model("llama"), _cal(), progress=False)


@pytest.mark.parametrize("method", ["slm", "laco"])
def test_batch_size_reaches_the_merging_engine(method, monkeypatch):
    import importlib

    module = importlib.import_module(f"depthprune.methods.{method}")
    seen = []
    real = module.SimilarityEngine

    def spy(model, calibration, *, batch_size=None, **kw):
        seen.append(batch_size)
        return real(model, calibration, batch_size=batch_size, **kw)

    monkeypatch.setattr(module, "SimilarityEngine", spy)
    make_plan(method, tiny_model("llama"), _cal(), threshold=0.5, batch_size=2, progress=False)
    assert seen == [2]


def test_an_internal_error_keeps_its_traceback(monkeypatch, tmp_path, capsys):
    """Only DepthpruneError is an input error; a bug anywhere else propagates with its traceback."""
    from dataclasses import replace

    def broken(*args, **kwargs):
        raise ValueError("an internal bug, not the user's fault")

    monkeypatch.setitem(METHODS, "shortgpt", replace(METHODS["shortgpt"], plan=broken))
    monkeypatch.setattr("depthprune.cli.groups.load", lambda *a, **k: _tiny_loaded(tmp_path))
    monkeypatch.setattr("depthprune.data.calibration.CalibrationSpec.windows", lambda self, tok: _cal())
    with pytest.raises(ValueError, match="an internal bug"):
        main(["prune", "--ratio", "0.2", "--out", str(tmp_path / "out"), "-q"])
    assert not issubclass(ValueError, DepthpruneError)


def _tiny_loaded(tmp_path):
    from depthprune.models.load import LoadedModel

    return LoadedModel(tiny_model("llama"), None, "tiny", str(tmp_path / "no-such-dir"))
