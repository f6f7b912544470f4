"""The deploy room's commands, registered on the `tuneforge` app by cli.py: export and combine (export_commands.py),
serve (serve_commands.py)."""

from __future__ import annotations


def register(app) -> None:
    """Add this room's commands to `app`."""
    from tuneforge.deploy.export_commands import register as export
    from tuneforge.deploy.serve_commands import register as serve

    export(app)
    serve(app)
