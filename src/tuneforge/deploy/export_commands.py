"""tuneforge export commands (typer), registered by deploy/commands.py. Heavy imports happen inside the verbs."""

from __future__ import annotations


def register(app) -> None:
    """Add the commands to `app`."""
