"""Many processes through accelerate launch, on CPU (gloo): `tuneforge train --cpu-processes 2`.

Pinned: for the same global batch and seed, 2 processes (per-device batch halved) log the same per-step losses as
1 process within LOSS_TOL (measured: <= 2e-6 on the tiny model, fp32), for LoRA and full fine-tuning. FSDP cannot
run on CPU through accelerate (it only selects FSDP over GPU process groups), so its mapping onto
TrainingArguments is tested instead, and the CPU launch of fsdp is refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from conftest import read_metrics, tiny_recipe, kill_job

LOSS_TOL = 1e-4


def _recipe_file(tmp_path, tiny_model_dir, small_sft_file, adapter_type, **train):
    adapter = {"type": adapter_type, **({"dropout": 0.0} if adapter_type != "full" else {})}  # full reads no dropout
    recipe = tiny_recipe(tiny_model_dir, small_sft_file, adapter=adapter,
                         train={"max_steps": 4, "batch_size": 2, "lr": 1e-3, "optimizer": "adamw_torch", **train},
                         eval={"baseline": False, "forgetting": False, "max_examples": 1, "max_new_tokens": 2})
    path = tmp_path / f"{adapter_type}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _train(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "tuneforge", "train", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _losses(run_path):
    return {row["step"]: row["loss"] for row in read_metrics(run_path) if "loss" in row}


@pytest.mark.parametrize("adapter_type", ["lora", "full"])
def test_two_processes_match_one(tmp_path, tiny_model_dir, small_sft_file, adapter_type):
    recipe = _recipe_file(tmp_path, tiny_model_dir, small_sft_file, adapter_type)
    one = _train(recipe, "--no-doctor", "--output", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _train(recipe, "--no-doctor", "--output", tmp_path / "two", "--cpu-processes", 2,
                 "--set", "train.batch_size=1")  # same global batch: 2 processes x 1
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= LOSS_TOL, (step, a[step], b[step])
    run = tmp_path / "two"
    assert (run / "adapter" if adapter_type == "lora" else run / "model").is_dir()
    assert '"completed"' in (run / "status.json").read_text()
    assert yaml.safe_load((run / "recipe.yaml").read_text())["distributed"]["strategy"] == "ddp"
    assert yaml.safe_load((run / "accelerate_config.yaml").read_text())["num_processes"] == 2
    # one row per logged step: only rank 0 writes metrics
    steps = [row["step"] for row in read_metrics(run) if "loss" in row]
    assert steps == sorted(set(steps))


FAIL_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import tuneforge.methods.common as common
    from tuneforge.errors import RecipeError

    def broken(*args, **kwargs):
        raise RecipeError(["boom on purpose in rank 1"])

    common.common_arguments = broken
    import tuneforge.methods.sft as sft
    sft.common_arguments = broken
"""


def test_error_on_one_rank_stops_all_and_names_it(tmp_path, tiny_model_dir, small_sft_file):
    recipe = _recipe_file(tmp_path, tiny_model_dir, small_sft_file, "lora")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_ON_RANK_1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    started = time.time()
    proc = _train(recipe, "--no-doctor", "--output", tmp_path / "run", "--cpu-processes", 2, timeout=180, env=env)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "rank 1:" in proc.stderr and "boom on purpose in rank 1" in proc.stderr
    assert time.time() - started < 180
    assert '"failed"' in (tmp_path / "run" / "status.json").read_text()


def test_resume_under_two_processes_continues_with_same_losses(tmp_path, tiny_model_dir, small_sft_file):
    recipe = _recipe_file(tmp_path, tiny_model_dir, small_sft_file, "lora", max_steps=30, batch_size=1, save_every=3)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _train(recipe, "--no-doctor", "--output", straight, "--cpu-processes", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(recipe), "--no-doctor", "--output",
                             str(killed), "--cpu-processes", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = killed / "checkpoints" / "checkpoint-6" / "trainer_state.json"
    deadline = time.time() + 200
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    kill_job(proc.pid)
    proc.wait()
    assert marker.exists()
    assert '"completed"' not in (killed / "status.json").read_text()
    resumed = _train("--resume", killed, "--cpu-processes", 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _losses(straight), _losses(killed)
    assert sorted(a) == sorted(b) and max(a) == 30
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_print_launch_prints_commands_and_runs_nothing(tmp_path, tiny_model_dir, small_sft_file):
    recipe = _recipe_file(tmp_path, tiny_model_dir, small_sft_file, "lora")
    proc = _train(recipe, "--output", tmp_path / "run", "--cpu-processes", 2, "--print-launch", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "accelerate launch" in proc.stdout and "torchrun" in proc.stdout and "--nproc_per_node=2" in proc.stdout
    assert "distributed.strategy=ddp" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_bad_combinations_name_their_key(tmp_path, tiny_model_dir, small_sft_file):
    recipe = _recipe_file(tmp_path, tiny_model_dir, small_sft_file, "lora")
    cases = [
        (["--set", "distributed.strategy=fsdp"], "`distributed.strategy`: fsdp needs CUDA"),
        (["--set", "distributed.strategy=deepspeed"], "`distributed.strategy`: deepspeed"),
        (["--set", "distributed.cpu_offload=true"], "`distributed.cpu_offload`: only applies to fsdp or deepspeed"),
    ]
    for extra, message in cases:
        proc = _train(recipe, "--cpu-processes", 2, "--print-launch", *extra, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (extra, proc.stderr)
    proc = _train(recipe, "--gpus", 2, timeout=60)
    assert proc.returncode == 2 and "--cpu-processes 2" in proc.stderr


def test_mapping_onto_training_arguments(monkeypatch, tiny_model_dir, small_sft_file):
    """FSDP2 / DeepSpeed / DDP settings as TrainingArguments receives them (FSDP itself needs GPUs)."""
    from tuneforge import distributed
    from tuneforge.recipe import parse_recipe

    def recipe(adapter="lora", **dist):
        return parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, adapter={"type": adapter}, distributed=dist))

    assert distributed.training_arguments(recipe(), "cpu") == {}  # not launched: single-process path unchanged
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ddp = distributed.training_arguments(recipe(strategy="ddp"), "cpu")
    assert ddp["ddp_backend"] == "gloo" and ddp["ddp_find_unused_parameters"] is False
    fsdp = distributed.training_arguments(recipe(strategy="fsdp", activation_checkpointing=True), "cuda")
    assert fsdp["fsdp"] == "full_shard" and fsdp["ddp_backend"] == "nccl"
    config = fsdp["fsdp_config"]
    assert config["version"] == 2 and config["reshard_after_forward"] is True
    assert config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and config["activation_checkpointing"] is True
    assert config["state_dict_type"] == "FULL_STATE_DICT"
    assert not any(v for k, v in fsdp.items() if k in ("gradient_checkpointing", "activation_checkpointing"))
    grad_op = distributed.training_arguments(recipe(strategy="fsdp", sharding="grad_op", cpu_offload=True), "cuda")
    assert grad_op["fsdp_config"]["reshard_after_forward"] is False and grad_op["fsdp_config"]["cpu_offload"] is True
    ds = distributed.deepspeed_config(recipe(strategy="deepspeed", cpu_offload=True), sharding="full")
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert distributed.deepspeed_config(recipe(strategy="deepspeed"), sharding="grad_op")["zero_optimization"]["stage"] == 2
    # the TrainingArguments accept the FSDP mapping (checked without building a process group)
    from transformers import TrainingArguments

    fields = set(TrainingArguments.__dataclass_fields__)
    assert set(fsdp) <= fields and set(ddp) <= fields
    problems = distributed.check_distributed(recipe("qlora", strategy="fsdp", cpu_offload=True), strategy="fsdp",
                                             device="cuda")
    assert any("`distributed.cpu_offload`" in p for p in problems)
    assert any("hybrid" in p for p in distributed.check_distributed(recipe(strategy="fsdp", sharding="hybrid"),
                                                                    strategy="fsdp", device="cuda"))


def test_quant_storage_follows_the_strategy(monkeypatch):
    import torch

    from tuneforge import distributed

    monkeypatch.delenv(distributed.ENV_STRATEGY, raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert distributed.quant_storage_dtype(torch.bfloat16) == torch.uint8
    monkeypatch.setenv(distributed.ENV_STRATEGY, "fsdp")
    assert distributed.quant_storage_dtype(torch.bfloat16) == torch.bfloat16


def test_strategy_auto_follows_the_memory_plan(tiny_model_dir, small_sft_file):
    from tuneforge import distributed
    from tuneforge.recipe import parse_recipe

    r = parse_recipe(tiny_recipe(tiny_model_dir, small_sft_file, adapter={"type": "full"}))
    assert distributed.resolve_strategy(r, device="cuda", gpu_memory_gib=80)[0] == "ddp"
    assert distributed.resolve_strategy(r, device="cuda", gpu_memory_gib=0.001)[0] == "fsdp"
    assert distributed.resolve_strategy(r, device="cpu")[0] == "ddp"


def test_gpus_n_makes_only_the_first_n_gpus_visible(monkeypatch):
    """--gpus 1 on a 2-GPU machine: one process that sees one GPU (else the Trainer wraps it in nn.DataParallel,
    which TRL refuses; found by the two-GPU run)."""
    import torch

    from tuneforge.distributed import DistributedPlan, child_environment

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    one = child_environment(DistributedPlan(processes=1, device="cuda", strategy="ddp", sharding=None), "/tmp/e", None)
    assert one["CUDA_VISIBLE_DEVICES"] == "0"
    both = child_environment(DistributedPlan(processes=2, device="cuda", strategy="ddp", sharding=None), "/tmp/e", None)
    assert "CUDA_VISIBLE_DEVICES" not in both
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the user's choice is kept
    assert child_environment(DistributedPlan(processes=1, device="cuda", strategy="ddp", sharding=None), "/tmp/e",
                             None)["CUDA_VISIBLE_DEVICES"] == "1"
