"""Federated and per-tenant fine-tuning (seed 001, family E): a recipe's `federated:` section (section.py) runs the
ordinary recipe as rounds of client training on Flower; only adapter tensors cross the client boundary. See
docs/federated.md.

train.py hands a federated recipe to federated.run.train_federated with its own functions (pieces.py); nothing in
this package imports train.py, so this package joins no import loop with it. Kept light: importing it loads nothing.
"""
