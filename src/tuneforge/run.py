"""The run directory: everything one run made, self-contained.

runs/<name>/
  recipe.yaml        resolved recipe (every default filled in)
  environment.json   library versions, device, tuneforge version
  status.json        running | failed | completed (+ error, timings): a crashed run never looks finished
  metrics.jsonl      one JSON object per logged step
  data_stats.json    counts from the data pipeline
  adapter/ | model/  the trained weights + tokenizer (+ chat template, generation config)
  checkpoints/       intermediate checkpoints (when train.save_every is set)
  eval/              baseline.json, tuned.json (metrics + samples)
  summary.json       the before/after table
  accelerate_config.yaml  (runs launched with --gpus/--cpu-processes) how the processes were started

Under several processes (accelerate launch / torchrun) only rank 0 writes: every writing method here is a no-op
on the other ranks, and `create` on them waits for rank 0's directory instead of making one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from tuneforge.errors import RunDirError


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def is_main(self) -> bool:
        """True in a single process, and on rank 0 of a launched run: the one process that writes."""
        from tuneforge.distributed import is_main_process

        return is_main_process()

    # -- creation ------------------------------------------------------------------------------------------------
    def create(self, *, overwrite: bool) -> RunDir:
        from tuneforge.distributed import ENV_PREPARED_RUN

        if not self.is_main:
            return self._wait_for_main()
        if os.environ.get(ENV_PREPARED_RUN) == str(self.path.resolve()):
            pass  # the launcher checked --overwrite and emptied it before the ranks started
        elif self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise RunDirError(
                    f"run directory {self.path} already exists",
                    fix="pass --overwrite to replace it, --output DIR for a new one, or change `name` in the recipe",
                )
            if not (self.path / "recipe.yaml").exists() and not (self.path / "status.json").exists():
                raise RunDirError(f"{self.path} exists and is not a tuneforge run directory; refusing to delete it",
                                  fix="choose another --output")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "eval").mkdir(exist_ok=True)
        self.set_status("running", started=time.time())
        return self

    def _wait_for_main(self, timeout: float = 600.0) -> RunDir:
        """A non-zero rank: wait until rank 0 has created this run's directory (its status.json started after this
        process did), so files written next to it by rank 0 are this run's."""
        import psutil

        born = psutil.Process().create_time() - 5.0
        deadline = time.time() + timeout
        while time.time() < deadline:
            started = (self.read_json("status.json", {}) or {}).get("started") if self.path.exists() else None
            if started is not None and started >= born:
                return self
            time.sleep(0.05)
        raise RunDirError(f"rank 0 did not create the run directory {self.path} within {timeout:.0f}s")

    # -- files -------------------------------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, value) -> None:
        if not self.is_main:
            return
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        tmp.replace(target)

    def read_json(self, name: str, default=None):
        target = self.path / name
        return json.loads(target.read_text(encoding="utf-8")) if target.exists() else default

    def append_metrics(self, row: dict) -> None:
        if not self.is_main:
            return
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict]:
        target = self.path / "metrics.jsonl"
        if not target.exists():
            return []
        return [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines() if line.strip()]

    def set_status(self, state: str, **fields) -> None:
        if not self.is_main:
            return
        status = self.read_json("status.json", {}) or {}
        status.update(fields, state=state, updated=time.time())
        self.write_json("status.json", status)

    @property
    def status(self) -> str:
        return (self.read_json("status.json", {}) or {}).get("state", "unknown")

    @property
    def weights_dir(self) -> Path:
        """adapter/ for LoRA/QLoRA runs, model/ for full fine-tuning."""
        return self.path / "adapter" if (self.path / "adapter").exists() else self.path / "model"


def open_run(path: str | Path) -> RunDir:
    """An existing, finished run directory (for eval / merge / generate)."""
    run = RunDir(path)
    if not (run.path / "recipe.yaml").exists():
        raise RunDirError(f"{run.path} is not a tuneforge run directory (no recipe.yaml)")
    if run.status != "completed":
        raise RunDirError(f"run {run.path} did not complete (status: {run.status})",
                          fix="look at status.json for the error; train again with --overwrite")
    return run


def environment() -> dict:
    """Versions and device, saved with every run."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {}
    for package in ("tuneforge", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    return {"python": platform.python_version(), "platform": platform.platform(), "device": device, "versions": versions}
