"""Where the GPU time of one LoRA training micro-batch goes, without the Trainer: a random-init model built on the
GPU (no checkpoint written), LoRA r16 on all seven projections, Liger kernels, speed.attention varlen, gradient
checkpointing every layer, one padding-free row of --tokens tokens cut into examples of realistic lengths.
Prints the step time, the useful-FLOPs utilisation, and the torch profiler's top CUDA kernels.

    PYTHONPATH=src python3 bench/profile_gpu_step.py --model llama-8b --tokens 6900
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from profile_step import timed, trainer_step_on

    from speed import TARGETS, model_config
    from tuneforge.speed import varlen
    from varlen_check import packed_lengths

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-8b")
    parser.add_argument("--tokens", type=int, default=6900)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--trainer", action="store_true", help="also time and profile TRL's SFTTrainer.training_step")
    args = parser.parse_args()
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama()
    varlen.register()
    config = model_config(args.model)
    config._attn_implementation = "varlen"
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="varlen")
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()
    lengths = packed_lengths(args.tokens)
    ids = torch.randint(10, config.vocab_size - 10, (1, args.tokens), device="cuda")
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).cuda()

    def step():
        out = model(input_ids=ids, position_ids=positions, labels=ids)
        out.loss.backward()

    seconds = timed(step, repeat=3)
    params = sum(p.numel() for p in model.parameters())
    useful = 4 * params * args.tokens
    print(json.dumps({"model": args.model, "tokens": args.tokens, "examples": len(lengths), "step_s": round(seconds, 4),
                      "useful_tflops": round(useful / seconds / 1e12, 1),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)
    from torch.profiler import ProfilerActivity, profile

    if args.trainer:  # the same micro-batch through TRL's SFTTrainer.training_step (what tuneforge runs)
        from datasets import Dataset
        from trl import SFTConfig

        from plan_vs_measured import byte_tokenizer

        tokenizer = byte_tokenizer()
        rows, start = [], 0
        flat = ids[0].tolist()
        for n in lengths:
            rows.append({"input_ids": flat[start:start + n], "completion_mask": [0] * (n // 3) + [1] * (n - n // 3)})
            start += n
        dataset = Dataset.from_list(rows)
        sft = SFTConfig(output_dir="/tmp/profile-trainer", per_device_train_batch_size=len(rows), report_to="none",
                        padding_free=True, max_length=None, bf16=True, use_liger_kernel=True, logging_steps=1,
                        gradient_checkpointing=not args.no_checkpointing, optim="adamw_torch_fused")
        step = trainer_step_on(model, tokenizer, dataset, sft)
        print(json.dumps({"trainer_training_step_s": round(timed(step, repeat=3), 4), "batch_keys": step.batch_keys}),
              flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
