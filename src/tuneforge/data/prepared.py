"""What data preparation hands to training and doctor: the prepared examples (PreparedData) and their counts
(DataStats), shared by SFT/CPT data (pipeline), preference pairs (preference) and RL prompts (prompts)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.data.template import Tokenized


@dataclass
class DataStats:
    format: str = ""
    train_examples: int = 0
    eval_examples: int = 0
    duplicates_removed: int = 0
    eval_split_from_train: bool = False
    train_tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0
    dropped_no_loss: int = 0
    overlap_train_eval: int = 0
    max_length: int = 0
    sources: dict | None = None  # several data sources: each one's share and counts (data/mixing.py)

    @property
    def truncated_pct(self) -> float:
        return 100.0 * self.truncated / max(1, self.train_examples + self.dropped_no_loss)


@dataclass
class PreparedData:
    train: list[Tokenized]
    eval: list[Tokenized]
    train_examples: list[dict]
    eval_examples: list[dict]
    stats: DataStats = field(default_factory=DataStats)
