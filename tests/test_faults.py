"""Nothing lost under faults: one writer per run directory (a lock that dies with its process), a full disk reported
by torch.save (optimizer.pt, scheduler.pt) or hit while writing the run's own files, a resume from the final
checkpoint (no step past max_steps), and merges that are whole or absent.

Faults are injected where they happen: a real training process (subprocess) holding a run while a second writer
arrives, torch.save raising the error text torch itself gives for a write that fell short, the run's file writer
failing with ENOSPC half-way, a real SIGINT / SIGKILL at the last step, an exception inside merge after the weights
are written."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from conftest import kill_job, read_metrics, run_cli, tiny_recipe
from tuneforge.errors import DiskFullError, RunDirError
from tuneforge.recipe import load_recipe, parse_recipe
from tuneforge.train import train
from test_reliability import _raw  # the same small LoRA recipe the other fault tests use


def _train(raw, out, **kwargs):
    return train(parse_recipe(raw), output=str(out), console=Console(quiet=True), doctor=False, **kwargs)


def _resume(out):
    return train(load_recipe(Path(out) / "recipe.yaml"), output=str(out), resume=True, console=Console(quiet=True))


def _losses(run_path):
    return {row["step"]: row["loss"] for row in read_metrics(run_path) if "loss" in row}


def _write(tmp_path, raw, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _status(out):
    return json.loads((Path(out) / "status.json").read_text())


def _wait_for(marker: Path, proc, timeout=240):
    deadline = time.time() + timeout
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    return marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# One writer per run directory

HANG_AT_STEP_3 = """
import sys, time
from pathlib import Path
from tuneforge.progress import ProgressCallback
marker = Path(sys.argv[1])
original = ProgressCallback.on_step_end
def hang(self, args, state, control, **kwargs):
    result = original(self, args, state, control, **kwargs)
    if state.global_step == 3:  # checkpoint-2 is complete; the run is training
        marker.write_text("training")
        time.sleep(300)
    return result
ProgressCallback.on_step_end = hang
from tuneforge.cli import main
sys.argv = ["tuneforge"] + sys.argv[2:]
main()
"""


def test_a_second_writer_is_refused_while_a_run_trains_and_the_lock_dies_with_it(tmp_path, tiny_model_dir,
                                                                                   small_sft_file):
    from tuneforge.ops.merge import merge_run
    from tuneforge.run import LOCK_FILE, check_output_path

    raw = _raw(tiny_model_dir, small_sft_file)
    done = _train({**raw, "train": {**raw["train"], "max_steps": 1, "save_every": None}}, tmp_path / "done")
    out, marker = tmp_path / "run", tmp_path / "training"
    proc = subprocess.Popen([sys.executable, "-c", HANG_AT_STEP_3, str(marker), "train", str(_write(tmp_path, raw)),
                             "--output", str(out), "--no-doctor"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _wait_for(marker, proc), "the run never reached step 3"
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        holder = f"process {proc.pid}"

        with pytest.raises(RunDirError, match="is in use") as caught:  # a second `train --resume`
            _resume(out)
        assert holder in str(caught.value)
        with pytest.raises(RunDirError, match="is in use") as caught:  # `--overwrite` of the folder
            _train(raw, out, overwrite=True)
        assert holder in str(caught.value)
        with pytest.raises(RunDirError, match="is in use") as caught:  # `merge` writing into it
            merge_run(str(done.path), str(out), overwrite=True)
        assert holder in str(caught.value)
        with pytest.raises(RunDirError, match="is in use"):
            merge_run(str(done.path), str(out / "merged"))
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched
        assert _status(out)["state"] == "running"
    finally:
        kill_job(proc.pid)
        proc.wait()

    # SIGKILLed: the kernel dropped the lock; the stale lock file is the run's own (--overwrite may replace it).
    check_output_path(out, overwrite=True)
    resumed = subprocess.run([sys.executable, "-m", "tuneforge", "train", "--resume", str(out)], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _status(out)["state"] == "completed" and sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]


def test_lock_primitives(tmp_path):
    from tuneforge.run import LOCK_FILE, acquire_run_lock, holds_run_lock, lock_holder, release_run_lock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from tuneforge.run import acquire_run_lock\n"
        "acquire_run_lock(Path(sys.argv[1])); Path(sys.argv[2]).write_text('locked'); time.sleep(300)"),
        str(tmp_path), str(tmp_path / "ready")], start_new_session=True)
    try:
        assert _wait_for(tmp_path / "ready", holder, timeout=60)
        assert f"process {holder.pid}" in lock_holder(tmp_path)
        with pytest.raises(RunDirError, match=f"process {holder.pid}"):
            acquire_run_lock(tmp_path)
    finally:
        kill_job(holder.pid)
        holder.wait()
    assert lock_holder(tmp_path) is None and (tmp_path / LOCK_FILE).exists()
    acquire_run_lock(tmp_path)
    acquire_run_lock(tmp_path)  # re-entrant in one process
    assert holds_run_lock(tmp_path) and json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    release_run_lock(tmp_path)
    assert not holds_run_lock(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# A full disk


def torch_short_write_error(tmp_dir: Path) -> str:
    """The text torch.save itself raises when the file system takes fewer bytes than it writes, as on a full disk
    ('[enforce fail at inline_container.cc:NNN] . unexpected pos N vs M'): a real torch.save of an optimizer-sized
    state into a real file, in a process whose file-size limit stops the write."""
    code = ("import resource, signal, sys, torch\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "try:\n"
            "    torch.save({'state': {0: {'exp_avg': torch.zeros(100_000)}}}, sys.argv[1])\n"
            "except RuntimeError as exc:\n"
            "    print(str(exc).splitlines()[0])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_dir / "optimizer.pt")], capture_output=True, text=True,
                          timeout=120)
    text = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert "inline_container.cc" in text, (proc.stdout, proc.stderr[-1000:])
    return text


def _low_space(monkeypatch):
    import tuneforge.checkpoints

    monkeypatch.setattr(tuneforge.checkpoints, "free_bytes", lambda path: 3 * 2**20)  # 3 MiB left


def _full_disk_in_torch_save(monkeypatch, file_name: str, step: int, text: str):
    """torch.save of `file_name` in the checkpoint of `step` writes part of it, then fails as torch does."""
    import torch

    original = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and Path(f).name == file_name and Path(f).parent.name == f"checkpoint-{step}":
            Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 4096)
            raise RuntimeError(text)
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    _low_space(monkeypatch)
    return original


@pytest.mark.parametrize("file_name", ["optimizer.pt", "scheduler.pt"])
def test_disk_full_in_torch_save_is_exit_4_and_the_run_resumes(tmp_path, tiny_model_dir, small_sft_file, monkeypatch,
                                                               capsys, file_name):
    import torch

    text = torch_short_write_error(tmp_path)
    assert "unexpected pos" in text
    original = _full_disk_in_torch_save(monkeypatch, file_name, 4, text)
    out = tmp_path / "run"
    code, err = run_cli(monkeypatch, capsys, "train", str(_write(tmp_path, _raw(tiny_model_dir, small_sft_file))),
                        "--output", str(out), "--no-doctor")
    assert code == 4, err
    assert "disk full while writing checkpoint-4" in err and "unexpected pos" in err and "Traceback" not in err
    assert "checkpoint-2 is intact" in err and f"--resume {out}" in err
    status = _status(out)
    assert status["state"] == "failed" and "DiskFullError" in status["error"]
    checkpoints = out / "checkpoints"
    assert not (checkpoints / "checkpoint-4").exists() and not (checkpoints / ".tmp" / "checkpoint-4").exists()
    assert not list(out.glob("*.tmp"))

    monkeypatch.setattr(torch, "save", original)  # space freed: the run continues
    assert _resume(out).status == "completed" and sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]


def _fail_run_file_write(monkeypatch, when):
    """The run's file writer (run.py) writes half of what it was given, then the disk is full, while `when(fd_path,
    data)` says so."""
    import tuneforge.run

    original = tuneforge.run._write_bytes

    def write(fd, data):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if when(path, data):
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(fd, data)

    monkeypatch.setattr(tuneforge.run, "_write_bytes", write)


def test_disk_full_while_appending_metrics_leaves_no_half_row(tmp_path, tiny_model_dir, small_sft_file, monkeypatch):
    _fail_run_file_write(monkeypatch, lambda path, data: path.endswith("metrics.jsonl") and b'"step": 3,' in data)
    out = tmp_path / "run"
    with pytest.raises(DiskFullError, match="disk full while writing metrics.jsonl") as caught:
        _train(_raw(tiny_model_dir, small_sft_file), out)
    assert caught.value.exit_code == 4
    assert _status(out)["state"] == "failed"
    assert sorted(_losses(out)) == [1, 2]  # every line whole: the half-written row was undone
    monkeypatch.undo()
    assert _resume(out).status == "completed" and sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]


def test_disk_full_while_writing_status_is_exit_4_and_failed(tmp_path, tiny_model_dir, small_sft_file, monkeypatch):
    _fail_run_file_write(monkeypatch, lambda path, data: path.endswith("status.json.tmp") and b"base_eval_loss" in data
                         and b'"failed"' not in data)
    out = tmp_path / "run"
    with pytest.raises(DiskFullError, match="disk full while writing status.json"):
        _train(_raw(tiny_model_dir, small_sft_file), out)
    assert _status(out)["state"] == "failed" and "DiskFullError" in _status(out)["error"]
    assert not list(out.glob("*.tmp"))


def test_failed_status_is_written_in_place_when_no_room_is_left(tmp_path, monkeypatch):
    from tuneforge.run import RunDir

    run = RunDir(tmp_path)
    run.set_status("running", started=1.0)
    _fail_run_file_write(monkeypatch, lambda path, data: True)  # no second copy fits
    run.set_status("failed", error="DiskFullError: ...")  # does not raise: the run's own error must show
    assert _status(tmp_path)["state"] == "failed" and not list(tmp_path.glob("*.tmp"))


def test_disk_full_while_writing_the_report(tmp_path, tiny_model_dir, small_sft_file, monkeypatch):
    import tuneforge.report

    def full_disk(run_dir):
        (Path(run_dir) / "report.html.tmp").write_text("<!DOCTYPE html><html><he")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tuneforge.report, "write_report", full_disk)
    out = tmp_path / "run"
    with pytest.raises(DiskFullError, match="disk full while writing the run's files") as caught:
        _train(_raw(tiny_model_dir, small_sft_file, max_steps=2), out)
    assert "report.html.tmp" in str(caught.value)
    assert _status(out)["state"] == "failed" and not (out / "report.html.tmp").exists()


def test_disk_full_while_saving_the_final_weights_removes_them(tmp_path, tiny_model_dir, small_sft_file, monkeypatch):
    from transformers import Trainer

    original = Trainer.save_model

    def full_disk(self, output_dir=None, _internal_call=False):
        if output_dir and Path(output_dir).name == "adapter":
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "adapter_model.safetensors").write_bytes(b"\0" * 100)
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                               "\"No space left on device\" })")
        return original(self, output_dir, _internal_call)

    monkeypatch.setattr(Trainer, "save_model", full_disk)
    out = tmp_path / "run"
    with pytest.raises(DiskFullError):
        _train(_raw(tiny_model_dir, small_sft_file, max_steps=2), out)
    assert _status(out)["state"] == "failed" and not (out / "adapter").exists()
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()  # complete checkpoints stay
    monkeypatch.undo()
    run = _resume(out)  # from the final checkpoint: straight to saving and scoring
    assert run.status == "completed" and (out / "adapter" / "tokenizer_config.json").exists()
    assert sorted(_losses(out)) == [1, 2]


def test_torch_write_failures_count_as_disk_full_only_when_space_is_low(tmp_path, monkeypatch):
    from tuneforge.checkpoints import is_disk_full

    short = RuntimeError(torch_short_write_error(tmp_path))
    writer = RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                          "data/3: file write failed")
    assert not is_disk_full(short, Path(".")) and not is_disk_full(writer, Path("."))  # plenty of space here
    chained = RuntimeError("saving failed")
    chained.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(chained, Path("."))
    _low_space(monkeypatch)
    assert is_disk_full(short, Path(".")) and is_disk_full(writer, Path("."))
    assert not is_disk_full(RuntimeError("expected scalar type Float"), Path("."))


# ---------------------------------------------------------------------------------------------------------------
# Resume from the final checkpoint: never past max_steps, the uninterrupted run's numbers


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter" / "adapter_model.safetensors"))


def _assert_same_run(straight, resumed, steps):
    import torch

    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1)), (sorted(a), sorted(b))
    assert all(a[s] == b[s] for s in a), (a, b)
    assert json.loads((Path(resumed) / "summary.json").read_text())["steps"] == steps
    assert max(row["step"] for row in read_metrics(resumed)) == steps
    assert not (Path(resumed) / "checkpoints" / f"checkpoint-{steps + 1}").exists()
    wa, wb = _adapter(straight), _adapter(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def eight_steps(tmp_path_factory, tiny_model_dir, small_sft_file):
    """max_steps 8 (not a whole number of epochs), save_every 1, constant lr: a 9th step would change the adapter."""
    raw = _raw(tiny_model_dir, small_sft_file, max_steps=8, save_every=1)
    straight = tmp_path_factory.mktemp("straight") / "run"
    _train(raw, straight)
    return raw, straight


@pytest.mark.parametrize("stop_after", [3, 7, 8])
def test_ctrl_c_then_resume_never_passes_max_steps(tmp_path, eight_steps, monkeypatch, stop_after):
    from tuneforge.progress import ProgressCallback

    raw, straight = eight_steps
    original = ProgressCallback.on_step_end

    def interrupt(self, args, state, control, **kwargs):
        result = original(self, args, state, control, **kwargs)
        if state.global_step == stop_after:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(ProgressCallback, "on_step_end", interrupt)
    out = tmp_path / "run"
    assert _train(raw, out).status == "interrupted"
    monkeypatch.setattr(ProgressCallback, "on_step_end", original)
    assert _resume(out).status == "completed"
    _assert_same_run(straight, out, 8)


HANG_AFTER_THE_LAST_CHECKPOINT = """
import sys, time
from pathlib import Path
import tuneforge.train
marker = Path(sys.argv[1])
def hang(*args, **kwargs):  # checkpoint-8 is complete; the final weights are not written yet
    marker.write_text("saved")
    time.sleep(300)
tuneforge.train.save_weights = hang
from tuneforge.cli import main
sys.argv = ["tuneforge"] + sys.argv[2:]
main()
"""


def test_sigkill_after_the_last_checkpoint_then_resume(tmp_path, eight_steps):
    raw, straight = eight_steps
    out, marker = tmp_path / "run", tmp_path / "saved"
    proc = subprocess.Popen([sys.executable, "-c", HANG_AFTER_THE_LAST_CHECKPOINT, str(marker), "train",
                             str(_write(tmp_path, raw)), "--output", str(out), "--no-doctor"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _wait_for(marker, proc)
    finally:
        kill_job(proc.pid)
        proc.wait()
    assert (out / "checkpoints" / "checkpoint-8" / "trainer_state.json").exists()
    assert _status(out)["state"] == "running"
    resumed = subprocess.run([sys.executable, "-m", "tuneforge", "train", "--resume", str(out)], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint-8" in resumed.stdout
    _assert_same_run(straight, out, 8)


# ---------------------------------------------------------------------------------------------------------------
# merge: whole or absent


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, small_sft_file):
    raw = _raw(tiny_model_dir, small_sft_file, max_steps=1, save_every=None, lr=1e-2)
    return _train(raw, tmp_path_factory.mktemp("merge") / "run")


def _fail_after_the_weights(monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def fail(self, *args, **kwargs):
        raise KeyboardInterrupt  # killed after the weights, before the tokenizer

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", fail)


def _siblings(folder: Path):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_interrupted_merge_leaves_no_output_and_no_temp_folder(tmp_path, finished_run, monkeypatch):
    from tuneforge.ops.merge import merge_run

    target = tmp_path / "merged"
    _fail_after_the_weights(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        merge_run(str(finished_run.path), str(target))
    assert not target.exists() and _siblings(target) == []


def test_interrupted_merge_with_overwrite_keeps_the_earlier_merge(tmp_path, finished_run, monkeypatch):
    from tuneforge.ops.merge import merge_run

    target = merge_run(str(finished_run.path), str(tmp_path / "merged"))
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    assert "tokenizer_config.json" in before and "model.safetensors" in before
    _fail_after_the_weights(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        merge_run(str(finished_run.path), str(target), overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before and _siblings(target) == []
    monkeypatch.undo()
    assert merge_run(str(finished_run.path), str(target), overwrite=True) == target  # a complete one replaces it
    assert {p.name for p in target.iterdir()} == set(before) and _siblings(target) == []


def test_merge_overwrite_refuses_what_is_not_a_merge(tmp_path, finished_run):
    from tuneforge.ops.merge import merge_run

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    (mine / "thesis.tex").write_text("\\chapter{Results}\n")
    with pytest.raises(RunDirError, match=r"not a merged model \(thesis.tex\)"):
        merge_run(str(finished_run.path), str(mine), overwrite=True)
    with pytest.raises(RunDirError, match="is a tuneforge run directory"):
        merge_run(str(finished_run.path), str(finished_run.path), overwrite=True)
    assert (mine / "thesis.tex").exists() and (finished_run.path / "adapter").is_dir()
