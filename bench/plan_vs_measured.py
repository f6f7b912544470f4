"""Plan vs measured: `tuneforge.memory.plan_memory` against the real peak of `torch.cuda.max_memory_allocated()`.

On a CUDA machine, for Llama-class models of 1B and 8B parameters with random weights (built from the plan's
reference configs: no download), trains a few steps with tuneforge's own stack -- `models.load_base_model`,
`adapters.apply_adapter`, the `sft` method's TRL trainer -- for full fine-tuning, LoRA and QLoRA, with and without
gradient checkpointing, and prints a table of predicted vs measured peak memory (and throughput vs the time model).

    python bench/plan_vs_measured.py                                  # 1b and 8b, full/lora/qlora, gc off/on
    python bench/plan_vs_measured.py --sizes 1b --seq-len 1024 --batch 2 --steps 3
    python bench/plan_vs_measured.py --out bench/results/plan_vs_measured_h100.json

Each case runs in its own Python process, so every measurement starts from an empty allocator and an
out-of-memory case is recorded as such (a predicted "does not fit" that really does not fit is a result too).
Random-weight checkpoints are written once per size under --workdir (8B: ~16 GB of bf16 safetensors).

Needs: CUDA, torch, transformers, trl, peft, bitsandbytes (QLoRA), datasets, tokenizers; importable on CPU (the
heavy imports happen inside the functions). Results: commit the JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SIZES = {"1b": "llama-1b", "8b": "llama-8b"}
# "tiny" is only for a CPU smoke test of this script (--device cpu): it measures nothing.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, tie_word_embeddings=True, max_position_embeddings=512)
GIB = 2**30


def config_for(size: str):
    from transformers import LlamaConfig

    from tuneforge.memory import reference_config

    return LlamaConfig(**TINY) if size == "tiny" else reference_config(SIZES[size])


def byte_tokenizer():
    """A tokenizer of 256 byte tokens + <|im_start|>/<|im_end|>/<pad> and a ChatML template: the trainer needs a
    processing class, and the data here is pre-tokenized random ids, so any tokenizer will do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<pad>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<pad>"
    tokenizer.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                               "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    return tokenizer


def build_checkpoint(size: str, workdir: Path, device: str = "cuda") -> Path:
    """Random-init bf16 checkpoint of the reference config, written once (initialised on the GPU: fast)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = workdir / f"random-{size}"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    config = config_for(size)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def recipe_for(case: dict, checkpoint: Path):
    from tuneforge.recipe import parse_recipe

    adapter = case["adapter"]
    optimizer = case.get("optimizer") or ("paged_adamw_8bit" if adapter == "qlora" else "adamw_torch")
    return parse_recipe({
        "name": "plan-bench",
        "model": {"name": str(checkpoint), "dtype": "bfloat16"},
        "data": {"train": "unused.jsonl"},
        "adapter": {"type": adapter, "r": case["r"], "dropout": case["dropout"], "target_modules": "all-linear"},
        "train": {"max_steps": case["steps"], "batch_size": case["batch"], "grad_accum": 1, "max_length": case["seq_len"],
                  "gradient_checkpointing": case["gc"], "optimizer": optimizer, "precision": "bf16", "warmup": 0.0,
                  "logging_steps": 1},
    })


def run_case(case: dict) -> dict:
    """One measurement, in this process. Returns predicted and measured numbers (or the error)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from tuneforge.adapters import apply_adapter
    from tuneforge.memory import estimate_seconds, find_gpu, plan_memory
    from tuneforge.methods import get_method, method_spec
    from tuneforge.models import load_base_model, load_tokenizer
    from tuneforge.run import RunContext, RunDir

    device = case.get("device", "cuda")
    cuda = device == "cuda"
    checkpoint = Path(case["checkpoint"])
    recipe = recipe_for(case, checkpoint)
    config = config_for(case["size"])
    predicted = plan_memory(config, adapter=case["adapter"], seq_len=case["seq_len"], batch_size=case["batch"],
                            gradient_checkpointing=case["gc"], optimizer=recipe.train.optimizer, dtype="bf16",
                            lora_r=case["r"], target_modules="all-linear", lora_dropout=case["dropout"])
    result = {**case, "optimizer": recipe.train.optimizer, "predicted_gib": predicted["total_gib"],
              "predicted_reserved_gib": predicted["reserved_gib"],
              "predicted_parts_gib": {k: predicted[k] / GIB for k in ("weights", "gradients", "optimizer_states",
                                                                       "activations", "lm_head")}}
    gpu_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    try:
        gpu = find_gpu(gpu_name.replace("NVIDIA", "").split()[0])
        tokens = case["steps"] * case["batch"] * case["seq_len"]
        result["predicted_tokens_per_s"] = tokens / estimate_seconds(config, tokens=tokens, gpu=gpu, adapter=case["adapter"],
                                                                     seq_len=case["seq_len"], gradient_checkpointing=case["gc"])
    except Exception:
        result["predicted_tokens_per_s"] = None
    result["gpu"] = gpu_name

    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.t)

    try:
        tokenizer = load_tokenizer(str(checkpoint))
        quant = recipe.quant if case["adapter"] == "qlora" else None
        model = load_base_model(recipe.model, quant=quant, device=device, dtype=torch.bfloat16)
        result["after_load_gib"] = torch.cuda.memory_allocated() / GIB if cuda else None
        model = apply_adapter(model, recipe, gradient_checkpointing=case["gc"])
        generator = torch.Generator().manual_seed(0)
        n = case["steps"] * case["batch"]
        ids = torch.randint(0, 256, (n, case["seq_len"]), generator=generator).tolist()
        prompt = case["seq_len"] // 4  # the first quarter is "prompt": no loss, as in SFT
        labels = [[-100] * prompt + row[prompt:] for row in ids]
        dataset = Dataset.from_dict({"input_ids": ids, "labels": labels})
        with tempfile.TemporaryDirectory() as tmp:
            run = RunDir(Path(tmp) / "run").create(overwrite=True)
            ctx = RunContext(recipe=recipe, spec=method_spec("sft"), tokenizer=tokenizer, data=None, device=device,
                             console=None, run=run)
            trainer = get_method("sft")(ctx, model, dataset, None, [StepTimer()])
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            trainer.train()
            if cuda:
                torch.cuda.synchronize()
        result["measured_gib"] = torch.cuda.max_memory_allocated() / GIB if cuda else None
        result["measured_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB if cuda else None
        timed = step_times[1:] or step_times  # the first step pays for kernel selection and optimizer-state creation
        result["tokens_per_s"] = case["batch"] * case["seq_len"] / (sum(timed) / len(timed))
        result["status"] = "ok"
    except torch.OutOfMemoryError as exc:
        result["status"] = "oom"
        result["measured_gib"] = torch.cuda.max_memory_allocated() / GIB
        result["error"] = str(exc).splitlines()[0][:300]
    except Exception as exc:  # recorded, not fatal: the other cases still run
        result["status"] = "error"
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return result


def cases_from(args) -> list[dict]:
    cases = []
    for size in args.sizes.split(","):
        if size not in SIZES and size != "tiny":
            raise SystemExit(f"unknown size {size!r}; use {', '.join(SIZES)}")
        for adapter in args.adapters.split(","):
            for gc in (g == "on" for g in args.gc.split(",")):
                cases.append({"size": size, "adapter": adapter, "seq_len": args.seq_len, "batch": args.batch, "gc": gc,
                              "steps": args.steps, "r": args.r, "dropout": args.dropout})
                if adapter == "full" and args.full_8bit:
                    cases.append({**cases[-1], "optimizer": "paged_adamw_8bit"})
    return cases


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(results: list[dict]) -> None:
    columns = ["size", "adapter", "optimizer", "seq", "bs", "gc", "plan GiB", "measured", "ratio", "plan rsv", "rsv",
               "tok/s", "plan tok/s", "status"]
    rows = []
    for r in results:
        measured = r.get("measured_gib")
        ratio = r["predicted_gib"] / measured if measured and r.get("status") == "ok" else None
        status = r.get("status", "?") + (f": {r['error'][:80]}" if r.get("error") else "")
        rows.append([r["size"], r["adapter"], r.get("optimizer", ""), str(r["seq_len"]), str(r["batch"]),
                     "on" if r["gc"] else "off", _num(r.get("predicted_gib")), _num(measured), _num(ratio),
                     _num(r.get("predicted_reserved_gib")), _num(r.get("measured_reserved_gib")),
                     _num(r.get("tokens_per_s"), 0), _num(r.get("predicted_tokens_per_s"), 0), status])
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print("ratio = plan / measured peak allocated (1.00 is exact; above 1 the plan is conservative).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1b,8b", help="comma list of: " + ", ".join(SIZES))
    parser.add_argument("--adapters", default="full,lora,qlora")
    parser.add_argument("--gc", default="off,on", help="gradient checkpointing: off, on, or off,on")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (>= 2: states exist from step 2)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--full-8bit", action="store_true", help="also run full fine-tuning with paged_adamw_8bit")
    parser.add_argument("--workdir", default=os.environ.get("PLAN_BENCH_DIR", "/tmp/tuneforge-plan-bench"))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke test with --sizes tiny only
    args = parser.parse_args(argv)

    if args.case:
        print("RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("plan_vs_measured needs a CUDA GPU (nothing to measure on CPU)", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = {size: build_checkpoint(size, workdir, args.device) for size in args.sizes.split(",")}
    if args.device == "cuda":
        torch.cuda.empty_cache()
    results = []
    for case in cases_from(args):
        case["checkpoint"] = str(checkpoints[case["size"]])
        case["device"] = args.device
        started = time.time()
        proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if lines:
            result = json.loads(lines[-1][len("RESULT "):])
        else:
            result = {**case, "status": "crashed", "predicted_gib": float("nan"), "predicted_reserved_gib": float("nan"),
                      "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        result["seconds"] = round(time.time() - started, 1)
        results.append(result)
        print(f"[{len(results)}] {case['size']} {case['adapter']} {result.get('optimizer', '')} "
              f"gc={'on' if case['gc'] else 'off'}: {result.get('status')} "
              f"plan {_num(result.get('predicted_gib'))} GiB, measured {_num(result.get('measured_gib'))} GiB "
              f"({result['seconds']} s)", flush=True)
    print()
    print_table(results)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                                              "torch": torch.__version__,
                                              "results": results}, indent=2), encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
