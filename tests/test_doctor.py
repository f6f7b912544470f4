"""`tuneforge doctor`: every deliberately broken recipe under tests/broken/ gets its finding, the clean one none.

Each recipe there names what it expects in a header line (`# doctor-expects: CODE SEVERITY`) and, when the mistake
depends on the hardware, the GPU to check for (`# doctor-device: H100`). Every one is a real recipe: the doctor
reads the Recipe's attributes, so the checks below build real recipes too (`fake_recipe`: parse_recipe over a base).
"""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuneforge.errors import RecipeError
from tuneforge.guide.doctor import (
    CHECKS,
    Context,
    DoctorError,
    Finding,
    device_from_gpu,
    doctor_recipe,
    raise_for_errors,
    render_findings,
    check_preference_start,
    needs_sft_start,
    run_doctor,
)
from tuneforge.methods import method_names, method_spec, methods_in
from tuneforge.recipe import parse_recipe

BROKEN = Path(__file__).parent / "broken"
CPU = {"type": "cpu", "name": "CPU", "bf16": False, "count": 1}


def header(path: Path, key: str) -> str | None:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(f"# {key}:"):
            return line.split(":", 1)[1].strip()
    return None


def expectation(path: Path) -> tuple[str, str | None]:
    value = header(path, "doctor-expects")
    assert value, f"{path.name} has no '# doctor-expects:' line"
    if value == "none":
        return "none", None
    code, severity = value.split()
    return code, severity


def device_for(path: Path) -> dict:
    gpu = header(path, "doctor-device")
    return device_from_gpu(gpu) if gpu else CPU


def codes(findings) -> list[tuple[str, str]]:
    return [(f.code, f.severity) for f in findings]


BROKEN_RECIPES = sorted(p for p in BROKEN.glob("*.yaml") if p.name != "clean.yaml")


def test_every_mistake_of_the_issue_has_a_broken_recipe():
    expected = {expectation(p)[0] for p in BROKEN_RECIPES}
    issue = {"lr-out-of-range", "no-validation-set", "train-eval-overlap", "no-chat-template", "chat-template-mismatch",
             "prompt-loss-not-masked", "dpo-without-sft", "new-tokens-without-modules-to-save", "fp32-on-bf16-gpu",
             "fp16-on-bf16-gpu", "qlora-optimizer", "target-modules-not-found",
             "max-length-truncates", "packing-conflict", "pad-is-eos", "too-many-epochs", "effective-batch-size",
             "warmup-missing", "duplicate-examples", "eval-set-too-small"}
    assert issue <= expected, f"no broken recipe for {sorted(issue - expected)}"


@pytest.mark.parametrize("path", BROKEN_RECIPES, ids=lambda p: p.stem)
def test_broken_recipe_is_flagged(path, monkeypatch):
    monkeypatch.chdir(BROKEN)
    code, severity = expectation(path)
    findings = doctor_recipe(path.name, device_info=device_for(path))
    assert (code, severity) in codes(findings), f"{path.name}: expected {code} ({severity}), got {codes(findings)}"
    finding = next(f for f in findings if f.code == code and f.severity == severity)
    assert finding.message and finding.why and finding.fix and finding.where


@pytest.mark.parametrize("device", [None, "H100", "T4"])
def test_clean_recipe_passes(device, monkeypatch):
    monkeypatch.chdir(BROKEN)
    findings = doctor_recipe("clean.yaml", device_info=device_from_gpu(device) if device else CPU)
    assert [f for f in findings if f.severity != "info"] == [], codes(findings)


def test_quickstart_recipe_has_no_error():
    root = Path(__file__).parents[1]
    findings = doctor_recipe(root / "recipes" / "quickstart.yaml", device_info=CPU)
    assert [f for f in findings if f.severity == "error"] == [], codes(findings)


# ---------------------------------------------------------------------------------------------------------------
# Checks on recipes alone (no model, no data)


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def fake_recipe(**sections):
    """A real Recipe: the base below with `sections` merged over it, validated by the schema."""
    base = {
        "name": "x", "method": "sft",
        "model": {"name": "embedded:smollm2-135m-instruct", "dtype": "auto", "chat_template": None, "trust_remote_code": False},
        "data": {"train": "t.jsonl", "eval": "e.jsonl", "eval_fraction": 0.1, "dedup": True},
        "adapter": {"type": "lora", "r": 16, "dropout": 0.05, "target_modules": "all-linear", "modules_to_save": []},
        "quant": {"bits": 4, "compute_dtype": "auto"},
        "train": {"lr": 2e-4, "epochs": 1, "max_steps": None, "batch_size": 4, "grad_accum": 4, "warmup": 0.03,
                  "scheduler": "cosine", "max_length": 1024, "packing": False, "precision": "auto",
                  "optimizer": "adamw_torch", "gradient_checkpointing": False, "eval_every": None},
        "eval": {"max_examples": 100},
    }
    return parse_recipe(merge(base, sections))


def test_recipe_alone_is_clean():
    assert run_doctor(fake_recipe()) == []


def test_every_check_tolerates_missing_inputs():
    for check in CHECKS:
        assert list(check(Context(recipe=fake_recipe()))) == [], check.__name__
    assert run_doctor(fake_recipe(), device_info=CPU) == []


@pytest.mark.parametrize("method,adapter,lr,expected", [
    ("sft", "lora", 2e-4, None), ("sft", "lora", 1e-3, None), ("sft", "lora", 2e-3, "warning"),
    ("sft", "lora", 5e-2, "error"), ("sft", "full", 2e-5, None), ("sft", "full", 2e-4, "warning"),
    ("sft", "full", 2e-3, "error"), ("dpo", "full", 5e-7, None), ("dpo", "full", 2e-5, "warning"),
    ("dpo", "full", 1e-4, "error"), ("dpo", "lora", 5e-6, None), ("kto", "qlora", 5e-7, None),
])
def test_learning_rate_ranges(method, adapter, lr, expected):
    recipe = fake_recipe(method=method, adapter={"type": adapter}, train={"lr": lr, "optimizer": "paged_adamw_8bit"})
    found = [f.severity for f in run_doctor(recipe) if f.code == "lr-out-of-range"]
    assert found == ([expected] if expected else [])


def test_dpo_without_sft_start_depends_on_the_evidence():
    base = fake_recipe(method="dpo", model={"name": "meta-llama/Llama-3.1-8B"}, train={"lr": 5e-7})
    no_template = SimpleNamespace(chat_template=None, pad_token_id=None, eos_token_id=None)
    assert ("dpo-without-sft", "warning") in codes(run_doctor(base))  # no tokenizer: unsure, so a warning
    with_stage = fake_recipe(method="dpo", stages=[{"name": "sft", "method": "sft", "train": {"lr": 2e-4}}, {"name": "dpo"}],
                             model={"name": "meta-llama/Llama-3.1-8B"}, train={"lr": 5e-7})
    assert "dpo-without-sft" not in [f.code for f in run_doctor(with_stage)]
    instruct = fake_recipe(method="kto", model={"name": "meta-llama/Llama-3.1-8B-Instruct"}, train={"lr": 5e-7})
    assert "dpo-without-sft" not in [f.code for f in run_doctor(instruct)]
    orpo = fake_recipe(method="orpo", model={"name": "meta-llama/Llama-3.1-8B"}, train={"lr": 5e-7})
    assert "dpo-without-sft" not in [f.code for f in run_doctor(orpo)]  # ORPO starts from a base by design
    assert [f.severity for f in check_preference_start(Context(recipe=base, tokenizer=no_template))] == ["error"]


def test_method_lists_come_from_the_registry():
    # preference methods but orpo (its loss includes SFT) and every RL method start from an SFT model
    expected = (set(methods_in("preference")) - {"orpo"}) | set(methods_in("rl"))
    assert {m for m in method_names() if needs_sft_start(m)} == expected
    # the range and the rate to start from are the method's own, for RL methods too
    low, high = method_spec("grpo").lr_range_for("full")
    found = run_doctor(fake_recipe(method="grpo", adapter={"type": "full"}, train={"lr": high * 2},
                                   rl={"rewards": [{"name": "exact_answer"}]}, model={"name": "x-instruct"}))
    lr = next(f for f in found if f.code == "lr-out-of-range")
    assert lr.severity == "warning" and f"{high:g}" in lr.message and "start at 1e-6" in lr.fix
    dpo = next(f for f in run_doctor(fake_recipe(method="dpo", adapter={"type": "lora"}, train={"lr": 1e-3},
                                                 model={"name": "x-instruct"})) if f.code == "lr-out-of-range")
    assert "start at 5e-6" in dpo.fix and "preference methods" in dpo.why
    sft = next(f for f in run_doctor(fake_recipe(train={"lr": 5e-2})) if f.code == "lr-out-of-range")
    assert "start at 2e-4" in sft.fix and "for lora" in sft.message


@pytest.mark.parametrize("method,extra", [
    ("grpo", {"rl": {"rewards": [{"name": "exact_answer"}]}}),  # prompts
    ("reward", {}),  # pairs
    ("dpo", {}),  # pairs
    ("sft", {}),  # conversations
])
def test_missing_data_is_a_finding_for_every_data_kind(method, extra, tmp_path, monkeypatch):
    import yaml

    monkeypatch.chdir(BROKEN)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "model": "embedded:smollm2-135m-instruct", "method": method,
                                      "data": {"train": "datasets/missing.jsonl"}, **extra}))
    assert ("data-error", "error") in codes(doctor_recipe(recipe, device_info=CPU))


def test_reward_data_is_prepared_as_pairs(tmp_path, monkeypatch):
    monkeypatch.chdir(BROKEN)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: embedded:smollm2-135m-instruct\nmethod: reward\n"
                      "data:\n  train: datasets/prefs-train.jsonl\n")
    found = doctor_recipe(recipe, device_info=CPU)
    assert "data-error" not in [f.code for f in found], codes(found)


def test_preference_method_epochs_and_packing():
    recipe = fake_recipe(method="dpo", model={"name": "x-instruct"}, train={"lr": 5e-7, "epochs": 4, "packing": True})
    found = codes(run_doctor(recipe))
    assert ("too-many-epochs", "warning") in found and ("packing-conflict", "error") in found


def test_schedule_and_batch_checks():
    assert ("warmup-missing", "warning") in codes(run_doctor(fake_recipe(train={"scheduler": "constant"})))
    assert ("warmup-missing", "warning") in codes(run_doctor(fake_recipe(train={"warmup": 0})))
    assert ("effective-batch-size", "warning") in codes(run_doctor(fake_recipe(train={"batch_size": 16, "grad_accum": 16})))
    two_gpus = {**device_from_gpu("H100", count=8)}
    assert ("effective-batch-size", "warning") in codes(run_doctor(fake_recipe(train={"batch_size": 8, "grad_accum": 4}),
                                                                   device_info=two_gpus))
    assert ("too-many-epochs", "warning") in codes(run_doctor(fake_recipe(train={"epochs": 12})))


def test_precision_by_device():
    fp16 = fake_recipe(train={"precision": "fp16"})
    assert "fp16-on-bf16-gpu" not in [f.code for f in run_doctor(fp16, device_info=device_from_gpu("T4"))]
    bf16 = fake_recipe(train={"precision": "bf16"})
    assert ("bf16-unsupported", "error") in codes(run_doctor(bf16, device_info=device_from_gpu("T4")))
    assert run_doctor(bf16, device_info=device_from_gpu("H100")) == []
    weights_fp32 = fake_recipe(model={"dtype": "float32"})
    assert ("fp32-on-bf16-gpu", "warning") in codes(run_doctor(weights_fp32, device_info=device_from_gpu("L4")))
    qlora_cpu = fake_recipe(adapter={"type": "qlora"}, train={"optimizer": "paged_adamw_8bit"})
    assert ("qlora-on-cpu", "warning") in codes(run_doctor(qlora_cpu, device_info=CPU))


def test_qlora_checks():
    good = fake_recipe(adapter={"type": "qlora"}, train={"optimizer": "paged_adamw_8bit"})
    assert run_doctor(good, device_info=device_from_gpu("L4")) == []
    plain = fake_recipe(adapter={"type": "qlora"}, train={"optimizer": "adamw_torch"})
    assert ("qlora-optimizer", "warning") in codes(run_doctor(plain, device_info=device_from_gpu("L4")))


def test_memory_check_uses_the_plan():
    from tuneforge.guide.plan import reference_config

    config = reference_config("llama-8b")
    full = fake_recipe(adapter={"type": "full"}, train={"lr": 2e-5, "max_length": 2048})
    assert ("memory-does-not-fit", "warning") in codes(run_doctor(full, model_config=config, device_info=device_from_gpu("L4")))
    qlora = fake_recipe(adapter={"type": "qlora"}, train={"optimizer": "paged_adamw_8bit", "max_length": 1024,
                                                          "batch_size": 1, "grad_accum": 16, "gradient_checkpointing": True})
    assert "memory-does-not-fit" not in [f.code for f in run_doctor(qlora, model_config=config, device_info=device_from_gpu("L4"))]


def test_target_modules_on_a_config_without_weights(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    ok = fake_recipe(adapter={"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]})
    assert run_doctor(ok, model_config=config) == []
    regex = fake_recipe(adapter={"target_modules": r".*\.(q_proj|v_proj)"})
    assert run_doctor(regex, model_config=config) == []
    blocks = fake_recipe(adapter={"target_modules": ["self_attn"]})
    found = run_doctor(blocks, model_config=config)
    assert ("target-modules-not-found", "error") in codes(found)
    assert "q_proj" in next(f.fix for f in found if f.code == "target-modules-not-found")
    missing_save = fake_recipe(adapter={"modules_to_save": ["classifier"]})
    assert ("target-modules-not-found", "error") in codes(run_doctor(missing_save, model_config=config))


def test_pad_eos_is_a_note(monkeypatch):
    from tuneforge.models import load_tokenizer

    monkeypatch.chdir(BROKEN)
    tokenizer = load_tokenizer("models/pad-eos")
    safe = run_doctor(fake_recipe(model={"name": "models/pad-eos"}), tokenizer=tokenizer)
    assert ("pad-is-eos", "info") in codes(safe)  # tuneforge masks padding by position: safe, worth knowing


def test_where_points_at_the_recipe_line(monkeypatch):
    monkeypatch.chdir(BROKEN)
    findings = doctor_recipe("lr-full-too-high.yaml", device_info=CPU)
    lr = next(f for f in findings if f.code == "lr-out-of-range")
    text = (BROKEN / "lr-full-too-high.yaml").read_text().splitlines()
    line = next(i for i, t in enumerate(text, 1) if t.strip().startswith("lr:"))
    assert lr.where == f"`train.lr` (lr-full-too-high.yaml:{line})"
    findings = doctor_recipe("warmup-missing.yaml", device_info=CPU)
    assert any("warmup-missing.yaml:" in f.where for f in findings)
    defaulted = doctor_recipe("new-tokens-without-modules-to-save.yaml", device_info=CPU)
    assert "default, not set" in next(f.where for f in defaulted if f.code == "new-tokens-without-modules-to-save")


def test_unreadable_model_and_data_become_findings(tmp_path, monkeypatch):
    monkeypatch.chdir(BROKEN)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: embedded:smollm2-135m-instruct\ndata:\n  train: datasets/missing.jsonl\n")
    found = doctor_recipe(recipe, device_info=CPU)
    assert ("data-error", "error") in codes(found)
    recipe.write_text("name: r\nmodel: ./no/such/model\ndata:\n  train: datasets/clean-train.jsonl\n")
    assert ("model-unreadable", "error") in codes(doctor_recipe(recipe, device_info=CPU))


def test_finding_rendering_and_raising():
    from rich.console import Console

    findings = [Finding("error", "x-code", "it is wrong", "because", "change it", "`a.b` (r.yaml:3)"),
                Finding("warning", "y-code", "hm", "maybe", "look", "")]
    buffer = io.StringIO()
    render_findings(Console(file=buffer, width=200), findings)
    text = buffer.getvalue()
    assert "x-code" in text and "because" in text and "change it" in text and "r.yaml:3" in text
    assert "1 error(s), 1 warning(s)" in text
    with pytest.raises(DoctorError) as excinfo:
        raise_for_errors(findings)
    assert excinfo.value.exit_code == 2 and "x-code" in str(excinfo.value) and "--no-doctor" in str(excinfo.value)
    raise_for_errors(findings[1:])  # warnings alone do not stop a run
    with pytest.raises(ValueError):
        Finding("fatal", "c", "m", "w", "f")


def test_lora_rank_against_the_adapted_layers():
    """adapter.r above the smallest adapted layer's min(in, out) is an error naming the rank and the layer; only the
    layers target_modules adapts count (q_proj is 64 x 64, k_proj 32 x 64 in this config)."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    ok = fake_recipe(adapter={"r": 32})
    assert "lora-rank-too-large" not in [f.code for f in run_doctor(ok, model_config=config)]
    too_large = run_doctor(fake_recipe(adapter={"r": 48}), model_config=config)
    finding = next(f for f in too_large if f.code == "lora-rank-too-large")
    assert finding.severity == "error" and "adapter.r = 48" in finding.message and "32 x 64" in finding.message
    assert "at most 32" in finding.fix and "adapter.r" in finding.where
    only_q = fake_recipe(adapter={"r": 48, "target_modules": ["q_proj"]})
    assert "lora-rank-too-large" not in [f.code for f in run_doctor(only_q, model_config=config)]
    full = fake_recipe(adapter={"type": "full"}, train={"lr": 2e-5})  # no LoRA rank to check
    assert "lora-rank-too-large" not in [f.code for f in run_doctor(full, model_config=config)]
    with pytest.raises(RecipeError, match="adapter.r"):  # a rank given to full fine-tuning is refused by the schema
        fake_recipe(adapter={"type": "full", "r": 48}, train={"lr": 2e-5})
