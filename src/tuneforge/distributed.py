"""Many GPUs: the same recipe on N processes, through `accelerate launch` and the HF Trainer's own accelerate
integration. tuneforge writes no all-reduce, sharding or launcher of its own; it only

1. resolves the recipe's `distributed:` section (strategy, sharding, offload, checkpointing, precision) and
   refuses combinations that cannot work, naming the key (`check_distributed`);
2. writes an accelerate config file and starts `python -m accelerate.commands.launch ... -m tuneforge train`
   (`launch`), or prints that command and its torchrun equivalent (`launch_commands`) for clusters;
3. maps the section onto TrainingArguments fields (`training_arguments`): ddp_backend and
   ddp_find_unused_parameters for DDP, `fsdp` + `fsdp_config` (FSDP2) for FSDP, a `deepspeed` config dict;
4. keeps side effects on rank 0 (`is_main_process`, in ranks.py) and turns an error on any rank into one line
   naming the rank (`record_rank_error` in the ranks -- ranks.py --, `rank_errors` in the launcher).

Recipe keys read: distributed.strategy, distributed.sharding, distributed.cpu_offload,
distributed.activation_checkpointing, distributed.mixed_precision; adapter.type, train.gradient_checkpointing,
train.precision, train.batch_size, train.max_length (for the memory plan behind `strategy: auto`).
Refused: deepspeed when it is not installed or on CPU; fsdp/deepspeed settings under ddp; hybrid sharding on
one machine or under deepspeed; QLoRA with cpu_offload, or QLoRA sharded on CPU; more GPUs than the machine has.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.errors import RecipeError
# The rank helpers live in ranks.py (a bottom-layer module anyone may import); re-exported here for the callers that
# still import them from distributed.
from tuneforge.ranks import (  # noqa: F401
    ENV_ERROR_DIR,
    ENV_PREPARED_RUN,
    ENV_STRATEGY,
    allow_training_wrap_after_evaluate,
    is_launched,
    is_main_process,
    quant_storage_dtype,
    rank,
    record_rank_error,
    world_size,
)


# ---------------------------------------------------------------------------------------------------------------
# Resolving and checking the recipe's section


@dataclass
class DistributedPlan:
    processes: int
    device: str  # cuda | cpu
    strategy: str  # ddp | fsdp | deepspeed
    sharding: str | None  # full | grad_op | hybrid (None under ddp)
    reason: str = ""
    overrides: list[str] = field(default_factory=list)  # --set items that pin the resolved choices for the ranks


def resolve_strategy(recipe, *, device: str, gpu_memory_gib: float | None = None) -> tuple[str, str]:
    """strategy: auto -> ddp when the model fits one GPU by the memory plan's estimate (memory.py), else fsdp.
    Returns the strategy and the reason."""
    d = recipe.distributed
    if d.strategy != "auto":
        return d.strategy, "set in the recipe"
    if device != "cuda":
        return "ddp", "CPU processes: DDP (no GPU memory to plan)"
    from tuneforge.memory import GpuSpec, default_gpu, recipe_model_config, verdict_for_recipe
    from tuneforge.models import resolve_model_source

    gpu = default_gpu()
    if gpu_memory_gib is not None:
        gpu = GpuSpec(gpu.name, gpu_memory_gib, gpu.bf16, gpu.tflops)
    try:
        config = recipe_model_config(recipe, resolve_source=resolve_model_source)
    except Exception as exc:  # no config to plan with: DDP is the safe, simple default
        return "ddp", f"model config unavailable for planning ({type(exc).__name__}); DDP"
    # As this plan has always been made: in the GPU's half precision whatever train.precision says, and with the
    # plan's defaults for LoRA dropout, modules_to_save and the QLoRA quantization instead of the recipe's (kept so
    # `auto` picks the same strategy as before; dropping these pins would plan the recipe as `tuneforge plan` does).
    verdict = verdict_for_recipe(recipe, config, gpu=gpu, dtype="bf16" if gpu.bf16 else "fp16", lora_dropout=0.05,
                                 modules_to_save=(), quant_bits=4, double_quant=True)
    need, have = verdict["needed_gib"], verdict["available_gib"]
    if verdict["fits"]:
        return "ddp", f"fits one {gpu.name} (~{need:.1f} of {have:.0f} GiB): DDP"
    return "fsdp", f"does not fit one {gpu.name} (~{need:.1f} of {have:.0f} GiB): FSDP full-shard"


def deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def check_distributed(recipe, *, strategy: str, device: str, processes: int | None = None,
                      available_gpus: int | None = None, nodes: int = 1) -> list[str]:
    """Every problem with the resolved distributed settings, each naming its key. Empty list: fine."""
    d = recipe.distributed
    problems = []
    if processes is not None and device == "cuda" and available_gpus is not None and processes > available_gpus:
        problems.append(f"--gpus {processes}: this machine has {available_gpus} CUDA GPU(s); use --gpus "
                        f"{max(available_gpus, 1)} or launch on a larger machine")
    if strategy == "deepspeed":
        if not deepspeed_available():
            problems.append("`distributed.strategy`: deepspeed is not installed; pip install deepspeed, or use "
                            "strategy: fsdp (same sharding, no extra package)")
        if device != "cuda":
            problems.append("`distributed.strategy`: deepspeed needs CUDA GPUs; on CPU use ddp (or fsdp)")
        if d.sharding == "hybrid":
            problems.append("`distributed.sharding`: hybrid is an FSDP setting; under deepspeed use full (ZeRO-3) "
                            "or grad_op (ZeRO-2)")
    if strategy == "ddp":
        for key, value, default in (("sharding", d.sharding, "auto"), ("cpu_offload", d.cpu_offload, False)):
            if value != default:
                problems.append(f"`distributed.{key}`: only applies to fsdp or deepspeed (strategy is ddp: every GPU "
                                f"holds the whole model); remove it or set distributed.strategy: fsdp")
    if strategy == "fsdp" and device != "cuda":
        # accelerate (1.15) selects FSDP only over GPU process groups; a CPU (MULTI_CPU) run would silently train
        # plain DDP instead, so it is refused here.
        problems.append("`distributed.strategy`: fsdp needs CUDA GPUs (accelerate runs FSDP only on GPU process "
                        "groups; on CPU it would silently fall back to DDP); on CPU use ddp")
    if strategy == "fsdp" and d.sharding == "hybrid" and nodes < 2:
        problems.append("`distributed.sharding`: hybrid shards within a node and replicates across nodes, so it "
                        "needs several machines; on one machine use full")
    if recipe.adapter.type == "qlora" and strategy in ("fsdp", "deepspeed"):
        if d.cpu_offload:
            problems.append("`distributed.cpu_offload`: not with adapter.type qlora (bitsandbytes 4-bit weights "
                            "cannot be offloaded by the sharding engine); turn it off or use adapter.type lora")
        if device != "cuda":
            problems.append(f"`distributed.strategy`: {strategy} with adapter.type qlora needs CUDA GPUs "
                            "(bitsandbytes 4-bit sharding); on CPU use ddp")
    if d.mixed_precision in ("bf16", "fp16") and device != "cuda":
        problems.append(f"`distributed.mixed_precision`: {d.mixed_precision} needs CUDA GPUs; on CPU use no (or auto)")
    return problems


def plan_launch(recipe, *, processes: int, device: str, print_only: bool = False) -> DistributedPlan:
    """Resolve `auto` and check everything before any process starts; raise one RecipeError listing the problems.
    print_only: the command is printed for another machine (a cluster, from a login node), so this machine's GPU
    count is not checked."""
    available = None
    if device == "cuda" and not print_only:
        import torch

        available = torch.cuda.device_count()
    strategy, reason = resolve_strategy(recipe, device=device)
    problems = check_distributed(recipe, strategy=strategy, device=device, processes=processes, available_gpus=available)
    if problems:
        raise RecipeError(problems, source=recipe.source_path)
    sharding = None if strategy == "ddp" else (recipe.distributed.sharding if recipe.distributed.sharding != "auto" else "full")
    overrides = [f"distributed.strategy={strategy}"] + ([f"distributed.sharding={sharding}"] if sharding else [])
    return DistributedPlan(processes=processes, device=device, strategy=strategy, sharding=sharding, reason=reason,
                           overrides=overrides)


# ---------------------------------------------------------------------------------------------------------------
# Recipe -> TrainingArguments


def _activation_checkpointing(recipe) -> bool:
    d = recipe.distributed
    return recipe.train.gradient_checkpointing if d.activation_checkpointing is None else d.activation_checkpointing


def fsdp_config(recipe, *, sharding: str) -> dict:
    """FSDP2 settings as TrainingArguments' `fsdp_config` takes them. The wrap policy is always set (wrap each
    decoder layer, found from the model's `_no_split_modules`): QLoRA under FSDP needs it."""
    config = {
        "version": 2,
        "reshard_after_forward": sharding != "grad_op",  # full: free the gathered layer after forward (ZeRO-3-like)
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_offload": bool(recipe.distributed.cpu_offload),
        "activation_checkpointing": _activation_checkpointing(recipe),
        "state_dict_type": "FULL_STATE_DICT",  # the saved model/adapter is an ordinary checkpoint
        "cpu_ram_efficient_loading": False,
    }
    return config


def deepspeed_config(recipe, *, sharding: str) -> dict:
    """A DeepSpeed config dict; "auto" values are filled in by the Trainer from TrainingArguments."""
    stage = 2 if sharding == "grad_op" else 3
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # save an ordinary (gathered) checkpoint
    if recipe.distributed.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


def training_arguments(recipe, device: str) -> dict:
    """The extra TrainingArguments kwargs for a launched run ({} when not launched: the single-process path is
    unchanged). They update (override) methods/common.py's common_arguments."""
    if not is_launched():
        return {}
    d = recipe.distributed
    strategy = d.strategy if d.strategy != "auto" else os.environ.get(ENV_STRATEGY) or resolve_strategy(recipe, device=device)[0]
    problems = check_distributed(recipe, strategy=strategy, device=device,
                                 nodes=max(1, world_size() // int(os.environ.get("LOCAL_WORLD_SIZE", world_size()) or 1)))
    if problems:
        raise RecipeError(problems)
    sharding = d.sharding if d.sharding != "auto" else "full"
    args: dict = {"ddp_backend": "nccl" if device == "cuda" else "gloo"}
    if d.mixed_precision != "auto":
        args.update(bf16=d.mixed_precision == "bf16", fp16=d.mixed_precision == "fp16")
    checkpointing = _activation_checkpointing(recipe)
    from tuneforge.library_fixes import checkpointing_field

    if strategy == "ddp":
        # Every trainable parameter takes part in each step (LoRA on all-linear, or the full model); telling DDP so
        # spares it a graph walk per step. A recipe that leaves some unused fails loudly in DDP, naming them.
        args["ddp_find_unused_parameters"] = False
        args.update(checkpointing_field(checkpointing))
    elif strategy == "fsdp":
        args["fsdp"] = "full_shard" if sharding != "grad_op" else "shard_grad_op"
        args["fsdp_config"] = fsdp_config(recipe, sharding=sharding)
        args.update(checkpointing_field(False))  # FSDP's own checkpointing (fsdp_config) replaces the Trainer's
        if sharding == "hybrid":
            from accelerate.parallelism_config import ParallelismConfig

            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
            args["parallelism_config"] = ParallelismConfig(dp_replicate_size=world_size() // per_node,
                                                           dp_shard_size=per_node)
    elif strategy == "deepspeed":
        args["deepspeed"] = deepspeed_config(recipe, sharding=sharding)
        args.update(checkpointing_field(checkpointing))
    return args


# ---------------------------------------------------------------------------------------------------------------
# Launching


def accelerate_config(plan: DistributedPlan, *, port: int) -> dict:
    """The accelerate config file for `accelerate launch`. It only starts the processes (torchrun-style, one per
    GPU or CPU process): what each process does (DDP / FSDP / DeepSpeed) comes from the recipe through
    TrainingArguments, so the config and the recipe can never disagree."""
    return {
        "compute_environment": "LOCAL_MACHINE",
        # MULTI_GPU is accelerate's torchrun launcher; on CPU it starts N processes that then pick gloo (a
        # MULTI_CPU config would go through mpirun, which is not needed on one machine).
        "distributed_type": "MULTI_GPU" if plan.processes > 1 or plan.strategy != "ddp" else "NO",
        "num_machines": 1,
        "num_processes": plan.processes,
        "machine_rank": 0,
        "main_process_ip": "127.0.0.1",
        "main_process_port": port,
        "rdzv_backend": "static",
        "same_network": True,
        "gpu_ids": "all",
        "mixed_precision": "no",  # the Trainer sets it from the recipe (bf16/fp16 flags)
        "use_cpu": False,
        "debug": False,
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_args(recipe_path: str | None, *, overrides: list[str], output: str | None, resume: str | None,
                no_doctor: bool) -> list[str]:
    if resume:
        return ["train", "--resume", resume]
    args = ["train", recipe_path]
    for item in overrides:
        args += ["--set", item]
    if output:
        args += ["--output", output]
    if no_doctor:
        args.append("--no-doctor")
    return args


def launch_commands(plan: DistributedPlan, *, config_file: str, train_args: list[str], port: int) -> dict[str, list[str]]:
    """The command this launch runs (accelerate) and the torchrun equivalent, for users who launch themselves."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
                  "--num_processes", str(plan.processes), "--main_process_port", str(port),
                  "-m", "tuneforge", *train_args]
    torchrun = ["torchrun", "--nnodes", "1", f"--nproc_per_node={plan.processes}", f"--master_port={port}",
                "-m", "tuneforge", *train_args]
    return {"accelerate": accelerate, "torchrun": torchrun}


def child_environment(plan: DistributedPlan, error_dir: str, run_path: str | None) -> dict:
    env = dict(os.environ)
    env[ENV_ERROR_DIR] = error_dir
    env[ENV_STRATEGY] = plan.strategy
    if run_path:
        env[ENV_PREPARED_RUN] = str(Path(run_path).resolve())
    if plan.device == "cuda" and "CUDA_VISIBLE_DEVICES" not in env:
        # --gpus N uses the first N GPUs; with more visible, a single process would be wrapped in nn.DataParallel
        # by the Trainer (TRL refuses that), and N processes would see GPUs they do not use.
        import torch

        if torch.cuda.device_count() > plan.processes:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(plan.processes))
    if plan.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        # Each CPU process gets its share of the cores (oversubscribed threads make every process slower).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.processes)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def rank_errors(error_dir: str | Path) -> dict[int, dict]:
    """{rank: {"message", "exit_code"}} for every rank that recorded an error."""
    import json

    return {int(p.stem.split("-")[1]): json.loads(p.read_text(encoding="utf-8"))
            for p in sorted(Path(error_dir).glob("rank-*.json"))}


class LaunchFailed(Exception):
    """A launched rank failed; `message` names the rank(s). The CLI prints it and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        self.message = message
        self.exit_code = exit_code
        super().__init__(message)


def prepare_run_directory(path: Path, *, overwrite: bool) -> None:
    """Done once, by the launcher, before any rank starts: the same checks as a single-process run, then an empty
    directory the ranks fill (rank 0 writes; the others only read)."""
    from tuneforge.run import check_output_path, mark_run_directory, replace_run_directory

    check_output_path(path, overwrite=overwrite)
    if path.exists() and any(path.iterdir()):
        replace_run_directory(path)
    mark_run_directory(path)


def launch(recipe, *, recipe_path: str | None, processes: int, device: str, overrides: list[str], output: str | None,
           overwrite: bool, resume: str | None, no_doctor: bool, print_only: bool = False, console=None,
           timeout: float | None = None) -> dict:
    """Start `processes` ranks of `tuneforge train` through accelerate (or, print_only, print the commands).
    Returns {"plan", "commands", "run"}; raises LaunchFailed naming the failing rank(s)."""
    import subprocess
    import tempfile

    import yaml

    from tuneforge.run import run_path_for

    plan = plan_launch(recipe, processes=processes, device=device, print_only=print_only)
    run_path = Path(resume) if resume else run_path_for(recipe, output)
    port = free_port()
    child_overrides = [] if resume else list(overrides) + plan.overrides
    train_args = _train_args(recipe_path, overrides=child_overrides, output=str(run_path), resume=resume, no_doctor=no_doctor)
    if not resume:
        train_args.append("--overwrite")  # the launcher checked --overwrite and prepared the directory below
    config = accelerate_config(plan, port=port)

    def say(text):
        if console is not None:
            console.print(text, highlight=False, markup=False, soft_wrap=True)  # plain text; commands copy-paste whole

    if print_only:
        config_file = str(run_path / "accelerate_config.yaml")
        commands = launch_commands(plan, config_file=config_file, train_args=[a for a in train_args if a != "--overwrite"],
                                   port=port)
        import shlex

        say(f"# strategy: {plan.strategy}{f' ({plan.sharding})' if plan.sharding else ''}: {plan.reason}")
        say("# accelerate config (save as " + config_file + "):")
        say("\n".join("#   " + line for line in yaml.safe_dump(config, sort_keys=False).splitlines()))
        say("accelerate launch " + shlex.join(commands["accelerate"][3:]))
        say("# or, with torchrun (one node; on SLURM add --nnodes/--node_rank/--master_addr per node):")
        say(shlex.join(commands["torchrun"]))
        return {"plan": plan, "commands": commands, "run": run_path, "config": config}

    if resume:
        from tuneforge.run import RunDir, resumable_checkpoint

        resumable_checkpoint(RunDir(run_path))  # fail here, once, rather than in every rank
    else:
        prepare_run_directory(run_path, overwrite=overwrite)
    config_file = run_path / "accelerate_config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    commands = launch_commands(plan, config_file=str(config_file), train_args=train_args, port=port)
    say(f"launching {processes} {'GPU' if device == 'cuda' else 'CPU'} process(es), strategy "
        f"{plan.strategy}{f' ({plan.sharding})' if plan.sharding else ''}: {plan.reason}")
    with tempfile.TemporaryDirectory(prefix="tuneforge-ranks-") as error_dir:
        env = child_environment(plan, error_dir, None if resume else str(run_path))
        try:
            proc = subprocess.run(commands["accelerate"], env=env, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = 124
        errors = rank_errors(error_dir)
    if code != 0 or errors:
        lines = [f"rank {r}: {e['message']}" for r, e in sorted(errors.items())] or \
            [f"a rank exited with status {code} without a tuneforge error (see its traceback above)"]
        message = "distributed training failed\n" + "\n".join(lines)
        from tuneforge.run import RunDir

        run = RunDir(run_path)
        if (run_path / "status.json").exists() and run.status != "completed":
            run.set_status("failed", error="; ".join(lines))
        exit_code = errors[min(errors)]["exit_code"] if errors else (code if 0 < code < 128 else 1)
        raise LaunchFailed(message, exit_code=exit_code)
    return {"plan": plan, "commands": commands, "run": run_path, "config": config}

