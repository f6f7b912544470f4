"""The two-GPU proof run (issue 12), one command on a machine with two GPUs:

    PYTHONPATH=src python3 bench/two_gpu.py --out bench/results/two-gpu.json
    PYTHONPATH=src python3 bench/two_gpu.py --device cpu --model tiny --steps 4 --out /tmp/two.json   # CPU smoke test

Parts, in order (each writes its results into --out as soon as it ends; --budget-s stops before a part that would
not finish in time):
  1. loss curves: the same recipe (Llama-1B architecture, random init, fixed seed, the speed benchmark's data) on 1
     GPU (micro-batch 8 x accumulation 2) and on 2 GPUs (8 x 1 each): same global batch of 16 -> per-step losses.
  2. throughput: 2 GPUs with the same per-GPU batch as the 1-GPU run (8 x 2 each): real tokens/s ratio.
  3. 8B full fine-tuning with FSDP2 full-shard on the two GPUs, fp32 master weights + AdamW states (does not fit
     one GPU unsharded by the memory plan): finite, falling loss; peak memory per GPU.
  4. sharded checkpoints: a 1B full fine-tuning FSDP2 run killed (SIGKILL) after its step-5 checkpoint, resumed on
     2 GPUs, and a copy resumed on 1 GPU (where the engine allows; the outcome is recorded either way).
Every run goes through `tuneforge train --gpus N` (accelerate launch); nothing here is distributed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def read_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def step_rows(run: Path) -> list[dict]:
    return [r for r in read_rows(run) if "loss" in r and "eval_loss" not in r and "train_loss" not in r]


def throughput(rows: list[dict], warmup: int) -> float | None:
    rows = rows[warmup:]
    if len(rows) < 2:
        return None
    return (rows[-1]["tokens_seen"] - rows[0]["tokens_seen"]) / max(1e-9, rows[-1]["time"] - rows[0]["time"])


class Driver:
    def __init__(self, args):
        self.args = args
        self.started = time.time()
        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.report = {"date": time.strftime("%Y-%m-%d"), "parts": {}}

    def save(self):
        Path(self.args.out).write_text(json.dumps(self.report, indent=1))

    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.started)

    def launch_flag(self, n: int) -> list[str]:
        return ["--gpus", str(n)] if self.args.device == "cuda" else ["--cpu-processes", str(n)]

    def train(self, recipe: Path, out: Path, n: int, sets: list[str], *, resume: bool = False, background=False):
        cmd = [sys.executable, "-m", "tuneforge", "train"]
        cmd += ["--resume", str(out)] if resume else [str(recipe), "--output", str(out), "--overwrite", "--no-doctor"]
        cmd += self.launch_flag(n)
        for item in ([] if resume else sets):
            cmd += ["--set", item]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        log = open(str(out) + (".resume" if resume else "") + ".log", "w")
        if background:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        started = time.time()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=max(60, self.left()))
        tail = Path(log.name).read_text().splitlines()[-8:]
        return {"exit": proc.returncode, "seconds": round(time.time() - started, 1),
                **({} if proc.returncode == 0 else {"log_tail": tail})}

    def recipe(self, model: Path, data: Path, eval_data: Path, name: str, **train) -> Path:
        import yaml

        text = {"name": name, "model": str(model), "data": {"train": str(data), "eval": str(eval_data)},
                "train": {"max_steps": self.args.steps, "batch_size": 8, "grad_accum": 2, "max_length": 2048,
                          "seed": 0, "report_to": [], "logging_steps": 1, **train},
                "speed": {"fold_accumulation": False},
                "eval": {"baseline": False, "forgetting": False, "few_shot": 0, "max_examples": 2, "max_new_tokens": 4}}
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(text))
        return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--big-model", default="llama-8b")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--parts", default="loss,throughput,big,resume")
    parser.add_argument("--budget-s", type=float, default=560)
    parser.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp") + "/tuneforge-two-gpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from speed import build_model, make_data

    d = Driver(args)
    parts = args.parts.split(",")
    model = build_model(args.model, d.work, args.device)
    data, eval_data = d.work / "train.jsonl", d.work / "eval.jsonl"
    d.report["data_lengths"] = make_data(data, 600, 2048, seed=0)
    make_data(eval_data, 8, 2048, seed=1)
    if args.device == "cuda":
        import torch

        d.report["device"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        import transformers
        import trl

        d.report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}

    if "loss" in parts or "throughput" in parts:  # 1-GPU reference run, used by both parts
        recipe = d.recipe(model, data, eval_data, "lora")
        one = d.work / "lora-1gpu"
        d.report["parts"]["lora_1gpu"] = {**d.train(recipe, one, 1, []), "micro_batch": "8 x 2"}
        rows_one = step_rows(one)
    if "loss" in parts:
        two = d.work / "lora-2gpu-same-global"
        result = d.train(recipe, two, 2, ["train.grad_accum=1"])
        rows_two = step_rows(two)
        pairs = list(zip([r["loss"] for r in rows_one], [r["loss"] for r in rows_two]))
        d.report["parts"]["loss_curves"] = {
            **result, "global_batch": 16, "one_gpu": [round(a, 5) for a, _ in pairs],
            "two_gpus": [round(b, 5) for _, b in pairs],
            "max_abs_diff": round(max((abs(a - b) for a, b in pairs), default=float("nan")), 5),
            "max_rel_diff": round(max((abs(a - b) / abs(a) for a, b in pairs), default=float("nan")), 5)}
        d.save()
    if "throughput" in parts:
        two = d.work / "lora-2gpu-same-per-gpu"
        result = d.train(recipe, two, 2, [])
        t1, t2 = throughput(rows_one, args.warmup), throughput(step_rows(two), args.warmup)
        d.report["parts"]["throughput"] = {**result, "per_gpu_batch": "8 x 2", "one_gpu_tokens_per_s": t1,
                                           "two_gpu_tokens_per_s": t2, "ratio": t1 and t2 and round(t2 / t1, 3)}
        d.save()
    if "big" in parts and d.left() > 240:
        from speed import model_config
        from tuneforge.memory import plan_memory

        big = build_model(args.big_model, d.work, args.device)
        config = model_config(args.big_model)
        unsharded = plan_memory(config, adapter="full", seq_len=1024, batch_size=2, gradient_checkpointing=True,
                                dtype="fp32", optimizer="adamw_torch")
        recipe = d.recipe(big, data, eval_data, "full-big", max_steps=min(args.steps, 6), batch_size=2, grad_accum=1,
                          max_length=1024, gradient_checkpointing=True, lr=1e-5)
        out = d.work / "full-big-fsdp"
        result = d.train(recipe, out, 2, ["adapter.type=full", "model.dtype=float32", "distributed.strategy=fsdp",
                                          "distributed.mixed_precision=bf16"])
        rows = step_rows(out)
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
        d.report["parts"]["big_full_fsdp"] = {
            **result, "model": args.big_model, "losses": [round(r["loss"], 4) for r in rows],
            "peak_memory_gib_rank0": summary.get("peak_memory_gb"),
            "plan_unsharded_one_gpu_gib": round(unsharded["reserved_gib"], 1),
            "saved": sorted(p.name for p in (out / "model").iterdir()) if (out / "model").exists() else None}
        d.save()
    if "resume" in parts and d.left() > 150:
        for leftover in ("full-big-fsdp", f"random-{args.big_model}"):  # the 8B files would fill the disk
            shutil.rmtree(d.work / leftover, ignore_errors=True)
        recipe = d.recipe(model, data, eval_data, "full-resume", max_steps=20, save_every=5, grad_accum=1,
                          gradient_checkpointing=True, lr=1e-5)
        out = d.work / "full-fsdp-killed"
        sets = ["adapter.type=full", "distributed.strategy=fsdp"]
        proc = d.train(recipe, out, 2, sets, background=True)
        deadline = time.time() + min(300, d.left())
        while time.time() < deadline and proc.poll() is None:  # kill between the step-5 and step-10 checkpoints
            if (out / "checkpoints" / "checkpoint-5" / "trainer_state.json").exists() and \
                    max((r["step"] for r in step_rows(out)), default=0) >= 7:
                break
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = max((r["step"] for r in step_rows(out)), default=0)
        copy = d.work / "full-fsdp-killed-copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(out, copy)
        part = {"killed_after_step": killed_at,
                "checkpoint": sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))}
        part["resume_2gpu"] = d.train(recipe, out, 2, sets, resume=True)
        rows = step_rows(out)
        part["resume_2gpu"]["steps_after"] = [r["step"] for r in rows if r["step"] > 5]
        part["resume_2gpu"]["losses"] = [round(r["loss"], 4) for r in rows]
        part["resume_2gpu"]["status"] = json.loads((out / "status.json").read_text()).get("state")
        if d.left() > 60:
            part["resume_1gpu"] = d.train(recipe, copy, 1, sets, resume=True)
            part["resume_1gpu"]["status"] = json.loads((copy / "status.json").read_text()).get("state")
        d.report["parts"]["sharded_resume"] = part
        d.save()
    d.report["seconds"] = round(time.time() - d.started, 1)
    d.save()
    print(json.dumps(d.report, indent=1))


if __name__ == "__main__":
    main()
