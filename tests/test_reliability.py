"""Faults during a run: a kill in the middle of a checkpoint save, a full disk, out of memory (advice, and the retry
with a smaller micro-batch), NaN/inf batches skipped and counted, and save_total_limit keeping the best checkpoint.

Faults are injected where they would really happen: a real SIGKILL to a subprocess that is inside the Trainer's
save, OSError(ENOSPC) from the Trainer's RNG-state writer, torch.OutOfMemoryError from the Trainer's training step,
a NaN loss from TRL's compute_loss."""

from __future__ import annotations

import errno
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from conftest import kill_job, read_metrics, run_cli, tiny_recipe
from tuneforge.recipe import parse_recipe
from tuneforge.train import train


def _raw(model_dir, data_file, **train_keys):
    return tiny_recipe(model_dir, data_file, adapter={"type": "lora", "dropout": 0.0},
                       train={"max_steps": 6, "batch_size": 2, "save_every": 2, "lr": 1e-3, "optimizer": "adamw_torch",
                              "scheduler": "constant", **train_keys},
                       eval={"baseline": False, "max_examples": 1, "max_new_tokens": 2, "forgetting": False,
                             "few_shot": 0})


def _train(raw, out, **kwargs):
    return train(parse_recipe(raw), output=str(out), console=Console(record=True, width=200), doctor=False, **kwargs)


def _losses(run_path):
    return {row["step"]: row["loss"] for row in read_metrics(run_path) if "loss" in row}


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    return run_cli(monkeypatch, capsys, *args)


def _write(tmp_path, raw, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _assert_loadable(checkpoint: Path, step: int):
    import torch
    from safetensors.torch import load_file

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == step
    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert optimizer["state"]


# ---------------------------------------------------------------------------------------------------------------
# Atomic checkpoints: SIGKILL inside a save

SLOW_SAVE = """
import sys, time
from pathlib import Path
from transformers import Trainer
marker = Path(sys.argv[1])
original = Trainer._save_rng_state
def slow(self, output_dir):
    if self.state.global_step == 4:  # weights and optimizer are written; RNG state and trainer state are not
        marker.write_text(str(output_dir))
        time.sleep(300)
    return original(self, output_dir)
Trainer._save_rng_state = slow
from tuneforge.cli import main
sys.argv = ["tuneforge"] + sys.argv[2:]
main()
"""


def test_sigkill_during_a_save_keeps_previous_checkpoint_and_resumes(tmp_path, tiny_model_dir, small_sft_file):
    recipe = _write(tmp_path, _raw(tiny_model_dir, small_sft_file))
    out, marker = tmp_path / "run", tmp_path / "saving"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(marker), "train", str(recipe), "--output", str(out),
                             "--no-doctor"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    kill_job(proc.pid)
    proc.wait()
    assert marker.exists(), "the run never reached the save of step 4"

    checkpoints = out / "checkpoints"
    partial = Path(marker.read_text())
    assert partial == checkpoints / ".tmp" / "checkpoint-4"  # the Trainer wrote under a temporary name
    assert (partial / "adapter_model.safetensors").exists() and not (partial / "trainer_state.json").exists()
    assert not (checkpoints / "checkpoint-4").exists()  # killed mid-save: nothing half-written under the real name
    _assert_loadable(checkpoints / "checkpoint-2", 2)

    resumed = subprocess.run([sys.executable, "-m", "tuneforge", "train", "--resume", str(out)],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout and "checkpoint-2" in resumed.stdout
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    assert sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]
    _assert_loadable(checkpoints / "checkpoint-4", 4)
    assert not partial.exists()  # the leftover of the killed save was cleared


# ---------------------------------------------------------------------------------------------------------------
# Disk full during a save


def test_disk_full_during_save_is_a_clear_error_and_the_run_resumes(tmp_path, tiny_model_dir, small_sft_file,
                                                                   monkeypatch, capsys):
    from transformers import Trainer

    original = Trainer._save_rng_state

    def full_disk(self, output_dir):
        if self.state.global_step == 4:
            Path(output_dir, "rng_state.pth").write_bytes(b"\0" * 1000)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", full_disk)
    out = tmp_path / "run"
    code, err = _cli(monkeypatch, capsys, "train", str(_write(tmp_path, _raw(tiny_model_dir, small_sft_file))),
                     "--output", str(out), "--no-doctor")
    assert code == 4, err
    assert "disk full while writing checkpoint-4" in err and str(out / "checkpoints" / "checkpoint-4") in err
    assert "GiB free" in err and "checkpoint-2 is intact" in err and f"--resume {out}" in err
    assert "save_total_limit" in err and "Traceback" not in err
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "DiskFullError" in status["error"]
    checkpoints = out / "checkpoints"
    assert not (checkpoints / "checkpoint-4").exists() and not (checkpoints / ".tmp" / "checkpoint-4").exists()
    _assert_loadable(checkpoints / "checkpoint-2", 2)

    monkeypatch.setattr(Trainer, "_save_rng_state", original)  # space freed: the run continues
    from tuneforge.recipe import load_recipe

    run = train(load_recipe(out / "recipe.yaml"), output=str(out), resume=True, console=Console(record=True))
    assert run.status == "completed" and sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]


def test_disk_full_while_saving_the_final_weights(tmp_path, tiny_model_dir, small_sft_file, monkeypatch):
    from transformers import Trainer

    from tuneforge.errors import DiskFullError

    original = Trainer.save_model

    def full_disk(self, output_dir=None, _internal_call=False):
        if output_dir and Path(output_dir).name == "adapter":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, _internal_call)

    monkeypatch.setattr(Trainer, "save_model", full_disk)
    with pytest.raises(DiskFullError, match="disk full while writing the run's files") as caught:
        _train(_raw(tiny_model_dir, small_sft_file, max_steps=2), tmp_path / "run")
    assert "--resume" in caught.value.fix
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


def test_disk_full_recognised_without_errno():
    """torch.save reports a full disk as a failed write without errno; safetensors as an OS error 28 message."""
    from tuneforge.checkpoints import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), Path("."))
    assert is_disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"), Path("."))
    assert not is_disk_full(RuntimeError("PytorchStreamWriter failed writing file data/0"), Path("."))  # space left
    assert not is_disk_full(ValueError("bad value"), Path("."))


# ---------------------------------------------------------------------------------------------------------------
# save_total_limit keeps the best checkpoint


def test_save_total_limit_never_deletes_the_best_checkpoint(tmp_path, tiny_model_dir, small_sft_file, monkeypatch):
    from transformers import Trainer

    scripted = {2: 2.0, 4: 1.0, 6: 1.5, 8: 1.7, 10: 1.8}  # the best held-out loss is at step 4, then it gets worse
    original = Trainer.evaluation_loop

    def evaluation_loop(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        if self.state.global_step in scripted:
            output.metrics["eval_loss"] = scripted[self.state.global_step]
        return output

    monkeypatch.setattr(Trainer, "evaluation_loop", evaluation_loop)
    run = _train(_raw(tiny_model_dir, small_sft_file, max_steps=10, eval_every=2, save_total_limit=2), tmp_path / "run")
    assert run.status == "completed"
    kept = sorted(p.name for p in (run.path / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-10", "checkpoint-4", "checkpoint-8"]  # the newest 2, and the best (step 4)
    _assert_loadable(run.path / "checkpoints" / "checkpoint-4", 4)
    assert not any((run.path / "checkpoints" / ".tmp").iterdir())


def test_rotation_rules(tmp_path):
    from tuneforge.checkpoints import rotate

    def make(steps):
        for step in steps:
            (tmp_path / f"checkpoint-{step}").mkdir()
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")

    make([1, 2, 3, 4, 5])
    assert [p.name for p in rotate(tmp_path, None, [])] == []  # no limit: keep all
    assert [p.name for p in rotate(tmp_path, 2, [])] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    make([1, 2, 3])
    history = [{"step": 2, "eval_loss": 0.5}, {"step": 3, "eval_loss": float("nan")}, {"step": 5, "eval_loss": 0.9}]
    assert [p.name for p in rotate(tmp_path, 1, history)] == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-5"]


# ---------------------------------------------------------------------------------------------------------------
# Out of memory


def _oom_at(monkeypatch, step: int, when_batch_above: int = 0):
    import torch
    from transformers import Trainer

    original = Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step + 1 == step and self.args.per_device_train_batch_size > when_batch_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", training_step)


def test_out_of_memory_names_the_step_and_gives_the_plans_advice(tmp_path, tiny_model_dir, small_sft_file,
                                                                 monkeypatch, capsys):
    _oom_at(monkeypatch, step=3)
    out = tmp_path / "run"
    raw = _raw(tiny_model_dir, small_sft_file, batch_size=4, grad_accum=2)
    code, err = _cli(monkeypatch, capsys, "train", str(_write(tmp_path, raw)), "--output", str(out), "--no-doctor")
    assert code == 5, err
    assert "train.batch_size: out of memory at step 3 (training, micro-batch 4" in err
    assert "train.batch_size: 2 with train.grad_accum: 4 (same effective batch of 8)" in err
    assert "train.gradient_checkpointing: true" in err and "adapter.type: qlora" in err
    assert "GiB planned" in err and "train.oom_retry: true" in err and "Traceback" not in err
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "OutOfMemory" in status["error"]


def test_oom_retry_halves_the_micro_batch_and_keeps_the_effective_batch(tmp_path, tiny_model_dir, small_sft_file,
                                                                        monkeypatch):
    raw = _raw(tiny_model_dir, small_sft_file, batch_size=4, grad_accum=1, max_steps=6, save_every=3)
    straight = _train(raw, tmp_path / "straight")
    _oom_at(monkeypatch, step=5, when_batch_above=2)  # batch 4 does not fit from step 5 on; batch 2 does
    run = _train({**raw, "train": {**raw["train"], "oom_retry": True}}, tmp_path / "retried")
    assert run.status == "completed"
    status = run.read_json("status.json")
    assert status["oom_retries"] == [{"step": 5, "batch_size": 4, "grad_accum": 1, "new_batch_size": 2,
                                      "new_grad_accum": 2}]
    saved = yaml.safe_load((run.path / "recipe.yaml").read_text())["train"]
    assert (saved["batch_size"], saved["grad_accum"]) == (2, 2)  # a later --resume keeps the smaller micro-batch
    # Continued from checkpoint-3; every optimizer step saw the same 4 examples as in the run that never ran out.
    a, b = _losses(straight.path), _losses(run.path)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])
    assert all(a[s] == b[s] for s in (1, 2, 3))  # before the OOM: the same run


def test_oom_helpers():
    import torch

    from tuneforge.guards import is_oom, smaller_batch

    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("expected scalar type Float"))
    assert [smaller_batch(b) for b in (1, 2, 3, 4, 6, 8, 12)] == [1, 1, 1, 2, 3, 4, 6]


# ---------------------------------------------------------------------------------------------------------------
# NaN/inf batches: skip and count


def _nan_loss_at(monkeypatch, steps: set[int]):
    from trl import SFTTrainer

    original = SFTTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if model.training and self.state.global_step + 1 in steps:
            return (out[0] * float("nan"), out[1]) if return_outputs else out * float("nan")
        return out

    monkeypatch.setattr(SFTTrainer, "compute_loss", compute_loss)


def test_nonfinite_batches_are_skipped_counted_and_reported(tmp_path, tiny_model_dir, small_sft_file, monkeypatch):
    import torch
    from safetensors.torch import load_file

    _nan_loss_at(monkeypatch, {3, 5})
    run = _train(_raw(tiny_model_dir, small_sft_file, skip_nonfinite_batches=2, save_every=1), tmp_path / "run")
    assert run.status == "completed"
    assert run.read_json("summary.json")["skipped_nonfinite_steps"] == [3, 5]
    assert run.read_json("status.json")["skipped_nonfinite_steps"] == [3, 5]
    losses = _losses(run.path)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in losses.values())
    weights = load_file(str(run.path / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())  # no NaN gradient reached the weights
    # A skipped step changes nothing (weights and optimizer state as after the step before); the others train.
    saved = {s: load_file(str(run.path / "checkpoints" / f"checkpoint-{s}" / "adapter_model.safetensors"))
             for s in (2, 3, 4)}
    assert all(torch.equal(saved[2][k], saved[3][k]) for k in saved[2])
    assert any(not torch.equal(saved[3][k], saved[4][k]) for k in saved[3])
    optimizers = {s: torch.load(run.path / "checkpoints" / f"checkpoint-{s}" / "optimizer.pt", weights_only=True)
                  for s in (2, 3)}
    for key, state in optimizers[2]["state"].items():
        assert torch.equal(state["exp_avg"], optimizers[3]["state"][key]["exp_avg"])


def test_more_nonfinite_batches_than_allowed_stops_naming_the_steps(tmp_path, tiny_model_dir, small_sft_file,
                                                                    monkeypatch, capsys):
    _nan_loss_at(monkeypatch, {3, 5})
    out = tmp_path / "run"
    raw = _raw(tiny_model_dir, small_sft_file, skip_nonfinite_batches=1, save_every=1)
    code, err = _cli(monkeypatch, capsys, "train", str(_write(tmp_path, raw)), "--output", str(out), "--no-doctor")
    assert code == 3, err
    assert "at step 5" in err and "steps [3, 5]" in err and "train.skip_nonfinite_batches=1" in err
    assert f"last good checkpoint: {out / 'checkpoints' / 'checkpoint-4'}" in err
    assert "lower train.lr" in err and "Traceback" not in err
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["skipped_nonfinite_steps"] == [3, 5]
    assert not (out / "checkpoints" / "checkpoint-5").exists()  # nothing saved after the fault
    _assert_loadable(out / "checkpoints" / "checkpoint-4", 4)
