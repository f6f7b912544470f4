"""Real data in (the layouts of widely used datasets and formats), portable artifacts out (issue #20)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, tiny_recipe
from tuneforge.data.formats import canonicalize
from tuneforge.data.readers import Record, read_records
from tuneforge.data.template import IGNORE_INDEX, prompt_for_generation, tokenize_example
from tuneforge.errors import DataError

# A ChatML template that renders OpenAI-style tools, tool calls and tool results (written for these tests).
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% if message.content %}{{ message.content }}\n{% endif %}"
    "{% for call in message.tool_calls %}<tool_call>{{ {'name': call.function.name, 'arguments': "
    "call.function.arguments} | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}
TOOL_RECORD = {
    "tools": [WEATHER_TOOL],
    "messages": [
        {"role": "user", "content": "How warm is it in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"celsius\": 4}"},
        {"role": "assistant", "content": "It is 4 degrees in Oslo."},
    ],
}


@pytest.fixture()
def tools_tokenizer(smol_tokenizer):
    import copy

    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = TOOLS_TEMPLATE
    return tokenizer


def _loss_text(tokenizer, item) -> str:
    return tokenizer.decode([t for t, label in zip(item.input_ids, item.labels) if label != IGNORE_INDEX])


def _example(data: dict) -> dict:
    examples, fmt = canonicalize([Record(data, "f.jsonl:1")], "auto")
    assert fmt == "messages"
    return examples[0]


def test_openai_tool_calls_train_the_call_and_the_answer_not_the_tool_result(tools_tokenizer):
    example = _example(TOOL_RECORD)
    call = example["messages"][1]
    assert call["content"] == "" and call["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    item = tokenize_example(tools_tokenizer, example, 512)
    learned = _loss_text(tools_tokenizer, item)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in learned
    assert "It is 4 degrees in Oslo." in learned
    assert "celsius" not in learned and "How warm" not in learned and "Weather for a city" not in learned
    full = tools_tokenizer.decode(item.input_ids)
    assert "Weather for a city" in full and '{"celsius": 4}' in full  # the tools and the result are context
    prompt, reference = prompt_for_generation(tools_tokenizer, {**example, "messages": example["messages"][:2]})
    assert prompt.endswith("<|im_start|>assistant\n") and "Weather for a city" in prompt
    assert reference == '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'


def test_tool_calls_with_text_keep_both(tools_tokenizer):
    record = json.loads(json.dumps(TOOL_RECORD))
    record["messages"][1]["content"] = "Let me check."
    item = tokenize_example(tools_tokenizer, _example(record), 512)
    learned = _loss_text(tools_tokenizer, item)
    assert "Let me check." in learned and '"get_weather"' in learned


def test_a_template_without_tool_rendering_is_refused_not_silently_dropped(smol_tokenizer):
    with pytest.raises(DataError, match="drops tool definitions or calls") as info:
        tokenize_example(smol_tokenizer, _example(TOOL_RECORD), 512)
    assert "model.chat_template" in info.value.render()


@pytest.mark.parametrize("change, says", [
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{not json"), "not valid JSON"),
    (lambda r: r["messages"][1].update(tool_calls=[{"type": "function"}]), "function.name` is missing"),
    (lambda r: r["messages"][0].update(tool_calls=r["messages"][1]["tool_calls"]), "is on a user message"),
    (lambda r: r.update(tools="get_weather"), "`tools` must be a list"),
])
def test_bad_tool_records_are_located(change, says):
    record = json.loads(json.dumps(TOOL_RECORD))
    change(record)
    with pytest.raises(DataError, match=says) as info:
        canonicalize([Record(record, "f.jsonl:7")], "auto")
    assert "f.jsonl:7" in info.value.render()


def test_openai_weight_zero_turn_carries_no_loss(smol_tokenizer):
    record = {"messages": [
        {"role": "user", "content": "Say A."}, {"role": "assistant", "content": "Wrong answer B.", "weight": 0},
        {"role": "user", "content": "Again."}, {"role": "assistant", "content": "A.", "weight": 1}]}
    item = tokenize_example(smol_tokenizer, _example(record), 512)
    learned = _loss_text(smol_tokenizer, item)
    assert "A." in learned and "Wrong answer" not in learned
    assert "Wrong answer B." in smol_tokenizer.decode(item.input_ids)
    for bad, says in ((2, "weight` is 2"), (0.5, "weight` is 0.5")):
        record["messages"][3]["weight"] = bad
        with pytest.raises(DataError, match=says):
            _example(record)
    record["messages"][3]["weight"] = 0
    with pytest.raises(DataError, match="every assistant turn has weight 0"):
        _example(record)


def test_plain_string_completions_lose_trls_leading_space_inside_a_chat_answer(smol_tokenizer):
    from tuneforge.data.preference import canonicalize_preferences
    from tuneforge.data.template import raw_prompt_completion

    kto, _ = canonicalize_preferences([Record({"prompt": "The sky is", "completion": " blue.", "label": True}, "k:1")], "auto")
    assert kto[0]["completion"] == [{"role": "assistant", "content": "blue."}]
    pair, _ = canonicalize_preferences([Record({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}, "p:1")], "auto")
    assert pair[0]["chosen"][0]["content"] == "blue."
    sft = _example_pc({"prompt": "The sky is", "completion": " blue."})
    assert sft["messages"][1]["content"] == "blue."
    assert raw_prompt_completion(sft) == ("The sky is", " blue.")  # without a chat template the text continues
    assert "assistant\nblue.<|im_end|>" in smol_tokenizer.decode(tokenize_example(smol_tokenizer, sft, 128).input_ids)


def _example_pc(data):
    examples, fmt = canonicalize([Record(data, "f:1")], "auto")
    assert fmt == "prompt_completion"
    return examples[0]


HH = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6.",
      "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: I won't say."}


def test_anthropic_hh_rlhf_strings_are_read_as_conversations():
    from tuneforge.data.preference import canonicalize_preferences

    pairs, fmt = canonicalize_preferences([Record(HH, "hh.jsonl:1")], "auto")
    assert fmt == "preference"
    assert pairs[0]["prompt"] == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
                                  {"role": "user", "content": "And 3+3?"}]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "6."}]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": "I won't say."}]


def test_preference_data_for_sft_says_what_it_is():
    with pytest.raises(DataError) as info:
        canonicalize([Record(HH, "hh.jsonl:3")], "auto")
    text = info.value.render()
    assert "hh.jsonl:3" in text and "preference pairs" in text and "method: dpo" in text


def test_multi_line_csv_record_is_located_at_its_first_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\n"two\nlines",ok\n\n"three\nline\ncell",fine,extra\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_records(str(path))
    assert f"{path}:5" in info.value.render()  # the bad record starts on line 5 (it ends on line 7)
    path.write_text('instruction,output\n"two\nlines",ok\nsecond,ok\n', encoding="utf-8")
    assert [r.where for r in read_records(str(path))] == [f"{path}:2", f"{path}:4"]


def test_qlora_with_adapter_mode_merge_is_refused(tiny_model_dir, small_sft_file):
    from tuneforge.errors import RecipeError
    from tuneforge.recipe import parse_recipe

    data = tiny_recipe(tiny_model_dir, small_sft_file, adapter={"type": "qlora"},
                       model={"name": str(tiny_model_dir), "adapter": str(tiny_model_dir), "adapter_mode": "merge"})
    with pytest.raises(RecipeError, match="model.adapter_mode.*4-bit base"):
        parse_recipe(data)


def test_print_launch_works_on_a_machine_without_gpus(monkeypatch, capsys, tiny_model_dir, small_sft_file, tmp_path):
    import torch
    import yaml

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, small_sft_file)), encoding="utf-8")
    code, out = run_cli(monkeypatch, capsys, "train", str(recipe), "--gpus", "2", "--print-launch", with_stdout=True)
    assert code == 0, out
    assert "accelerate launch" in out and "--num_processes 2" in out and "torchrun" in out
    assert not (tmp_path / "runs").exists()  # printing starts nothing


# ---------------------------------------------------------------------------------------------------------------
# Portable artifacts

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, small_sft_file):
    from tuneforge.recipe import parse_recipe
    from tuneforge.train import train

    out = tmp_path_factory.mktemp("portable") / "run"
    run = train(parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, train={"max_steps": 2},
                                         eval={"max_examples": 2, "max_new_tokens": 4, "few_shot": 0})),
                output=str(out))
    assert run.status == "completed"
    return out


def test_adapter_folder_is_safetensors_and_json_only_and_names_a_portable_base(lora_run, tiny_model_dir):
    from tuneforge.artifacts import portable_base_name

    names = sorted(p.name for p in (lora_run / "adapter").iterdir())
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pth"))], names
    assert "adapter_model.safetensors" in names
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert portable_base_name("embedded:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_base_name("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"


def test_a_moved_run_and_base_load_elsewhere_with_identical_outputs(lora_run, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.models import load_target

    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356]])
    model, _ = load_target(str(lora_run), device="cpu")
    with torch.no_grad():
        before = model(ids).logits
    elsewhere = tmp_path / "other-machine"
    shutil.copytree(lora_run, elsewhere / "run")
    shutil.copytree(tiny_model_dir, elsewhere / "base")
    moved_base = tmp_path / "gone"
    shutil.move(str(elsewhere / "base"), str(moved_base))  # the recorded base path no longer matters
    # plain PEFT, as a user on another machine would load it
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moved_base), elsewhere / "run" / "adapter")
    # tuneforge, told where the base is now
    ours, _ = load_target(str(elsewhere / "run"), device="cpu", base=str(moved_base))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, before, atol=1e-5)
        assert torch.allclose(ours(ids).logits, before, atol=1e-5)


def test_a_run_whose_local_base_is_gone_says_pass_base(lora_run, tiny_model_dir, tmp_path, monkeypatch, capsys):
    import yaml

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["name"] = str(tmp_path / "missing-base")
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    code, out = run_cli(monkeypatch, capsys, "generate", str(run), "--prompt", "hi")
    assert code == 2 and "is not there" in out and "--base PATH" in out
    code, out = run_cli(monkeypatch, capsys, "generate", str(run), "--prompt", "hi", "--max-new-tokens", "3",
                        "--base", str(tiny_model_dir), with_stdout=True)
    assert code == 0, out


TRANSFORMERS4 = Path(sys.prefix) / "compat" / "transformers4"
LOAD_SCRIPT = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
text = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], tokenize=False, add_generation_prompt=True)
ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
with torch.no_grad():
    logits = model(ids).logits[0]
print(json.dumps({"version": transformers.__version__, "ids": ids[0].tolist(), "logits": logits[-1].tolist(),
                  "rope_theta": model.config.rope_theta if hasattr(model.config, "rope_theta") else None}))
"""


def _load_with(folder: Path, pythonpath: str | None) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(folder)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_merged_model_loads_identically_in_transformers_4_and_5(lora_run, tmp_path, monkeypatch, capsys):
    """transformers 4.57 (set-up installs it beside the venv's 5.x, in .venv/compat) reads the merged checkpoint:
    same tokens, same logits, the real RoPE base (4.x falls back to 10,000 without top-level rope_theta)."""
    assert (TRANSFORMERS4 / "transformers").is_dir(), "scripts/setup.sh installs transformers 4.x into .venv/compat"
    merged = tmp_path / "merged"
    code, out = run_cli(monkeypatch, capsys, "merge", str(lora_run), "--output", str(merged))
    assert code == 0, out
    config = json.loads((merged / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert json.loads((merged / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    four, five = _load_with(merged, str(TRANSFORMERS4)), _load_with(merged, None)
    assert four["version"].startswith("4.") and five["version"].startswith("5.")
    assert four["ids"] == five["ids"] and four["rope_theta"] == config["rope_theta"]
    assert max(abs(a - b) for a, b in zip(four["logits"], five["logits"])) < 1e-4


def test_a_lora_run_prints_no_library_notices(tmp_path, tiny_model_dir, small_sft_file):
    """The quickstart's output is clean: no bitsandbytes "kernels-community ... trust" notice, no FutureWarning from
    TRL/PEFT reading a renamed transformers property (library_fixes.quiet_library_notices)."""
    import os

    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, small_sft_file, train={"max_steps": 1},
                                                 eval={"max_examples": 2, "max_new_tokens": 4, "few_shot": 0,
                                                       "forgetting": False})), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONWARNINGS")}
    done = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(recipe), "--output", str(tmp_path / "run"),
                           "--no-doctor"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert "FutureWarning" not in output and "kernels-community" not in output and "Traceback" not in output
