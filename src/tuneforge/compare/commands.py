"""The compare room's command (`tuneforge compare`), registered on the `tuneforge` app by cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def register(app) -> None:
    """Add this room's commands to `app`."""
    import typer

    @app.command()
    def compare(
        recipe: Path = typer.Argument(..., help="The recipe whose data, model, budget and eval every method shares."),
        methods: str = typer.Option("lora,qlora,dora,ia3,adalora,prompt_tuning,prefix_tuning", "--methods",
                                    help="Comma-separated: lora, qlora, dora, rslora, pissa, olora, adalora, ia3, "
                                    "prompt_tuning, prefix_tuning, ptuning_v2, p_tuning, bottleneck, galore, lisa, "
                                    "spectrum, freeze, full; or all."),
        output: Optional[Path] = typer.Option(None, "--output", help="Folder for the runs and the report (default: "
                                              "<output_dir>/<name>-compare)."),
        set_: list[str] = typer.Option([], "--set", help="Override a recipe key for every method (repeatable)."),
        overwrite: bool = typer.Option(False, help="Train again the methods that already have a completed run there."),
        no_doctor: bool = typer.Option(False, "--no-doctor", help="Skip each run's preflight checks."),
    ):
        """Run the same data and budget through each adaptation method (each its own run directory) and write one
        report: trainable parameters, artifact size, peak memory, step time, task score vs base and few-shot,
        held-out loss and forgetting -- compare.md/.html/.json and compare.png."""
        from rich.console import Console
        from rich.markup import escape

        from tuneforge.compare.menu import parse_methods
        from tuneforge.compare.runs import run_comparison
        from tuneforge.recipe import load_recipe

        console = Console()
        names = parse_methods(methods)
        base = load_recipe(recipe, set_)
        folder = output or Path(base.output_dir) / f"{base.name}-compare"
        report = run_comparison(recipe, names, folder, overrides=set_, overwrite=overwrite, doctor=not no_doctor,
                                console=console)
        from tuneforge.compare.report import markdown

        console.print(escape(markdown(report)), highlight=False)
        console.print(f"report: {escape(str(Path(folder) / 'compare.html'))}", highlight=False)
        failed = [r["method"] for r in report["rows"] if r["status"] != "completed"]
        if failed:
            raise typer.Exit(1)
