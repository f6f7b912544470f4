"""Many GPUs: the same recipe on N processes, through `accelerate launch` and the HF Trainer's own accelerate
integration. tuneforge writes no all-reduce, sharding or launcher of its own; it only

1. resolves the recipe's `distributed:` section (strategy, sharding, offload, checkpointing, precision) and
   refuses combinations that cannot work, naming the key (`check_distributed`);
2. writes an accelerate config file and starts `python -m accelerate.commands.launch ... -m tuneforge train`
   (`launch`), or prints that command and its torchrun equivalent (`launch_commands`) for clusters;
3. maps the section onto TrainingArguments fields (`training_arguments`): ddp_backend and
   ddp_find_unused_parameters for DDP, `fsdp` + `fsdp_config` (FSDP2) for FSDP, a `deepspeed` config dict;
4. keeps side effects on rank 0 (`is_main_process`, used by run.py and progress.py) and turns an error on any
   rank into one line naming the rank (`record_rank_error` in the ranks, `rank_errors` in the launcher).

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

ENV_ERROR_DIR = "TUNEFORGE_ERROR_DIR"  # where each rank writes its error, for the launcher to report
ENV_PREPARED_RUN = "TUNEFORGE_PREPARED_RUN"  # the run directory the launcher prepared (ranks must not recreate it)
ENV_STRATEGY = "TUNEFORGE_STRATEGY"  # the resolved strategy, for code that runs before TrainingArguments


# ---------------------------------------------------------------------------------------------------------------
# Where am I


def rank() -> int:
    """This process's global rank (0 when not launched)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_launched() -> bool:
    """Started by accelerate launch / torchrun (even with one process)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    return rank() == 0


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
    """strategy: auto -> ddp when the model fits one GPU by guide/plan.py's estimate, else fsdp. Returns the
    strategy and the reason."""
    d = recipe.distributed
    if d.strategy != "auto":
        return d.strategy, "set in the recipe"
    if device != "cuda":
        return "ddp", "CPU processes: DDP (no GPU memory to plan)"
    from tuneforge.guide.plan import GpuSpec, default_gpu, fit_verdict, load_model_config

    gpu = default_gpu()
    if gpu_memory_gib is not None:
        gpu = GpuSpec(gpu.name, gpu_memory_gib, gpu.bf16, gpu.tflops)
    try:
        config = load_model_config(recipe.model.name, trust_remote_code=recipe.model.trust_remote_code,
                                   revision=recipe.model.revision)
    except Exception as exc:  # no config to plan with: DDP is the safe, simple default
        return "ddp", f"model config unavailable for planning ({type(exc).__name__}); DDP"
    adapter = "full" if recipe.adapter.type == "none" else recipe.adapter.type
    verdict = fit_verdict(config, gpu=gpu, adapter=adapter, seq_len=recipe.train.max_length,
                          batch_size=recipe.train.batch_size, gradient_checkpointing=recipe.train.gradient_checkpointing,
                          optimizer=recipe.train.optimizer, dtype="bf16" if gpu.bf16 else "fp16", lora_r=recipe.adapter.r,
                          target_modules=recipe.adapter.target_modules)
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


def plan_launch(recipe, *, processes: int, device: str) -> DistributedPlan:
    """Resolve `auto` and check everything before any process starts; raise one RecipeError listing the problems."""
    available = None
    if device == "cuda":
        import torch

        available = torch.cuda.device_count()
    strategy, reason = resolve_strategy(recipe, device=device)
    problems = check_distributed(recipe, strategy=strategy, device=device, processes=processes, available_gpus=available)
    if problems:
        raise RecipeError(problems, source=getattr(recipe, "_source_path", None))
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
    from tuneforge.methods.common import checkpointing_field

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


def quant_storage_dtype(compute_dtype):
    """bitsandbytes' `bnb_4bit_quant_storage` for this process: under FSDP or DeepSpeed ZeRO-3 the packed 4-bit
    weights are sharded like any other parameter, which needs them stored in the compute dtype (a flat uint8
    tensor mixed with bf16 ones cannot be sharded together); otherwise uint8, bitsandbytes' default."""
    import torch

    strategy = os.environ.get(ENV_STRATEGY, "")
    sharded = strategy in ("fsdp", "deepspeed") or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" \
        or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    return compute_dtype if sharded else torch.uint8


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


def record_rank_error(exc: BaseException) -> None:
    """In a launched rank: write this rank's error where the launcher reads it."""
    folder = os.environ.get(ENV_ERROR_DIR)
    if not folder:
        return
    from tuneforge.errors import TuneforgeError

    import json

    if isinstance(exc, TuneforgeError):
        record = {"message": exc.render(), "exit_code": exc.exit_code}
    else:
        record = {"message": f"{type(exc).__name__}: {exc}", "exit_code": 1}
    try:
        Path(folder, f"rank-{rank()}.json").write_text(json.dumps(record), encoding="utf-8")
    except OSError:
        pass


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

    plan = plan_launch(recipe, processes=processes, device=device)
    run_path = Path(resume) if resume else run_path_for(recipe, output)
    port = free_port()
    child_overrides = [] if resume else list(overrides) + plan.overrides
    train_args = _train_args(recipe_path, overrides=child_overrides, output=str(run_path), resume=resume, no_doctor=no_doctor)
    if not resume:
        train_args.append("--overwrite")  # the launcher checked --overwrite and prepared the directory below
    config = accelerate_config(plan, port=port)

    def say(text):
        if console is not None:
            console.print(text, highlight=False)

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
    say(f"[bold]launching[/] {processes} {'GPU' if device == 'cuda' else 'CPU'} process(es), strategy "
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


def allow_training_wrap_after_evaluate(model, state) -> None:
    """Library fix (accelerate 1.15 + transformers 5.24): `trainer.evaluate()` before `trainer.train()` prepares the
    model in evaluation mode, which skips the DDP wrapper but still marks the model `_is_accelerate_prepared`; the
    training prepare then returns it unwrapped, and each rank silently trains on its own gradients (found by the
    1-vs-2-process loss test). Called from the run's callback after an evaluation before the first step: clears the
    mark so training wraps the model in DDP. FSDP/DeepSpeed evaluation prepares fully, so nothing changes there."""
    if model is None or state.global_step != 0 or world_size() < 2:
        return
    if getattr(model, "_is_accelerate_prepared", False):
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state.get("distributed_type") is not None and \
                str(AcceleratorState().distributed_type) in ("DistributedType.MULTI_GPU", "DistributedType.MULTI_CPU"):
            model._is_accelerate_prepared = False
