"""Federated and per-tenant fine-tuning (seed 001, family E): a recipe's `federated:` section (section.py) runs the
ordinary recipe as rounds of client training on Flower; only adapter tensors cross the client boundary."""

from __future__ import annotations


def train_federated(recipe, *, output=None, overwrite=False, console=None, resume=False, doctor=True):
    """Entry point from train.train() when the recipe has a `federated:` section."""
    from tuneforge.federated.run import train_federated as run

    return run(recipe, output=output, overwrite=overwrite, console=console, resume=resume, doctor=doctor)
