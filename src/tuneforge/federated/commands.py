"""The federated room's commands (`tuneforge federated ...`), registered on the `tuneforge` app by cli.py.

`tuneforge federated app RECIPE --output APP_DIR` writes the Flower App that trains a federated recipe on Flower's
deployment engine (a flower-superlink, one flower-supernode per client machine, flwr run); see app.py and
docs/federated.md. `tuneforge train RECIPE` keeps running the same recipe on Flower's simulation engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def register(app) -> None:
    """Add this room's commands to `app`."""
    import typer

    room = typer.Typer(help="Federated runs on Flower's deployment engine (real SuperLink / SuperNode processes).",
                       no_args_is_help=True)

    @room.command("app")
    def write(
        recipe: Path = typer.Argument(..., help="A recipe with a federated: section (mode federated) and data.eval, "
                                      "the global held-out set the server scores every round on."),
        output: Path = typer.Option(..., "--output", help="The Flower App folder to write (pyproject.toml naming "
                                    "tuneforge's ServerApp and ClientApp, README.md with the commands)."),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Where the server writes the run directory "
                                               "(default: <output_dir>/<name>, made absolute)."),
        superlink: str = typer.Option("127.0.0.1:9093", "--superlink", help="The SuperLink's Control API address "
                                      "that flwr run connects to (HOST:PORT)."),
        set_: list[str] = typer.Option([], "--set", help="Override a recipe key (repeatable), as for train."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an App this command wrote before."),
    ):
        """Write the Flower App that trains RECIPE's federated rounds over real processes: each client machine runs
        a flower-supernode whose --node-config names its own records; the server runs flower-superlink and
        flwr run. The run directory is an ordinary federated run (per-round global scores, adapter/, report), without
        the baselines that need pooled records."""
        from rich.console import Console
        from rich.markup import escape

        from tuneforge.federated.app import commands, write_app

        console = Console()
        info = write_app(recipe, output, run_dir=run_dir, superlink=superlink, overrides=set_, overwrite=overwrite)
        steps = commands(info)
        console.print(f"[bold]Flower App[/] {escape(str(info.app_dir))}: {info.rounds} round(s), the server waits for "
                      f"{info.clients} SuperNodes (federated.clients); run directory {escape(str(info.run_dir))}",
                      highlight=False)
        for title, key in (("server", "server"), ("each client machine (its own records)", "client"),
                           ("then start the run", "run")):
            console.print(f"  {title}:\n    {escape(steps[key])}", highlight=False)

    app.add_typer(room, name="federated")
