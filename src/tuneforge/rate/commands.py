"""The rate room's command (`tuneforge rate`), registered on the `tuneforge` app by cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def register(app) -> None:
    """Add this room's commands to `app`."""
    import typer

    @app.command()
    def rate(
        run: Path = typer.Argument(..., help="A finished run directory (with eval/baseline.json and eval/tuned.json)."),
        import_file: Optional[Path] = typer.Option(None, "--import", help="Read a filled sheet back (the CSV the HTML "
                                                   "sheet downloads, or rating_sheet.csv filled in a spreadsheet)."),
        output: Optional[Path] = typer.Option(None, "--output", help="Folder for rating_sheet.html and "
                                              "rating_sheet.csv (default: the run's eval/)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the items' random order and sides."),
        max_examples: Optional[int] = typer.Option(None, "--max-examples", min=1, help="Rate the first N held-out "
                                                   "examples (default: all the run scored)."),
    ):
        """Blind A/B rating by people: writes a sheet of base vs tuned answers (random order, sides hidden); with
        --import, reads the ratings back: the tuned win rate with its interval, and the LLM judge's agreement with
        the people when the run has eval/judge.json."""
        from rich.console import Console
        from rich.markup import escape

        from tuneforge.errors import TuneforgeError

        console = Console()
        if import_file is not None:
            given = [flag for flag, value in (("--output", output), ("--max-examples", max_examples)) if value is not None]
            given += ["--seed"] if seed != 0 else []
            if given:
                raise TuneforgeError(f"{', '.join(given)} shape a new sheet; --import reads ratings of the sheet already "
                                     "made (its key decides)", fix=f"drop {', '.join(given)}")
            from tuneforge.rate.ratings import RATINGS_FILE, describe, import_ratings

            result = import_ratings(run, import_file)
            for line in describe(result):
                console.print(escape(line), highlight=False)
            console.print(f"wrote {escape(str(run / RATINGS_FILE))}", highlight=False)
            return
        from tuneforge.rate.sheet import make_sheet

        made = make_sheet(run, output=output, seed=seed, max_examples=max_examples)
        console.print(f"rating sheet of {made['n']} items: {escape(str(made['html']))} (open in a browser, offline) "
                      f"and {escape(str(made['csv']))} (fill the rating column: A, B or tie)", highlight=False)
        console.print(f"the key (which side is the tuned model) is {escape(str(made['key']))}: keep it from the "
                      f"raters; read their CSV back with: tuneforge rate {escape(str(run))} --import ratings.csv",
                      highlight=False)
