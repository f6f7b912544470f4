"""Checkpoints that are whole or absent, rotation that keeps the best one, and a clear error when the disk fills.

Why a wrapper: transformers 5.24's `Trainer._save_checkpoint` writes straight into `checkpoints/checkpoint-N`:
weights first, then optimizer and scheduler, RNG states, and trainer_state.json last. A kill or a full disk in
between leaves a folder that looks like a checkpoint and is not one, and the Trainer's `save_total_limit` rotation
keeps the best checkpoint only when `metric_for_best_model` is set and the best step happened to be saved.
Rather than re-implement the save, `install_checkpointing` wraps that one method on the trainer instance (the one
place tuneforge touches checkpoint writing):

1. the Trainer's own save runs unchanged, but into `checkpoints/.tmp/checkpoint-N` (its `_get_output_dir` points
   there for the duration of the call);
2. every file is fsynced, then the folder is renamed to `checkpoints/checkpoint-N` (os.replace within one
   filesystem: atomic). So a `checkpoint-N` folder is complete or absent; a killed save leaves only `.tmp/`, which
   the next start clears, and `--resume` continues from the previous checkpoint;
3. rotation (`train.save_total_limit`) is done here, not by the Trainer: keep the newest N checkpoints, plus the
   best one by held-out loss when it is older (read from state.log_history, which checkpoints carry, so it holds
   across resumes). A checkpoint is deleted by renaming it into `.tmp/` first, so a kill mid-delete never leaves a
   half-deleted folder that looks whole;
4. a full disk (ENOSPC / EDQUOT, or a failed write with almost no space left, as torch.save reports it without an
   errno) removes the partial checkpoint and raises DiskFullError: what was being written, where, how much space
   is free, and what to do. Checkpoints already written are not touched;
5. resume restores weights in the dtype they trained in (`keep_dtypes_on_resume`: QLoRA's bf16 LoRA weights would
   otherwise come back as fp32 through PEFT's load_adapter, and the resumed run would not match);
6. resume from the final checkpoint (global_step == max_steps: killed or stopped after the last save, before the
   run finished) trains no further step (`stop_at_max_steps`): the Trainer checks max_steps only after a step, and
   its resumed loop would otherwise run step max_steps + 1 whenever max_steps is not a whole number of epochs.

Under several processes every rank writes its own files (RNG states, sharded optimizer) into the same temporary
folder; all ranks meet at a barrier before rank 0 renames it.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from pathlib import Path

from tuneforge.errors import DiskFullError

TMP = ".tmp"  # under checkpoints/: checkpoints being written, and checkpoints being deleted
LOW_SPACE_BYTES = 64 * 2**20  # a failed write with less than this free counts as disk full
DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "storagefull", "quotaexceeded", "os error 28")
# A failed write as torch.save reports it (no errno): PyTorchStreamWriter's "failed writing file data/0: file write
# failed", and "[enforce fail at inline_container.cc:NNN] . unexpected pos N vs M" when a write fell short.
WRITE_FAILED_TEXT = ("write", "pytorchstreamwriter", "inline_container.cc", "unexpected pos")


def install_checkpointing(trainer, recipe, run, console=None) -> None:
    """Make `trainer`'s checkpoint saves atomic, rotate with `train.save_total_limit` keeping the best checkpoint,
    and turn a full disk into DiskFullError. Call once, after the trainer is built and before `train()`."""
    limit = recipe.train.save_total_limit
    trainer.args.save_total_limit = None  # rotation happens here, after the rename, and keeps the best checkpoint
    root = Path(trainer.args.output_dir)
    if run.is_main:
        shutil.rmtree(root / TMP, ignore_errors=True)  # what a killed save left behind
    original = trainer._save_checkpoint

    def atomic_save_checkpoint(model, trial=None, *args, **kwargs):
        step = trainer.state.global_step
        staging = root / TMP
        written, final = staging / f"checkpoint-{step}", root / f"checkpoint-{step}"
        # The Trainer names the checkpoint folder after `_get_output_dir()`; pointed at the staging folder for this
        # call only (args.output_dir stays: TRL writes its model card there).
        trainer._get_output_dir = lambda trial=None: str(staging)
        full = None
        try:
            original(model, trial, *args, **kwargs)
        except Exception as exc:
            if not is_disk_full(exc, staging):
                raise
            full = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        finally:
            del trainer._get_output_dir
        if full is not None:
            raise disk_full_error(written, final, root, full)
        if trainer.args.world_size > 1:
            trainer.accelerator.wait_for_everyone()  # every rank's files are in before the rename
        if not trainer.args.should_save:
            return
        try:
            fsync_tree(written)
            publish(written, final)
        except OSError as exc:
            if not is_disk_full(exc, staging):
                raise
            raise disk_full_error(written, final, root, f"{type(exc).__name__}: {exc}") from None
        for removed in rotate(root, limit, trainer.state.log_history):
            if console is not None:
                console.print(f"[dim]removed {removed.name} (train.save_total_limit {limit})[/]")

    trainer._save_checkpoint = atomic_save_checkpoint
    keep_dtypes_on_resume(trainer)
    stop_at_max_steps(trainer)


def stop_at_max_steps(trainer) -> None:
    """A resume from a checkpoint at (or past) max_steps trains nothing more. The Trainer's resumed loop restores the
    state, weights, optimizer and scheduler, then enters the epoch in which global_step falls and runs a step before
    its first max_steps check: resumed from checkpoint-8 of max_steps 8 it trained a 9th step (unless 8 steps were a
    whole number of epochs). Here an epoch that would start at or past max_steps is not entered: the RNG state is
    restored as the resumed epoch would have, and the Trainer finishes as after its last step (on_train_end, the
    train summary), so the run goes straight to saving and scoring the final weights."""
    original = trainer._run_epoch

    def run_epoch(*args, **kwargs):
        state = trainer.state
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            checkpoint = kwargs.get("resume_from_checkpoint")
            if checkpoint is not None:
                trainer._load_rng_state(checkpoint)
            trainer.control.should_training_stop = True
            return None
        return original(*args, **kwargs)

    trainer._run_epoch = run_epoch


def keep_dtypes_on_resume(trainer) -> None:
    """Resume restores the weights in the dtypes they trained in. Under QLoRA, TRL trains the LoRA weights in bf16
    (it casts them when the trainer is built), but on resume transformers reloads the adapter through PEFT's
    `load_adapter`, whose autocast_adapter_dtype upcasts them to fp32: the resumed run would then train in another
    dtype than the run it continues (and the optimizer state would be cast to fp32 with them). The checkpoint holds
    the bf16 values, so casting back right after the load (before the optimizer is built and its state loaded) is
    exact."""
    original = trainer._load_from_checkpoint

    def load_from_checkpoint(resume_from_checkpoint, model=None, *args, **kwargs):
        target = model if model is not None else trainer.model
        dtypes = {name: p.dtype for name, p in target.named_parameters()}
        if model is None:
            original(resume_from_checkpoint, *args, **kwargs)
        else:
            original(resume_from_checkpoint, model, *args, **kwargs)
        for name, parameter in target.named_parameters():
            if name in dtypes and parameter.dtype != dtypes[name] and parameter.is_floating_point():
                parameter.data = parameter.data.to(dtypes[name])

    trainer._load_from_checkpoint = load_from_checkpoint


def publish(written: Path, final: Path) -> None:
    """Rename a finished checkpoint into place. A complete checkpoint of the same step already there (a resumed run
    saving that step again) is moved aside first and deleted only after the new one is in place."""
    if not written.is_dir():
        raise FileNotFoundError(f"the Trainer wrote no checkpoint at {written}")
    replaced = None
    if final.exists():
        replaced = written.parent / f"replaced-{final.name}"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(written, final)
    fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith("checkpoint-") or not name.split("-", 1)[1].isdigit():
        return None
    return int(name.split("-", 1)[1])


def complete_checkpoints(root: Path) -> list[Path]:
    """checkpoint-N folders with their trainer state, oldest first."""
    found = [p for p in Path(root).glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None
             and (p / "trainer_state.json").exists()]
    return sorted(found, key=checkpoint_step)


def best_checkpoint(checkpoints: list[Path], log_history: list[dict]) -> Path | None:
    """The checkpoint whose step has the lowest held-out loss (a later one wins a tie); None without evaluations at
    checkpoint steps."""
    losses = {}
    for row in log_history or []:
        value = row.get("eval_loss")
        if isinstance(value, (int, float)) and math.isfinite(value) and isinstance(row.get("step"), int):
            losses.setdefault(row["step"], float(value))  # the evaluation made during training, not a later re-score
    scored = [c for c in checkpoints if checkpoint_step(c) in losses]
    if not scored:
        return None
    return min(scored, key=lambda c: (losses[checkpoint_step(c)], -checkpoint_step(c)))


def rotate(root: Path, limit: int | None, log_history: list[dict]) -> list[Path]:
    """Delete old checkpoints beyond `limit`: the newest `limit` stay, and so does the best one by held-out loss.
    Returns the deleted paths."""
    if not limit:
        return []
    checkpoints = complete_checkpoints(root)
    keep = set(checkpoints[-limit:])
    best = best_checkpoint(checkpoints, log_history)
    if best is not None:
        keep.add(best)
    removed = []
    for checkpoint in checkpoints:
        if checkpoint in keep:
            continue
        trash = Path(root) / TMP / f"deleting-{checkpoint.name}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(checkpoint, trash)  # gone from view at once; a kill now leaves no half-deleted checkpoint
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(checkpoint)
    return removed


def fsync_tree(path: Path) -> None:
    """Flush every file under `path`, then the folders, so the rename publishes data that is on disk."""
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int | None:
    for candidate in (Path(path), *Path(path).parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def is_disk_full(exc: BaseException, where: Path) -> bool:
    """ENOSPC/EDQUOT (on the error or one it was raised from), a library's message for them, or a failed write while
    (almost) no space is left: torch.save reports a full disk without errno, as 'PytorchStreamWriter failed writing
    file data/0: file write failed' or '[enforce fail at inline_container.cc:NNN] . unexpected pos N vs M'."""
    seen, current = set(), exc
    while current is not None and id(current) not in seen:  # the error itself, then what it was raised from
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        if any(marker in str(current).lower() for marker in DISK_FULL_TEXT):
            return True
        current = current.__cause__ or current.__context__
    text = str(exc).lower()
    if isinstance(exc, (OSError, RuntimeError)) and any(marker in text for marker in WRITE_FAILED_TEXT):
        free = free_bytes(where)
        return free is not None and free < LOW_SPACE_BYTES
    return False


def remove_partial_files(run) -> list[Path]:
    """After a full disk ended a run: remove what was being written and is useless half-written (it also holds the
    space): a checkpoint being saved (checkpoints/.tmp), a run file's temporary copy (*.tmp: status, summary, eval
    files, report), and final weights cut short (adapter/ or model/ without weights or tokenizer, in a run that did
    not complete). Complete checkpoints and complete weights are never touched. Returns what was removed."""
    if not run.is_main or not run.path.is_dir():
        return []
    removed = []
    staging = run.path / "checkpoints" / TMP
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
        removed.append(staging)
    for tmp in [*run.path.glob("*.tmp"), *run.path.glob("eval/*.tmp"), *run.path.glob("plots/*.tmp")]:
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    if run.status != "completed":
        for name in ("adapter", "model"):
            weights = run.path / name
            if weights.is_dir() and not _complete_weights(weights):
                shutil.rmtree(weights, ignore_errors=True)
                removed.append(weights)
    return removed


def _complete_weights(folder: Path) -> bool:
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    index = next(iter(folder.glob("*.safetensors.index.json")), None)
    if index is not None:
        import json

        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return False
        has_weights = all((folder / shard).is_file() for shard in shards)
    return has_weights and (folder / "tokenizer_config.json").is_file()


def disk_full_error(written: Path, final: Path, root: Path, cause: str) -> DiskFullError:
    """Remove the partial checkpoint (it is useless and holds space) and describe what happened."""
    shutil.rmtree(written, ignore_errors=True)
    free = free_bytes(root)
    previous = complete_checkpoints(root)
    kept = (f"the previous checkpoint {previous[-1].name} is intact" if previous
            else "no earlier checkpoint exists")
    run_dir = root.parent
    return DiskFullError(
        f"disk full while writing {final.name} ({cause}); {_gib(free)} free on that disk; the partial checkpoint "
        f"was removed and {kept}",
        where=str(final),
        fix=f"free space on the disk that holds {root} (or move the run elsewhere), keep fewer checkpoints with "
        f"train.save_total_limit, then continue with: tuneforge train --resume {run_dir}",
    )


def _gib(value: int | None) -> str:
    return "unknown space" if value is None else f"{value / 2**30:.2f} GiB"
