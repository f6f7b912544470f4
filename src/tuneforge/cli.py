"""The `tuneforge` command. Thin: parse, call one function per verb, print. Heavy imports happen inside verbs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from tuneforge.errors import TuneforgeError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Fine-tune pre-trained language models from one recipe.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect data as it will be trained.")
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)
# User text (paths, --set values, model output, error messages that quote them) goes through rich's `escape`: rich
# would read `[bleu]` in `--set eval.metrics=[bleu]` as a style tag and drop it.
TRUST_REMOTE_CODE_HELP = ("Run code shipped with the model (its own modelling files). Off unless you trust it; a run "
                          "directory's saved recipe never turns it on.")
BASE_HELP = "With a LoRA run: its base model's location now, if it moved (default: the run's model.name)."
DTYPE_HELP = ("Weights dtype: auto | float32 | bfloat16 | float16 (default: the run's model.dtype; auto = bf16 on a "
              "GPU). float32 makes greedy answers independent of batching on a GPU.")


@app.command()
def train(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML file (not needed with --resume)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: --set train.lr=1e-4 (repeatable)."),
    output: Optional[str] = typer.Option(None, help="Run directory (default: <output_dir>/<name>)."),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
    resume: Optional[Path] = typer.Option(None, help="Continue this unfinished run from its last checkpoint."),
    no_doctor: bool = typer.Option(False, "--no-doctor", help="Skip the preflight checks (not recommended)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="Train on N GPUs of this machine (accelerate "
                                       "launch; strategy from the recipe's distributed: section)."),
    cpu_processes: Optional[int] = typer.Option(None, "--cpu-processes", min=1, help="Train on N CPU processes "
                                                "(gloo): the multi-GPU path, testable without GPUs."),
    print_launch: bool = typer.Option(False, "--print-launch", help="With --gpus/--cpu-processes: print the "
                                      "accelerate launch / torchrun command (for clusters, SLURM) and exit."),
):
    """Train as the recipe says; writes a run directory and ends with base-vs-tuned scores."""
    from tuneforge.errors import RecipeError
    from tuneforge.recipe import load_recipe

    if resume is not None and (recipe is not None or set_):
        raise RecipeError(["--resume continues a run with its saved recipe; do not pass a recipe or --set"])
    if resume is None and recipe is None:
        raise RecipeError(["train needs a recipe file (or --resume RUN_DIR)"])
    if gpus is not None or cpu_processes is not None:
        _launch_train(recipe, set_, output, overwrite, resume, no_doctor, gpus, cpu_processes, print_launch)
        return
    if print_launch:
        raise RecipeError(["--print-launch: say how many processes, with --gpus N (or --cpu-processes N)"])

    from tuneforge.ranks import is_launched, is_main_process
    from tuneforge.train import train as run_train

    out = console
    if is_launched() and not is_main_process():
        out = Console(quiet=True)  # only rank 0 talks; the others' errors still reach the launcher
        overwrite = True  # rank 0 checks the run directory; the others never delete (RunDir.create waits for it)
    loaded = load_recipe(resume / "recipe.yaml") if resume is not None else load_recipe(recipe, set_)
    if resume is not None:
        run_train(loaded, output=str(resume), resume=True, console=out)
        return
    run_train(loaded, output=output, overwrite=overwrite, console=out, doctor=not no_doctor)


def _launch_train(recipe, set_, output, overwrite, resume, no_doctor, gpus, cpu_processes, print_launch) -> None:
    """--gpus N / --cpu-processes N: start N ranks of this same command through accelerate launch."""
    from tuneforge.distributed import LaunchFailed, launch
    from tuneforge.errors import RecipeError
    from tuneforge.recipe import load_recipe

    if gpus is not None and cpu_processes is not None:
        raise RecipeError(["--gpus and --cpu-processes: choose one"])
    if gpus is not None:
        import torch

        if not torch.cuda.is_available() and not print_launch:
            raise RecipeError([f"--gpus {gpus}: this machine has no CUDA GPU; to try the multi-process path on CPU "
                               f"use --cpu-processes {gpus}"])
    loaded = load_recipe(resume / "recipe.yaml") if resume is not None else load_recipe(recipe, set_)
    from tuneforge.models import check_weight_files

    check_weight_files(loaded.model.name, allow_pickle=loaded.model.allow_pickle)
    try:
        launch(loaded, recipe_path=str(recipe) if recipe is not None else None, processes=gpus or cpu_processes,
               device="cuda" if gpus is not None else "cpu", overrides=list(set_), output=output, overwrite=overwrite,
               resume=str(resume) if resume is not None else None, no_doctor=no_doctor, print_only=print_launch,
               console=console)
    except LaunchFailed as exc:
        err_console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
        raise typer.Exit(exc.exit_code)


@app.command()
def doctor(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key."),
    gpu: Optional[str] = typer.Option(None, help="Check for this GPU instead of this machine (e.g. H100, A10, T4)."),
):
    """Preflight checks: the seeds' common mistakes, each with why it matters and the fix. Exit 2 on errors."""
    from tuneforge.guide.doctor import device_from_gpu, doctor_recipe, has_errors, render_findings
    from tuneforge.recipe import load_recipe

    loaded = load_recipe(recipe, set_)
    findings = doctor_recipe(loaded, device_info=device_from_gpu(gpu) if gpu else None)
    render_findings(console, findings, title=f"doctor: {recipe}")
    if has_errors(findings):
        raise typer.Exit(2)


@app.command()
def methods():
    """List the training methods: family, data, default learning rates and KL, from their declarations."""
    from rich.table import Table

    from tuneforge.methods import format_rate, method_names, method_spec

    table = Table(title="methods (src/tuneforge/methods/)")
    for column in ("method", "family", "data", "lr LoRA", "lr full", "KL", "what it trains"):
        table.add_column(column)
    for name in method_names():
        m = method_spec(name)
        table.add_row(name, m.family, m.data, format_rate(m.lr["lora"]), format_rate(m.lr["full"]),
                      "" if m.kl is None else f"{m.kl:g}", m.summary)
    console.print(table)


@app.command()
def plan(
    source: str = typer.Argument(..., help="Recipe file, model folder, hub id, embedded model, or a size like llama-8b."),
    gpu: Optional[str] = typer.Option(None, help="GPU to plan for (H100, H200, A100-80GB, A10, L4, RTX4090, T4)."),
    vram: Optional[float] = typer.Option(None, help="GPU memory in GB (instead of --gpu)."),
    seq_len: Optional[int] = typer.Option(None, help="Sequence length (default: the recipe's max_length)."),
    batch_size: Optional[int] = typer.Option(None, help="Micro-batch size (default: the recipe's)."),
    adapters: Optional[str] = typer.Option(None, help="More adapter types to plan, comma-separated (ia3,galore,lisa,"
                                           "spectrum,freeze,prompt_tuning,...), or all."),
):
    """Memory and time estimate for full FT, LoRA and QLoRA (and the recipe's adapter type), the largest batch that
    fits, and a verdict."""
    from tuneforge.guide.plan import make_plan, parse_adapter_list, render_plan

    render_plan(console, make_plan(source, gpu=gpu, vram_gb=vram, seq_len=seq_len, batch_size=batch_size,
                                   adapters=parse_adapter_list(adapters)))


@app.command()
def recommend(
    answer: list[str] = typer.Option([], "--answer", "-a", help="Answer a question up front: key=value (repeatable)."),
    output: Optional[Path] = typer.Option(None, help="Write the recommended recipe here."),
):
    """Walk the seeds' decision tree (prompting / RAG / fine-tune; SFT / DPO / GRPO; LoRA / QLoRA / full) and
    write a ready, commented recipe with the reason for each choice."""
    from tuneforge.errors import RecipeError
    from tuneforge.guide.recommend import recommend_interactive, render_recommendation

    answers = {}
    for item in answer:
        if "=" not in item:
            raise RecipeError([f"--answer {item!r}: expected key=value, e.g. --answer goal=task"])
        key, value = item.split("=", 1)
        answers[key.strip()] = value.strip()
    recipe_yaml, reasons = recommend_interactive(console, answers=answers)
    render_recommendation(console, recipe_yaml, reasons)
    if output and recipe_yaml:
        if output.exists():
            raise RecipeError([f"{output} already exists; choose another --output"])
        output.write_text(recipe_yaml, encoding="utf-8")
        console.print(escape(f"recipe written to {output}; next: tuneforge doctor {output}"))


@app.command("eval")
def evaluate(
    target: str = typer.Argument(..., help="Run directory, model folder, hub id, or embedded:smollm2-135m-instruct."),
    data: Path = typer.Option(..., help="Held-out examples (.jsonl etc.; chat/instruction formats)."),
    metric: list[str] = typer.Option(["exact_match"], help="Metric name (repeatable): exact_match, contains, json_valid."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write metrics and samples to this JSON file."),
    max_examples: Optional[int] = typer.Option(None, help="Score only the first N examples."),
    max_new_tokens: int = typer.Option(128, help="Generation budget per answer."),
    batch_size: int = typer.Option(16, help="Prompts per generation batch."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    base: Optional[str] = typer.Option(None, "--base", help=BASE_HELP),
):
    """Score a model on a data file by generation."""
    from rich.table import Table

    from tuneforge.data.pipeline import load_examples
    from tuneforge.errors import RecipeError
    from tuneforge.evaluate.metrics import METRICS
    from tuneforge.evaluate.scoring import evaluate_generation
    from tuneforge.models import load_target

    unknown = [m for m in metric if m not in METRICS]
    if unknown:
        raise RecipeError([f"--metric {m}: unknown metric; known: {sorted(METRICS)}" for m in unknown])
    examples, _ = load_examples(str(data), "auto")
    model, tokenizer = load_target(target, trust_remote_code=trust_remote_code, base=base)
    from rich.progress import Progress

    with Progress(console=console, transient=True) as progress:
        result = evaluate_generation(model, tokenizer, examples, metrics=metric, max_examples=max_examples,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    table = Table(title=escape(f"{target} on {data} ({result['n']} examples)"))
    table.add_column("metric")
    table.add_column("score", justify="right")
    for name, value in result["metrics"].items():
        table.add_row(escape(name), f"{value:.1f}")
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps({"target": target, "data": str(data), **result}, indent=2), encoding="utf-8")


@app.command()
def generate(
    target: str = typer.Argument(..., help="Run directory, model folder, hub id, or embedded:smollm2-135m-instruct."),
    prompt: str = typer.Option(..., help="The user message."),
    system: Optional[str] = typer.Option(None, help="Optional system message."),
    max_new_tokens: int = typer.Option(256, help="Generation budget."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    base: Optional[str] = typer.Option(None, "--base", help=BASE_HELP),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
):
    """Answer one prompt (greedy), through the model's chat template."""
    from tuneforge.evaluate.generation import chat_prompt, generate_answers
    from tuneforge.models import load_target

    model, tokenizer = load_target(target, trust_remote_code=trust_remote_code, base=base, dtype=dtype)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    print(generate_answers(model, tokenizer, [chat_prompt(tokenizer, messages)], max_new_tokens=max_new_tokens)[0])


@app.command()
def chat(
    target: str = typer.Argument(..., help="Run directory, model folder, hub id, or embedded:smollm2-135m-instruct."),
    system: Optional[str] = typer.Option(None, help="Optional system message."),
    max_new_tokens: int = typer.Option(256, help="Generation budget per answer."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    base: Optional[str] = typer.Option(None, "--base", help=BASE_HELP),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
):
    """Talk to a model in the terminal (empty line or Ctrl-D to quit)."""
    from tuneforge.evaluate.generation import chat_prompt, generate_answers
    from tuneforge.models import load_target

    model, tokenizer = load_target(target, trust_remote_code=trust_remote_code, base=base, dtype=dtype)
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = console.input("[bold]you> [/]")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        answer = generate_answers(model, tokenizer, [chat_prompt(tokenizer, messages)], max_new_tokens=max_new_tokens)[0]
        messages.append({"role": "assistant", "content": answer})
        console.print(f"[bold cyan]model>[/] {escape(answer)}")


@app.command()
def merge(
    run_dir: str = typer.Argument(..., help="A finished LoRA/QLoRA run directory."),
    output: str = typer.Option(..., help="Folder for the merged checkpoint."),
    dtype: str = typer.Option("auto", help="auto (fp32) | float32 | bfloat16 | float16."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    base: Optional[str] = typer.Option(None, "--base", help=BASE_HELP),
):
    """Merge the run's adapter into an un-quantized base; writes an ordinary checkpoint."""
    from tuneforge.ops.merge import merge_run

    target = merge_run(run_dir, output, dtype=dtype, overwrite=overwrite, base=base, trust_remote_code=trust_remote_code)
    console.print(escape(f"merged model written to {target}"))


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(..., help="One or more run directories."),
    output: Path = typer.Option(Path("comparison.html"), help="Comparison page (with several runs)."),
):
    """(Re)write each run's report.html and plots; with several runs, print and write a side-by-side comparison."""
    from tuneforge.report import compare_runs, write_comparison, write_report
    from tuneforge.run import RunDir

    for run_dir in run_dirs:
        if not (run_dir / "recipe.yaml").exists():
            from tuneforge.errors import RunDirError

            raise RunDirError(f"{run_dir} is not a tuneforge run directory (no recipe.yaml)")
        console.print(escape(f"{RunDir(run_dir).status:>10}  {write_report(run_dir)}"))
    if len(run_dirs) > 1:
        console.print(compare_runs(run_dirs))
        console.print(escape(f"comparison: {write_comparison(run_dirs, output)}"))


@data_app.command("preview")
def data_preview(
    source: Path = typer.Argument(..., help="A recipe (.yaml) or a data file."),
    model: str = typer.Option("embedded:smollm2-135m-instruct", help="Tokenizer to use for a data file."),
    count: int = typer.Option(3, "-n", help="Examples to show."),
    max_length: int = typer.Option(2048, help="max_length for a data file."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key."),
):
    """Show examples after templating with loss-carrying tokens marked, and counts."""
    from tuneforge.data.pipeline import prepare_data
    from tuneforge.data.preview import preview
    from tuneforge.models import load_tokenizer
    from tuneforge.recipe import load_recipe, parse_recipe

    if source.suffix in (".yaml", ".yml"):
        recipe = load_recipe(source, set_)
    else:
        recipe = parse_recipe({"name": "preview", "model": model, "data": {"train": str(source), "eval_fraction": 0.1},
                               "train": {"max_length": max_length}})
    tokenizer = load_tokenizer(recipe.model.name, chat_template=recipe.model.chat_template)
    preview(console, prepare_data(recipe, tokenizer), tokenizer, count)


def _register_rooms() -> None:
    """Commands that live in their own rooms (each module's register(app) adds them; imports stay light)."""
    from tuneforge.board.commands import register as board
    from tuneforge.compare.commands import register as compare
    from tuneforge.deploy.commands import register as deploy
    from tuneforge.federated.commands import register as federated
    from tuneforge.rate.commands import register as rate

    deploy(app)
    board(app)
    rate(app)
    compare(app)
    federated(app)


_register_rooms()


def main() -> None:
    from tuneforge.library_fixes import quiet_library_notices
    from tuneforge.ranks import is_launched, rank, record_rank_error

    quiet_library_notices()
    where = f"[rank {rank()}] " if is_launched() else ""
    try:
        app()
    except TuneforgeError as exc:
        record_rank_error(exc)
        err_console.print(f"{escape(where)}[bold red]error:[/] {escape(exc.render())}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # a bug, or a library error: its traceback follows; the launcher names the rank
        record_rank_error(exc)
        raise


if __name__ == "__main__":
    main()
