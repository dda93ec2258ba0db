"""bench: every method x ratio plus dense on SmolLM2, resumable rows, failures in the table, inputs checked
first; and the single-run report written inside an atomic checkpoint save."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import PIQA_DIR
from depthprune import CalibrationSpec, Evaluation, PerplexitySpec, Plan, SpeedSpec, ZeroShotSpec, apply_plan, save
from depthprune.bench import RESULTS_JSON, RESULTS_MD, RESULTS_PLOT, ROWS_DIR, BenchError, run_bench
from depthprune.cli import main
from depthprune.models.arch import num_layers
from depthprune.models.load import load_model
from depthprune.report import compare_metrics, write_run_report
from tiny import LAYERS, save_tiny_checkpoint, text_file, tiny_model

RATIO = 0.2  # 30 layers -> 6 removed, 24 kept
LIMIT = 20
PNG = b"\x89PNG\r\n\x1a\n"

# The CLI equivalent of the API call in `first_run`; both must give the same settings fingerprint.
CLI_ARGS = ["--methods", "shortgpt,angular,boom", "--ratios", str(RATIO), "--eval-texts", "default-heldout",
            "--ppl-windows", "4",
            "--eval", "ppl,piqa_local", "--piqa-dir", str(PIQA_DIR), "--limit", str(LIMIT), "--calib-samples", "4",
            "--batch-size", "4", "-q"]


@pytest.fixture(scope="module")
def planning_calls():
    """Count every planning call per method, and register 'boom', a method that always raises."""
    from dataclasses import replace

    from depthprune.methods import METHODS, Method, MethodOptions

    calls: Counter[str] = Counter()

    def counted(method: Method) -> Method:
        def fn(*args, **kwargs):
            calls[method.name] += 1
            return method.plan(*args, **kwargs)

        return replace(method, plan=fn)

    def boom(*args, **kwargs):
        calls["boom"] += 1
        raise RuntimeError("boom never plans anything")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("shortgpt", "angular"):
            mp.setitem(METHODS, name, counted(METHODS[name]))
        mp.setitem(METHODS, "boom", Method("boom", "always fails", MethodOptions, boom))
        yield calls


@pytest.fixture(scope="module")
def first_run(planning_calls, smollm2_path, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    result = run_bench(
        smollm2_path, ["shortgpt", "angular", "boom"], [RATIO], out,
        calibration=CalibrationSpec(num_windows=4),
        evaluation=Evaluation(PerplexitySpec("default-heldout", 128, 4, batch_size=4),
                              ZeroShotSpec(["piqa_local"], limit=LIMIT, batch_size=4, piqa_dir=str(PIQA_DIR))),
        batch_size=4, progress=False,
    )
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / ROWS_DIR).iterdir()}
    return result, Counter(planning_calls), mtimes


def test_bench_writes_table_json_and_plot(first_run):
    result, calls, _ = first_run
    out = result.out
    assert calls == {"shortgpt": 1, "angular": 1, "boom": 1}
    assert (out / RESULTS_PLOT).read_bytes()[:8] == PNG

    data = json.loads((out / RESULTS_JSON).read_text())
    rows = {(r["method"], r["ratio"]): r for r in data["rows"]}
    assert list(rows) == [("dense", None), ("shortgpt", RATIO), ("angular", RATIO), ("boom", RATIO)]
    dense, short, ang = rows["dense", None], rows["shortgpt", RATIO], rows["angular", RATIO]
    assert dense["layers"] == 30 and short["layers"] == ang["layers"] == 24
    assert len(short["plan"]["dropped"]) == len(ang["plan"]["dropped"]) == 6 == short["layers_removed"]
    assert ang["plan"]["dropped"] == list(range(ang["plan"]["dropped"][0], ang["plan"]["dropped"][0] + 6))
    for row in (short, ang):
        assert row["perplexity"] > dense["perplexity"]
        assert row["params"] < dense["params"]
        assert row["perplexity_ratio"] == pytest.approx(row["perplexity"] / dense["perplexity"])
        assert row["accuracy_retention"] == pytest.approx(row["task_mean"] / dense["task_mean"])
        assert set(row["timings_s"]) >= {"load", "depth", "perplexity", "zeroshot", "total"}
        assert row["details"]["zeroshot"]["n_samples"]["piqa_local"]["effective"] == LIMIT
    assert 0 < dense["tasks"]["piqa_local"] <= 1 and dense["task_mean"] == dense["tasks"]["piqa_local"]
    assert rows["boom", RATIO]["error"] == "RuntimeError: boom never plans anything"
    assert set(data["versions"]) >= {"torch", "transformers", "lm_eval", "depthprune"}
    settings = data["settings"]
    evaluation = settings["evaluation"]
    assert settings["calibration"]["num_windows"] == 4 and evaluation["perplexity"]["max_windows"] == 4
    assert evaluation["zeroshot"]["limit"] == LIMIT and evaluation["zeroshot"]["piqa_dir"] == str(PIQA_DIR.resolve())

    table = [line for line in (out / RESULTS_MD).read_text().splitlines() if line.startswith("| ")]
    header, body = table[0], table[1:]
    assert "piqa_local" in header and "PPL" in header and "acc retention" in header
    assert [line.split("|")[1].strip() for line in body] == ["dense", "shortgpt", "angular", "boom"]
    assert "| 24 |" in body[1] and "| 30 |" in body[0]
    assert "error: RuntimeError: boom never plans anything" in body[3]


def test_rerun_reuses_finished_rows(first_run, planning_calls, smollm2_path, capsys):
    """The CLI with the API's settings: nothing finished is planned or written again; the failure is retried."""
    result, calls_before, mtimes = first_run
    capsys.readouterr()
    code = main(["bench", "--model", smollm2_path, "--out", str(result.out), *CLI_ARGS])
    stdout = capsys.readouterr().out
    assert code == 0
    assert planning_calls["shortgpt"] == calls_before["shortgpt"]
    assert planning_calls["angular"] == calls_before["angular"]
    assert planning_calls["boom"] == calls_before["boom"] + 1
    after = {p.name: p.stat().st_mtime_ns for p in (result.out / ROWS_DIR).iterdir()}
    for name in ("dense.json", f"shortgpt-{RATIO:g}.json", f"angular-{RATIO:g}.json"):
        assert after[name] == mtimes[name], name
    assert "3 reused" in stdout and "1 failed" in stdout
    data = json.loads((result.out / RESULTS_JSON).read_text())
    assert data["cached_rows"] == ["dense", f"shortgpt@{RATIO:g}", f"angular@{RATIO:g}"]
    assert [r["perplexity"] for r in data["rows"][:3]] == [r.perplexity for r in result.all_rows[:3]]


def test_bench_api_with_a_loaded_model_speed_and_changed_settings(tmp_path):
    """A LoadedModel is only evaluated (rows reload from its path); speed is reported against the ideal;
    rows computed with other settings are not reused."""
    loaded = load_model(str(save_tiny_checkpoint(tmp_path / "tiny")))

    def bench(windows: int):
        return run_bench(loaded, ["shortgpt"], [0.34], tmp_path / "out", progress=False,
                         calibration=CalibrationSpec(num_windows=2, seq_len=32),
                         evaluation=Evaluation(PerplexitySpec("default-heldout", 32, windows),
                                               speed=SpeedSpec(prompt_len=8, gen_len=2, warmup=0, repeats=1)))

    result = bench(2)
    assert num_layers(loaded.model) == LAYERS
    row = result.rows[0]
    assert (result.dense.layers, row.layers, row.layers_removed) == (LAYERS, LAYERS - 2, 2)
    assert row.decode_tokens_per_s > 0 and result.dense.decode_tokens_per_s > 0
    assert result.derived(row)["ideal_speedup"] == pytest.approx(LAYERS / (LAYERS - 2))
    md = (result.out / RESULTS_MD).read_text()
    assert "speedup (ideal)" in md and f"({LAYERS / (LAYERS - 2):.2f}x)" in md
    assert bench(2).cached == ["dense", "shortgpt@0.34"]
    changed = bench(3)
    assert changed.cached == [] and changed.dense.details["perplexity"]["windows"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "shortgpt,nope", "--ratios", "0.2"], "unknown method(s) nope"),
        (["--methods", "shortgpt", "--ratios", "0.2,1.5"], "between 0 and 1"),
        (["--methods", "shortgpt", "--ratios", "0"], "between 0 and 1"),
        (["--methods", "shortgpt", "--ratios", "a,b"], "comma-separated fractions"),
        (["--methods", "shortgpt", "--eval", "piqa_local", "--piqa-dir", "/no/such/piqa"], "does not exist"),
        (["--methods", "shortgpt", "--ppl-data", "/no/such/text.txt"], "neither a file nor a known text"),
        (["--methods", "shortgpt", "--eval", "piqa_local,no_such_task_xyz", "--piqa-dir", str(PIQA_DIR)],
         "unknown lm-eval task"),
        (["--methods", "shortgpt", "--eval", ""], "nothing to measure"),
        (["--methods", "shortgpt", "--threshold", "0.5"], "does not take --threshold"),
        (["--methods", "shortgpt,slm", "--final-window", "nope"], "must be one of commit, skip"),
    ],
)
def test_bad_input_fails_before_loading(args, message, tmp_path, capsys, monkeypatch):
    """The model path does not exist: each message proves the check ran before any loading."""
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("depthprune.bench.runner.load_model", no_loading)
    monkeypatch.setattr("depthprune.models.load.resolve_source", no_loading)
    code = main(["bench", "--model", "/no/such/model", "--out", str(tmp_path / "out"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_out_must_be_new_or_a_bench_dir(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["bench", "--model", "/no/such/model", "--methods", "shortgpt", "--out", str(tmp_path)]) == 2
    assert "did not write it as bench output" in capsys.readouterr().err
    assert main(["bench", "--methods", "shortgpt"]) == 2
    assert "--out is required" in capsys.readouterr().err
    with pytest.raises(BenchError, match="dense"):
        run_bench("/no/such/model", ["dense"], [0.2], tmp_path / "x")


def _plan_with_scores() -> Plan:
    return Plan("shortgpt", 6, remove=[2, 3], scores={"bi": [0.5, 0.4, 0.1, 0.2, 0.3, 0.6]},
                params={"metric": "bi"})


def test_run_report_inside_atomic_save(tmp_path):
    """As a job calls it: a writer of io.save, inside the temporary checkpoint directory."""
    model = tiny_model("llama")
    plan = _plan_with_scores()
    apply_plan(model, plan)
    before = {"perplexity": 60.0, "piqa_local": 0.65}
    after = {"perplexity": 90.0, "piqa_local": 0.60}
    report = {"model": "tiny", "stages": [{"stage": "depth", "summary": plan.summary()}],
              "metrics": compare_metrics(before, after, {"perplexity": False, "piqa_local": True}),
              "before": before, "after": after, "timings_s": {"depth": 1.5}, "settings": {"batch_size": 8}}
    seen = []

    def writer(tmp):
        seen.append(tmp)
        write_run_report(tmp, report, plan)

    out = save(model, None, tmp_path / "ckpt", plan, writers=[writer])
    assert seen[0] != out and not seen[0].exists()
    data = json.loads((out / "report.json").read_text())
    ppl, piqa = data["metrics"]["perplexity"], data["metrics"]["piqa_local"]
    assert not ppl["higher_is_better"] and ppl["ratio"] == pytest.approx(1.5)
    assert piqa["higher_is_better"] and piqa["change"] == pytest.approx(-0.05)
    assert data["scores_plot"] == "layer_scores.png"
    assert (out / "layer_scores.png").read_bytes()[:8] == PNG

    md = (out / "report.md").read_text()
    assert "`shortgpt: 6 -> 4 layers; remove [2, 3]`" in md
    assert "| perplexity (lower is better) | 60.00 | 90.00 | x1.50 |" in md
    assert "| piqa_local (higher is better) | 0.6500 | 0.6000 | -0.0500 (92.3% retained) |" in md
    assert "](layer_scores.png)" in md and "- depth: 1.5 s" in md


def test_direction_comes_from_the_evaluation_not_the_name():
    """A task whose metric is lower-is-better (as lm-eval declares it) is reported as such, whatever its name."""
    compared = compare_metrics({"my_task": 4.0, "perplexity": 10.0}, {"my_task": 2.0, "perplexity": 12.0},
                               {"my_task": False, "perplexity": False})
    assert not compared["my_task"]["higher_is_better"] and compared["my_task"]["ratio"] == 0.5


def test_run_report_without_scores_has_no_plot(tmp_path):
    plan = Plan("manual", 6, remove=[1])
    report = {"metrics": compare_metrics({"perplexity": 10.0}, {"perplexity": None}, {"perplexity": False})}
    md, js = write_run_report(tmp_path, report, plan)
    assert not (tmp_path / "layer_scores.png").exists()
    assert json.loads(js.read_text())["metrics"]["perplexity"]["ratio"] is None
    assert "layer_scores.png" not in md.read_text() and "| 10.00 | - | - |" in md.read_text()


def test_compensation_axis_and_auto_rows(tmp_path, monkeypatch):
    from dataclasses import replace

    from depthprune.compensate import Compensation
    from depthprune.methods import METHODS

    calls = []
    real = METHODS["shortgpt"]
    monkeypatch.setitem(METHODS, "shortgpt", replace(real, plan=lambda *a, **k: calls.append(1) or real.plan(*a, **k)))

    text = text_file(tmp_path / "text.txt")
    src = save_tiny_checkpoint(tmp_path / "model", "llama", seed=3)
    result = run_bench(str(src), ["shortgpt", "auto"], [0.34], tmp_path / "out", progress=False,
                       calibration=CalibrationSpec(str(text), num_windows=4, seq_len=32),
                       evaluation=Evaluation(PerplexitySpec(str(text), 32, 4)),
                       method_options={"auto": {"candidates": "shortgpt,sleb", "compensate_tokens": 640}},
                       compensations=["none", "linear"], compensation=Compensation(tokens=640))
    assert [r.name for r in result.rows] == ["shortgpt@0.34", "shortgpt+linear@0.34", "auto@0.34"]
    assert all(r.ok for r in result.rows), [r.error for r in result.rows]
    plain, linear, auto = result.rows
    assert plain.plan["dropped"] == linear.plan["dropped"] and linear.plan["compensation"]["fit"] == "linear"
    assert plain.plan["compensation"] is None
    assert len(calls) == 2, "shortgpt planned once for its two rows (and once inside auto)"
    assert auto.plan["params"]["chosen"] and auto.compensation == "none"
    header = next(line for line in (result.out / RESULTS_MD).read_text().splitlines() if line.startswith("| method"))
    assert header.startswith("| method | compensation | ratio |")
    assert f"| auto: {auto.plan['params']['chosen']} | - | 0.34 |" in (result.out / RESULTS_MD).read_text()
    with pytest.raises(BenchError, match="--compensate magic"):
        run_bench(str(src), ["shortgpt"], [0.34], tmp_path / "x", compensations=["magic"])
