"""tuneforge export commands (typer), registered by deploy/commands.py. Heavy imports happen inside the verbs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

TRUST_HELP = ("Run code shipped with the model (its own modelling files). Off unless you trust it; a run directory's "
              "saved recipe never turns it on.")


def register(app) -> None:
    """Add the commands to `app`."""

    @app.command("export")
    def export_command(
        source: str = typer.Argument(..., help="A finished run directory, a model folder, a .gguf file, or "
                                     "embedded:smollm2-135m-instruct."),
        format_: str = typer.Option(..., "--format", help="gguf | ollama | bnb-4bit | bnb-8bit."),
        quant: Optional[str] = typer.Option(None, help="gguf/ollama: f16 (default) | q8_0 | q4_k_m; bnb-4bit: nf4 "
                                            "(default) | fp4; bnb-8bit: int8."),
        output: str = typer.Option(..., help="gguf: a .gguf file; ollama / bnb: a folder."),
        overwrite: bool = typer.Option(False, help="Replace an earlier export at --output."),
        score: bool = typer.Option(True, help="From a run, score a q8_0/q4_k_m GGUF against f16 on the run's "
                                   "held-out set."),
        max_examples: Optional[int] = typer.Option(None, help="Score only the first N held-out examples."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the export summary (and scores) here."),
        base: Optional[str] = typer.Option(None, help="A LoRA run's base model, where it is now (if it moved)."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    ):
        """Export a model for deployment: GGUF (llama.cpp), an Ollama folder, or a bitsandbytes checkpoint."""
        from rich.console import Console
        from rich.markup import escape

        from tuneforge.deploy.export import export

        console = Console()
        summary = export(source, format_, quant, output, overwrite=overwrite, trust_remote_code=trust_remote_code,
                         score=score, max_examples=max_examples, base=base, console=console)
        size = f" ({summary['size']})" if "size" in summary else ""
        console.print(escape(f"{summary['format']} {summary['quant']} written to {summary['output']}{size}; "
                             f"stops at {summary['stop_tokens']}"))
        if json_out:
            json_out.write_text(json.dumps(summary, indent=2), encoding="utf-8")

    @app.command("combine")
    def combine_command(
        sources: list[str] = typer.Argument(..., help="Two or more finished runs on the same base (all LoRA/QLoRA, "
                                            "or all full fine-tuning)."),
        method: str = typer.Option("linear", help="linear | ties | dare_ties | dare_linear | slerp (slerp: full "
                                   "models, two sources)."),
        weights: Optional[str] = typer.Option(None, help="One weight per source, e.g. 0.5,0.5 (default: equal, "
                                              "summing to 1)."),
        density: Optional[float] = typer.Option(None, help="ties / dare: the fraction of each update kept "
                                                "(default 0.5)."),
        output: str = typer.Option(..., help="Folder for the combined model (laid out like a run directory)."),
        overwrite: bool = typer.Option(False, help="Replace an earlier combine at --output."),
        max_examples: Optional[int] = typer.Option(None, help="Score only the first N held-out examples of each "
                                                   "source."),
        seed: int = typer.Option(0, help="Seed for DARE's random drop."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    ):
        """Combine fine-tuned runs into one model (PEFT for adapters, mergekit for full models) and score it on
        every source's held-out set, side by side with the sources."""
        from rich.console import Console
        from rich.markup import escape

        from tuneforge.deploy.combine import combine, parse_weights, results_table

        console = Console()
        result = combine(sources, method=method, weights=parse_weights(weights, len(sources)), density=density,
                         output=output, overwrite=overwrite, max_examples=max_examples, seed=seed,
                         trust_remote_code=trust_remote_code, console=console)
        console.print(results_table(result))
        console.print(escape(f"combined model written to {result['output']}; scores in "
                             f"{Path(result['output']) / 'combine.json'}"))
