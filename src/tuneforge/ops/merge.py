"""Merge a LoRA/QLoRA adapter into its base model, producing an ordinary checkpoint.

For a QLoRA run the base is reloaded un-quantized (bf16 on GPU, fp32 on CPU) before merging: merging into 4-bit
weights would round the update away and bake quantization error into the result (seed 002/004 warning).
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.errors import RunDirError


def merge_run(run_dir: str, output: str, *, dtype: str = "auto", overwrite: bool = False) -> Path:
    from peft import PeftModel

    from tuneforge.data.template import align_eos
    from tuneforge.models import load_base_model, load_tokenizer, resolve_dtype
    from tuneforge.recipe import load_recipe
    from tuneforge.run import open_run

    run = open_run(run_dir)
    target = Path(output)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise RunDirError(f"{target} already exists", fix="pass --overwrite or choose another --output")
    recipe = load_recipe(run.path / "recipe.yaml")
    if not recipe.uses_lora:
        raise RunDirError(f"{run.path} is a full fine-tuning run; its model/ folder is already a merged checkpoint",
                          fix=f"use {run.weights_dir} directly")
    # Always the un-quantized base, on CPU, in a float dtype.
    base = load_base_model(recipe.model, quant=None, device="cpu",
                           dtype=resolve_dtype("float32" if dtype == "auto" else dtype, "cpu"))
    model = PeftModel.from_pretrained(base, str(run.weights_dir)).merge_and_unload()
    tokenizer = load_tokenizer(str(run.weights_dir))
    from transformers import GenerationConfig

    if (run.weights_dir / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(run.weights_dir))
    align_eos(tokenizer, model)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return target
