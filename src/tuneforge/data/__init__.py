"""Data: read files -> canonical records -> chat template -> loss masks -> split (packing is done at train time)."""
