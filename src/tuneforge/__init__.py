"""tuneforge: fine-tune pre-trained language models from one recipe.

Importing this package is cheap on purpose: torch, transformers and friends are imported inside the
functions that need them, so `tuneforge --help` answers at once.
"""

__version__ = "0.1.0"
