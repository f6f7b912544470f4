"""The recipe's `federated:` section (keys are the interface: clients, rounds, local_steps / local_epochs, split,
aggregation, fraction)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tuneforge.recipe_base import Section


class FederatedSection(Section):
    clients: int = Field(4, ge=1, description="Number of simulated clients the training data is split across.")
    rounds: int = Field(3, ge=1, description="Federated rounds (each: selected clients train locally, server aggregates).")
    local_steps: int | None = Field(None, ge=1, description="Optimizer steps each client trains per round.")
    local_epochs: float | None = Field(None, gt=0, description="Epochs over its own data each client trains per round "
                                       "(instead of local_steps).")
    split: str = Field("iid", description="How records reach clients: iid | non_iid | field:<name> (a field of each "
                       "record names its client).")
    aggregation: Literal["fedavg", "fedprox"] = Field("fedavg", description="fedavg (weighted by examples) | fedprox "
                                                      "(fedavg plus a proximal term on the clients).")
    fraction: float = Field(1.0, gt=0, le=1, description="Share of clients selected each round.")
