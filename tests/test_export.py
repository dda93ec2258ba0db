"""Exports: a mergekit passthrough recipe from a removal-only plan, and pushing a checkpoint to the Hub (no
network: the Hub client is replaced by a recorder)."""

from __future__ import annotations

import json

import pytest
import yaml

from depthprune import Merge, Plan
from depthprune.export.hub import CARD_FILE, model_card, push_checkpoint, upload_plan
from depthprune.export.mergekit import ExportError, kept_ranges, mergekit_config, mergekit_yaml
from depthprune.run_record import RunRecord
from tiny import save_tiny_checkpoint


# ------------------------------------------------------------------ mergekit


def test_non_contiguous_removals_become_half_open_slices():
    plan = Plan("shortgpt", 12, remove=[0, 3, 4, 7, 11])
    run = RunRecord(source="org/base", stages=[{"stage": "depth"}])
    assert kept_ranges(plan) == [(1, 3), (5, 7), (8, 11)]
    recipe = yaml.safe_load(mergekit_yaml(plan, dtype="bfloat16", run=run))
    assert recipe["merge_method"] == "passthrough" and recipe["dtype"] == "bfloat16"
    assert [s["sources"][0]["layer_range"] for s in recipe["slices"]] == [[1, 3], [5, 7], [8, 11]]
    assert {s["sources"][0]["model"] for s in recipe["slices"]} == {"org/base"}
    kept = [i for s in recipe["slices"] for i in range(*s["sources"][0]["layer_range"])]
    assert kept == plan.kept and len(kept) == plan.num_layers_after
    assert recipe == mergekit_config(plan, dtype="bfloat16", run=run)


def test_base_model_option_and_odd_paths_survive_yaml():
    plan = Plan("angular", 6, remove=[2, 3])
    recipe = yaml.safe_load(mergekit_yaml(plan, base_model='/models/my "llama": v2'))
    assert recipe["slices"][0]["sources"][0]["model"] == '/models/my "llama": v2'
    assert [s["sources"][0]["layer_range"] for s in recipe["slices"]] == [[0, 2], [4, 6]]


SOURCE = RunRecord(source="m", stages=[{"stage": "depth"}])


@pytest.mark.parametrize("plan, run, message", [
    (Plan("slm", 8, merges=[Merge(2, 4, "reference")]), SOURCE, "merges layers \\(2..4\\)"),
    (Plan("x", 8, remove=[1], compensation={"fit": "linear"}), SOURCE, "compensates its gaps \\(linear fit\\)"),
    (Plan("shortgpt", 8, remove=[1]), RunRecord(source="m", stages=[{"stage": "depth"}, {"stage": "width"}]),
     "later stages \\(width\\)"),
    (Plan("shortgpt", 8, remove=[1]), None, "records no source model"),
])
def test_plans_passthrough_cannot_express_are_refused(plan, run, message):
    with pytest.raises(ExportError, match=message):
        mergekit_config(plan, run=run)


def test_a_checkpoint_from_before_the_run_record_keeps_its_source_and_stages(tmp_path):
    """Older checkpoints kept the source model and later stages in their plan file."""
    legacy = {"method": "shortgpt", "num_layers": 8, "remove": [1], "model": "org/base",
              "calibration": {"source": "default"}, "stages": [{"stage": "heal", "summary": "h"}]}
    (tmp_path / "depthprune_plan.json").write_text(json.dumps(legacy))
    run = RunRecord.of_checkpoint(tmp_path)
    assert run.source == "org/base" and run.names() == ["depth", "heal"]
    assert run.stages[0]["calibration"] == {"source": "default"}
    with pytest.raises(ExportError, match="later stages \\(heal\\)"):
        mergekit_config(Plan.load(tmp_path), run=run)


@pytest.fixture()
def pruned(tmp_path, run_cli):
    """A tiny model pruned through the CLI (with perplexity before/after for the report)."""
    model = save_tiny_checkpoint(tmp_path / "model", "llama", layers=8)
    run_cli("prune", "--model", model, "--method", "shortgpt", "--remove-layers", "3", "--out", tmp_path / "pruned",
            "--calib-samples", "4", "--seq-len", "24", "--eval", "ppl", "--ppl-windows", "2", "-q")
    return tmp_path / "pruned"


def test_export_mergekit_command(pruned, tmp_path, run_cli):
    plan = Plan.load(pruned)
    printed = yaml.safe_load(run_cli("export", "mergekit", pruned).stdout)
    assert printed["dtype"] == "float32"  # the checkpoint's own
    assert printed["slices"][0]["sources"][0]["model"] == str(tmp_path / "model")
    assert [i for s in printed["slices"] for i in range(*s["sources"][0]["layer_range"])] == plan.kept
    target = tmp_path / "recipes" / "prune.yaml"
    run_cli("export", "mergekit", pruned / "depthprune_plan.json", "--out", target, "--dtype", "bfloat16")
    assert yaml.safe_load(target.read_text())["dtype"] == "bfloat16"
    run_cli("export", "mergekit", pruned, "--out", target)  # its own file is replaced
    assert yaml.safe_load(target.read_text())["dtype"] == "float32"

    (tmp_path / "mine.yaml").write_text("my: recipe\n")
    for out, message in [(tmp_path / "mine.yaml", "not a result depthprune wrote"),
                         (tmp_path / "recipe.yml", "must end in .yaml"),
                         (pruned / "recipe.yaml", "inside the model directory")]:
        proc = run_cli("export", "mergekit", pruned, "--out", out, check=False)
        assert proc.returncode == 2 and message in proc.stderr
    assert (tmp_path / "mine.yaml").read_text() == "my: recipe\n"
    assert not (tmp_path / "recipe.yml").exists() and not (pruned / "recipe.yaml").exists()


def test_export_mergekit_refuses_a_merge_plan(tmp_path, run_cli):
    (tmp_path / "plan.json").write_text(Plan("slm", 6, merges=[Merge(1, 3, "average")]).to_json())
    proc = run_cli("export", "mergekit", tmp_path / "plan.json", check=False)
    assert proc.returncode == 2 and "passthrough can only select" in proc.stderr


# ------------------------------------------------------------------ Hub


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls, uploads nothing."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if self.fail:
            raise ConnectionError("no network")
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/1"})()


def test_model_card_says_what_was_done(pruned):
    card = model_card(pruned, command="depthprune prune --ratio 0.3", repo="me/tiny-pruned")
    plan = Plan.load(pruned)
    report = json.loads((pruned / "report.json").read_text())
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "# me/tiny-pruned" in card
    assert "- method: `shortgpt`" in card and "- layers: 8 -> 5" in card
    assert f"- removed layers (original indices): {plan.remove}" in card and "- merged layers: none" in card
    ppl = report["metrics"]["perplexity"]
    assert f"| perplexity (lower is better) | {ppl['before']:.2f}" in card
    assert "depthprune prune --ratio 0.3" in card and "0.2.0" in card
    assert "subject to that model's license" in card
    assert "base_model:" not in card  # a local directory is not a Hub id


def test_push_uploads_exactly_the_planned_files(pruned):
    (pruned / CARD_FILE).write_text(model_card(pruned))
    files = upload_plan(pruned)
    assert files == sorted(["README.md", "config.json", "depthprune_plan.json", "depthprune_run.json",
                            "generation_config.json",
                            "layer_scores.png", "model.safetensors", "report.json", "report.md", "tokenizer.json",
                            "tokenizer_config.json"])
    assert push_checkpoint(pruned, "me/tiny", dry_run=True).files == files
    api = RecordingApi()
    result = push_checkpoint(pruned, "me/tiny", api=api, private=True)
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "me/tiny", "repo_type": "model", "private": True, "exist_ok": True}
    upload = api.calls[1][1]
    assert upload["allow_patterns"] == files and upload["folder_path"] == str(pruned)
    assert result.uploaded and result.url.endswith("/commit/1")


def test_prune_push_to_hub_writes_the_card_in_the_atomic_save(tmp_path, run_cli, monkeypatch):
    import huggingface_hub

    apis = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **kw: apis.append(RecordingApi()) or apis[-1])
    model = save_tiny_checkpoint(tmp_path / "model", "llama", layers=8)
    proc = run_cli("prune", "--model", model, "--ratio", "0.25", "--out", tmp_path / "out", "--calib-samples", "4",
                   "--seq-len", "24", "-q", "--push-to-hub", "me/tiny-pruned")
    card = (tmp_path / "out" / CARD_FILE).read_text()
    assert "depthprune prune --model" in card and "--push-to-hub me/tiny-pruned" in card
    assert "uploaded 11 files to https://huggingface.co/me/tiny-pruned/commit/1" in proc.stderr
    assert apis[0].calls[1][1]["allow_patterns"] == upload_plan(tmp_path / "out")


def test_failed_upload_keeps_the_checkpoint_and_says_how_to_retry(tmp_path, run_cli, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **kw: RecordingApi(fail=True))
    model = save_tiny_checkpoint(tmp_path / "model", "llama", layers=8)
    proc = run_cli("prune", "--model", model, "--ratio", "0.25", "--out", tmp_path / "out", "--calib-samples", "4",
                   "--seq-len", "24", "-q", "--push-to-hub", "me/x", check=False)
    assert proc.returncode == 2
    assert "upload to me/x failed (ConnectionError: no network)" in proc.stderr
    assert "depthprune export hub" in proc.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / CARD_FILE).is_file()


def test_bad_repo_id_is_refused_before_work(tmp_path, run_cli):
    model = save_tiny_checkpoint(tmp_path / "model", "llama", layers=8)
    proc = run_cli("prune", "--model", model, "--ratio", "0.25", "--out", tmp_path / "out", "--push-to-hub",
                   "not a/valid/repo", check=False)
    assert proc.returncode == 2 and "not a valid Hub repository id" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_export_hub_dry_run_and_upload(pruned, run_cli, monkeypatch):
    import huggingface_hub

    out = run_cli("export", "hub", pruned, "--repo", "me/tiny", "--dry-run").stdout
    assert "would upload to me/tiny" in out and "  README.md" in out and "- method: `shortgpt`" in out
    assert not (pruned / CARD_FILE).exists()
    apis = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **kw: apis.append(RecordingApi()) or apis[-1])
    run_cli("export", "hub", pruned, "--repo", "me/tiny")
    assert (pruned / CARD_FILE).is_file() and apis[0].calls[1][1]["allow_patterns"] == upload_plan(pruned)


def test_export_hub_refuses_what_depthprune_did_not_write(tmp_path, run_cli):
    (tmp_path / "mine").mkdir()
    proc = run_cli("export", "hub", tmp_path / "mine", "--repo", "me/x", check=False)
    assert proc.returncode == 2 and "not a checkpoint depthprune wrote" in proc.stderr
