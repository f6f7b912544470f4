"""Speed, side by side on one GPU: tuneforge with its default settings vs plain TRL SFTTrainer (its defaults) vs TRL's
best documented settings (padding-free batches + Liger kernels) vs Unsloth (when its wheels are present).

    python bench/speed.py --out bench/results/speed.json                 # every case below
    python bench/speed.py --cases llama-1b-lora --steps 6 --warmup 2      # one case, quick
    python bench/speed.py --device cpu --cases tiny-lora --steps 2 --warmup 1   # CPU smoke test of the script

Same model architecture (random init from a config, fixed seed: no download), same data (chat examples with a
realistic length distribution: log-normal, median ~350 tokens, long tail cut at max_length 2048), same LoRA config
(r 16, alpha 32, dropout 0.05, all seven projections), same examples per optimizer step. Every contender runs in its
own process (an empty allocator each; Unsloth with its own pinned libraries from --unsloth-path), the order of the
contenders alternates from case to case, the first --warmup steps are excluded, and the reported rate is the
median of the measured steps' rates (a step stalled by a one-off Triton compile does not count; the mean is kept too). Reported per contender: real (non-padding) tokens/s, peak GPU memory
(max_memory_allocated), useful model-FLOPs utilisation (4 x params x tokens for LoRA/QLoRA, 6 x for full
fine-tuning, plus attention, against the bf16 matmul peak measured at the start of the same run), and the losses of
the first steps (tuneforge with all levers off runs too, so the levers' numerical check is in the same file).
"""

from __future__ import annotations

import argparse
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
QWEN2_1_5B = dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                  max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
# case -> (model, adapter, micro-batch, grad accum)
CASES = {
    "llama-1b-lora": ("llama-1b", "lora", 8, 2),
    "llama-8b-lora": ("llama-8b", "lora", 4, 4),
    "qwen2-1.5b-lora": ("qwen2-1.5b", "lora", 8, 2),
    "llama-1b-qlora": ("llama-1b", "qlora", 8, 2),
    "llama-1b-full": ("llama-1b", "full", 8, 2),
    "tiny-lora": ("tiny", "lora", 4, 2),
    "embedded-lora": ("embedded", "lora", 8, 2),  # the CPU case: SmolLM2-135M-Instruct, vs trl_equivalent
}
CONTENDERS = ["tuneforge", "trl_plain", "trl_best", "unsloth", "tuneforge_levers_off"]
# Also runnable: tuneforge with one speed setting changed from its defaults (what that setting is worth, same run).
TUNEFORGE_VARIANTS = {
    "tuneforge_fast": {"layout": "speed"},  # the memory plan spends free GPU memory on speed
    "tuneforge_unmerged": {"fold_accumulation": False},  # the micro-batches as written (the layout before 2026-11-25b)
    "tuneforge_no_offload": {"offload_checkpoints": False},  # checkpoints kept on the GPU
    "tuneforge_sdpa": {"attention": "sdpa"},  # what the varlen attention lever is worth
    "tuneforge_unfused": {"fused_lora": False},  # PEFT's LoRA forward (scale and add as separate passes)
}
EXTRA_CONTENDERS = list(TUNEFORGE_VARIANTS)


# ---------------------------------------------------------------------------------------------------------------
# Models and data


def model_config(name: str):
    from transformers import LlamaConfig, Qwen2Config

    from plan_vs_measured import TINY
    from tuneforge.memory import reference_config

    if name == "tiny":
        return LlamaConfig(**TINY)
    if name == "embedded":
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(build_model("embedded", Path("."), "cpu")))
    if name == "qwen2-1.5b":
        return Qwen2Config(**{k: v for k, v in QWEN2_1_5B.items() if k != "model_type"})
    return reference_config(name)


def build_model(name: str, workdir: Path, device: str) -> Path:
    """Random-init bf16 checkpoint + the byte tokenizer, written once per model."""
    import torch
    from transformers import AutoModelForCausalLM

    from plan_vs_measured import byte_tokenizer

    if name == "embedded":  # the embedded SmolLM2-135M-Instruct checkpoint (converted from its GGUF once)
        from tuneforge.models import resolve_model_source
        from tuneforge.recipe import EMBEDDED_MODEL

        return Path(resolve_model_source(EMBEDDED_MODEL))
    folder = workdir / f"random-{name}"
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
    cut at max_length; the answer is ~80% of each example. Returns length statistics."""
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
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            total = int(min(max_length - 40, max(24, rng.lognormvariate(math.log(median), sigma))))
            prompt = max(8, total // 5)
            lengths.append(total + 36)  # + the chat template's tokens
            f.write(json.dumps({"messages": [{"role": "user", "content": text(prompt)},
                                             {"role": "assistant", "content": text(total - prompt)}]}) + "\n")
    lengths.sort()
    return {"n": n, "median": lengths[n // 2], "mean": round(sum(lengths) / n, 1), "p90": lengths[int(0.9 * n)],
            "max": lengths[-1]}


# ---------------------------------------------------------------------------------------------------------------
# Contenders (each runs in its own process: `python bench/speed.py --worker SPEC.json`)


class StepTimer:
    """A TrainerCallback (made a subclass at run time) timing each optimizer step as the period from one step's end
    to the next (CUDA-synced): data loading, the step and logging, the same span tuneforge's contenders are timed
    over (between consecutive metrics.jsonl rows). (Runs before 2026-11-25 timed the other contenders from step
    begin to step end only, which left their data loading and logging out: in their favour.)"""

    def __init__(self):
        self.times, self.tokens, self.losses, self._start, self._tokens = [], [], [], None, 0

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

        return Callback()


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def trl_worker(spec: dict) -> dict:
    """Plain TRL (its SFTConfig defaults: padded batches, gradient checkpointing on, bf16) or TRL's best documented
    settings (padding_free=True, use_liger_kernel=True)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    best = spec["contender"] == "trl_best"
    # trl_equivalent: the plain TRL script with the settings tuneforge resolves on a CPU (padding-free batches, no
    # checkpointing, no Liger, adamw_torch): the "within 5% of plain TRL" comparison
    equivalent = spec["contender"] == "trl_equivalent"
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    dtype = torch.bfloat16 if spec["device"] == "cuda" else torch.float32
    model_kwargs = {"dtype": dtype}
    if spec["adapter"] == "qlora":
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], **model_kwargs)
    peft_config = None if spec["adapter"] == "full" else LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules=TARGETS, task_type="CAUSAL_LM")
    timer = StepTimer()
    args = SFTConfig(output_dir=spec["workdir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
                     gradient_accumulation_steps=spec["accum"], learning_rate=2e-4 if peft_config else 2e-5,
                     logging_steps=1, report_to="none", save_strategy="no",
                     **({} if best or equivalent else {"max_length": spec["max_length"]}),
                     include_num_input_tokens_seen="non_padding", bf16=spec["device"] == "cuda",
                     use_cpu=spec["device"] == "cpu", seed=42, dataloader_num_workers=0,
                     # TRL's padding-free mode cannot truncate; the data here is already shorter than max_length
                     **({"padding_free": True, "max_length": None, "use_liger_kernel": spec["device"] == "cuda"}
                        if best else {}),
                     **({"padding_free": True, "max_length": None, "gradient_checkpointing": False,
                         "optim": "adamw_torch"} if equivalent else {}))
    trainer = SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=spec["data"])["train"],
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[timer.make()])
    trainer.train()
    return {"times": timer.times, "tokens": timer.tokens, "losses": timer.losses,
            "settings": {"gradient_checkpointing": bool(args.gradient_checkpointing or getattr(args, "activation_checkpointing", False)),
                         "padding_free": bool(getattr(args, "padding_free", False)), "liger": bool(args.use_liger_kernel)}}


def tuneforge_worker(spec: dict) -> dict:
    """`tuneforge train` with its defaults (only the run's size set), or with every speed lever off."""
    from rich.console import Console

    from tuneforge.recipe import parse_recipe
    from tuneforge.train import train

    off = spec["contender"] == "tuneforge_levers_off"
    recipe = {
        "name": spec["contender"], "model": spec["model"],
        "data": {"train": spec["data"], "eval": spec["eval_data"]},
        "adapter": {"type": spec["adapter"], **({} if spec["adapter"] == "full" else
                                                {"r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"],
                                                 "target_modules": TARGETS})},
        "train": {"max_steps": spec["steps"], "batch_size": spec["batch"], "grad_accum": spec["accum"],
                  "max_length": spec["max_length"], "report_to": [],
                  **({"gradient_checkpointing": True} if off else {})},
        "eval": {"baseline": False, "forgetting": False, "few_shot": 0, "max_examples": 1, "max_new_tokens": 4},
    }
    if spec["adapter"] == "qlora":
        recipe["train"]["optimizer"] = "adamw_torch"  # same optimizer as the TRL contenders
    if off:
        recipe["speed"] = {"padding_free": False, "liger": False, "fused_optimizer": False, "attention": "sdpa"}
    if spec["contender"] in TUNEFORGE_VARIANTS:
        recipe["speed"] = dict(TUNEFORGE_VARIANTS[spec["contender"]])
    from tuneforge.run import RunDir

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
    times, tokens, previous_time, previous_tokens = [], [], 0.0, 0
    start = next((r["time"] for r in rows if "eval_loss" in r), 0.0)  # training starts after the base eval
    previous_time = start
    for r in steps:
        times.append(r["time"] - previous_time)
        tokens.append(r["tokens_seen"] - previous_tokens)
        previous_time, previous_tokens = r["time"], r["tokens_seen"]
    saved = __import__("yaml").safe_load((run.path / "recipe.yaml").read_text())
    return {"times": times, "tokens": tokens, "losses": [r["loss"] for r in steps],
            "settings": {"gradient_checkpointing": saved["train"]["gradient_checkpointing"], **saved["speed"]}}


def unsloth_worker(spec: dict) -> dict:
    """Unsloth's documented fast path: FastLanguageModel + get_peft_model (its gradient checkpointing) + TRL."""
    import unsloth  # noqa: F401  (must come first: it patches transformers/TRL)
    import torch
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(spec["model"], max_seq_length=spec["max_length"],
                                                         dtype=torch.bfloat16, load_in_4bit=spec["adapter"] == "qlora",
                                                         full_finetuning=spec["adapter"] == "full", local_files_only=True)
    if spec["adapter"] != "full":
        model = FastLanguageModel.get_peft_model(model, r=LORA["r"], lora_alpha=LORA["alpha"],
                                                 lora_dropout=LORA["dropout"], target_modules=TARGETS,
                                                 use_gradient_checkpointing="unsloth", random_state=42)
    timer = StepTimer()
    args = SFTConfig(output_dir=spec["workdir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
                     gradient_accumulation_steps=spec["accum"], learning_rate=2e-4, logging_steps=1, report_to="none",
                     save_strategy="no", max_length=None, include_num_input_tokens_seen="non_padding",
                     bf16=True, seed=42, dataloader_num_workers=0, padding_free=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=spec["data"])["train"],
                         processing_class=tokenizer, callbacks=[timer.make()])
    trainer.train()
    return {"times": timer.times, "tokens": timer.tokens, "losses": timer.losses,
            "settings": {"gradient_checkpointing": "unsloth", "padding_free": True}}


def worker(spec_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("profile"):
        import step_profiler

        step_profiler.install(Path(spec["workdir"]) / "PROFILE.txt", start=spec["profile"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    fn = {"tuneforge": tuneforge_worker, "tuneforge_levers_off": tuneforge_worker,
          **{name: tuneforge_worker for name in TUNEFORGE_VARIANTS}, "trl_plain": trl_worker,
          "trl_equivalent": trl_worker, "trl_best": trl_worker, "unsloth": unsloth_worker}[spec["contender"]]
    result = fn(spec)
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    result["wall_s"] = round(time.time() - started, 1)
    import transformers
    import trl

    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    Path(spec["result"]).write_text(json.dumps(result))


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
        return {"error": "no measured steps"}
    per_step = statistics.median(times)
    # the median of the steps' own rates: a step that stalls (a Triton kernel compiled for a new shape, a page of
    # the data read) does not move it; the mean over all measured steps is kept beside it
    tokens_per_s = statistics.median(n / t for n, t in zip(tokens, times))
    out = {"tokens_per_s": round(tokens_per_s, 1), "tokens_per_s_mean": round(sum(tokens) / sum(times), 1),
           "median_step_s": round(per_step, 4),
           "real_tokens_per_step": round(sum(tokens) / len(tokens), 1), "peak_gib": result.get("peak_gib"),
           "losses": [round(x, 4) for x in result["losses"][:6]], "settings": result.get("settings"),
           "measured_steps": len(times), "wall_s": result.get("wall_s"), "versions": result.get("versions")}
    if peak_tflops:
        out["mfu_pct"] = round(100 * tokens_per_s * flops_per_token / (peak_tflops * 1e12), 1)
    return out


def run_contender(contender: str, case: str, args, folder: Path, data: Path, eval_data: Path, device: str) -> dict:
    model_name, adapter, batch, accum = CASES[case]
    workdir = Path(args.workdir) / case / contender
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {"contender": contender, "model": str(folder), "adapter": adapter, "batch": batch, "accum": accum,
            "steps": args.warmup + args.steps, "max_length": args.max_length, "data": str(data),
            "eval_data": str(eval_data), "workdir": str(workdir), "device": device,
            "result": str(workdir / "result.json"), "profile": args.profile}
    (workdir / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ)
    if contender == "unsloth":
        if not args.unsloth_path or not Path(args.unsloth_path).is_dir():
            return {"error": "not run: no --unsloth-path with Unsloth and its pinned libraries"}
        env["PYTHONPATH"] = os.pathsep.join([args.unsloth_path, env.get("PYTHONPATH", "")])
        env["HF_HUB_OFFLINE"] = "1"
        env["UNSLOTH_DISABLE_STATISTICS"] = "1"
    started = time.time()
    proc = subprocess.run([sys.executable, __file__, "--worker", str(workdir / "spec.json")], env=env,
                          capture_output=True, text=True, timeout=args.timeout)
    (workdir / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()][-6:]
        return {"error": f"exit {proc.returncode} after {time.time() - started:.0f}s", "log_tail": tail}
    return json.loads((workdir / "result.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker")
    parser.add_argument("--cases", default="llama-1b-lora,llama-8b-lora,qwen2-1.5b-lora,llama-1b-qlora,llama-1b-full")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--examples", type=int, default=1200)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp") + "/tuneforge-speed")
    parser.add_argument("--unsloth-path", default=None, help="a pip --target folder with Unsloth and its pinned libs")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", type=int, default=0, metavar="STEP",
                        help="profile steps STEP+1.. of each contender (bench/step_profiler.py: PROFILE.txt in its "
                             "work folder); timings of profiled runs are not comparable")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)

    from tuneforge.memory import flops_per_token

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data, eval_data = workdir / "train.jsonl", workdir / "eval.jsonl"
    lengths = make_data(data, args.examples, args.max_length, seed=0)
    make_data(eval_data, 8, args.max_length, seed=1)
    peak = matmul_peak_tflops(args.device)
    report = {"date": time.strftime("%Y-%m-%d"), "device": _device_name(args.device), "matmul_peak_tflops": peak,
              "data_lengths": lengths, "lora": LORA, "warmup": args.warmup, "steps": args.steps, "cases": {}}
    print(json.dumps({k: v for k, v in report.items() if k != "cases"}), flush=True)
    contenders = args.contenders.split(",")
    for index, case in enumerate(args.cases.split(",")):
        model_name, adapter, batch, accum = CASES[case]
        folder = build_model(model_name, workdir, args.device)
        useful = flops_per_token(model_config(model_name), adapter=adapter, seq_len=int(lengths["mean"]))
        order = contenders if index % 2 == 0 else list(reversed(contenders))
        results = {}
        for contender in order:
            raw = run_contender(contender, case, args, folder, data, eval_data, args.device)
            results[contender] = raw if "error" in raw else summarise(raw, args.warmup, useful, peak)
            print(json.dumps({"case": case, "contender": contender, **results[contender]}), flush=True)
        results["order"] = order
        results["ratios"] = ratios(results)
        report["cases"][case] = results
        print(json.dumps({"case": case, "ratios": results["ratios"]}), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


def ratios(results: dict) -> dict:
    ours = results.get("tuneforge", {})
    out = {}
    for other in ("trl_plain", "trl_best", "trl_equivalent", "unsloth", "tuneforge_levers_off", *TUNEFORGE_VARIANTS):
        theirs = results.get(other, {})
        if "tokens_per_s" in ours and "tokens_per_s" in theirs:
            out[f"speed_vs_{other}"] = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3)
            if ours.get("peak_gib") and theirs.get("peak_gib"):
                out[f"memory_vs_{other}"] = round(ours["peak_gib"] / theirs["peak_gib"], 3)
    return out


def _device_name(device: str) -> str:
    if device != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0)


if __name__ == "__main__":
    main()
