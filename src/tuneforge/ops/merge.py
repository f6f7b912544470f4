"""Merge a LoRA/QLoRA adapter into its base model, producing an ordinary checkpoint.

For a QLoRA run the base is reloaded un-quantized (bf16 on GPU, fp32 on CPU) before merging: merging into 4-bit
weights would round the update away and bake quantization error into the result (seed 002/004 warning).

The output is whole or absent: everything (weights, tokenizer, chat template, generation config) is written into a
temporary sibling folder (`.NAME.merging-PID`), flushed, and renamed to NAME at the end. With --overwrite an earlier
merge is moved aside only once the new one is complete, and deleted after the rename. A killed or failed merge leaves
no output folder (and removes its temporary one when it can; a SIGKILL leaves `.NAME.merging-PID`, which the next
merge into NAME clears).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tuneforge.errors import RunDirError

MERGED_MARKER = ".tuneforge-merged"  # what a merge writes next to the weights: `--overwrite` replaces such folders
# Files of a saved model (transformers save_pretrained + tokenizer): a folder of only these may be replaced too.
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
               "tokenizer.model", "added_tokens.json", MERGED_MARKER)
MODEL_SUFFIXES = (".safetensors", ".safetensors.index.json")


def merge_run(run_dir: str, output: str, *, dtype: str = "auto", overwrite: bool = False, base: str | None = None,
              trust_remote_code: bool = False) -> Path:
    """The run's adapter folded into its un-quantized base (`base`: the base's location now, if it moved).
    `trust_remote_code` comes from the command line (models.open_text_run), never from the run's recipe."""
    from peft import PeftModel

    from tuneforge.data.template import align_eos
    from tuneforge.models import (check_base_is_here, check_dtype_option, load_base_model, load_tokenizer,
                                  open_text_run, resolve_dtype)

    check_dtype_option(dtype)
    run, recipe = open_text_run(run_dir, "tuneforge merge", trust_remote_code=trust_remote_code)
    target = Path(output)
    check_merge_target(target, overwrite=overwrite)
    if not recipe.uses_peft:
        raise RunDirError(f"{run.path} is a full fine-tuning run; its model/ folder is already a merged checkpoint",
                          fix=f"use {run.weights_dir} directly")
    from tuneforge.adapter_kinds import MERGEABLE

    if recipe.adapter.type not in MERGEABLE:  # soft prompts live in the input, bottlenecks are non-linear
        raise RunDirError(f"{run.path} trained a {recipe.adapter.type} adapter, which cannot be merged into the weights "
                          f"({'virtual tokens in the input, not a change of any weight' if recipe.adapter.type != 'bottleneck' else 'a non-linear module after each MLP'})",
                          fix=f"use the run as it is: tuneforge generate/eval/chat {run.path} load the adapter on its base")
    # Always the un-quantized base, on CPU, in a float dtype.
    section = recipe.model.model_copy(update={"name": base}) if base else recipe.model
    check_base_is_here(section.name, run.path)
    base_model = load_base_model(section, quant=None, device="cpu",
                                 dtype=resolve_dtype("float32" if dtype == "auto" else dtype, "cpu"))
    tokenizer = load_tokenizer(str(run.weights_dir))
    from tuneforge.vocab import match_vocabulary

    match_vocabulary(base_model, tokenizer)  # a run that added tokens: grow the base before the adapter lands
    model = PeftModel.from_pretrained(base_model, str(run.weights_dir)).merge_and_unload()
    from transformers import GenerationConfig

    if (run.weights_dir / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(run.weights_dir))
    align_eos(tokenizer, model)

    from tuneforge.artifacts import make_portable

    def write(folder: Path) -> None:
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        make_portable(folder)
        (folder / MERGED_MARKER).write_text(f"merged from {run.path.resolve()}\n", encoding="utf-8")

    return write_folder_atomically(target, write, overwrite=overwrite)


def check_merge_target(target: Path, *, overwrite: bool) -> None:
    """Refuse an --output that merge may not write: a link or a file; an existing folder without --overwrite; with
    --overwrite, a folder that is not an earlier merge (or a saved model), a run directory, the current folder or one
    above it, home or /; and anything inside a run that is training (its lock held)."""
    from tuneforge.run import RUN_MARKER, refuse_if_in_use

    refuse_if_in_use(target, "merge into it")
    if target.is_symlink():
        raise RunDirError(f"--output {target} is a symbolic link; merge does not write through or replace links",
                          fix="pass the real folder, or a new --output path")
    if target.exists() and not target.is_dir():
        raise RunDirError(f"--output {target} is a file, not a folder", fix="choose another --output")
    if not target.exists() or not any(target.iterdir()):
        return
    if not overwrite:
        raise RunDirError(f"{target} already exists", fix="pass --overwrite or choose another --output")
    resolved, cwd = target.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve() or resolved == Path(resolved.anchor):
        raise RunDirError(f"--overwrite would replace {resolved}, which is the current folder, one that holds it, your "
                          "home or the filesystem root; refusing", fix="pass --output a folder of its own")
    if (target / RUN_MARKER).exists():
        raise RunDirError(f"{target} is a tuneforge run directory; merge does not replace runs",
                          fix="choose another --output (e.g. RUN_DIR-merged)")
    foreign = [e.name for e in sorted(target.iterdir()) if not _is_model_file(e)]
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise RunDirError(f"{target} holds files that are not a merged model ({shown}); --overwrite refuses to delete "
                          "them", fix="move those files out, or choose another --output")


def _is_model_file(entry: Path) -> bool:
    return entry.is_file() and not entry.is_symlink() and (
        entry.name in MODEL_FILES or entry.name.endswith(MODEL_SUFFIXES))


def write_folder_atomically(target: Path, write, *, overwrite: bool) -> Path:
    """Call `write(folder)` on a temporary sibling of `target`, flush it, then rename it to `target` (an existing
    `target`, allowed by --overwrite, is moved aside first and deleted once the new folder is in place). On any
    failure the temporary folder is removed and `target` is as it was."""
    from tuneforge.checkpoints import fsync_dir, fsync_tree

    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{target.name}.merging-*"):  # what a killed merge into the same folder left
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    staging = parent / f".{target.name}.merging-{os.getpid()}"
    old = parent / f".{target.name}.replaced-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        write(staging)
        fsync_tree(staging)
        if target.exists():
            if not overwrite and any(target.iterdir()):  # appeared while merging
                raise RunDirError(f"{target} already exists", fix="pass --overwrite or choose another --output")
            os.replace(target, old) if any(target.iterdir()) else target.rmdir()
        os.replace(staging, target)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)  # the earlier folder back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
