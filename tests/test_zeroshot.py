"""Zero-shot evaluation: numbers must be lm-eval's own (on SmolLM2), offline failures must be immediate and
clear (on a tiny random model: only the refusal is under test)."""

from __future__ import annotations

import json
import os
import socket
import statistics
from pathlib import Path

import pytest
import yaml

from conftest import PIQA_DIR
from depthprune.evaluate import zeroshot
from depthprune.evaluate.offline import HubTaskUnavailableError
from depthprune.evaluate.piqa import PIQA_DIR_ENV, PiqaDataError, prepare_piqa_local, resolve_piqa_dir, task_cache_dir
from depthprune.evaluate.zeroshot import PAPER_TASKS, ZeroShotResult, check_tasks, evaluate_zeroshot, pick_score
from depthprune.paths import CACHE_ENV
from tiny import byte_tokenizer, tiny_model

LIMIT = 40
BATCH_SIZE = 16


@pytest.fixture(scope="module")
def piqa_dir(shared_data) -> Path:
    """The shared PIQA release files; missing data fails the tests rather than skipping them."""
    for name in ("valid.jsonl", "valid-labels.lst"):
        if not (PIQA_DIR / name).is_file():
            pytest.fail(f"PIQA file {PIQA_DIR / name} not found (expected in ../shared/data/piqa)")
    return PIQA_DIR


@pytest.fixture(scope="module")
def cache_dir(smollm2_path, tmp_path_factory):
    """Keep rendered tasks out of the user's cache (after the model path is resolved from it)."""
    path = tmp_path_factory.mktemp("depthprune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(path))
        yield path


@pytest.fixture(scope="module")
def tiny_lm():
    """A tiny random model and its tokenizer, for the paths that fail before any scoring."""
    tok = byte_tokenizer()
    return tiny_model("llama", vocab_size=len(tok)), tok


@pytest.fixture(scope="module")
def piqa_result(smollm2_readonly, piqa_dir, cache_dir) -> ZeroShotResult:
    model, tok = smollm2_readonly
    return evaluate_zeroshot(
        model, tok, ["piqa_local"], limit=LIMIT, batch_size=BATCH_SIZE, piqa_dir=piqa_dir, progress=False
    )


def test_piqa_matches_direct_lm_eval(smollm2_readonly, piqa_dir, cache_dir, piqa_result) -> None:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    assert task_cache_dir() == cache_dir / "tasks"
    include = prepare_piqa_local(piqa_dir, task_cache_dir())
    assert include.parent == cache_dir / "tasks"
    assert piqa_result.settings["include_paths"] == [str(include)]

    model, tok = smollm2_readonly
    direct = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH_SIZE),
        tasks=["piqa_local"],
        num_fewshot=0,
        limit=LIMIT,
        task_manager=TaskManager(include_path=str(include), include_defaults=False),
        log_samples=False,
    )
    expected = direct["results"]["piqa_local"]
    assert piqa_result.metrics["piqa_local"] == expected["acc,none"]
    assert piqa_result.scores["piqa_local"].stderr == expected["acc_stderr,none"]
    assert piqa_result.raw["results"]["piqa_local"]["acc_norm,none"] == expected["acc_norm,none"]


def test_piqa_result_summary(piqa_result: ZeroShotResult) -> None:
    score = piqa_result.scores["piqa_local"]
    assert score.metric == PAPER_TASKS["piqa"] == "acc"
    assert 0.5 < score.value <= 1.0
    assert score.stderr is not None and score.stderr > 0
    assert piqa_result.mean == statistics.fmean(piqa_result.metrics.values())
    assert piqa_result.raw["n-samples"]["piqa_local"]["effective"] == LIMIT
    settings = piqa_result.settings
    assert (settings["limit"], settings["num_fewshot"], settings["batch_size"]) == (LIMIT, 0, BATCH_SIZE)
    assert settings["lm_eval_version"]
    json.dumps(piqa_result.to_dict())


def test_hub_task_fails_at_once_without_trying_the_network(tiny_lm, monkeypatch, tmp_path) -> None:
    """Offline mode is forced, so a task whose data is only on the Hub fails without one connection attempt
    (no waiting on timeouts and retries), and the user's own offline settings are restored afterwards."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # a user who chose no mode (conftest sets them)
        monkeypatch.delenv(var, raising=False)
    for module, flag in ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                         (huggingface_hub.constants, "HF_HUB_OFFLINE")):
        monkeypatch.setattr(module, flag, False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)

    zeroshot._full_task_manager.cache_clear()
    model, tok = tiny_lm
    with pytest.raises(HubTaskUnavailableError) as info:
        evaluate_zeroshot(model, tok, ["boolq"], limit=2)

    assert attempts == [], "offline mode was not forced: the Hub was tried"
    message = str(info.value)
    assert "boolq" in message and "--task-dir" in message and "piqa_local" in message
    assert "HF_HUB_OFFLINE" not in os.environ
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and datasets.config.HF_DATASETS_OFFLINE is False


def test_unknown_task_is_rejected(tiny_lm, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = tiny_lm
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        evaluate_zeroshot(model, tok, ["no_such_task_xyz"])


def _fake_piqa(root: Path, labels: list[str] | None = ("0", "1", "1")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    docs = [{"goal": f"goal {i}", "sol1": f"a{i}", "sol2": f"b{i}"} for i in range(3)]
    (root / "valid.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    if labels is not None:
        (root / "valid-labels.lst").write_text("".join(f"{x}\n" for x in labels))
    return root


def test_prepare_piqa_local_renders_builtin_task(tmp_path) -> None:
    import lm_eval

    task_dir = prepare_piqa_local(_fake_piqa(tmp_path / "piqa"), tmp_path / "work")
    config = yaml.safe_load((task_dir / "piqa_local.yaml").read_text())
    data_file = Path(config["dataset_kwargs"]["data_files"]["validation"])
    assert data_file.is_absolute() and data_file.parent == task_dir
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    assert [r["label"] for r in rows] == [0, 1, 1]
    assert rows[2] == {"goal": "goal 2", "sol1": "a2", "sol2": "b2", "label": 1}

    builtin = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "piqa" / "piqa.yaml").read_text())
    assert config["task"] == "piqa_local" and config["dataset_path"] == "json"
    same_as_builtin = (
        "output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "validation_split"
    )
    for key in same_as_builtin:
        assert config[key] == builtin[key], key

    mtime = data_file.stat().st_mtime_ns
    assert prepare_piqa_local(tmp_path / "piqa", tmp_path / "work") == task_dir
    assert data_file.stat().st_mtime_ns == mtime


def test_missing_piqa_dir_is_clear(tiny_lm, tmp_path) -> None:
    with pytest.raises(PiqaDataError, match="does not exist"):
        prepare_piqa_local(tmp_path / "nowhere", tmp_path / "work")
    model, tok = tiny_lm
    with pytest.raises(PiqaDataError, match="does not exist"):
        evaluate_zeroshot(model, tok, ["piqa_local"], piqa_dir=tmp_path / "nowhere")


def test_piqa_local_without_location_is_clear(tiny_lm, monkeypatch) -> None:
    monkeypatch.delenv(PIQA_DIR_ENV, raising=False)
    model, tok = tiny_lm
    with pytest.raises(PiqaDataError, match=PIQA_DIR_ENV):
        evaluate_zeroshot(model, tok, ["piqa_local"])


def test_missing_or_misaligned_labels_are_clear(tmp_path) -> None:
    with pytest.raises(PiqaDataError, match="valid-labels.lst"):
        prepare_piqa_local(_fake_piqa(tmp_path / "nolabels", labels=None), tmp_path / "work")
    with pytest.raises(PiqaDataError, match="3 examples but .* 2 labels"):
        prepare_piqa_local(_fake_piqa(tmp_path / "short", labels=["0", "1"]), tmp_path / "work")
    with pytest.raises(PiqaDataError, match="expected label 0 or 1"):
        prepare_piqa_local(_fake_piqa(tmp_path / "bad", labels=["0", "2", "1"]), tmp_path / "work")


def test_piqa_dir_from_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(PIQA_DIR_ENV, str(tmp_path))
    assert resolve_piqa_dir(None) == tmp_path
    assert resolve_piqa_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_metric_choice() -> None:
    entry = {
        "alias": "x",
        "acc,none": 0.4,
        "acc_stderr,none": 0.1,
        "acc_norm,none": 0.6,
        "acc_norm_stderr,none": "N/A",
    }
    assert pick_score("hellaswag", entry).metric == "acc_norm"
    assert pick_score("hellaswag", entry).stderr is None
    assert pick_score("boolq", entry).value == 0.4
    assert pick_score("my_task", entry).metric == "acc"
    gen_entry = {"alias": "g", "exact_match,strict": 0.3, "exact_match_stderr,strict": 0.05}
    other = pick_score("my_gen_task", gen_entry)
    assert (other.metric, other.value, other.stderr) == ("exact_match", 0.3, 0.05)


def test_missing_task_dir_is_clear(tiny_lm, tmp_path) -> None:
    model, tok = tiny_lm
    with pytest.raises(FileNotFoundError, match="task directory"):
        evaluate_zeroshot(model, tok, ["my_task"], task_dir=tmp_path / "nowhere")


def test_check_tasks_fails_before_any_model_work(piqa_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert check_tasks(["piqa_local"], piqa_dir=piqa_dir) == [str(prepare_piqa_local(piqa_dir, task_cache_dir()))]
    with pytest.raises(ValueError, match="no tasks given"):
        check_tasks([])
    with pytest.raises(PiqaDataError, match="does not exist"):
        check_tasks(["piqa_local"], piqa_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="task directory"):
        check_tasks(["piqa_local"], piqa_dir=piqa_dir, task_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        check_tasks(["piqa_local", "no_such_task_xyz"], piqa_dir=piqa_dir)
