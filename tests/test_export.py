"""tuneforge export: GGUF (llama.cpp's converter and quantizer), Ollama Modelfile, bitsandbytes; and bad input.

The GGUF round trip uses the embedded SmolLM2-135M (llama.cpp runs it; f16 is ~260 MB) for the template, token-id
and greedy-answer checks, and a tiny random Llama LoRA run for the run-based paths (merge, scoring, Ollama, bnb)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from rich.console import Console

from conftest import run_cli, tiny_recipe
from tuneforge.recipe import parse_recipe

EMBEDDED = "embedded:smollm2-135m-instruct"
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Colour of the sky?"}],
    [{"role": "user", "content": "Extract the order as JSON: Anna from Oslo wants 3 mugs."},
     {"role": "assistant", "content": '{"name": "Anna", "city": "Oslo", "item": "mug", "quantity": 3}'},
     {"role": "user", "content": "And now: Li from Lima, 2 lamps.\n  (indented) café ✓"}],
]

llama = pytest.mark.skipif(not __import__("importlib").util.find_spec("llama_cpp"),
                           reason="llama-cpp-python is not installed (bash scripts/llama_cpp_tools.sh)")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, small_sft_file):
    from tuneforge.train import train

    recipe = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, train={"max_steps": 3, "lr": 1e-2},
                                      eval={"forgetting": False, "few_shot": 0, "baseline": False}))
    return train(recipe, output=str(tmp_path_factory.mktemp("lora") / "run"), console=Console(quiet=True), doctor=False)


@pytest.fixture(scope="module")
def smol_gguf(tmp_path_factory):
    from tuneforge.deploy.export import export

    out = tmp_path_factory.mktemp("smol") / "smol-f16.gguf"
    summary = export(EMBEDDED, "gguf", "f16", str(out))
    assert summary["stop_tokens"] == ["<|im_end|>"]
    return out


# --------------------------------------------------------------------------------------------------------------
# (a) the GGUF carries the training chat template and stop tokens: same prompt token ids


@llama
def test_gguf_template_renders_the_same_prompt_token_ids(smol_gguf, smol_tokenizer):
    from tuneforge.data.template import render_chat
    from tuneforge.deploy.gguf_convert import read_metadata
    from tuneforge.deploy.gguf_runtime import gguf_chat_prompt, is_stop, load_gguf, prompt_ids

    meta = read_metadata(smol_gguf)
    assert meta["tokenizer.chat_template"] == smol_tokenizer.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    vocab = load_gguf(smol_gguf, vocab_only=True)
    assert is_stop(vocab, smol_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    for messages in CONVERSATIONS:
        hf_text = render_chat(smol_tokenizer, messages, add_generation_prompt=True)
        gguf_text = gguf_chat_prompt(smol_gguf, messages)
        assert gguf_text == hf_text
        hf_ids = smol_tokenizer(hf_text, add_special_tokens=False)["input_ids"]
        assert prompt_ids(vocab, gguf_text) == hf_ids


@llama
def test_template_and_stops_differing_from_the_converters_choice_are_written(tmp_path, tiny_model_dir):
    """A folder whose tokenizer EOS is <|endoftext|> while answers end at <|im_end|>, with its own chat template:
    the GGUF gets the template verbatim, eos = <|im_end|>, eot = <|endoftext|>, and llama.cpp stops at both."""
    from transformers import GenerationConfig

    from tuneforge.deploy.export import export
    from tuneforge.deploy.gguf_convert import read_metadata
    from tuneforge.deploy.gguf_runtime import is_stop, load_gguf
    from tuneforge.models import load_tokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = load_tokenizer(str(folder))
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
                               "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer.save_pretrained(folder)
    GenerationConfig(eos_token_id=0, bos_token_id=1).save_pretrained(folder)
    out = tmp_path / "custom.gguf"
    summary = export(str(folder), "gguf", None, str(out))
    assert summary["stop_tokens"] == ["<|im_end|>", "<|endoftext|>"]
    meta = read_metadata(out)
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.eot_token_id"]) == (2, 0)
    vocab = load_gguf(out, vocab_only=True)
    assert is_stop(vocab, 2) and is_stop(vocab, 0)


# --------------------------------------------------------------------------------------------------------------
# (b) llama.cpp gives the project's greedy answers


GENERATE_PROMPTS = [("What is the capital of France?", None), ("Colour of the sky?", "You answer in one word."),
                    ("Name three fruits.", None)]


def _generate_cli(monkeypatch, capsys, *args) -> str:
    """What `tuneforge generate EMBEDDED ARGS` prints on stdout (the answer), run in this process."""
    import sys

    from tuneforge import cli

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["tuneforge", "generate", EMBEDDED, *args])
    try:
        cli.main()
    except SystemExit as exc:
        assert not exc.code, capsys.readouterr()
    return capsys.readouterr().out


@llama
def test_f16_gguf_answers_like_tuneforge_generate(smol_gguf, monkeypatch, capsys):
    """`tuneforge generate` (the CLI itself) and llama.cpp's chat completion on the f16 file (its own template from
    the GGUF metadata, greedy) give the same answers; a multi-turn conversation through generate's functions too."""
    from tuneforge.deploy.gguf_runtime import load_gguf
    from tuneforge.evaluate.generation import chat_prompt, generate_answers
    from tuneforge.models import load_target

    conversations = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
                     for prompt, system in GENERATE_PROMPTS] + [CONVERSATIONS[2]]
    prompt, system = GENERATE_PROMPTS[1]
    cli_answer = _generate_cli(monkeypatch, capsys, "--prompt", prompt, "--system", system, "--max-new-tokens", "24")
    model, tokenizer = load_target(EMBEDDED, device="cpu")  # one load: the functions `generate` calls
    expected = [generate_answers(model, tokenizer, [chat_prompt(tokenizer, m)], max_new_tokens=24)[0]
                for m in conversations]
    assert cli_answer.strip() == expected[1].strip()
    llm = load_gguf(smol_gguf, threads=2)
    got = [llm.create_chat_completion(messages=m, temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=24)
           ["choices"][0]["message"]["content"] for m in conversations]
    assert [g.strip() for g in got] == [e.strip() for e in expected]
    assert all(e.strip() for e in expected) and len(set(expected)) == len(expected), expected  # real, distinct


# --------------------------------------------------------------------------------------------------------------
# (c) quantized GGUFs scored against f16 on a run's held-out set


@llama
def test_quantized_ggufs_are_scored_against_f16(tmp_path, lora_run, monkeypatch, capsys):
    from tuneforge.deploy.export import held_out_set
    from tuneforge.deploy.gguf_convert import quantize_gguf
    from tuneforge.deploy.gguf_runtime import score_gguf_files

    code, text = run_cli(monkeypatch, capsys, "export", str(lora_run.path), "--format", "gguf", "--quant", "q8_0",
                         "--output", str(tmp_path / "run-q8_0.gguf"), "--json", str(tmp_path / "summary.json"),
                         with_stdout=True)
    assert code == 0, text
    assert "drop exact_match" in text and "agreement" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {row["label"]: row for row in summary["scores"]["rows"]}
    assert set(rows) == {"f16", "q8_0"} and rows["f16"]["agreement"] == 100.0
    assert summary["scores"]["n"] == len(json.loads((lora_run.path / "eval" / "tuned.json").read_text())["samples"])

    f16 = tmp_path / "run-f16.gguf"
    assert run_cli(monkeypatch, capsys, "export", str(lora_run.path), "--format", "gguf", "--output", str(f16))[0] == 0
    files = {"f16": f16, "q8_0": tmp_path / "run-q8_0.gguf",
             "q4_k_m": quantize_gguf(f16, tmp_path / "run-q4_k_m.gguf", "q4_k_m")}
    result = score_gguf_files(files, held_out_set(lora_run.path))
    sizes = [row["size_bytes"] for row in result["rows"]]
    assert sizes[0] > sizes[1] > sizes[2]
    for row in result["rows"]:
        assert 0 <= row["agreement"] <= 100 and set(row["metrics"]) == {"exact_match"}
        assert row["drop"]["exact_match"] == pytest.approx(result["rows"][0]["metrics"]["exact_match"]
                                                           - row["metrics"]["exact_match"], abs=0.01)
    assert len(result["samples"]) == result["n"]


# --------------------------------------------------------------------------------------------------------------
# (d) Ollama: the Modelfile's TEMPLATE renders the training prompt

CHATML_TEMPLATE = ('{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
                   '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
                   '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
                   '{{ end }}{{ end }}<|im_start|>assistant\n')


# Gemma's shape: the system prompt is prefixed to the first user turn, the assistant is called "model"
GEMMA_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ (prefix if loop.first else '') + m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@llama
def test_ollama_modelfile_renders_the_training_prompt(tmp_path, lora_run, smol_tokenizer):
    from tuneforge.data.template import render_chat
    from tuneforge.deploy.export import export
    from tuneforge.deploy.gguf_convert import read_metadata
    from tuneforge.deploy.ollama import parse_modelfile, render_go_template

    out = tmp_path / "ollama"
    export(str(lora_run.path), "ollama", "q8_0", str(out))
    modelfile = parse_modelfile((out / "Modelfile").read_text())
    assert modelfile["from"] == "./model.gguf" and (out / "model.gguf").is_file()
    assert read_metadata(out / "model.gguf")["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert modelfile["template"] == CHATML_TEMPLATE
    assert modelfile["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert modelfile["stops"] == ["<|im_end|>"]
    for messages in CONVERSATIONS:
        assert render_go_template(modelfile["template"], messages, modelfile["system"]) == \
            render_chat(smol_tokenizer, messages, add_generation_prompt=True)


def test_ollama_translation_of_other_templates(smol_tokenizer):
    """A Llama-3 style template (BOS once, headers per role) is translated and checked; one that trims contents, or
    folds the system prompt into the first user turn, cannot be written as per-role Go template turns: refused."""
    import copy

    from tuneforge.deploy.gguf_convert import ExportError
    from tuneforge.deploy.ollama import ollama_template, render_go_template

    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    template, system = ollama_template(tokenizer)
    assert system is None and template.startswith(tokenizer.bos_token + "{{ range .Messages }}")
    messages = CONVERSATIONS[1]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert render_go_template(template, messages) == expected
    dropped, _ = ollama_template(tokenizer, bos_added_by_runtime=True)  # llama.cpp adds BOS itself: not twice
    assert dropped.startswith("{{ range .Messages }}")

    # Llama 3's own template trims each message; a Go template cannot, so the probe with spaces tells them apart
    tokenizer.chat_template = tokenizer.chat_template.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
    with pytest.raises(ExportError, match="cannot be translated"):
        ollama_template(tokenizer)
    tokenizer.chat_template = GEMMA_LIKE
    with pytest.raises(ExportError, match="cannot be translated into an Ollama TEMPLATE"):
        ollama_template(tokenizer)


# --------------------------------------------------------------------------------------------------------------
# (e) bitsandbytes exports load back in transformers and answer


@pytest.mark.parametrize("fmt, layer", [("bnb-4bit", "Linear4bit"), ("bnb-8bit", "Linear8bitLt")])
def test_bnb_export_loads_back_and_answers(tmp_path, lora_run, fmt, layer):
    from transformers import AutoModelForCausalLM

    from tuneforge.deploy.export import export
    from tuneforge.evaluate.generation import generate_answers
    from tuneforge.models import load_target

    out = tmp_path / fmt
    export(str(lora_run.path), fmt, None, str(out))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config[f"load_in_{fmt[4]}bit"] is True
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, device_map={"": "cpu"})
    assert any(type(m).__name__ == layer for m in model.modules())
    reference, tokenizer = load_target(str(lora_run.path), device="cpu")
    ids = torch.tensor([tokenizer("Extract the order as JSON: Anna from Oslo wants 3 mugs.")["input_ids"]])
    with torch.no_grad():
        quantized, exact = model(input_ids=ids).logits, reference(input_ids=ids).logits
    # close to the merged model, not equal to it (quantization error, bounded by the logits' own scale)
    assert 0 < (quantized - exact).abs().mean() < 0.25 * exact.abs().mean()
    answer = generate_answers(model, tokenizer, ["hello"], max_new_tokens=4)[0]
    assert isinstance(answer, str) and model.generation_config.eos_token_id == reference.generation_config.eos_token_id


# --------------------------------------------------------------------------------------------------------------
# (f) bad input: exit 2 with a located message, nothing written


def _refused(monkeypatch, capsys, *args, says: list[str]) -> None:
    code, text = run_cli(monkeypatch, capsys, "export", *args, with_stdout=True)
    assert code == 2, text
    assert "Traceback" not in text
    for part in says:
        assert part in text, (part, text)


def test_export_bad_input(tmp_path, lora_run, tiny_model_dir, monkeypatch, capsys):
    run = str(lora_run.path)
    _refused(monkeypatch, capsys, run, "--format", "onnx", "--output", str(tmp_path / "x"),
             says=["--format", "unknown export format 'onnx'", "gguf, ollama, bnb-4bit, bnb-8bit"])
    for fmt in ("gptq", "awq"):
        _refused(monkeypatch, capsys, run, "--format", fmt, "--output", str(tmp_path / "x"),
                 says=[f"--format: {fmt} export is not built in", "transformers>=5.15,<=5.17", "gptqmodel",
                       "bench/quantize_gpu.py", "--format bnb-4bit"])
    _refused(monkeypatch, capsys, run, "--format", "bnb-4bit", "--quant", "q4_k_m", "--output", str(tmp_path / "x"),
             says=["--quant q4_k_m is not valid for --format bnb-4bit", "nf4, fp4"])
    _refused(monkeypatch, capsys, run, "--format", "gguf", "--quant", "nf4", "--output", str(tmp_path / "x.gguf"),
             says=["--quant nf4 is not valid for --format gguf", "f16, q8_0, q4_k_m"])
    _refused(monkeypatch, capsys, run, "--format", "gguf", "--max-examples", "-1", "--output", str(tmp_path / "m.gguf"),
             says=["--max-examples", "at least 1"])
    _refused(monkeypatch, capsys, run, "--format", "gguf", "--output", str(tmp_path / "model.bin"),
             says=["should be a file name ending in .gguf"])
    taken = tmp_path / "taken.gguf"
    taken.write_text("not a gguf")
    _refused(monkeypatch, capsys, run, "--format", "gguf", "--output", str(taken),
             says=[f"{taken} already exists", "--overwrite"])
    _refused(monkeypatch, capsys, run, "--format", "gguf", "--output", str(taken), "--overwrite",
             says=["is not a GGUF file"])
    assert taken.read_text() == "not a gguf"
    folder = tmp_path / "bnb"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    _refused(monkeypatch, capsys, run, "--format", "bnb-8bit", "--output", str(folder), says=["already exists"])
    _refused(monkeypatch, capsys, run, "--format", "ollama", "--output", str(folder), "--overwrite",
             says=["not an Ollama export", "notes.txt"])
    assert (folder / "notes.txt").read_text() == "mine"

    failed = tmp_path / "failed-run"
    shutil.copytree(lora_run.path, failed)
    status = json.loads((failed / "status.json").read_text())
    (failed / "status.json").write_text(json.dumps({**status, "state": "failed"}))
    _refused(monkeypatch, capsys, str(failed), "--format", "bnb-4bit", "--output", str(tmp_path / "out"),
             says=["did not complete", "status: failed"])
    _refused(monkeypatch, capsys, str(tmp_path / "nowhere"), "--format", "bnb-4bit", "--output", str(tmp_path / "o2"),
             says=["does not exist"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "o2").exists()

    from tuneforge.models import load_tokenizer

    model_dir = tmp_path / "gemma-like"  # the system prompt folded into the first user turn: no per-role template
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    tokenizer.chat_template = GEMMA_LIKE
    tokenizer.save_pretrained(model_dir)
    _refused(monkeypatch, capsys, str(model_dir), "--format", "ollama", "--output", str(tmp_path / "o3"),
             says=["--format ollama", "cannot be translated into an Ollama TEMPLATE"])
    assert not (tmp_path / "o3").exists()
    assert not list(tmp_path.glob(".*export-*"))  # no work folder left behind


@llama
def test_added_tokens_survive_the_gguf_export(tmp_path, tiny_model_dir):
    """model.add_special_tokens: the exported GGUF's vocabulary has the new tokens at the ids training gave them, and
    llama.cpp reads each as one token (issue #25: "saved, merged, exported and reloaded with the new vocabulary")."""
    from tuneforge.deploy.export import export
    from tuneforge.deploy.gguf_convert import read_metadata
    from tuneforge.deploy.gguf_runtime import load_gguf
    from tuneforge.models import load_tokenizer
    from tuneforge.train import train

    data = tmp_path / "tagged.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"tag {i}"},
                                                     {"role": "assistant", "content": f"<tag_{i % 2}> done"}]}) + "\n"
                            for i in range(8)), encoding="utf-8")
    recipe = parse_recipe(tiny_recipe(tiny_model_dir, data, model={"name": str(tiny_model_dir),
                                                                   "add_special_tokens": ["<tag_0>", "<tag_1>"]},
                                      train={"max_steps": 1},
                                      eval={"forgetting": False, "few_shot": 0, "baseline": False}))
    run = train(recipe, output=str(tmp_path / "run"), console=Console(quiet=True), doctor=False)
    out = tmp_path / "tagged-f16.gguf"
    export(str(run.path), "gguf", "f16", str(out))
    tokenizer = load_tokenizer(str(run.path / "adapter"))
    tokens = read_metadata(out, ("tokenizer.ggml.tokens",))["tokenizer.ggml.tokens"]
    assert len(tokens) >= len(tokenizer)
    llm = load_gguf(out, vocab_only=True)
    for name in ("<tag_0>", "<tag_1>"):
        new_id = tokenizer.convert_tokens_to_ids(name)
        assert new_id >= 49152 and tokens[new_id] == name
        assert llm.tokenize(name.encode(), add_bos=False, special=True) == [new_id]
