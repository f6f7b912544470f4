"""Evaluation: generation-based metrics, held-out loss, and the before/after comparison every run ends with."""
