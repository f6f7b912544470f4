"""The board room's command (`tuneforge board`), registered on the `tuneforge` app by cli.py."""

from __future__ import annotations


def register(app) -> None:
    """Add this room's commands to `app`."""
