"""Shared fixtures: the embedded model's tokenizer and a tiny random Llama built from a config (milliseconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Tiny models gain nothing from threads; on a loaded 2-core machine, threads make them slower. Subprocesses keep
# torch's default (the embedded-model end-to-end test wants both cores).
import torch

torch.set_num_threads(1)

QUICKSTART = Path(__file__).resolve().parent.parent / "data" / "quickstart"

# Tests that wait on real processes -- servers, a browser, sandboxed programs with timeouts, SIGKILLed and resumed
# runs, multi-process launches, Flower, llama.cpp, the embedded-model end-to-end runs (which want both cores) --
# are marked `serial`: scripts/test.sh runs them alone, after the rest has run on two workers (a second worker
# beside them on a 2-core machine starved them: timeouts). Whole files, and single tests of other files.
SERIAL_FILES = {"test_board.py", "test_serve.py", "test_federated.py", "test_federated_deployment.py",
                "test_distributed.py", "test_sandbox.py", "test_metrics.py", "test_rewards.py", "test_rate.py",
                "test_judge.py", "test_end_to_end.py", "test_export.py", "test_faults.py", "test_reliability.py",
                "test_guards.py", "test_resume.py", "test_real_data.py", "test_merge_and_cli.py", "test_recipe.py"}
SERIAL_TESTS = {"test_adapter_types.py::test_sigkill_then_resume_matches_uninterrupted"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        file = Path(str(item.fspath)).name
        if file in SERIAL_FILES or f"{file}::{item.originalname}" in SERIAL_TESTS:
            item.add_marker(pytest.mark.serial)


@pytest.fixture(scope="session")
def smol_tokenizer():
    from tuneforge.models import load_tokenizer

    return load_tokenizer("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A 2-layer, 64-dim Llama with the SmolLM2 tokenizer and chat template, random weights, seed 0."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small_sft_file(tmp_path_factory) -> Path:
    """32 quickstart examples (chat messages)."""
    lines = (QUICKSTART / "train.jsonl").read_text(encoding="utf-8").splitlines()[:32]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_recipe(model_dir, data_file, **sections) -> dict:
    """A recipe dict for a few fast steps on the tiny model; `sections` override whole keys, e.g.
    adapter={"type": "full"} or train={"max_steps": 2}. The general probe is off (eval={"forgetting": True} for it)."""
    recipe = {
        "name": "tiny",
        "model": str(model_dir),
        "data": {"train": str(data_file), "eval_fraction": 0.2},
        "adapter": {"type": "lora"},
        "train": {"max_steps": 3, "batch_size": 4, "grad_accum": 1, "max_length": 128, "seed": 0, "warmup": 0},
        # the general-ability probe (536 items before and after) is a third of a tiny run: tests that are about it
        # ask for it (eval={"forgetting": True})
        "eval": {"max_examples": 4, "max_new_tokens": 8, "batch_size": 4, "forgetting": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def read_metrics(run_path: Path) -> list[dict]:
    return [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines() if line.strip()]


def kill_job(pid: int) -> None:
    """SIGKILL a launched job the way a machine crash would: the process group started for it and every process
    descended from it (torch's launcher starts each rank in its own session, outside the launcher's group, so
    killing the group alone would leave the ranks training on)."""
    import os
    import signal

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for process in tree:
        try:
            os.kill(process, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_cli(monkeypatch, capsys, *args, with_stdout: bool = False) -> tuple[int, str]:
    """Run `tuneforge ARGS` in this process (so monkeypatched faults apply): the exit code and what it printed to
    stderr (and stdout, with_stdout) as one line."""
    import sys

    from tuneforge import cli

    monkeypatch.setenv("COLUMNS", "400")
    # the CLI's consoles read COLUMNS once, when tuneforge.cli is first imported (maybe by an earlier test, narrower):
    # wide for this call, so rich does not fold long temporary paths across lines
    for console in (cli.console, cli.err_console):
        monkeypatch.setattr(console, "_width", 400)
    monkeypatch.setattr(sys, "argv", ["tuneforge", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, " ".join((captured.err + (captured.out if with_stdout else "")).split())
