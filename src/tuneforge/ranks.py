"""Where am I, under a launcher: rank, world size, rank 0, and the environment variables the launcher
(distributed.py) hands its ranks. Small functions of the environment only, at the bottom of the layers: this
module imports nothing from tuneforge but errors, so run.py, models.py, progress.py, guards.py, speed and the CLI
can ask "am I rank 0?" without importing distributed.py (which imports the run, the methods and the memory plan
to launch and configure a run).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_ERROR_DIR = "TUNEFORGE_ERROR_DIR"  # where each rank writes its error, for the launcher to report
ENV_PREPARED_RUN = "TUNEFORGE_PREPARED_RUN"  # the run directory the launcher prepared (ranks must not recreate it)
ENV_STRATEGY = "TUNEFORGE_STRATEGY"  # the resolved strategy, for code that runs before TrainingArguments


def rank() -> int:
    """This process's global rank (0 when not launched)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def local_rank() -> int:
    """This process's GPU under a launcher (accelerate/torchrun set LOCAL_RANK); 0 when run alone."""
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_launched() -> bool:
    """Started by accelerate launch / torchrun (even with one process)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    return rank() == 0


def quant_storage_dtype(compute_dtype):
    """bitsandbytes' `bnb_4bit_quant_storage` for this process: under FSDP or DeepSpeed ZeRO-3 the packed 4-bit
    weights are sharded like any other parameter, which needs them stored in the compute dtype (a flat uint8
    tensor mixed with bf16 ones cannot be sharded together); otherwise uint8, bitsandbytes' default."""
    import torch

    strategy = os.environ.get(ENV_STRATEGY, "")
    sharded = strategy in ("fsdp", "deepspeed") or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" \
        or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    return compute_dtype if sharded else torch.uint8


def record_rank_error(exc: BaseException) -> None:
    """In a launched rank: write this rank's error where the launcher reads it (distributed.rank_errors)."""
    folder = os.environ.get(ENV_ERROR_DIR)
    if not folder:
        return
    from tuneforge.errors import TuneforgeError

    import json

    if isinstance(exc, TuneforgeError):
        record = {"message": exc.render(), "exit_code": exc.exit_code}
    else:
        record = {"message": f"{type(exc).__name__}: {exc}", "exit_code": 1}
    try:
        Path(folder, f"rank-{rank()}.json").write_text(json.dumps(record), encoding="utf-8")
    except OSError:
        pass


def allow_training_wrap_after_evaluate(model, state) -> None:
    """Library fix (accelerate 1.15 + transformers 5.24): `trainer.evaluate()` before `trainer.train()` prepares the
    model in evaluation mode, which skips the DDP wrapper but still marks the model `_is_accelerate_prepared`; the
    training prepare then returns it unwrapped, and each rank silently trains on its own gradients (found by the
    1-vs-2-process loss test). Called from the run's callback after an evaluation before the first step: clears the
    mark so training wraps the model in DDP. FSDP/DeepSpeed evaluation prepares fully, so nothing changes there."""
    if model is None or state.global_step != 0 or world_size() < 2:
        return
    if getattr(model, "_is_accelerate_prepared", False):
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state.get("distributed_type") is not None and \
                str(AcceleratorState().distributed_type) in ("DistributedType.MULTI_GPU", "DistributedType.MULTI_CPU"):
            model._is_accelerate_prepared = False
