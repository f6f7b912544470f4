"""The adaptation menu beyond LoRA (issue 23): AdaLoRA, IA3, prompt tuning, prefix tuning (P-tuning v2 with
prefix_projection), P-tuning, bottleneck adapters, GaLore, LISA, Spectrum, freeze-tuning, and LoRA's bias.

Each type trains a tiny random Llama through the one life of a run, saves a self-contained artifact that loads back
(plain PEFT for the PEFT types, transformers for the full-parameter ones, bottleneck.py for the bottleneck), scores
before and after, and merges where merging exists (soft prompts and bottlenecks are refused). Recipe errors name the
key and come before a run directory exists. The stateful types (AdaLoRA's importance estimates, LISA's layer
choice, GaLore's projected optimizer states) resume exactly after SIGKILL."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import pytest
import yaml

from conftest import kill_job, read_metrics, tiny_recipe


def _parse(tiny_model_dir, small_sft_file, **sections):
    from tuneforge.recipe import parse_recipe

    return parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, **sections))


def _recipe_error(tiny_model_dir, small_sft_file, **sections) -> str:
    from tuneforge.errors import RecipeError

    with pytest.raises(RecipeError) as info:
        _parse(tiny_model_dir, small_sft_file, **sections)
    return " ".join(info.value.problems)


# ---------------------------------------------------------------------------------------------------------------
# The schema: knobs belong to their types; defaults by type


@pytest.mark.parametrize("adapter, key, words", [
    ({"type": "ia3", "r": 8}, "adapter.r", "not read by adapter.type ia3"),
    ({"type": "prompt_tuning", "bias": "all"}, "adapter.bias", "lora, qlora, adalora"),
    ({"type": "lora", "num_virtual_tokens": 10}, "adapter.num_virtual_tokens", "prompt_tuning, prefix_tuning, p_tuning"),
    ({"type": "lisa", "galore_rank": 64}, "adapter.galore_rank", "galore"),
    ({"type": "galore", "quantize_base": True}, "adapter.quantize_base", "GaLore updates every base weight"),
    ({"type": "lisa", "quantize_base": True}, "adapter.quantize_base", "trains the base weights themselves"),
    ({"type": "adalora", "init_r": 4, "target_r": 8}, "adapter.target_r", "target_r <= init_r"),
    ({"type": "freeze", "trainable_layers": []}, "adapter.trainable_layers", "trains nothing"),
])
def test_knob_for_another_type_is_a_recipe_error(tiny_model_dir, small_sft_file, adapter, key, words):
    message = _recipe_error(tiny_model_dir, small_sft_file, adapter=adapter)
    assert f"`{key}`" in message and words in message, message


def test_cross_section_errors_name_the_key(tiny_model_dir, small_sft_file):
    message = _recipe_error(tiny_model_dir, small_sft_file, adapter={"type": "galore"},
                            train={"optimizer": "adamw_torch"})
    assert "`train.optimizer`" in message and "galore_adamw" in message
    message = _recipe_error(tiny_model_dir, small_sft_file, adapter={"type": "prefix_tuning"}, train={"packing": True})
    assert "`train.packing`" in message and "packing: false" in message
    # found on the GPU matrix: a checkpointed layer drops the attention cache, which is where the prefix travels
    message = _recipe_error(tiny_model_dir, small_sft_file, adapter={"type": "prefix_tuning"},
                            train={"gradient_checkpointing": True})
    assert "`train.gradient_checkpointing`" in message and "gradient_checkpointing: false" in message
    message = _recipe_error(tiny_model_dir, small_sft_file, adapter={"type": "ia3"}, method="dpo")
    assert "`adapter.type`" in message and "supervised" in message
    message = _recipe_error(tiny_model_dir, small_sft_file, train={"optimizer": "galore_adamw"})
    assert "`train.optimizer`" in message and "adapter.type: galore" in message


def test_defaults_by_type(tiny_model_dir, small_sft_file):
    lr = {t: _parse(tiny_model_dir, small_sft_file, adapter={"type": t}).train.lr
          for t in ("lora", "ia3", "prompt_tuning", "prefix_tuning", "bottleneck", "adalora", "lisa", "galore")}
    assert lr == {"lora": 2e-4, "ia3": 3e-3, "prompt_tuning": 3e-2, "prefix_tuning": 1e-2, "bottleneck": 1e-4,
                  "adalora": 2e-4, "lisa": 2e-5, "galore": 2e-5}
    recipe = _parse(tiny_model_dir, small_sft_file, adapter={"type": "galore"})
    assert recipe.train.optimizer == "galore_adamw" and not recipe.uses_peft and recipe.adapter.galore_rank == 128
    deep = _parse(tiny_model_dir, small_sft_file, adapter={"type": "prefix_tuning", "prefix_projection": True})
    assert deep.train.lr == 1e-3  # P-tuning v2: 1e-2 diverged on the embedded model (compare-cpu results)
    soft = _parse(tiny_model_dir, small_sft_file, adapter={"type": "p_tuning"})
    assert soft.speed.padding_free is False and soft.uses_peft and not soft.uses_lora
    assert soft.train.gradient_checkpointing == "auto"  # p_tuning's virtual tokens are input embeddings: no cache
    assert _parse(tiny_model_dir, small_sft_file, adapter={"type": "prefix_tuning"}).train.gradient_checkpointing is False
    assert _parse(tiny_model_dir, small_sft_file, adapter={"type": "ia3", "quantize_base": True}).adapter.quantized
    # a saved recipe (every key written out at its default) parses again: only changed keys are checked
    from tuneforge.recipe import Recipe, recipe_to_yaml

    again = Recipe.model_validate(yaml.safe_load(recipe_to_yaml(soft)))
    assert again.adapter.type == "p_tuning"


def test_lora_bias_reaches_peft():
    from tuneforge.adapters import lora_config
    from tuneforge.recipe_adapter import AdapterSection

    assert lora_config(AdapterSection(type="lora", bias="lora_only")).bias == "lora_only"
    assert lora_config(AdapterSection(type="lora")).bias == "none"


# ---------------------------------------------------------------------------------------------------------------
# Bad input that needs the model or data: before a run directory exists


def test_soft_prompt_longer_than_context_fails_before_the_run(tmp_path, tiny_model_dir, small_sft_file):
    from tuneforge.errors import RecipeError
    from tuneforge.train import train

    recipe = _parse(tiny_model_dir, small_sft_file, adapter={"type": "prompt_tuning", "num_virtual_tokens": 500},
                    output_dir=str(tmp_path))
    with pytest.raises(RecipeError) as info:
        train(recipe, doctor=False, console=_quiet())
    message = " ".join(info.value.problems)
    assert "`adapter.num_virtual_tokens`" in message and "context (512)" in message and "at most" in message
    assert not (tmp_path / "tiny").exists()


def test_adalora_step_count(tiny_model_dir, small_sft_file):
    from types import SimpleNamespace

    from tuneforge.adapter_checks import check_adapter_for_run
    from tuneforge.errors import RecipeError

    recipe = _parse(tiny_model_dir, small_sft_file, adapter={"type": "adalora"},
                    train={"max_steps": None, "epochs": 2, "batch_size": 4, "grad_accum": 2})
    check_adapter_for_run(recipe, SimpleNamespace(train=list(range(20))))
    assert recipe.adapter.total_step == 6  # 2 epochs x ceil(20 / 8)
    unknown = _parse(tiny_model_dir, small_sft_file, adapter={"type": "adalora"}, train={"max_steps": None})
    with pytest.raises(RecipeError, match="adapter.total_step"):
        check_adapter_for_run(unknown, SimpleNamespace(train=iter(())))  # a stream: no length
    late = _parse(tiny_model_dir, small_sft_file, adapter={"type": "adalora", "tinit": 2, "tfinal": 1})
    with pytest.raises(RecipeError, match="adapter.tinit"):
        check_adapter_for_run(late, SimpleNamespace(train=[]))  # max_steps 3: nothing left to prune in


# ---------------------------------------------------------------------------------------------------------------
# Each type: trains, saves, loads back, scores before/after, merges or says why not


def _quiet():
    from rich.console import Console

    return Console(file=io.StringIO(), width=200)


TYPES = {  # adapter section -> (saved folder, can merge)
    "ia3": ({"type": "ia3"}, "adapter", True),
    "ia3_4bit": ({"type": "ia3", "quantize_base": True}, "adapter", True),  # QLoRA-style: NF4 base (bitsandbytes)
    "adalora": ({"type": "adalora", "init_r": 4, "target_r": 2}, "adapter", True),
    "prompt_tuning": ({"type": "prompt_tuning", "num_virtual_tokens": 4, "prompt_init_text": "Answer:"}, "adapter", False),
    "prefix_tuning": ({"type": "prefix_tuning", "num_virtual_tokens": 4, "prefix_projection": True,
                       "encoder_hidden_size": 16}, "adapter", False),
    "p_tuning": ({"type": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16}, "adapter", False),
    "bottleneck": ({"type": "bottleneck", "bottleneck_reduction": 8}, "adapter", False),
    "galore": ({"type": "galore", "galore_rank": 8}, "model", False),
    "lisa": ({"type": "lisa", "lisa_layers": 1, "lisa_interval": 1}, "model", False),
    "spectrum": ({"type": "spectrum", "spectrum_top_fraction": 0.5}, "model", False),
    "freeze": ({"type": "freeze", "trainable_layers": 1, "trainable_modules": ["mlp"]}, "model", False),
}
# Trainable parameters on the tiny model (hidden 64, 2 layers, kv 32, mlp 128, vocab 49152 tied): pinned.
TRAINABLE = {
    "ia3": 2 * (32 + 32 + 128),  # k, v outputs and down_proj's input, per layer
    "ia3_4bit": 2 * (32 + 32 + 128),
    "adalora": 2 * sum(4 * (i + o) + 4 for i, o in ((64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128),
                                                     (128, 64))),
    "prompt_tuning": 4 * 64,
    # PEFT's prefix width under grouped-query attention is the key/value width (32), not the hidden size
    "prefix_tuning": 4 * 32 + (32 * 16 + 16) + (16 * 2 * 2 * 32 + 2 * 2 * 32),
    "p_tuning": 4 * 64 + (64 * 16 + 16) + (16 * 16 + 16) + (16 * 64 + 64),
    "bottleneck": 2 * (64 * 8 + 8 + 8 * 64 + 64),
    # one of the two layers of each kind: q, k, v, o, gate, up, down
    "spectrum": 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128,
    "freeze": 3 * 64 * 128,  # the last layer's gate, up, down
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, small_sft_file):
    """Each type trained once (2 steps), keyed by type: (run directory, its summary)."""
    from tuneforge.recipe import parse_recipe
    from tuneforge.train import train

    root = tmp_path_factory.mktemp("types")
    out = {}
    for name, (adapter, _, _) in TYPES.items():
        recipe = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, name=name, adapter=adapter,
                                          output_dir=str(root), train={"max_steps": 2},
                                          eval={"forgetting": False, "max_examples": 2, "max_new_tokens": 2,
                                                "few_shot": 1}))
        run = train(recipe, doctor=False, console=_quiet())
        out[name] = (run.path, json.loads((run.path / "summary.json").read_text()))
    return out


@pytest.mark.parametrize("name", list(TYPES))
def test_each_type_trains_saves_loads_and_scores(trained, name, tiny_model_dir):
    from tuneforge.models import load_target

    path, summary = trained[name]
    folder, _, _ = TYPES[name]
    assert summary["steps"] == 2
    if name in TRAINABLE:
        assert summary["trainable_params"] == TRAINABLE[name], summary["trainable_params"]
    # the memory model (tuneforge plan) counts the same trainable parameters as the run had
    from tuneforge.memory import load_model_config, plan_memory
    from tuneforge.memory_adapters import adapter_options
    from tuneforge.recipe_adapter import AdapterSection

    section = AdapterSection(**TYPES[name][0])
    planned = plan_memory(load_model_config(str(tiny_model_dir)), adapter=section.type, seq_len=64, dtype="fp32",
                          adapter_options=adapter_options(section))
    assert planned["params_trainable"] == summary["trainable_params"], (planned["params_trainable"], summary)
    assert set(summary["metrics"]["exact_match"]) >= {"base", "tuned"}  # scored before and after
    assert summary["eval_loss"]["tuned"] is not None
    saved = path / TYPES[name][1]
    assert saved.is_dir() and not (path / ("model" if TYPES[name][1] == "adapter" else "adapter")).exists()
    model, tokenizer = load_target(str(path), device="cpu")
    linear = type(model.get_base_model().model.layers[0].mlp.down_proj.base_layer).__name__ \
        if name.startswith("ia3") else None
    assert linear in (None, "Linear4bit" if name == "ia3_4bit" else "Linear")  # loaded on the base it trained on
    ids = tokenizer("Hello", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert ids["input_ids"].shape[1] < out.shape[1] <= ids["input_ids"].shape[1] + 2


@pytest.mark.parametrize("name", ["ia3", "adalora", "prompt_tuning", "prefix_tuning", "p_tuning"])
def test_plain_peft_loads_the_adapter(trained, name, tiny_model_dir):
    """Without tuneforge: transformers + PEFT alone, from the adapter folder; the output differs from the base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path, _ = trained[name]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = base(input_ids=ids).logits[:, -1].clone()
        model = PeftModel.from_pretrained(base, str(path / "adapter"))
        after = model(input_ids=ids).logits[:, -1]
    config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"ia3": "IA3", "adalora": "ADALORA", "prompt_tuning": "PROMPT_TUNING",
                                   "prefix_tuning": "PREFIX_TUNING", "p_tuning": "P_TUNING"}[name]
    assert not torch.allclose(before, after)


def test_bottleneck_artifact_loads_back_exactly(trained, tiny_model_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tuneforge.bottleneck import load_bottlenecks

    path, _ = trained["bottleneck"]
    config = json.loads((path / "adapter" / "bottleneck_config.json").read_text())
    assert config["bottleneck_size"] == 8 and config["layers"] == 2 and config["format"] == "tuneforge-bottleneck-v1"
    state = load_file(str(path / "adapter" / "bottleneck.safetensors"))
    assert sorted(state) == sorted(f"model.layers.{i}.mlp.bottleneck.{p}.{w}" for i in range(2)
                                   for p in ("down", "up") for w in ("weight", "bias"))
    assert any(v.abs().sum() > 0 for k, v in state.items() if ".up." in k)  # trained away from the zero start
    model = load_bottlenecks(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), path / "adapter")
    loaded = {k: v for k, v in model.state_dict().items() if ".bottleneck." in k}
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("name", list(TYPES))
def test_merge_where_merging_exists(trained, name, tmp_path):
    from tuneforge.errors import RunDirError
    from tuneforge.ops.merge import merge_run

    path, _ = trained[name]
    _, folder, mergeable = TYPES[name]
    if mergeable:
        merged = merge_run(str(path), str(tmp_path / "merged"))
        assert (merged / "config.json").exists() and not (merged / "adapter_config.json").exists()
        return
    with pytest.raises(RunDirError) as info:
        merge_run(str(path), str(tmp_path / "merged"))
    expected = "full fine-tuning run" if folder == "model" else "cannot be merged"
    assert expected in str(info.value), str(info.value)
    assert not (tmp_path / "merged").exists()


def test_full_savers_train_only_their_weights(trained, tiny_model_dir):
    """freeze moved only the last layer's MLP; spectrum left the unchosen layers where they were; GaLore moved
    every weight; LISA's embeddings (always active) moved."""
    from safetensors.torch import load_file

    base = load_file(str(tiny_model_dir / "model.safetensors"))

    def moved(name):
        tuned = load_file(str(trained[name][0] / "model" / "model.safetensors"))
        return {k for k in base if k in tuned and not (tuned[k] == base[k]).all()}

    assert moved("freeze") == {f"model.layers.1.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    spectrum = moved("spectrum")
    assert len(spectrum) == 7 and all(".layers." in k for k in spectrum)
    assert {k.split(".", 3)[-1] for k in spectrum} == {f"{m}.weight" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    assert "model.embed_tokens.weight" in moved("lisa")
    assert len(moved("galore")) >= 14  # every linear of both layers


def test_galore_uses_galores_optimizer(tiny_model_dir, small_sft_file, tmp_path):
    from tuneforge.adapters import apply_adapter, install_adapter_hooks
    from tuneforge.full_savers import galore_optim_args

    recipe = _parse(tiny_model_dir, small_sft_file, adapter={"type": "galore", "galore_rank": 8})
    assert galore_optim_args(recipe.adapter) == "rank=8,update_proj_gap=200,scale=0.25"
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = apply_adapter(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), recipe)
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path), optim="galore_adamw", use_cpu=True,
                                                          report_to=[]))
    install_adapter_hooks(trainer, recipe)
    optimizer = trainer.create_optimizer()
    assert type(optimizer).__module__.startswith("galore_torch")  # galore_torch.adamw.AdamW (GaLoreAdamW)
    ranked = [g for g in optimizer.param_groups if g.get("rank") == 8]
    assert ranked and sum(len(g["params"]) for g in ranked) == 14  # the 7 linears of 2 layers (attn, mlp)


def test_lisa_layers_follow_the_step_and_seed():
    from types import SimpleNamespace

    from tuneforge.full_savers import lisa_layers_for

    recipe = SimpleNamespace(adapter=SimpleNamespace(lisa_layers=2, lisa_interval=5), train=SimpleNamespace(seed=0))
    choices = [lisa_layers_for(step, recipe, 8) for step in range(0, 40)]
    assert all(len(c) == 2 for c in choices)
    assert choices[0] == choices[4] and len({tuple(c) for c in choices[::5]}) > 1  # one draw per interval
    assert choices == [lisa_layers_for(step, recipe, 8) for step in range(0, 40)]  # from (seed, interval) alone


def test_spectrum_snr_prefers_structure():
    """A low-rank signal plus noise scores above pure noise of the same shape."""
    import torch

    from tuneforge.full_savers import weight_snr

    torch.manual_seed(0)
    noise = torch.randn(64, 128) * 0.02
    signal = noise + torch.randn(64, 4) @ torch.randn(4, 128) * 0.2
    assert weight_snr(signal) > 3 * weight_snr(noise)


# ---------------------------------------------------------------------------------------------------------------
# Memory: `tuneforge plan` shows each type's effect


def test_plan_shows_each_types_memory():
    from tuneforge.memory import plan_memory, reference_config

    config = reference_config("llama-1b")
    plan = {a: plan_memory(config, adapter=a, seq_len=1024, dtype="bf16") for a in
            ("full", "lora", "galore", "lisa", "spectrum", "freeze", "ia3", "prompt_tuning", "prefix_tuning",
             "adalora", "bottleneck")}
    full = plan["full"]
    for saver in ("galore", "lisa", "spectrum", "freeze"):
        assert plan[saver]["optimizer_states"] < 0.5 * full["optimizer_states"], saver
        assert plan[saver]["weights"] == full["weights"]
    assert plan["lisa"]["gradients"] < 0.5 * full["gradients"] and plan["galore"]["gradients"] == full["gradients"]
    assert plan["ia3"]["params_trainable"] < plan["lora"]["params_trainable"] / 10  # "even smaller than LoRA"
    assert plan["prompt_tuning"]["params_trainable"] == 20 * 2048
    assert plan["prefix_tuning"]["params_trainable"] == 20 * 2 * 16 * 8 * 64  # n x 2 x layers x kv width
    assert plan["adalora"]["params_trainable"] > plan["lora"]["params_trainable"] * 12 / 16 * 0.99
    assert plan["freeze"]["activations"] < plan["lisa"]["activations"] < full["activations"]


def test_plan_command_lists_the_recipes_type(tmp_path, tiny_model_dir, small_sft_file):
    from tuneforge.guide.plan import make_plan, parse_adapter_list

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, small_sft_file,
                                                       adapter={"type": "lisa", "lisa_layers": 1})))
    plan = make_plan(str(recipe_file), gpu="T4", adapters=parse_adapter_list("ia3,galore"))
    rows = {row["adapter"]: row for row in plan.rows}
    assert list(rows) == ["full", "lora", "qlora", "lisa", "ia3", "galore"] and rows["lisa"]["recipe"]
    # one of the two layers (its linears and two norms) has no gradient or optimizer state at a time
    assert rows["full"]["params_trainable"] - rows["lisa"]["params_trainable"] == 36864 + 2 * 64
    assert rows["lisa"]["optimizer_states"] < rows["full"]["optimizer_states"]
    with pytest.raises(Exception, match="--adapters"):
        parse_adapter_list("ia3,lorra")


# ---------------------------------------------------------------------------------------------------------------
# Exact resume after SIGKILL: AdaLoRA's importance, LISA's layer choice, GaLore's projected states, a soft prompt's
# encoder (PEFT saves only its output)


def _losses(run_path):
    return {row["step"]: row["loss"] for row in read_metrics(run_path) if "loss" in row}


@pytest.mark.parametrize("adapter", [
    {"type": "adalora", "init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 4, "deltaT": 2},
    {"type": "lisa", "lisa_layers": 1, "lisa_interval": 3},
    {"type": "galore", "galore_rank": 4, "galore_update_proj_gap": 7},
    {"type": "prefix_tuning", "num_virtual_tokens": 4, "prefix_projection": True, "encoder_hidden_size": 16},
], ids=["adalora", "lisa", "galore", "ptuning_v2"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_model_dir, small_sft_file, adapter):
    recipe = tiny_recipe(tiny_model_dir, small_sft_file, adapter=adapter,
                         train={"max_steps": 20, "batch_size": 2, "save_every": 5, "lr": 1e-3, "logging_steps": 1},
                         eval={"baseline": False, "max_examples": 1, "max_new_tokens": 2, "forgetting": False})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "tuneforge", "train", str(path), "--no-doctor"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(cmd + ["--output", str(straight)], check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(cmd + ["--output", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = killed / "checkpoints" / "checkpoint-10" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    kill_job(proc.pid)
    proc.wait()
    assert marker.exists()
    assert '"completed"' not in (killed / "status.json").read_text()
    resumed = subprocess.run([sys.executable, "-m", "tuneforge", "train", "--resume", str(killed)],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _losses(straight), _losses(killed)
    assert sorted(a) == sorted(b) and max(a) == 20
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    if adapter["type"] == "adalora":  # the pruned rank pattern is saved with the adapter, the same both ways
        pattern = [json.loads((r / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
                   for r in (straight, killed)]
        assert pattern[0] and pattern[0] == pattern[1]


def test_galore_optimizer_state_survives_a_weights_only_checkpoint():
    """GaLore's projectors are Python objects in the optimizer state; the Trainer reloads optimizer.pt with
    weights_only=True, so they are saved as plain mappings and rebuilt, the projection matrix exact."""
    import io

    import torch
    from galore_torch import GaLoreAdamW

    from tuneforge.full_savers import _checkpointable_projectors

    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(16, 32)), torch.nn.Parameter(torch.randn(16))

    def optimizer():
        made = GaLoreAdamW([{"params": [bias]}, {"params": [weight], "rank": 4, "update_proj_gap": 3, "scale": 0.25,
                                                  "proj_type": "std"}], lr=1e-2, no_deprecation_warning=True)
        _checkpointable_projectors(made)
        return made

    first = optimizer()
    for _ in range(4):
        (weight.sum() ** 2 + bias.sum()).backward()
        first.step()
        first.zero_grad()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = optimizer()
    second.load_state_dict(torch.load(buffer, weights_only=True))
    restored, original = second.state[weight]["projector"], first.state[weight]["projector"]
    assert type(restored).__name__ == "GaLoreProjector" and type(original).__name__ == "GaLoreProjector"
    assert torch.equal(restored.ortho_matrix, original.ortho_matrix) and restored.rank == 4
    assert torch.equal(second.state[weight]["exp_avg"], first.state[weight]["exp_avg"])
    assert restored.proj_type == "std"
    (weight.sum() ** 2 + bias.sum()).backward()
    second.step()  # the restored projector projects (a string cast by torch's loader once broke this)


def test_doctor_checks_the_types_ranges(tiny_model_dir, small_sft_file):
    from transformers import AutoConfig

    from tuneforge.guide.doctor.adapter_menu import check_adapter_menu
    from tuneforge.guide.doctor.core import Context

    config = AutoConfig.from_pretrained(str(tiny_model_dir))

    def codes(adapter, **train):
        recipe = _parse(tiny_model_dir, small_sft_file, adapter=adapter, train=train or {})
        return {(f.severity, f.code) for f in check_adapter_menu(Context(recipe=recipe, model_config=config))}

    assert codes({"type": "lisa", "lisa_layers": 2}) == {("warning", "lisa-all-layers"), ("warning", "lisa-interval")}
    assert codes({"type": "lisa", "lisa_layers": 1, "lisa_interval": 1}) == set()
    assert codes({"type": "freeze", "trainable_layers": [0, 5]}) == {("error", "freeze-layers")}
    assert codes({"type": "freeze", "trainable_layers": [-1]}) == set()
    assert codes({"type": "prefix_tuning", "num_virtual_tokens": 300}) == {("warning", "virtual-tokens-range")}
    assert ("info", "prompt-tuning-small-model") in codes({"type": "prompt_tuning"})
    assert codes({"type": "galore", "galore_rank": 64}) == {("warning", "galore-rank")}  # hidden size 64
    assert codes({"type": "spectrum", "spectrum_top_fraction": 1.0}) == {("warning", "spectrum-all")}
    assert codes({"type": "adalora", "tinit": 2, "tfinal": 1}, max_steps=3) == {("warning", "adalora-schedule")}


@pytest.mark.parametrize("projection", [False, True], ids=["prefix", "ptuning_v2"])
def test_prefix_init_zero_starts_near_the_base(tiny_model_dir, small_sft_file, projection):
    """adapter.prefix_init: zero (the default; PEFT's init_weights="zero") starts the prefix as zeros, so the wrapped
    model's outputs start near the base's; PEFT's random start (prefix_init: random) moves them far more. Found on
    the CPU matrix: on the embedded model the random prefix started the training loss at 11.5 against the base's 0.47."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.adapter_peft import apply_peft_type

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 24))

    def logits_with(init):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if init is None:
            return model(input_ids=ids).logits, None
        adapter = _parse(tiny_model_dir, small_sft_file, adapter={"type": "prefix_tuning", "num_virtual_tokens": 6,
                                                                 "prefix_projection": projection,
                                                                 "prefix_init": init}).adapter
        peft_model = apply_peft_type(model, adapter)
        prefix = peft_model.prompt_encoder["default"](torch.arange(6).unsqueeze(0))
        return peft_model(input_ids=ids).logits, prefix

    with torch.no_grad():
        base, _ = logits_with(None)
        zero, zero_prefix = logits_with("zero")
        random, random_prefix = logits_with("random")
    assert torch.count_nonzero(zero_prefix) == 0 and torch.count_nonzero(random_prefix) > 0
    moved_zero, moved_random = (zero - base).abs().mean().item(), (random - base).abs().mean().item()
    assert moved_zero < moved_random / 2, (moved_zero, moved_random)  # 0.041 vs 0.107 (prefix), seeded
    message = _recipe_error(tiny_model_dir, small_sft_file, adapter={"type": "lora", "prefix_init": "random"})
    assert "adapter.prefix_init" in message


@pytest.mark.parametrize("adapter", [
    {"type": "prompt_tuning", "num_virtual_tokens": 4},
    {"type": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
    {"type": "prefix_tuning", "num_virtual_tokens": 4, "prefix_init": "random"},
], ids=["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_soft_prompt_answers_are_the_forwards_greedy_answers(tmp_path, smol_tokenizer, small_sft_file, adapter):
    """Found on the CPU matrix: PEFT's generate for prompt-learning models gave answers that were not the model's
    (a prefix-tuned run answered as its base). generate_answers (eval, generate, chat) now goes through
    library_fixes.soft_prompt_generate; its batched, left-padded answers must equal a greedy loop over the model's
    own forward, one prompt at a time, without a cache."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.adapter_peft import apply_peft_type
    from tuneforge.evaluate.generation import generate_answers

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.2, pad_token_id=smol_tokenizer.pad_token_id,
                         eos_token_id=smol_tokenizer.eos_token_id, bos_token_id=smol_tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    smol_tokenizer.save_pretrained(tmp_path / "model")
    spec = _parse(tmp_path / "model", small_sft_file, adapter=adapter).adapter
    torch.manual_seed(1)
    model = apply_peft_type(LlamaForCausalLM.from_pretrained(tmp_path / "model"), spec).eval()
    prompts = ["hello there", "Extract the order as JSON: Anna from Oslo wants 3 mugs.", "2+2?"]
    answers = generate_answers(model, smol_tokenizer, prompts, max_new_tokens=6)
    for prompt, answer in zip(prompts, answers):
        ids = smol_tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        start = ids.shape[1]
        with torch.no_grad():
            for _ in range(6):
                step = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
                ids = torch.cat([ids, step.view(1, 1)], dim=1)
                if step.item() == smol_tokenizer.eos_token_id:
                    break
        assert answer == smol_tokenizer.decode(ids[0, start:], skip_special_tokens=True), prompt
    assert len(set(answers)) > 1  # the answers depend on the prompt: the check is not comparing constants
