"""`tuneforge plan`: parameter counts from configs, memory estimates checked against what PyTorch really keeps
(autograd's saved tensors counted on CPU, tiny models), the fit verdict and the largest batch."""

from __future__ import annotations

import io

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tuneforge.errors import TuneforgeError
from tuneforge.guide.plan import (
    GIB,
    count_parameters,
    estimate_seconds,
    find_gpu,
    fit_verdict,
    largest_batch,
    llama_shape,
    lora_parameters,
    make_plan,
    meta_shape,
    model_shape,
    plan_memory,
    reference_config,
    render_plan,
)

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, max_position_embeddings=256)


def tiny_configs():
    from transformers import MistralConfig, Qwen2Config, Qwen3Config

    yield LlamaConfig(**TINY)
    yield LlamaConfig(**TINY, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    yield LlamaConfig(**{**TINY, "num_key_value_heads": 4}, head_dim=32)
    yield MistralConfig(**TINY)
    yield Qwen2Config(**TINY)
    yield Qwen3Config(**TINY, head_dim=24)


@pytest.mark.parametrize("config", list(tiny_configs()), ids=lambda c: c.model_type)
def test_formula_matches_the_model(config):
    """The documented formula (embeddings, GQA attention, MLP, norms, lm_head unless tied) counts exactly what
    transformers builds."""
    formula = llama_shape(config)
    model = AutoModelForCausalLM.from_config(config)
    assert formula.params_total == sum(p.numel() for p in model.parameters())
    assert meta_shape(config).params_total == formula.params_total


def test_reference_sizes_match_published_counts():
    assert model_shape(reference_config("llama-8b")).params_total == 8_030_261_248  # Llama 3.1 8B
    assert model_shape(reference_config("llama-1b")).params_total == 1_235_814_400  # Llama 3.2 1B
    assert model_shape(reference_config("llama-70b")).params_total == 70_553_706_496  # Llama 3.1 70B
    # seed 002: Llama-3-8B, r=16 on q,k,v,o,gate,up,down -> "trainable params: 41,943,040"
    assert lora_parameters(reference_config("llama-8b"), 16,
                           ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]) == 41_943_040
    parts = count_parameters(reference_config("llama-8b"))
    assert parts["lm_head"] == parts["embeddings"] == 128256 * 4096


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["o_proj", "down_proj"]])
def test_lora_parameters_match_peft(targets):
    from peft import LoraConfig, get_peft_model

    config = LlamaConfig(**TINY)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_parameters(config, 4, targets) == trainable


def saved_activation_bytes(model, ids, *, autocast: bool) -> int:
    """Bytes autograd keeps for backward during the decoder's forward (parameters excluded), counted once per storage."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    backbone = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        backbone(input_ids=ids)
    return sum(seen.values())


@pytest.mark.parametrize("mode", ["full-bf16", "full-fp32", "lora-all-linear", "lora-q-v"])
def test_activation_estimate_matches_saved_tensors(mode):
    """The per-layer activation formula against the tensors autograd really saves (CPU, multi-head attention so the
    kernel path is the same; dropout 0 because CPU dropout masks are fp32 where CUDA's are 1 byte)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=300)
    dtype = torch.float32 if mode == "full-fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    targets = ["q_proj", "v_proj"] if mode == "lora-q-v" else "all-linear"
    if mode.startswith("lora"):
        model = get_peft_model(model, LoraConfig(r=8, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"))
        model.enable_input_require_grads()
    model.train()
    ids = torch.randint(0, 300, (2, 96))
    measured = saved_activation_bytes(model, ids, autocast=mode.startswith("lora"))
    predicted = plan_memory(config, adapter="lora" if mode.startswith("lora") else "full", seq_len=96, batch_size=2,
                            dtype="fp32" if mode == "full-fp32" else "bf16", lora_r=8, target_modules=targets,
                            lora_dropout=0.0)["activations"]
    assert 0.9 < measured / predicted < 1.1, (measured, predicted)


def test_qlora_estimate_matches_a_4bit_model(tmp_path):
    """QLoRA on CPU (bitsandbytes' CPU path): the 4-bit weights plus their quantization constants, and the saved
    activations (fp32 residual stream and MLP, as prepare_model_for_kbit_training leaves them)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=300)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb, dtype=torch.bfloat16, device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    weights = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            weights += p.untyped_storage().nbytes()
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            weights += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                weights += state.state2.absmax.numel() * state.state2.absmax.element_size()
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)  # as TRL does for quantized models
    model.enable_input_require_grads()
    model.train()
    estimate = plan_memory(config, adapter="qlora", seq_len=96, batch_size=2, lora_r=8, lora_dropout=0.0)
    lora = estimate["params_trainable"] * 2
    assert 0.98 < weights / (estimate["weights"] - lora) < 1.02, (weights, estimate["weights"] - lora)
    measured = saved_activation_bytes(model, torch.randint(0, 300, (2, 96)), autocast=True)
    assert 0.9 < measured / estimate["activations"] < 1.1, (measured, estimate["activations"])


def test_memory_parts_behave():
    config = reference_config("llama-8b")
    full = plan_memory(config, adapter="full", seq_len=2048)
    lora = plan_memory(config, adapter="lora", seq_len=2048)
    qlora = plan_memory(config, adapter="qlora", seq_len=2048)
    assert full["weights"] == 8_030_261_248 * 2  # bf16
    assert full["gradients"] == full["weights"] and full["optimizer_states"] == 2 * full["weights"]  # AdamW, bf16 states
    assert qlora["weights"] < 0.55 * lora["weights"]
    assert lora["params_trainable"] == lora_parameters(config, 16) and lora["gradients"] == 4 * lora["params_trainable"]
    eight_bit = plan_memory(config, adapter="full", seq_len=2048, optimizer="paged_adamw_8bit")
    assert eight_bit["optimizer_states"] < 0.55 * full["optimizer_states"]
    gc = plan_memory(config, adapter="lora", seq_len=2048, gradient_checkpointing=True)
    assert gc["activations"] < 0.1 * lora["activations"]
    assert plan_memory(config, adapter="lora", seq_len=2048, batch_size=2)["activations"] == pytest.approx(2 * lora["activations"])
    assert lora["reserved"] > lora["total"] and lora["total_gib"] == pytest.approx(lora["total"] / GIB)
    with pytest.raises(ValueError):
        plan_memory(config, adapter="bitfit")  # not an adapter type (ia3 and the others: tests/test_adapter_types.py)


def test_largest_batch_is_the_largest_that_fits():
    config = reference_config("llama-1b")
    settings = dict(adapter="lora", seq_len=2048, gradient_checkpointing=False)
    batch = largest_batch(config, vram_gib=40.0, **settings)
    assert batch >= 1
    assert plan_memory(config, batch_size=batch, **settings)["reserved_gib"] <= 40.0
    assert plan_memory(config, batch_size=batch + 1, **settings)["reserved_gib"] > 40.0
    assert largest_batch(reference_config("llama-70b"), vram_gib=24.0, adapter="full") == 0


def test_verdict_lists_changes_that_fit():
    config = reference_config("llama-8b")
    gpu = find_gpu("L4")
    verdict = fit_verdict(config, gpu=gpu, adapter="lora", seq_len=2048, batch_size=4)
    assert not verdict["fits"] and verdict["largest_batch"] == 0
    assert any("qlora" in change for change in verdict["changes"])
    assert any("gradient_checkpointing" in change for change in verdict["changes"])
    assert fit_verdict(config, gpu=find_gpu("H100"), adapter="qlora", seq_len=1024, batch_size=1)["fits"]


def test_gpu_names():
    assert find_gpu("H100").memory_gib > 79 and find_gpu("h100-80gb").name == "H100 80GB"
    assert find_gpu("A100 40GB").memory_gib == 40 and find_gpu("a100").memory_gib == 80
    assert find_gpu("RTX 4090").bf16 and not find_gpu("T4").bf16
    with pytest.raises(TuneforgeError):
        find_gpu("voodoo2")


def test_time_model():
    config = reference_config("llama-8b")
    h100 = find_gpu("H100")
    full = estimate_seconds(config, tokens=1e6, gpu=h100, adapter="full")
    lora = estimate_seconds(config, tokens=1e6, gpu=h100, adapter="lora")
    lora_gc = estimate_seconds(config, tokens=1e6, gpu=h100, adapter="lora", gradient_checkpointing=True)
    assert full == pytest.approx(1.5 * lora) and lora_gc == pytest.approx(1.5 * lora)
    assert estimate_seconds(config, tokens=1e6, gpu=find_gpu("T4"), adapter="lora") > 10 * lora


def test_plan_from_a_config_folder_without_weights(tmp_path):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    plan = make_plan(str(tmp_path), gpu="T4", seq_len=128, batch_size=2)
    assert [row["adapter"] for row in plan.rows] == ["full", "lora", "qlora"]
    assert all(row["fits"] for row in plan.rows) and plan.params_total == llama_shape(LlamaConfig(**TINY)).params_total
    buffer = io.StringIO()
    from rich.console import Console

    render_plan(Console(file=buffer, width=160), plan)
    assert "fits" in buffer.getvalue() and "qlora" in buffer.getvalue()


def test_plan_of_a_recipe_and_a_reference_size():
    from pathlib import Path

    recipe = Path(__file__).parent / "broken" / "clean.yaml"
    import os

    cwd = os.getcwd()
    os.chdir(recipe.parent)
    try:
        plan = make_plan("clean.yaml", vram_gb=16)
    finally:
        os.chdir(cwd)
    assert plan.recipe_adapter == "lora" and plan.settings["seq_len"] == 256 and plan.tokens and plan.tokens > 0
    assert [row["recipe"] for row in plan.rows] == [False, True, False]
    big = make_plan("llama-70b", gpu="A10", seq_len=4096)
    verdicts = {row["adapter"]: row for row in big.rows}
    assert not verdicts["full"]["fits"] and not verdicts["lora"]["fits"]
    assert verdicts["full"]["changes"]


def test_one_translation_of_a_recipe_into_the_plan():
    """memory.recipe_settings is the one door from a recipe into the plan (speed, guards, distributed and `tuneforge
    plan` go through it): every recipe key the plan reads, changes applied last, the dtype from the GPU."""
    from tuneforge.memory import DEFAULT_OPTIMIZER, plan_for_recipe, recipe_settings
    from tuneforge.recipe import DEFAULT_OPTIMIZER as RECIPE_DEFAULT_OPTIMIZER
    from tuneforge.recipe import parse_recipe

    assert DEFAULT_OPTIMIZER is RECIPE_DEFAULT_OPTIMIZER  # one table: recipe.py takes it from memory.py
    recipe = parse_recipe({"name": "t", "model": {"name": "llama-8b"}, "data": {"train": "x.jsonl"},
                           "adapter": {"type": "qlora", "r": 32, "dropout": 0.0, "modules_to_save": ["lm_head"]},
                           "quant": {"bits": 8, "double_quant": False},
                           "train": {"batch_size": 2, "max_length": 1024, "gradient_checkpointing": True}})
    settings = recipe_settings(recipe, gpu=find_gpu("A100"))
    assert settings == dict(adapter="qlora", seq_len=1024, batch_size=2, gradient_checkpointing=True,
                            optimizer="paged_adamw_8bit", dtype="bf16", lora_r=32, target_modules="all-linear",
                            lora_dropout=0.0, modules_to_save=["lm_head"], quant_bits=8, double_quant=False)
    assert recipe_settings(recipe, gpu=find_gpu("T4"))["dtype"] == "fp32"  # precision auto, no bf16 on a T4
    assert recipe_settings(recipe, seq_len=99, dtype="fp16")["seq_len"] == 99
    config = reference_config("llama-8b")
    assert plan_for_recipe(recipe, config, gpu=find_gpu("A100"), batch_size=1) == plan_memory(config, **{**settings, "batch_size": 1})
    none = parse_recipe({"name": "t", "data": {"train": "x.jsonl"}, "adapter": {"type": "none"}})
    assert recipe_settings(none, dtype="bf16")["adapter"] == "full"


def test_memory_and_ranks_sit_at_the_bottom_of_the_layers():
    """memory.py, memory_shapes.py, memory_adapters.py and ranks.py import nothing from tuneforge but errors (and each
    other), anywhere in the file: speed, guards, distributed, run and models import them without an import loop."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "src" / "tuneforge"
    allowed = {"tuneforge.errors", "tuneforge.memory_shapes", "tuneforge.memory", "tuneforge.memory_adapters"}
    for name in ("memory.py", "memory_shapes.py", "memory_adapters.py", "ranks.py"):
        tree = ast.parse((package / name).read_text(encoding="utf-8"))
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module} | \
            {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert {m for m in imported if m.startswith("tuneforge")} <= allowed, (name, imported)
