"""Safe loading (safetensors only unless allowed) and secrets never written into a run directory."""

from __future__ import annotations

import os

import pytest
from rich.console import Console

from conftest import tiny_recipe
from tuneforge.errors import ModelError
from tuneforge.models import load_base_model
from tuneforge.recipe import ModelSection, parse_recipe
from tuneforge.train import train


def test_pickle_weights_need_explicit_flag(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    import torch

    (tmp_path / "pickled").mkdir()
    model.config.save_pretrained(tmp_path / "pickled")
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    assert list((tmp_path / "pickled").glob("*.bin"))
    with pytest.raises(ModelError, match="allow_pickle"):
        load_base_model(ModelSection(name=str(tmp_path / "pickled")), device="cpu")
    loaded = load_base_model(ModelSection(name=str(tmp_path / "pickled"), allow_pickle=True), device="cpu")
    assert loaded.num_parameters() == model.num_parameters()


def test_planted_secret_never_reaches_the_run_directory(tmp_path, tiny_model_dir, small_sft_file, monkeypatch):
    secret = "hf_PLANTEDsecret0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    recipe = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, train={"max_steps": 1}))
    run = train(recipe, output=str(tmp_path / "run"), console=Console(quiet=True), doctor=False)
    hits = [p for p in run.path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert hits == []
    assert os.environ["HF_TOKEN"] == secret  # the run did not need to unset it
