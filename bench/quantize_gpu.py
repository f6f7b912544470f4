"""GPTQ and AWQ (4-bit weights, 16-bit activations) of a small causal LM with llm-compressor on a CUDA GPU: size on
disk, decode tokens/s and held-out loss of each against bf16, written as JSON. Standalone: it does not import
tuneforge (the GPU machine it is written for has torch 2.11, transformers 5.17 and peft, no trl, no internet).

    # no downloads: a random-init Llama, first trained a few hundred steps on a synthetic Markov-chain language so
    # that its held-out loss means something (and a quantization error shows in it)
    python bench/quantize_gpu.py --out bench/results/2026-12-07-quantize-gptq-awq-h100.json
    # or a given model folder (safetensors + tokenizer) and data files (JSONL: "text" or chat "messages")
    python bench/quantize_gpu.py --model DIR --calib data/quickstart/train.jsonl --held-out data/quickstart/eval.jsonl \
        --out bench/results/2026-12-07-quantize-gptq-awq-h100-DIR.json

Library (checked 2026-12-07 against PyPI for CPython 3.12, manylinux x86_64; the same reasons are in
`tuneforge export --format gptq|awq`'s error):
- gptqmodel: NOT usable here. PyPI publishes only gptqmodel-7.7.0.tar.gz, a source distribution; pip compiles its
  CUDA kernels at install (nvcc + CUDA toolkit), so there is no wheel that installs without compilation.
- llm-compressor: usable. llmcompressor 0.14.0.1 is a pure-Python wheel (py3-none-any) and does both GPTQ
  (GPTQModifier) and AWQ (AWQModifier); it saves compressed-tensors checkpoints that transformers loads (with the
  compressed-tensors package installed). Its pins: torch>=2.10,<=2.14 (2.11 fits), transformers>=5.15,<=5.17 (5.17
  fits; tuneforge needs >=5.20, hence no `export --format gptq|awq` inside tuneforge), compressed-tensors==0.19.0,
  auto-round>=0.14.1,<=0.15.1, accelerate>=1.15, datasets>=4.8.4, loguru, nvidia-ml-py, pydantic (via
  compressed-tensors).

Wheels to bring (on a machine with internet; then on the GPU machine `pip install --no-deps wheels/*.whl`):

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d wheels \
        llmcompressor==0.14.0.1 compressed-tensors==0.19.0 auto-round==0.15.1 loguru==0.7.3 \
        nvidia-ml-py==13.615.71 py-cpuinfo==9.0.0

      llmcompressor-0.14.0.1-py3-none-any.whl         394,940 B
      compressed_tensors-0.19.0-py3-none-any.whl      240,213 B
      auto_round-0.15.1-py3-none-any.whl            1,353,136 B
      loguru-0.7.3-py3-none-any.whl                    61,595 B
      nvidia_ml_py-13.615.71-py3-none-any.whl          58,132 B
      py_cpuinfo-9.0.0-py3-none-any.whl                22,335 B
      total                                         2,130,351 B (2.0 MiB; the limit is 40 MiB)

All six are pure Python, so --platform only matters to pip's resolver. Everything else llm-compressor imports
(numpy, pyyaml, requests, tqdm, psutil, pillow, accelerate, datasets, pydantic) is assumed present beside torch,
transformers and peft; `--check` (and every run, first) lists the import names still missing and the exact
`pip download` line for each, so a missing one costs one round trip, not a failed run. Smoke-tested on CPU
(`--device cpu --tiny --schemes gptq-w4a16`) with transformers 5.25 here: GPTQ quantizes, saves and loads back on
CPU; AWQ in llm-compressor 0.14 pins host memory (`Tensor.pin_memory`), which needs a CUDA device, so on CPU it
fails by design and is reported as an error row. The GPU numbers come from the lead's run.

Speed note: transformers loads a compressed-tensors W4A16 checkpoint by decompressing it to bf16 Linear layers
(`linear_layer_types` in each row says what ran), so `tokens_per_s` measures transformers' path, not 4-bit kernels;
the 4-bit serving speed is vLLM's (Marlin kernels), out of scope here. Size and held-out loss are the quantized
model's.

Output JSON: {"model", "device", "versions", "calibration", "held_out", "rows": [{"label": "bf16"|"gptq-w4a16"|
"awq-w4a16", "size_bytes", "tokens_per_s" (greedy decode, batch 1 and batch 16), "held_out_loss",
"loss_vs_bf16", "quantize_s"}]}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

WHEELS = {  # import name -> the pinned distribution to download when it is missing
    "llmcompressor": "llmcompressor==0.14.0.1", "compressed_tensors": "compressed-tensors==0.19.0",
    "auto_round": "auto-round==0.15.1", "loguru": "loguru==0.7.3", "pynvml": "nvidia-ml-py==13.615.71",
    "cpuinfo": "py-cpuinfo==9.0.0",
}
ASSUMED = {  # import name -> distribution: expected beside torch/transformers/peft; needed by llm-compressor
    "numpy": "numpy", "yaml": "pyyaml", "requests": "requests", "tqdm": "tqdm", "psutil": "psutil",
    "PIL": "pillow", "accelerate": "accelerate>=1.15", "datasets": "datasets>=4.8.4", "pydantic": "pydantic>=2",
    "tokenizers": "tokenizers", "safetensors": "safetensors",
}
SCHEMES = {"gptq-w4a16": "gptq", "awq-w4a16": "awq"}


def check_imports() -> list[str]:
    """The pip download lines for every missing import (empty when all are there)."""
    missing = [spec for name, spec in {**WHEELS, **ASSUMED}.items() if importlib.util.find_spec(name) is None]
    return [f"pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "
            f"--platform manylinux2014_x86_64 -d wheels '{spec}'" for spec in missing]


# ---------------------------------------------------------------------------------------------------------------
# model and data


def markov_corpus(vocab: int, n_seqs: int, length: int, seed: int) -> list[list[int]]:
    """Sequences from a fixed sparse Markov chain over `vocab` word ids (each word has 4 likely successors): a
    language a small model learns in a few hundred steps, with a known entropy floor."""
    import torch

    g = torch.Generator().manual_seed(1234)  # the chain itself is fixed; `seed` draws the sequences
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    probs = torch.tensor([0.55, 0.25, 0.15, 0.05])
    g.manual_seed(seed)
    seqs = []
    for _ in range(n_seqs):
        word = int(torch.randint(0, vocab, (1,), generator=g))
        seq = [word]
        for _ in range(length - 1):
            word = int(successors[word, torch.multinomial(probs, 1, generator=g)])
            seq.append(word)
        seqs.append(seq)
    return seqs


def word_tokenizer(vocab: int):
    """A word-level tokenizer for the synthetic language ("w0 w1 ..."), saved with the model like any other."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def random_model(folder: Path, *, tiny: bool, device: str, steps: int, seed: int) -> dict:
    """A random-init Llama trained `steps` steps on the synthetic language; saved (bf16) with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    words = 512 if tiny else 8192
    size = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2) if tiny else \
        dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=8)
    config = LlamaConfig(vocab_size=words + 3, max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, **size)
    model = LlamaForCausalLM(config).to(device)
    train = torch.tensor(markov_corpus(words, 2048 if not tiny else 64, 128, seed=1)) + 3
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = train[torch.randint(0, len(train), (16,))].to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    model.to(torch.bfloat16).save_pretrained(folder)
    word_tokenizer(words).save_pretrained(folder)
    return {"kind": "random-init Llama trained on a synthetic Markov-chain language", "words": words, **size,
            "train_steps": steps, "train_s": round(time.perf_counter() - start, 1),
            "final_train_loss": round(float(loss), 4),
            "entropy_floor_nats": round(-sum(p * math.log(p) for p in (0.55, 0.25, 0.15, 0.05)), 4)}


def synthetic_texts(n: int, seed: int, words: int) -> list[str]:
    return [" ".join(f"w{i}" for i in seq) for seq in markov_corpus(words, n, 128, seed=seed)]


def jsonl_texts(path: Path, tokenizer, limit: int) -> list[str]:
    """Texts of a JSONL file: "text", or chat "messages" rendered with the tokenizer's chat template."""
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "messages" in row and tokenizer.chat_template:
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        elif "text" in row:
            texts.append(row["text"])
        elif "prompt" in row and "completion" in row:
            texts.append(str(row["prompt"]) + str(row["completion"]))
        if len(texts) >= limit:
            break
    if not texts:
        raise SystemExit(f"{path}: no 'text', 'messages' or 'prompt'/'completion' rows")
    return texts


# ---------------------------------------------------------------------------------------------------------------
# measurements


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix == ".safetensors")


def held_out_loss(model, tokenizer, texts: list[str], max_length: int) -> float:
    """Mean next-token cross-entropy over every token of the held-out texts (token-weighted)."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"].to(device)
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total += float(loss)
            count += ids.shape[1] - 1
    return total / max(1, count)


def decode_speed(model, tokenizer, prompt: str, *, batch: int, new_tokens: int, device: str) -> float:
    """Greedy decode tokens/s (new tokens over all rows), after one warm-up call; EOS ignored."""
    import torch

    ids = tokenizer([prompt] * batch, return_tensors="pt")["input_ids"][:, :32].to(device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    with torch.no_grad():
        model.generate(input_ids=ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
    return round((out.shape[1] - ids.shape[1]) * batch / (time.perf_counter() - start), 1)


def measure(label: str, folder: Path, tokenizer, held_out: list[str], args, device: str, extra: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": device})
    model.eval()
    row = {"label": label, "size_bytes": folder_size(folder), **extra,
           "held_out_loss": round(held_out_loss(model, tokenizer, held_out, args.max_length), 5),
           "tokens_per_s": {f"batch{b}": decode_speed(model, tokenizer, held_out[0], batch=b,
                                                        new_tokens=args.new_tokens, device=device)
                            for b in (1, 16)},
           "linear_layer_types": sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def quantize(kind: str, source: Path, target: Path, tokenizer, calib: list[str], args, device: str) -> float:
    """llm-compressor oneshot: W4A16 (group 128, symmetric for GPTQ, asymmetric for AWQ), lm_head kept."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, device_map={"": device})
    encoded = tokenizer(calib, truncation=True, max_length=args.max_length)
    dataset = Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    if kind == "gptq":
        recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    else:
        recipe = AWQModifier(targets=["Linear"], scheme="W4A16_ASYM", ignore=["lm_head"])
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, max_seq_length=args.max_length,
            num_calibration_samples=len(calib), pipeline="sequential" if device == "cuda" else "basic")
    seconds = time.perf_counter() - start
    model.save_pretrained(target, save_compressed=True)
    tokenizer.save_pretrained(target)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return round(seconds, 1)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "llmcompressor", "compressed-tensors", "accelerate", "datasets", "peft"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model folder (safetensors + tokenizer); default: random-init")
    parser.add_argument("--calib", type=Path, help="JSONL calibration texts (default: the synthetic language)")
    parser.add_argument("--held-out", type=Path, help="JSONL held-out texts (default: the synthetic language)")
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random model (smoke test, e.g. on CPU)")
    parser.add_argument("--train-steps", type=int, default=400, help="random-init model: steps on the synthetic data")
    parser.add_argument("--n-calib", type=int, default=128)
    parser.add_argument("--n-held-out", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated: " + ", ".join(SCHEMES))
    parser.add_argument("--keep", type=Path, help="keep the bf16 and quantized folders here")
    parser.add_argument("--check", action="store_true", help="only check the imports and print what to download")
    args = parser.parse_args()

    missing = check_imports()
    if missing or args.check:
        print("missing imports; download these wheels elsewhere, then pip install --no-deps wheels/*.whl:" if missing
              else "all imports present", file=sys.stderr)
        for line in missing:
            print("    " + line, file=sys.stderr)
        raise SystemExit(1 if missing else 0)
    if args.out is None:
        parser.error("--out is required")
    import torch
    from transformers import AutoTokenizer

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu for a (slow) smoke test")
    work = args.keep or Path(tempfile.mkdtemp(prefix="quantize-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    bf16 = work / "bf16"
    if args.model:
        model_info = {"kind": "given folder", "path": str(args.model)}
        shutil.rmtree(bf16, ignore_errors=True)
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).save_pretrained(bf16)
        AutoTokenizer.from_pretrained(args.model).save_pretrained(bf16)
    else:
        model_info = random_model(bf16, tiny=args.tiny, device=args.device, steps=args.train_steps, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(bf16)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    words = model_info.get("words")
    calib = (jsonl_texts(args.calib, tokenizer, args.n_calib) if args.calib
             else synthetic_texts(args.n_calib, seed=2, words=words))
    held_out = (jsonl_texts(args.held_out, tokenizer, args.n_held_out) if args.held_out
                else synthetic_texts(args.n_held_out, seed=3, words=words))
    rows = [measure("bf16", bf16, tokenizer, held_out, args, args.device, {"quantize_s": 0.0})]
    for label in [s for s in args.schemes.split(",") if s]:
        if label not in SCHEMES:
            parser.error(f"--schemes: unknown {label!r} (use {', '.join(SCHEMES)})")
        target = work / label
        shutil.rmtree(target, ignore_errors=True)
        try:
            seconds = quantize(SCHEMES[label], bf16, target, tokenizer, calib, args, args.device)
            rows.append(measure(label, target, tokenizer, held_out, args, args.device, {"quantize_s": seconds}))
        except Exception as exc:  # noqa: BLE001 -- one scheme failing must not lose the others' numbers
            import traceback

            traceback.print_exc()
            rows.append({"label": label, "error": f"{type(exc).__name__}: {exc}"[:500]})
    base = rows[0]
    for row in rows:
        if "error" in row:
            continue
        row["loss_vs_bf16"] = round(row["held_out_loss"] - base["held_out_loss"], 5)
        row["size_vs_bf16"] = round(row["size_bytes"] / base["size_bytes"], 4)
    result = {"model": model_info, "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "versions": versions(), "calibration": {"n": len(calib), "source": str(args.calib or "synthetic")},
              "held_out": {"n": len(held_out), "source": str(args.held_out or "synthetic"),
                           "max_length": args.max_length},
              "decode": {"new_tokens": args.new_tokens, "prompt_tokens": "<=32", "greedy": True}, "rows": rows,
              "measured": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
