"""Speed, measured fairly, side by side on one GPU: tuneforge vs TRL (its best documented settings: padding-free
batches + Liger kernels; its plain defaults on request) vs Unsloth -- every contender at its own best settings for
the same job.

    python bench/speed.py --cases llama-1b-lora --out fair-1b.json            # sweep, then 3 repeats x 20 steps
    python bench/speed.py --device cpu --cases tiny-lora --steps 2 --warmup 1 --repeats 1   # CPU smoke test

The same job for everyone: the same random-init model (fixed seed, no download), the same data (chat examples with
log-normal lengths, median ~350 tokens), 16 examples per optimizer step, the same LoRA (r 16, alpha 32, dropout
0.05, all seven projections), the same learning rate (2e-4 LoRA, 2e-5 full) and schedule family (linear), loss on the
answer tokens for everyone (tuneforge masks prompts by default; TRL and Unsloth get the same conversations as
prompt/completion pairs, which TRL trains completion-only).

Fairness rules (issue #21):
  1. Sweep. Each contender's micro-batch x accumulation (16x1, 8x2, 4x4, 2x8) and gradient checkpointing (off/on)
     are swept in short runs: per checkpointing setting, the largest micro-batch that fits in memory (a larger
     micro-batch with the same recomputation is never slower); the faster of those wins. tuneforge's candidates are
     its defaults (its planner picks the layout and checkpointing), `speed.layout: speed`, `speed.layout: speed`
     with `train.gradient_checkpointing: false` (checkpointing off, as the peers' sweeps try), and `speed.layout:
     speed` with `speed.max_micro_batch_tokens: 8192`, and (LoRA) no checkpointing with
     `speed.recompute_lora_dropout: true` or `speed.keep_lora_dropout_mask: true`. Opt-in candidates (named in
     --tuneforge-candidates only): `syncs_on`, `fused_qlora`, `compiled` (speed.fewer_syncs, speed.fused_lora on
     QLoRA, speed.compile: levers not yet on by default, each measured against `layout_speed`).
     One case may be measured over several calls (a device call is limited in time): --sweep-only, then
     --sweep-from with --repeats / --first-repeat, joined by --merge.
  2. Each peer in its own process on the versions it pins: Unsloth from its own --unsloth-path (its pinned TRL,
     datasets < 5 and the machine's transformers <= 5.17), the others from PYTHONPATH. The driver never touches the
     GPU (models are built and the matmul peak is measured in child processes), so every contender starts on a
     free GPU.
  3. TRL's padding-free mode is documented to need FlashAttention; flash-attn has no wheel for this torch/CUDA, so
     TRL best runs it on sdpa (transformers then builds a dense mask); `trl_best_varlen` is TRL best with
     tuneforge's varlen attention function plugged into transformers (what that kernel alone is worth to a TRL user).
  4. Measured: >= 20 optimizer steps after the warm-up, three repeats in alternated order. Headline: total
     throughput (real tokens / total time of the measured steps), mean of the repeats with their spread; the median
     of the per-step rates beside it. Peak memory = torch.cuda.max_memory_allocated of the run.
  5. Loss parity: every contender's losses of the measured steps are recorded (same data, same loss tokens).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

LORA = dict(r=16, alpha=32, dropout=0.05)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXAMPLES_PER_STEP = 16
LAYOUTS = [(16, 1), (8, 2), (4, 4), (2, 8)]  # micro-batch x accumulation, largest micro-batch first
QWEN2_1_5B = dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                  max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
# case -> (model, adapter, data: (median tokens, max_length))
SHORT, LONG = (350.0, 2048), (6000.0, 8192)
CASES = {
    "llama-1b-lora": ("llama-1b", "lora", SHORT),
    "llama-8b-lora": ("llama-8b", "lora", SHORT),
    "llama-8b-qlora": ("llama-8b", "qlora", SHORT),
    "llama-1b-full": ("llama-1b", "full", SHORT),
    "qwen2-1.5b-lora": ("qwen2-1.5b", "lora", SHORT),
    "llama-1b-lora-8k": ("llama-1b", "lora", LONG),  # the long-context case: examples up to 8,192 tokens
    "llama-1b-qlora": ("llama-1b", "qlora", SHORT),
    "tiny-lora": ("tiny", "lora", (60.0, 256)),  # CPU smoke test of this script
    "tiny-full": ("tiny", "full", (60.0, 256)),
    "tiny-qlora": ("tiny", "qlora", (60.0, 256)),  # CPU smoke test of the QLoRA workers (bitsandbytes NF4 on CPU)
    "tiny-lora-8k": ("tiny", "lora", LONG),  # CPU smoke test of the long-context case's data and candidates  # CPU: where a full fine-tuning step would sync on a GPU (--profile)
}
CONTENDERS = ["tuneforge", "trl_best", "unsloth"]
OPTIONAL = ["trl_plain", "trl_best_varlen"]
# tuneforge's sweep: its defaults, the speed layout, and the speed layout without gradient checkpointing (the other
# contenders' sweep tries checkpointing off too); "gradient_checkpointing" goes to the recipe's train: section
TUNEFORGE_CANDIDATES = {"defaults": {}, "layout_speed": {"layout": "speed"},
                        "no_checkpointing": {"layout": "speed", "gradient_checkpointing": False},
                        # the speed layout planned for micro-batches of at most 8,192 tokens (longer ones split)
                        "capped_8k": {"layout": "speed", "max_micro_batch_tokens": 8192},
                        # the speed layout with speed.fewer_syncs on / torch.compile / QLoRA's 4-bit layers fused
                        # (each measured against layout_speed, the lever off, in the same call)
                        "syncs_on": {"layout": "speed", "fewer_syncs": True},
                        "compiled": {"layout": "speed", "compile": True},
                        "fused_qlora": {"layout": "speed", "fused_lora": True},
                        # LoRA only: no checkpointing, LoRA's dropout drawn again in the backward instead of kept
                        "no_checkpointing_recompute_dropout": {"layout": "speed", "gradient_checkpointing": False,
                                                               "recompute_lora_dropout": True},
                        # LoRA only: no checkpointing, LoRA's dropout keeping its mask as bits, not the dropped copy
                        "no_checkpointing_keep_mask": {"layout": "speed", "gradient_checkpointing": False,
                                                       "keep_lora_dropout_mask": True}}
LORA_ONLY = ("recompute_lora_dropout", "keep_lora_dropout_mask")  # levers inside the fused LoRA forward


def lr_for(adapter: str) -> float:
    return 2e-5 if adapter == "full" else 2e-4


def same_job(device: str) -> dict:
    """The optimizer settings every TRL-based contender passes explicitly, as tuneforge's worker runs them (train:
    warmup 0, weight_decay 0, max_grad_norm 1, AdamW fused on CUDA). Explicit because importing Unsloth swaps TRL's
    SFTConfig for one with other defaults (unsloth/models/rl.py: warmup_steps 0.1 -- 10% of the steps, so its first
    step ran at lr 0 --, optim adamw_8bit, weight_decay 0.001): until 2026-12-07 its curves were a different job."""
    return {"warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
            "optim": "adamw_torch_fused" if device == "cuda" else "adamw_torch"}


# ---------------------------------------------------------------------------------------------------------------
# Models and data


def model_config(name: str):
    from transformers import LlamaConfig, Qwen2Config

    from plan_vs_measured import TINY
    from tuneforge.memory import reference_config

    if name == "tiny":
        return LlamaConfig(**TINY)
    if name == "qwen2-1.5b":
        return Qwen2Config(**{k: v for k, v in QWEN2_1_5B.items() if k != "model_type"})
    return reference_config(name)


def build_model(name: str, workdir: Path, device: str) -> Path:
    """Random-init checkpoint + the byte tokenizer in <workdir>/random-<name>, written once (the driver below calls it
    in a child process, so it keeps no GPU memory; bench/two_gpu.py calls it directly)."""
    import torch
    from transformers import AutoModelForCausalLM

    from plan_vs_measured import byte_tokenizer

    folder = Path(workdir) / f"random-{name}"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(name), dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def make_data(path: Path, n: int, max_length: int, seed: int = 0, median: float = 350.0, sigma: float = 0.9) -> dict:
    """Chat examples whose token counts (the byte tokenizer: one token per byte) are log-normal around `median`,
    cut at max_length; the answer is ~80% of each example. Writes `path` (messages, for tuneforge) and its
    prompt/completion twin (for TRL and Unsloth: completion-only loss, the same tokens as tuneforge's masking).
    Returns length statistics."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]

    def text(chars: int) -> str:
        out, size = [], 0
        while size < chars:
            word = rng.choice(words)
            out.append(word)
            size += len(word) + 1
        return " ".join(out)[:chars]

    lengths = []
    with path.open("w", encoding="utf-8") as f, pc_path(path).open("w", encoding="utf-8") as g:
        for _ in range(n):
            total = int(min(max_length - 40, max(24, rng.lognormvariate(math.log(median), sigma))))
            prompt = max(8, total // 5)
            lengths.append(total + 36)  # + the chat template's tokens
            user = {"role": "user", "content": text(prompt)}
            answer = {"role": "assistant", "content": text(total - prompt)}
            f.write(json.dumps({"messages": [user, answer]}) + "\n")
            g.write(json.dumps({"prompt": [user], "completion": [answer]}) + "\n")
    lengths.sort()
    return {"n": n, "median": lengths[n // 2], "mean": round(sum(lengths) / n, 1), "p90": lengths[int(0.9 * n)],
            "max": lengths[-1]}


def pc_path(path: Path) -> Path:
    return path.with_name(path.stem + "-pc.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# Contenders (each runs in its own process: `python bench/speed.py --worker SPEC.json`)


class StepTimer:
    """A TrainerCallback (made a subclass at run time) timing each optimizer step as the period from one step's end
    to the next (CUDA-synced): data loading, the step and logging -- the span tuneforge is timed over (between
    consecutive metrics.jsonl rows)."""

    def __init__(self):
        self.times, self.tokens, self.losses, self.lrs, self._start, self._tokens = [], [], [], [], None, 0

    def make(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                _sync()
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                _sync()
                now = time.perf_counter()
                timer.times.append(now - timer._start)
                timer._start = now
                timer.tokens.append((state.num_input_tokens_seen or 0) - timer._tokens)
                timer._tokens = state.num_input_tokens_seen or 0

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    timer.losses.append(logs["loss"])
                    timer.lrs.append(logs.get("learning_rate"))

        return Callback()


def _job_args(args) -> dict:
    """What the trainer was really given (the config class too: Unsloth replaces TRL's)."""
    return {"config_class": type(args).__name__, **{k: getattr(args, k, None) for k in (
        "learning_rate", "lr_scheduler_type", "warmup_steps", "optim", "weight_decay", "max_grad_norm")}}


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def first_layout_that_fits(spec: dict, attempt) -> dict:
    """Try spec["layouts"] in order (largest micro-batch first); the first that trains without running out of memory
    is the result. `attempt(batch, accum)` builds a fresh model and trainer and returns the timer's record."""
    import torch

    tried = []
    for batch, accum in spec["layouts"]:
        _free()
        try:
            result = attempt(batch, accum)
        except torch.OutOfMemoryError:
            tried.append(f"{batch}x{accum}: out of memory")
            _free()
            continue
        result["layout"] = [batch, accum]
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        result["did_not_fit"] = tried
        return result
    return {"error": "no layout fits", "did_not_fit": tried}


def trl_worker(spec: dict) -> dict:
    """TRL's SFTTrainer: trl_best = its best documented settings (padding_free + use_liger_kernel); trl_plain = its
    defaults (padded batches); trl_best_varlen = trl_best with tuneforge's varlen attention plugged in."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    best = spec["contender"] in ("trl_best", "trl_best_varlen")
    dtype = torch.bfloat16 if spec["device"] == "cuda" else torch.float32
    model_kwargs = {"dtype": dtype}
    if spec["contender"] == "trl_best_varlen":
        from tuneforge.speed import varlen

        varlen.register()
        model_kwargs["attn_implementation"] = varlen.NAME
    if spec["adapter"] == "qlora":
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    data = load_dataset("json", data_files=spec["data_pc"])["train"]

    def attempt(batch: int, accum: int) -> dict:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], **model_kwargs)
        peft_config = None if spec["adapter"] == "full" else LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=TARGETS,
            task_type="CAUSAL_LM")
        timer = StepTimer()
        args = SFTConfig(output_dir=spec["workdir"], max_steps=spec["steps"], per_device_train_batch_size=batch,
                         gradient_accumulation_steps=accum, learning_rate=lr_for(spec["adapter"]),
                         lr_scheduler_type="linear", gradient_checkpointing=spec["checkpointing"],
                         logging_steps=1, report_to="none", save_strategy="no",
                         include_num_input_tokens_seen="non_padding", bf16=spec["device"] == "cuda",
                         use_cpu=spec["device"] == "cpu", seed=42, dataloader_num_workers=0, **same_job(spec["device"]),
                         # padding-free mode cannot truncate; the data is already shorter than max_length
                         **({"padding_free": True, "max_length": None, "use_liger_kernel": spec["device"] == "cuda"}
                            if best else {"max_length": spec["max_length"]}))
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config,
                   callbacks=[timer.make()]).train()
        return {"times": timer.times, "tokens": timer.tokens, "losses": timer.losses, "lrs": timer.lrs,
                "args": _job_args(args),
                "settings": {"gradient_checkpointing": spec["checkpointing"], "padding_free": best,
                             "liger": best and spec["device"] == "cuda",
                             "attention": model_kwargs.get("attn_implementation", "sdpa")}}

    return first_layout_that_fits(spec, attempt)


def unsloth_worker(spec: dict) -> dict:
    """Unsloth's documented fast path: FastLanguageModel + get_peft_model (its own gradient checkpointing) + TRL."""
    import unsloth  # noqa: F401  (must come first: it patches transformers/TRL)
    import torch
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    data = load_dataset("json", data_files=spec["data_pc"])["train"]
    checkpointing = "unsloth" if spec["checkpointing"] else False

    def attempt(batch: int, accum: int) -> dict:
        model, tokenizer = FastLanguageModel.from_pretrained(
            spec["model"], max_seq_length=spec["max_length"], dtype=torch.bfloat16, load_in_4bit=spec["adapter"] == "qlora",
            full_finetuning=spec["adapter"] == "full", local_files_only=True,
            use_gradient_checkpointing=checkpointing)
        if spec["adapter"] != "full":
            model = FastLanguageModel.get_peft_model(model, r=LORA["r"], lora_alpha=LORA["alpha"],
                                                     lora_dropout=LORA["dropout"], target_modules=TARGETS,
                                                     use_gradient_checkpointing=checkpointing, random_state=42)
        timer = StepTimer()
        args = SFTConfig(output_dir=spec["workdir"], max_steps=spec["steps"], per_device_train_batch_size=batch,
                         gradient_accumulation_steps=accum, learning_rate=lr_for(spec["adapter"]),
                         lr_scheduler_type="linear", logging_steps=1, report_to="none", save_strategy="no",
                         max_length=None, include_num_input_tokens_seen="non_padding", bf16=True, seed=42,
                         dataloader_num_workers=0, padding_free=True, gradient_checkpointing=False,
                         **same_job("cuda"))
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                   callbacks=[timer.make()]).train()
        return {"times": timer.times, "tokens": timer.tokens, "losses": timer.losses, "lrs": timer.lrs,
                "args": _job_args(args), "settings": {"gradient_checkpointing": checkpointing, "padding_free": True}}

    return first_layout_that_fits(spec, attempt)


def tuneforge_worker(spec: dict) -> dict:
    """`tuneforge train` with its defaults for 16 examples a step (its planner picks the micro-batch layout and the
    checkpointing), or with one `speed:` setting changed (spec["speed"])."""
    import torch
    from rich.console import Console

    from tuneforge.recipe import parse_recipe
    from tuneforge.run import RunDir
    from tuneforge.train import train

    recipe = {
        "name": "tuneforge", "model": spec["model"],
        "data": {"train": spec["data"], "eval": spec["eval_data"]},
        "adapter": {"type": spec["adapter"], **({} if spec["adapter"] == "full" else
                                                {"r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"],
                                                 "target_modules": TARGETS})},
        # AdamW as every contender (same_job): QLoRA's recipe default is paged 8-bit AdamW; fused by speed's lever
        "train": {"max_steps": spec["steps"], "batch_size": EXAMPLES_PER_STEP, "grad_accum": 1, "optimizer": "adamw_torch",
                  "lr": lr_for(spec["adapter"]), "scheduler": "linear", "warmup": 0,
                  "max_length": spec["max_length"], "report_to": []},
        "eval": {"baseline": False, "forgetting": False, "few_shot": 0, "max_examples": 1, "max_new_tokens": 4},
        "speed": dict(spec.get("speed") or {}),
    }
    if "gradient_checkpointing" in recipe["speed"]:
        recipe["train"]["gradient_checkpointing"] = recipe["speed"].pop("gradient_checkpointing")
    try:
        run = train(parse_recipe(recipe), output=str(Path(spec["workdir"]) / "run"), console=Console(quiet=True),
                    doctor=False, overwrite=True)
    except Exception as exc:  # after training (e.g. the report's plotting library missing): the steps are recorded
        run = RunDir(Path(spec["workdir"]) / "run")
        if not (run.path / "metrics.jsonl").exists():
            raise
        print(f"after training: {type(exc).__name__}: {exc}", file=sys.stderr)
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "eval_loss" not in r and "train_loss" not in r]
    times, tokens = [], []
    previous_time = next((r["time"] for r in rows if "eval_loss" in r), 0.0)  # training starts after the base eval
    previous_tokens = 0
    for r in steps:
        times.append(r["time"] - previous_time)
        tokens.append(r["tokens_seen"] - previous_tokens)
        previous_time, previous_tokens = r["time"], r["tokens_seen"]
    saved = __import__("yaml").safe_load((run.path / "recipe.yaml").read_text())
    return {"times": times, "tokens": tokens, "losses": [r["loss"] for r in steps],
            "lrs": [r.get("learning_rate") for r in steps],
            "args": {"config_class": "tuneforge recipe", "learning_rate": saved["train"]["lr"],
                     **{k: saved["train"].get(k) for k in ("scheduler", "warmup", "optimizer", "weight_decay",
                                                          "max_grad_norm")}},
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "layout": [saved["train"]["batch_size"], saved["train"]["grad_accum"]],
            "settings": {"gradient_checkpointing": saved["train"]["gradient_checkpointing"], **saved["speed"]}}


WORKERS = {"tuneforge": tuneforge_worker, "trl_best": trl_worker, "trl_plain": trl_worker,
           "trl_best_varlen": trl_worker, "unsloth": unsloth_worker}


def worker(spec_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("profile"):
        import step_profiler

        step_profiler.install(Path(spec["workdir"]) / "PROFILE.txt", start=spec["profile"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    result = WORKERS[spec["contender"]](spec)
    result["wall_s"] = round(time.time() - started, 1)
    import transformers
    import trl

    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    Path(spec["result"]).write_text(json.dumps(result))


def helper_job(kind: str, arg: str, device: str) -> None:
    """--build NAME:FOLDER and --peak run here, in a child process, so the driver never holds GPU memory."""
    if kind == "build":
        name, workdir = arg.split(":", 1)
        build_model(name, Path(workdir), device)
    else:
        Path(arg).write_text(json.dumps(matmul_peak_tflops(device)))


# ---------------------------------------------------------------------------------------------------------------
# The driver


def matmul_peak_tflops(device: str) -> float | None:
    """bf16 matmul throughput of 8192^3 products (the MFU denominator), measured now on this GPU."""
    if device != "cuda":
        return None
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 20 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12)
    return best


def summarise(result: dict, warmup: int, flops_per_token: float, peak_tflops: float | None) -> dict:
    times, tokens = result["times"][warmup:], result["tokens"][warmup:]
    if not times:
        return {"error": "no measured steps", **{k: result.get(k) for k in ("did_not_fit",)}}
    total = sum(tokens) / sum(times)
    out = {"tokens_per_s": round(total, 1), "tokens_per_s_median_step": round(statistics.median(n / t for n, t in zip(tokens, times)), 1),
           "measured_steps": len(times), "measured_s": round(sum(times), 2),
           "real_tokens_per_step": round(sum(tokens) / len(tokens), 1), "peak_gib": result.get("peak_gib"),
           "layout": result.get("layout"), "did_not_fit": result.get("did_not_fit", []),
           "losses": [round(x, 4) for x in result["losses"]], "settings": result.get("settings"),
           "wall_s": result.get("wall_s"), "versions": result.get("versions"), "args": result.get("args"),
           "lrs": result.get("lrs", [])[:4]}
    if peak_tflops:
        out["mfu_pct"] = round(100 * total * flops_per_token / (peak_tflops * 1e12), 1)
    return out


def child(args_list: list[str], env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, *args_list], env=env, capture_output=True, text=True, timeout=timeout)


def run_one(contender: str, case: str, args, folder: Path, data: Path, eval_data: Path, tag: str, *,
            layouts: list, checkpointing: bool | None, speed: dict | None, steps: int) -> dict:
    model_name, adapter, (_, max_length) = CASES[case]
    workdir = Path(args.workdir) / case / contender / tag
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {"contender": contender, "model": str(folder), "adapter": adapter, "layouts": layouts,
            "checkpointing": checkpointing, "speed": speed, "steps": steps, "max_length": max_length,
            "data": str(data), "data_pc": str(pc_path(data)), "eval_data": str(eval_data), "workdir": str(workdir),
            "device": args.device, "result": str(workdir / "result.json"), "profile": args.profile}
    (workdir / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ)
    if contender == "unsloth":
        if not args.unsloth_path or not Path(args.unsloth_path).is_dir():
            return {"error": "not run: no --unsloth-path with Unsloth and its pinned libraries"}
        env["PYTHONPATH"] = os.pathsep.join([args.unsloth_path, str(ROOT / "src")])  # its pins only, not ours
        env["HF_HUB_OFFLINE"] = "1"
        env["UNSLOTH_DISABLE_STATISTICS"] = "1"
    started = time.time()
    try:
        proc = child(["--worker", str(workdir / "spec.json")], env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout}s"}
    (workdir / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()][-6:]
        return {"error": f"exit {proc.returncode} after {time.time() - started:.0f}s", "log_tail": tail}
    return json.loads((workdir / "result.json").read_text())


# tried only when named in --tuneforge-candidates: a lever measured against itself, or a slow start
OPT_IN = {"syncs_on", "compiled", "fused_qlora"}


def candidates(contender: str, adapter: str = "lora", only: list[str] | None = None) -> list[dict]:
    """What the sweep tries for a contender: per checkpointing setting, the micro-batches largest first. `only`
    narrows tuneforge's candidates (--tuneforge-candidates: a call's 10 minutes do not hold every one on big cases)."""
    if contender == "tuneforge":
        return [{"tag": name, "speed": speed, "layouts": None, "checkpointing": None}
                for name, speed in TUNEFORGE_CANDIDATES.items()
                if (adapter == "lora" or not any(speed.get(key) for key in LORA_ONLY))
                and (name in only if only else name not in OPT_IN)]
    return [{"tag": f"ckpt-{'on' if ckpt else 'off'}", "speed": None, "layouts": LAYOUTS, "checkpointing": ckpt}
            for ckpt in (False, True)]


def sweep(contender: str, case: str, args, folder, data, eval_data, summary) -> dict:
    """Short runs of each candidate; the fastest that fits is the contender's setting for the measured repeats."""
    tried = {}
    for cand in candidates(contender, CASES[case][1], args.tuneforge_candidates):
        raw = run_one(contender, case, args, folder, data, eval_data, "sweep-" + cand["tag"], layouts=cand["layouts"],
                      checkpointing=cand["checkpointing"], speed=cand["speed"], steps=args.sweep_warmup + args.sweep_steps)
        tried[cand["tag"]] = raw if "error" in raw else summary(raw, args.sweep_warmup)
        print(json.dumps({"case": case, "contender": contender, "sweep": cand["tag"],
                          **{k: v for k, v in tried[cand["tag"]].items() if k != "losses"}}), flush=True)
    fits = {tag: r for tag, r in tried.items() if "tokens_per_s" in r}
    if not fits:
        return {"tried": tried, "best": None}
    # chosen by the median step rate: a sweep run is short, and a one-off stall in it (a Triton kernel compiled for a
    # new shape) would decide the choice if total throughput did
    tag = max(fits, key=lambda t: fits[t]["tokens_per_s_median_step"])
    cand = next(c for c in candidates(contender, CASES[case][1], args.tuneforge_candidates) if c["tag"] == tag)
    layout = fits[tag]["layout"]
    return {"tried": tried, "best": {**cand, "layouts": [layout] if cand["layouts"] else None, "layout": layout}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker")
    parser.add_argument("--table", nargs="+", help="print the markdown table of these results files")
    parser.add_argument("--build")
    parser.add_argument("--peak")
    parser.add_argument("--cases", default="llama-1b-lora,llama-8b-lora,llama-8b-qlora,llama-1b-full,qwen2-1.5b-lora,"
                                           "llama-1b-lora-8k")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"also: {', '.join(OPTIONAL)}")
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per repeat (>= 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep-steps", type=int, default=6)
    parser.add_argument("--sweep-warmup", type=int, default=2)
    parser.add_argument("--examples", type=int, default=1200)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp") + "/tuneforge-speed")
    parser.add_argument("--unsloth-path", default=None, help="a pip --target folder with Unsloth and its pinned libs")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tuneforge-candidates", type=lambda v: v.split(","), default=None,
                        help=f"sweep only these of tuneforge's candidates ({', '.join(TUNEFORGE_CANDIDATES)})")
    parser.add_argument("--sweep-only", action="store_true", help="stop after the sweep (its choices go to --out)")
    parser.add_argument("--sweep-from", default=None, help="a results JSON whose sweep choices to use (no new sweep)")
    parser.add_argument("--first-repeat", type=int, default=0, help="number the repeats from here (a later call's "
                        "repeats keep the alternated order; join the files with --merge)")
    parser.add_argument("--merge", nargs="+", help="join results files of one case measured in several calls (the "
                        "sweep of the first, the repeats of all) into --out")
    parser.add_argument("--profile", type=int, default=0, metavar="STEP",
                        help="profile steps STEP+1.. of each contender (bench/step_profiler.py: PROFILE.txt in its "
                             "work folder); timings of profiled runs are not comparable")
    args = parser.parse_args()
    unknown = set(args.tuneforge_candidates or []) - set(TUNEFORGE_CANDIDATES)
    if unknown:
        parser.error(f"--tuneforge-candidates: no candidate {', '.join(sorted(unknown))}; "
                     f"choose from {', '.join(TUNEFORGE_CANDIDATES)}")
    if args.worker:
        return worker(args.worker)
    if args.table:
        return print(table(args.table))
    if args.merge:
        return merge(args.merge, args.out, args.contenders.split(","))
    if args.build or args.peak:
        return helper_job("build" if args.build else "peak", args.build or args.peak, args.device)

    from tuneforge.memory import flops_per_token

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    peak_file = workdir / "peak.json"
    child(["--peak", str(peak_file), "--device", args.device])
    peak = json.loads(peak_file.read_text()) if peak_file.exists() else None
    report = {"date": time.strftime("%Y-%m-%d"), "device": device_name(args.device), "matmul_peak_tflops": peak,
              "lora": LORA, "examples_per_step": EXAMPLES_PER_STEP, "warmup": args.warmup, "steps": args.steps,
              "repeats": args.repeats, "cases": {}}
    print(json.dumps({k: v for k, v in report.items() if k != "cases"}), flush=True)
    contenders = args.contenders.split(",")

    def save():
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))

    for index, case in enumerate(args.cases.split(",")):
        model_name, adapter, (median, max_length) = CASES[case]
        folder = workdir / f"random-{model_name}"
        if not (folder / "config.json").is_file():
            proc = child(["--build", f"{model_name}:{workdir}", "--device", args.device])
            if proc.returncode:
                raise SystemExit(proc.stderr[-2000:])
        data, eval_data = workdir / f"train-{int(median)}.jsonl", workdir / f"eval-{int(median)}.jsonl"
        lengths = make_data(data, args.examples, max_length, seed=0, median=median)
        make_data(eval_data, 8, max_length, seed=1, median=median)
        useful = flops_per_token(model_config(model_name), adapter=adapter, seq_len=int(lengths["mean"]))

        def summary(raw, warmup):
            return summarise(raw, warmup, useful, peak)

        entry = report["cases"][case] = {"data_lengths": lengths, "max_length": max_length, "sweep": {}, "repeats": []}
        earlier = json.loads(Path(args.sweep_from).read_text())["cases"].get(case, {}) if args.sweep_from else {}
        for contender in contenders:
            if contender in earlier.get("sweep", {}):
                entry["sweep"][contender] = {**earlier["sweep"][contender], "from": args.sweep_from}
            else:
                entry["sweep"][contender] = sweep(contender, case, args, folder, data, eval_data, summary)
            save()
        for repeat in range(args.first_repeat, args.first_repeat + (0 if args.sweep_only else args.repeats)):
            order = contenders if (index + repeat) % 2 == 0 else list(reversed(contenders))
            results = {"order": order}
            for contender in order:
                best = entry["sweep"][contender]["best"]
                if best is None:
                    results[contender] = {"error": "nothing fits"}
                    continue
                raw = run_one(contender, case, args, folder, data, eval_data, f"repeat-{repeat}",
                              layouts=best["layouts"], checkpointing=best["checkpointing"], speed=best["speed"],
                              steps=args.warmup + args.steps)
                results[contender] = raw if "error" in raw else summary(raw, args.warmup)
                print(json.dumps({"case": case, "repeat": repeat, "contender": contender,
                                  **{k: v for k, v in results[contender].items() if k != "losses"}}), flush=True)
            entry["repeats"].append(results)
            entry["summary"] = combine(entry["repeats"], contenders)
            save()
        print(json.dumps({"case": case, "summary": entry.get("summary")}), flush=True)
    save()


def merge(paths: list[str], out: str, contenders: list[str]) -> None:
    """One results file from several calls: the first file's header and sweep, every file's repeats of each case
    (each call ran on its own machine, so the note names the devices and matmul peaks of each)."""
    files = [json.loads(Path(p).read_text()) for p in paths]
    report = {**files[0], "merged_from": [{"file": Path(p).name, "device": f.get("device"),
                                           "matmul_peak_tflops": f.get("matmul_peak_tflops"),
                                           "repeats": {c: len(e.get("repeats", [])) for c, e in f["cases"].items()}}
                                          for p, f in zip(paths, files)]}
    for case, entry in report["cases"].items():
        entry["repeats"] = [r for f in files for r in f["cases"].get(case, {}).get("repeats", [])]
        entry["summary"] = combine(entry["repeats"], [c for c in contenders if any(c in r for r in entry["repeats"])])
    Path(out).write_text(json.dumps(report, indent=1))
    print(table([out]))


def combine(repeats: list[dict], contenders: list[str]) -> dict:
    """Per contender: mean total throughput over the repeats with min/max, peak memory, MFU; ratios of tuneforge's
    mean to each other contender's mean, with the range from the repeats' extremes."""
    out = {}
    for contender in contenders:
        rates = [r[contender]["tokens_per_s"] for r in repeats if "tokens_per_s" in r.get(contender, {})]
        if not rates:
            continue
        runs = [r[contender] for r in repeats if "tokens_per_s" in r.get(contender, {})]
        out[contender] = {"tokens_per_s": round(statistics.mean(rates), 1), "min": min(rates), "max": max(rates),
                          "repeats": len(rates),
                          "median_step_rate": round(statistics.mean(x["tokens_per_s_median_step"] for x in runs), 1),
                          "peak_gib": round(max(x["peak_gib"] or 0 for x in runs), 2), "layout": runs[0]["layout"],
                          "settings": runs[0]["settings"], "mfu_pct": runs[0].get("mfu_pct") and round(
                              statistics.mean(x["mfu_pct"] for x in runs), 1),
                          "mean_loss": round(statistics.mean(statistics.mean(x["losses"]) for x in runs if x["losses"]), 4)}
    ours = out.get("tuneforge")
    if ours:
        for other, theirs in out.items():
            if other != "tuneforge":
                ours[f"speed_vs_{other}"] = {"ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
                                             "range": [round(ours["min"] / theirs["max"], 3),
                                                       round(ours["max"] / theirs["min"], 3)]}
                if ours["peak_gib"] and theirs["peak_gib"]:
                    ours[f"memory_vs_{other}"] = round(ours["peak_gib"] / theirs["peak_gib"], 3)
    return out


def device_name(device: str) -> str:
    if device != "cuda":
        return "cpu"
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else "cuda"


def table(paths: list[str]) -> str:
    """The markdown table of one or more results files (python bench/speed.py --table a.json b.json)."""
    lines = ["| case | contender | best setting (micro-batch x accum, checkpointing) | tokens/s (mean of repeats) | "
             "min-max | median step rate | peak GiB | MFU % | mean loss |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ratios = []
    for path in paths:
        for case, entry in json.loads(Path(path).read_text())["cases"].items():
            for contender, s in entry.get("summary", {}).items():
                ckpt = s["settings"].get("gradient_checkpointing")
                if contender == "tuneforge":
                    ckpt = f"every {s['settings'].get('checkpoint_every', 1)} layer(s), layout {s['settings'].get('layout')}" if ckpt else "off"
                lines.append(f"| {case} | {contender} | {s['layout'][0]}x{s['layout'][1]}, {ckpt} | {s['tokens_per_s']:,.0f} | "
                             f"{s['min']:,.0f}-{s['max']:,.0f} | {s['median_step_rate']:,.0f} | {s['peak_gib']:.1f} | "
                             f"{s['mfu_pct']} | {s['mean_loss']} |")
                for key, value in s.items():
                    if key.startswith("speed_vs_"):
                        other = key[len("speed_vs_"):]
                        ratios.append(f"| {case} | {other} | {value['ratio']:.2f}x | {value['range'][0]:.2f}-{value['range'][1]:.2f} | "
                                      f"{s.get('memory_vs_' + other, '')} |")
    return "\n".join(lines + ["", "| case | tuneforge vs | speed ratio | range over repeats | memory ratio |",
                              "| --- | --- | ---: | ---: | ---: |", *ratios, "", *sweep_table(paths)])


def sweep_table(paths: list[str], baseline: str = "layout_speed") -> list[str]:
    """Every sweep run of the results files: how each candidate did, tuneforge's against its `baseline` candidate
    (the speed layout, every opt-in lever off) in the same call -- how a lever is read against itself off."""
    lines = ["| case | contender | candidate | micro-batch x accum | measured steps | tokens/s | median step rate | "
             f"peak GiB | mean loss | vs {baseline} (speed, memory) |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for path in paths:
        for case, entry in json.loads(Path(path).read_text())["cases"].items():
            for contender, sweep in (entry.get("sweep") or {}).items():
                tried = sweep.get("tried", {})
                base = tried.get(baseline) if contender == "tuneforge" else None
                for tag, r in tried.items():
                    if "tokens_per_s" not in r:
                        lines.append(f"| {case} | {contender} | {tag} | | | did not run: {str(r.get('error', ''))[:80]} "
                                     "| | | | |")
                        continue
                    losses = r.get("losses") or []
                    versus = ""
                    if base and "tokens_per_s" in base and tag != baseline:
                        memory = (f"{r['peak_gib'] / base['peak_gib']:.2f}x" if r.get("peak_gib") and base.get("peak_gib")
                                  else "n/a")
                        versus = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x, {memory}"
                    peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "n/a"
                    mean = f"{statistics.mean(losses):.4f}" if losses else ""
                    lines.append(f"| {case} | {contender} | {tag} | {r['layout'][0]}x{r['layout'][1]} | "
                                 f"{r['measured_steps']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_median_step']:,.0f} "
                                 f"| {peak} | {mean} | {versus} |")
    return lines if len(lines) > 2 else []


if __name__ == "__main__":
    main()
