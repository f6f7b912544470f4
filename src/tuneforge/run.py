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
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tuneforge.errors import RunDirError


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- creation ------------------------------------------------------------------------------------------------
    def create(self, *, overwrite: bool) -> RunDir:
        if self.path.exists() and any(self.path.iterdir()):
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

    # -- files -------------------------------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, value) -> None:
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        tmp.replace(target)

    def read_json(self, name: str, default=None):
        target = self.path / name
        return json.loads(target.read_text(encoding="utf-8")) if target.exists() else default

    def append_metrics(self, row: dict) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict]:
        target = self.path / "metrics.jsonl"
        if not target.exists():
            return []
        return [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines() if line.strip()]

    def set_status(self, state: str, **fields) -> None:
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
