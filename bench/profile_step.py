"""Where a training step's time goes: a bare forward+backward of the model on one padding-free micro-batch vs the same
micro-batch through TRL's SFTTrainer.training_step, then the torch profiler's top operators for the trainer step.

    python bench/profile_step.py --model /tmp/tuneforge-speed/random-llama-1b --data /tmp/tuneforge-speed/train.jsonl

Used to find what keeps the speed benchmark's MFU low (see bench/results/*-speed-*.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def timed(fn, repeat=5):
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def trainer_step_on(model, tokenizer, dataset, config):
    """TRL's SFTTrainer.training_step on the whole `dataset` collated as one micro-batch (on the GPU): a callable."""
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    batch = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in batch.items()}
    trainer.model.train()
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    trainer.current_gradient_accumulation_steps = 1

    def step():
        trainer.training_step(trainer.model, dict(batch), num_items_in_batch=None)

    step.batch_keys = sorted(batch)
    return step


def main():
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--liger", action="store_true")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()[: args.batch]]
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    flat = torch.tensor([sum(ids, [])], device="cuda")
    position_ids = torch.tensor([sum((list(range(len(i))) for i in ids), [])], device="cuda")
    tokens = flat.shape[1]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).cuda()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    report = {"tokens": tokens}

    def bare(logits_to_keep=None):
        def step():
            out = model(input_ids=flat, position_ids=position_ids, labels=flat)
            out.loss.backward()
        return step

    report["bare_fwd_bwd_s"] = timed(bare())

    def forward_only():
        with torch.no_grad():
            model(input_ids=flat, position_ids=position_ids)

    report["bare_fwd_s"] = timed(forward_only)
    dataset = Dataset.from_list([{"input_ids": i} for i in ids])
    config = SFTConfig(output_dir="/tmp/profile-out", per_device_train_batch_size=args.batch, report_to="none",
                       padding_free=True, max_length=None, bf16=True, use_liger_kernel=args.liger,
                       gradient_checkpointing=False, logging_steps=1)
    trainer_step = trainer_step_on(model, tokenizer, dataset, config)
    print(json.dumps(report), flush=True)
    report["trainer_training_step_s"] = timed(trainer_step)
    # The whole Trainer loop (data, optimizer, logging, callbacks) for a few steps, under cProfile
    import cProfile
    import pstats

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()[:200]]
    loop_data = Dataset.from_list(rows)
    loop_config = SFTConfig(output_dir="/tmp/profile-loop", per_device_train_batch_size=args.batch, report_to="none",
                            padding_free=True, max_length=None, bf16=True, use_liger_kernel=args.liger,
                            gradient_checkpointing=False, logging_steps=1, max_steps=8, gradient_accumulation_steps=2,
                            save_strategy="no", include_num_input_tokens_seen="non_padding")
    loop = SFTTrainer(model=model, args=loop_config, train_dataset=loop_data, processing_class=tokenizer)
    started = time.perf_counter()
    profiler = cProfile.Profile()
    profiler.enable()
    loop.train()
    profiler.disable()
    report["loop_8_steps_s"] = time.perf_counter() - started
    print(json.dumps(report), flush=True)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer_step()
        torch.cuda.synchronize()
    print(json.dumps(report))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
