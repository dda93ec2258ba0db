"""Healing and the layers fit in several processes (``torchrun`` / ``accelerate launch``), on the CPU with gloo:
the trained weights equal one process's with the same global batch, the main process alone writes, and a launch the run cannot
honour is refused before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from depthprune.distributed import check_launch
from depthprune.errors import InputError
from tiny import save_tiny_checkpoint

HEAL = ["--data", "fiction", "--max-steps", "3", "--batch-size", "4", "--grad-accum", "1", "--cutoff-len", "64",
        "--max-items", "24", "--val-size", "4", "--eval-steps", "3", "--lr", "2e-3", "--dropout", "0",
        "--eval", "none", "-q"]
"""Three optimizer steps of 4 sequences; dropout off, since each process draws its own masks."""


def launch(processes: int, command: str, model: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    """``depthprune COMMAND`` in ``processes`` CPU processes (torchrun, gloo; one thread each), which must succeed."""
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                          f"--nproc_per_node={processes}"]
    line = [sys.executable, *launcher, "-m", "depthprune", command, "--model", model, "--out", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(line, capture_output=True, text=True, env=env, timeout=900, cwd=out.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def heal(processes: int, model: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return launch(processes, "heal", model, out, *HEAL, *extra)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The L2 distance between two sets of weights, all tensors together."""
    return sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a).sqrt().item()


def assert_trained_alike(one: Path, two: Path, start: dict[str, torch.Tensor]) -> None:
    """Two processes' weights are within 1e-3 of how far training moved one process's (L2 over all weights;
    single elements differ by float rounding that Adam's normalisation enlarges where a gradient is near 0)."""
    a, b = weights(one), weights(two)
    moved, apart = distance(a, start), distance(a, b)
    assert moved > 1e-2, "training must move the weights for the comparison to mean anything"
    assert apart <= 1e-3 * moved, f"2 processes ended {apart:.3g} from 1 process; training moved {moved:.3g}"


def assert_written_once(tmp_path: Path, out: Path, stderr: str, processes: int) -> dict:
    """One output directory, no temporaries beside or inside it, one report line; its heal record."""
    assert not (out / ".depthprune-work").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary left beside the output"
    assert stderr.count("loading ") <= 1, "one process reports loading"
    stage = json.loads((out / "report.json").read_text())["stages"][0]
    assert stage["result"]["processes"] == processes
    assert stage["result"]["tokens_per_s_per_process"] > 0
    return stage


def test_two_processes_train_the_weights_one_process_does(smollm2_path, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    heal(1, smollm2_path, one)
    done = heal(2, smollm2_path, two)
    assert done.stdout.count("saved to") == 1, done.stdout
    stage = assert_written_once(tmp_path, two, done.stderr, 2)
    assert stage["steps"] == 3 and stage["tokens"] == 3 * 4 * 64, "--batch-size is the global batch"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    from depthprune.models.load import load_model

    assert_trained_alike(one, two, load_model(smollm2_path, progress=False).model.state_dict())


LAYERS = ["--method", "shortgpt", "--ratio", "0.25", "--seq-len", "64", "--eval", "none", "-q"]
"""A 25% plan whose kept layers at the gap train on 64-token windows."""


def prune(processes: int, model: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return launch(processes, "prune", model, out, *LAYERS, *extra)


def layers_record(out: Path) -> dict:
    """The layers fit's record in ``out``'s report."""
    stage = json.loads((out / "report.json").read_text())["stages"][0]
    return next(r["layers"] for r in stage["compensation"] if "layers" in r)


def test_the_layers_fit_in_two_processes_trains_the_weights_one_process_does(smollm2_path, tmp_path):
    """Each step's 4 windows split 2 + 2: the same steps, held-out checks and kept weights as one process; the
    linear start (0 steps) is what training moved them from."""
    start, one, two = tmp_path / "start", tmp_path / "one", tmp_path / "two"
    fit = ["--compensate", "layers", "--compensate-steps", "4"]
    prune(1, smollm2_path, start, "--compensate", "layers", "--compensate-steps", "0")
    prune(1, smollm2_path, one, *fit)
    done = prune(2, smollm2_path, two, *fit)
    assert done.stdout.count("saved to") == 1, done.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary left beside the output"
    assert not (two / ".depthprune-work").exists()
    alone, shared = layers_record(one), layers_record(two)
    assert shared["processes"] == 2 and alone["processes"] == 1 and shared["tokens_per_s_per_process"] > 0
    assert shared["tokens_trained"] == alone["tokens_trained"] == 4 * 4 * 63, "4 global windows a step"
    assert shared["kept_step"] == alone["kept_step"]
    assert shared["holdout_kl_after"] == pytest.approx(alone["holdout_kl_after"], rel=1e-4)
    assert_trained_alike(one, two, weights(start))


def test_auto_recovers_in_a_launch_with_the_main_process_planning(smollm2_path, tmp_path):
    out = tmp_path / "auto"
    done = prune(2, smollm2_path, out, "--method", "auto", "--candidates", "shortgpt,angular", "--fits", "none",
                 "--recover", "layers", "--recover-steps", "2")
    assert done.stdout.count("saved to") == 1 and done.stdout.count("auto:") <= 1, done.stdout
    assert layers_record(out)["processes"] == 2


def test_two_processes_distil_from_one_teacher_cache(smollm2_path, smollm2, tmp_path):
    """The main process builds the teacher's distributions; the other reads them; the weights still match."""
    import depthprune as dp

    student = tmp_path / "student"
    dp.save(dp.apply_plan(smollm2.model, dp.Plan(method="manual", num_layers=30, remove=[20, 21, 22])),
            smollm2.tokenizer, student)
    start = weights(student)
    one, two = tmp_path / "one", tmp_path / "two"
    distil = ["--distill", "--teacher", smollm2_path, "--train-layers", "last:2"]
    heal(1, str(student), one, *distil)
    done = heal(2, str(student), two, *distil)
    stage = assert_written_once(tmp_path, two, done.stderr, 2)
    assert stage["teacher"]["mode"] == "cache" and stage["teacher"]["reused"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "student", "two"]
    assert_trained_alike(one, two, start)


@pytest.mark.parametrize("command, extra, message", [
    ("heal", ["--data", "fiction", "--batch-size", "3"],
     "--batch-size 3 is the global batch and cannot be split across 2 processes"),
    ("prune", ["--ratio", "0.25"], "only training runs data-parallel (healing, --compensate layers"),
    ("prune", ["--ratio", "0.25", "--compensate", "linear"], "but depth runs in one"),
    ("prune", ["--ratio", "0.25", "--stream"], "only training runs data-parallel"),
    ("prune", ["--ratio", "0.25", "--compensate", "layers", "--stream"], "layer streaming (--stream"),
])
def test_a_launch_the_run_cannot_honour_is_refused_before_loading(tmp_path, run_cli, monkeypatch, command, extra,
                                                                  message):
    model = save_tiny_checkpoint(tmp_path / "model")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_cli(command, "--model", str(model), "--out", str(tmp_path / "out"), *extra, check=False)
    assert code == 2 and message in err, err
    assert "loading" not in err and not (tmp_path / "out").exists()


def test_a_launch_larger_than_the_layers_fit_batch_is_refused_before_loading(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "5")
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_cli("prune", "--model", str(save_tiny_checkpoint(tmp_path / "model")), "--ratio", "0.25",
                           "--compensate", "layers", "--out", str(tmp_path / "out"), check=False)
    assert code == 2 and "launch at most 4 processes (this launch has 5)" in err, err
    assert "loading" not in err


def test_streaming_is_refused_in_a_launch():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORLD_SIZE", "2")
        with pytest.raises(InputError, match="layer streaming .* runs in one process"):
            check_launch(batch_size=None, eval_batch_size=None, stream=True)
        check_launch(batch_size=4, eval_batch_size=2, stream=False)


def test_deepspeed_without_the_package_is_refused(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "deepspeed" else object())
    code, _, err = run_cli("heal", "--model", str(save_tiny_checkpoint(tmp_path / "model")), "--data", "fiction",
                           "--out", str(tmp_path / "out"), check=False)
    assert code == 2 and "the deepspeed package is not installed: pip install deepspeed" in err, err


def test_other_processes_leave_a_failed_check_to_the_main_one(tmp_path, run_cli, monkeypatch):
    """Every process runs the same checks: the main process prints the one error line, the others none."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr("depthprune.cli.CHECKS_GRACE_S", 0.0)
    code, _, err = run_cli("heal", "--model", str(save_tiny_checkpoint(tmp_path / "model")), "--data", "fiction",
                           "--batch-size", "3", "--out", str(tmp_path / "out"), check=False)
    assert code == 2 and err.strip() == "", err


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("with_lora", [True, False])
def test_the_main_process_rebuilds_a_sharded_model_from_its_gathered_weights(family, with_lora):
    """FSDP / ZeRO-3 leave each process a shard; accelerate gathers the full state dict, from which the main
    process rebuilds the model it merges and writes: the same weights and outputs as the trained model."""
    from peft import LoraConfig, get_peft_model

    from depthprune.heal.train import lora_targets, unsharded_copy
    from tiny import tiny_model

    model = tiny_model(family, seed=3)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets(model), fan_in_fan_out=family == "gpt2")
    trained = get_peft_model(model, lora) if with_lora else model
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name or not with_lora:
                p.add_(torch.randn_like(p) * 0.01)
    rebuilt = unsharded_copy(model, {k: v.clone() for k, v in trained.state_dict().items()},
                             lora if with_lora else None)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    expected = trained(ids).logits
    got = rebuilt(ids).logits
    assert torch.equal(got, expected)
    if with_lora:
        assert torch.allclose(rebuilt.merge_and_unload()(ids).logits, expected, atol=1e-5)


def test_an_error_while_working_is_reported_by_the_process_it_happened_in(monkeypatch):
    from depthprune.distributed import error_prefix, working

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(InputError) as caught:
        with working():
            raise InputError("the main process left no usable teacher cache")
    assert error_prefix(caught.value) == "process 1 of 2: "
    assert error_prefix(InputError("a failed check")) is None
    monkeypatch.setenv("RANK", "0")
    assert error_prefix(InputError("a failed check")) == ""
