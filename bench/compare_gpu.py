"""The adaptation matrix on a GPU (issue 23): `tuneforge compare` over every method for a 1B-class model.

Builds a Llama with the plan's `llama-1b` shape (16 layers, hidden 2048, GQA 32/8) and random weights in bf16 -- no
download: the GPU machine reaches nothing outside -- with the embedded SmolLM2 tokenizer (vocabulary 49,152, so the
embedding matches it), then runs the quickstart JSON-extraction data through each method with the same budget and
writes the report next to the CPU one:

    python bench/compare_gpu.py                                    # every method, 30 steps, llama-1b
    python bench/compare_gpu.py --methods lora,qlora,galore --steps 10
    python bench/compare_gpu.py --size tiny --device cpu --methods lora,ia3 --steps 2   # a smoke test of the script
    python bench/compare_gpu.py --merge A.json B.json --out STEM   # one report from parts run in separate calls

Results: bench/results/<date>-compare-gpu.{md,json,png} (and .html), plus the command line in the .md. With random
weights the task scores stay near zero; what the matrix measures on a GPU is each method's trainable parameters,
artifact size, CUDA peak memory and step time, and the held-out loss each reaches on the same budget (a model that
learns shows it in the loss first). Each method runs in its own process (tuneforge compare does that), so every
peak starts from an empty allocator.

Needs: CUDA, torch, transformers 5.x, peft, trl, bitsandbytes (qlora), galore-torch (galore; `pip install
galore-torch`, pure Python). Run from the repository root.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

METHODS = ("lora,qlora,dora,adalora,ia3,prompt_tuning,prefix_tuning,ptuning_v2,p_tuning,bottleneck,galore,lisa,"
           "spectrum,freeze,full")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048)


def build_model(size: str, folder: Path, tokenizer_source: str = "embedded:smollm2-135m-instruct") -> Path:
    """A random-weight Llama of the plan's reference shape, saved with the embedded tokenizer (once)."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.memory import reference_config
    from tuneforge.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_source)
    if size == "tiny":
        config = LlamaConfig(**TINY)
    else:
        config = reference_config("llama-1b")
    config.vocab_size = len(tokenizer)
    config.tie_word_embeddings = True
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16 if size != "tiny" else torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_recipe(model: Path, path: Path, steps: int, examples: int) -> Path:
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / "compare.yaml").read_text())
    recipe.update(name="compare-gpu", model=str(model))
    recipe["data"] = {"train": str(ROOT / "data/quickstart/train.jsonl"), "eval": str(ROOT / "data/quickstart/eval.jsonl")}
    recipe["train"].update(max_steps=steps, batch_size=8, grad_accum=2, max_length=256)
    recipe["eval"].update(max_examples=examples, batch_size=16, max_new_tokens=32,
                          forgetting=False)  # random weights: the general probe would measure nothing
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def merge(parts: list[str], stem: Path) -> None:
    """One report from comparisons of disjoint method sets (each GPU call is limited to 10 minutes, so the matrix
    runs in parts on the same machine kind): rows in METHODS order, each part's machine note kept."""
    import json

    from tuneforge.compare.report import write_report

    reports = [json.loads(Path(p).read_text()) for p in parts]
    order = METHODS.split(",")
    rank = lambda r: order.index(r["method"]) if r["method"] in order else len(order)  # noqa: E731
    merged = {**reports[0], "command": " ; ".join(r["command"] for r in reports),
              "methods": sorted((m for r in reports for m in r["methods"]), key=rank),
              "rows": sorted((row for r in reports for row in r["rows"]), key=rank)}
    notes = [line for p in parts for line in Path(p).with_suffix(".md").read_text().splitlines()
             if line.startswith(("Machine:", "Reproduce:"))]
    stem.parent.mkdir(parents=True, exist_ok=True)
    files = write_report(merged, stem.parent, stem.name)
    with files["md"].open("a") as f:
        f.write("\n" + "\n".join(notes) + "\n")
    print(f"merged {len(parts)} parts into {stem}.md/.json/.html")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--examples", type=int, default=30, help="held-out examples scored per model")
    parser.add_argument("--size", choices=("1b", "tiny"), default="1b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tokenizer", default="embedded:smollm2-135m-instruct", help="tokenizer folder (the GPU "
                        "machine cannot hold the embedded GGUF: pass a folder with the SmolLM2 tokenizer files)")
    parser.add_argument("--workdir", default="/tmp/tuneforge-compare-gpu")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / f"{time.strftime('%Y-%m-%d')}-compare-gpu"),
                        help="stem of the result files (.md, .json, .png, .html)")
    parser.add_argument("--merge", nargs="+", metavar="PART.json", help="merge the .json results of earlier parts "
                        "into --out, running nothing")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge, Path(args.out))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run on the GPU machine, or --size tiny --device cpu for a smoke test")
    workdir = Path(args.workdir)
    model = build_model(args.size, workdir / f"llama-{args.size}-random", args.tokenizer)
    recipe = write_recipe(model, workdir / "compare-gpu.yaml", args.steps, args.examples)
    output = workdir / "runs"
    command = [sys.executable, "-m", "tuneforge", "compare", str(recipe), "--methods", args.methods,
               "--output", str(output), "--no-doctor"]
    print(" ".join(command), flush=True)
    started = time.time()
    code = subprocess.call(command, cwd=ROOT)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".md", ".json", ".png", ".html"):
        source = output / f"compare{suffix}"
        if source.exists():
            shutil.copyfile(source, stem.with_suffix(suffix))
    import torch

    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    with stem.with_suffix(".md").open("a") as f:
        f.write(f"\nMachine: {device}; model: random-weight llama-{args.size} (bf16) with the SmolLM2 tokenizer; "
                f"{args.steps} steps of 8 x 2 examples; {time.time() - started:.0f} s in all.\n"
                f"Reproduce: `python bench/compare_gpu.py --methods {args.methods} --steps {args.steps} --examples "
                f"{args.examples}`\n")
    print(f"results: {stem}.md/.json/.png (exit {code})")
    sys.exit(code)


if __name__ == "__main__":
    main()
