"""GGUF export of one finished run at f16, q8_0 and q4_k_m, each scored on the run's held-out set with llama.cpp
(greedy), next to the run's own transformers score; the prompt tokens of the held-out conversations through the
GGUF's template vs transformers'; writes a markdown results file and a JSON of every answer.

    tuneforge train recipes/quickstart.yaml --output RUN_DIR      # the embedded SmolLM2-135M, LoRA
    nice -n 5 python bench/export_gguf.py RUN_DIR --out bench/results/2026-12-07-export-gguf-cpu.md

Uses tuneforge's export path (merge, llama.cpp's converter, metadata, llama.cpp's quantizer) and gguf_runtime's
scoring: the same functions `tuneforge export --format gguf` calls.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from importlib.metadata import version
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="markdown results file (a .json is written beside it)")
    parser.add_argument("--keep", type=Path, help="keep the GGUF files in this folder")
    parser.add_argument("--conversations", type=Path, default=Path("data/quickstart/eval.jsonl"),
                        help="JSONL of chat messages (the run's held-out file) for the prompt-token check")
    args = parser.parse_args()

    from tuneforge.deploy.export import export, held_out_set
    from tuneforge.deploy.gguf_convert import quantize_gguf
    from tuneforge.deploy.gguf_runtime import score_gguf_files

    folder = args.keep or Path(tempfile.mkdtemp(prefix="export-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.perf_counter()
    f16 = folder / "model-f16.gguf"
    summary = export(str(args.run), "gguf", "f16", str(f16), overwrite=True)
    timings["merge + convert f16"] = time.perf_counter() - start
    files = {"f16": f16}
    for quant in ("q8_0", "q4_k_m"):
        start = time.perf_counter()
        files[quant] = quantize_gguf(f16, folder / f"model-{quant}.gguf", quant)
        timings[f"quantize {quant}"] = time.perf_counter() - start
    held_out = held_out_set(args.run)
    result = {"prompt_tokens": prompt_token_check(args.run, f16, args.conversations)}
    start = time.perf_counter()
    result.update(score_gguf_files(files, held_out))
    timings["score 3 GGUFs"] = time.perf_counter() - start
    tuned = json.loads((args.run / "eval" / "tuned.json").read_text())
    hf_answers = [s["prediction"] for s in tuned["samples"]]
    for row in result["rows"]:
        answers = [s[row["label"]] for s in result["samples"]]
        row["agreement_with_transformers"] = round(
            100.0 * sum(a.strip() == b.strip() for a, b in zip(answers, hf_answers)) / len(hf_answers), 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"summary": summary, "timings_s": timings, **result},
                                                        indent=2), encoding="utf-8")
    args.out.write_text(_markdown(args, result, tuned, timings, summary), encoding="utf-8")
    print(args.out.read_text())


def prompt_token_check(run: Path, gguf_file: Path, conversations: Path) -> dict:
    """Each held-out conversation (less its last answer) rendered through transformers (the run's tokenizer, as
    generate/eval render it) and through the GGUF's own chat template (llama-cpp-python's formatter), tokenized by
    each side's tokenizer: how many prompt texts and token-id lists are identical."""
    from tuneforge.deploy.gguf_runtime import gguf_chat_prompt, load_gguf, prompt_ids
    from tuneforge.evaluate.generation import chat_prompt
    from tuneforge.models import load_tokenizer

    tokenizer = load_tokenizer(str(run / "adapter" if (run / "adapter").is_dir() else run / "model"))
    vocab = load_gguf(gguf_file, vocab_only=True)
    same_text = same_ids = n = tokens = 0
    first_difference = None
    for line in conversations.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        messages = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        hf_text, gguf_text = chat_prompt(tokenizer, messages), gguf_chat_prompt(gguf_file, messages)
        hf_ids = tokenizer(hf_text, add_special_tokens=False)["input_ids"]
        llama_ids = prompt_ids(vocab, gguf_text)
        n += 1
        tokens += len(hf_ids)
        same_text += hf_text == gguf_text
        same_ids += hf_ids == llama_ids
        if first_difference is None and hf_ids != llama_ids:
            first_difference = {"transformers": hf_text, "gguf": gguf_text}
    return {"conversations": n, "prompt_tokens": tokens, "identical_text": same_text, "identical_token_ids": same_ids,
            "source": str(conversations), "first_difference": first_difference}


def _markdown(args, result, tuned, timings, summary) -> str:
    keys = list(result["rows"][0]["metrics"])
    lines = ["# GGUF export on CPU: f16 vs q8_0 vs q4_k_m", "", f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')}.", "",
             f"Run: `{args.run}` (its recipe.yaml: model {json.dumps(_recipe_model(args.run))}).",
             f"Command: `nice -n 5 .venv/bin/python bench/export_gguf.py {args.run} --out {args.out}`",
             f"Machine: {platform.machine()} CPU, {platform.python_version()}; llama-cpp-python "
             f"{version('llama-cpp-python')}, transformers {version('transformers')}, gguf {version('gguf')}.",
             f"Held-out set: the run's eval/tuned.json ({result['n']} prompts, greedy, the run's eval.max_new_tokens), "
             f"scored by the run's eval.metrics. Stop tokens in the GGUF: {summary['stop_tokens']}.", "",
             "| quant | file size | " + " | ".join(keys) + " | drop vs f16 | answers identical to f16 | "
             "identical to transformers (run's own answers) |",
             "| --- | --- | " + " | ".join("---" for _ in keys) + " | --- | --- | --- |"]
    for row in result["rows"]:
        lines.append(f"| {row['label']} | {row['size']} ({row['size_bytes']:,} B) | "
                     + " | ".join(f"{row['metrics'][k]:.1f}" for k in keys) + " | "
                     + ", ".join(f"{row['drop'][k]:+.1f}" for k in keys) + f" | {row['agreement']:.1f}% | "
                     f"{row['agreement_with_transformers']:.1f}% |")
    check = result["prompt_tokens"]
    lines += ["", f"Prompt tokens: {check['identical_token_ids']}/{check['conversations']} held-out conversations "
              f"({check['prompt_tokens']:,} tokens; `{check['source']}`) give identical token ids through transformers' "
              f"chat template + tokenizer and through the GGUF's own template (llama-cpp-python's Jinja2ChatFormatter) + "
              f"llama.cpp's tokenizer; {check['identical_text']}/{check['conversations']} identical prompt texts.",
              "Greedy equality: the last column compares each GGUF's greedy answers with the run's own held-out "
              "answers (eval/tuned.json: the LoRA adapter on the fp32 base, transformers, batched greedy) — the "
              "path `tuneforge generate` takes.", "",
              f"The run's own score (transformers, fp32, same prompts): "
              + ", ".join(f"{k} {v:.1f}" for k, v in tuned["metrics"].items()) + ".", "",
              "Wall-clock (2 CPU cores shared with other jobs, so only a rough guide): "
              + "; ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".", ""]
    return "\n".join(lines)


def _recipe_model(run: Path) -> str:
    import yaml

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    model = recipe.get("model")
    return model.get("name") if isinstance(model, dict) else model


if __name__ == "__main__":
    main()
