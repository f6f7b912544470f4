"""The recipe's `federated:` section. It sits on top of an ordinary recipe (the same model, data, adapter, train and
eval keys) and says how that recipe is trained across clients:

  mode: federated   rounds of local training on each client's own records, aggregated by a Flower strategy (fedavg
                    or fedprox); only the adapter's tensors cross the client boundary
  mode: per_tenant  one adapter per tenant (a record field names it) on the shared base, each trained and scored on
                    its own records only

Checks that need only this section live here (each error names its key); checks against the rest of the recipe
(the method, adapter type, train.max_steps ...) are in federated/checks.py, before a run directory exists.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tuneforge.recipe_base import KeyedValueError, Section

DEFAULT_LOCAL_STEPS = 10
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


class PrivacySection(Section):
    """Differential privacy on the clients' updates, as Flower provides it (flwr.serverapp.strategy
    DifferentialPrivacyClientSideFixedClipping / ...ServerSideFixedClipping, flwr.clientapp.mod.fixedclipping_mod)."""

    clipping_norm: float = Field(..., gt=0, description="Each client's update (its change to the adapter in one "
                                 "round) is clipped to this L2 norm before it is aggregated.")
    noise_multiplier: float = Field(0.0, ge=0, description="Gaussian noise with std noise_multiplier x clipping_norm / "
                                    "(clients sampled per round) is added by the server to the aggregate (central DP). "
                                    "0 = clipping only, no privacy guarantee.")
    clipping: Literal["client", "server"] = Field("client", description="Where updates are clipped: client = on each "
                                                  "client before it sends (the server never sees an unclipped update) "
                                                  "| server = on the server, before aggregation.")
    delta: float = Field(1e-5, gt=0, lt=1, description="The delta of the (epsilon, delta) figure recorded in "
                         "summary.json (client-level, computed with opacus' RDP accountant when it is installed).")
    secure_aggregation: bool = Field(False, description="Not available: Flower 1.32's SecAgg+ runs only in its legacy "
                                     "workflow, not with the strategies used here; true is refused.")

    @field_validator("secure_aggregation")
    @classmethod
    def _no_secagg(cls, value: bool) -> bool:
        if value:
            raise ValueError("secure aggregation is not available here: Flower 1.32's SecAgg+ protocol runs only in its "
                             "legacy workflow (flwr.server.workflow.SecAggPlusWorkflow with LegacyContext), not with the "
                             "message-API strategies tuneforge uses (FedAvg, FedProx and the DP wrappers); remove it, "
                             "and use clipping_norm + noise_multiplier for a privacy guarantee on the aggregate")
        return value


class FederatedSection(Section):
    mode: Literal["federated", "per_tenant"] = Field(
        "federated", description="federated = rounds of client training aggregated on Flower | per_tenant = one "
        "adapter per tenant (split: field:<name> names the tenant), each trained on its own records.")
    clients: int | None = Field(None, ge=2, description="Clients the training records are split across (iid / "
                                "non_iid; default 4). With split field:<name> it is the number of distinct values; "
                                "set it only to check that number.")
    rounds: int = Field(3, ge=1, description="Federated rounds: the selected clients train locally from the global "
                        "adapter, the server aggregates their adapters into the next one.")
    local_steps: int | None = Field(None, ge=1, description="Optimizer steps each client trains per round (default "
                                    f"{DEFAULT_LOCAL_STEPS}); or local_epochs, not both.")
    local_epochs: float | None = Field(None, gt=0, description="Passes over its own records each client trains per "
                                       "round (instead of local_steps).")
    split: str = Field("iid", description="How records reach clients: iid (shuffled, even shares) | non_iid (the "
                       "values of group_by skewed across clients, Dirichlet(alpha)) | field:<name> (a field of each "
                       "record names its client; per_tenant: its tenant).")
    group_by: str | None = Field(None, description="non_iid: the record field whose values are skewed across clients "
                                 "(e.g. a topic, label or source).")
    alpha: float | None = Field(None, gt=0, description="non_iid: Dirichlet concentration (default 0.5); smaller = "
                                "each client holds fewer of the group_by values.")
    aggregation: Literal["fedavg", "fedprox"] = Field("fedavg", description="fedavg (client adapters averaged, weighted "
                                                      "by their training examples) | fedprox (the same average; each "
                                                      "client's local loss adds (proximal_mu/2)||w - w_global||^2).")
    proximal_mu: float | None = Field(None, gt=0, description="fedprox: weight of the proximal term (default 0.01).")
    fraction: float = Field(1.0, gt=0, le=1, description="Share of clients selected each round (at least one).")
    baselines: list[Literal["central", "local"]] = Field(
        default_factory=lambda: ["central", "local"], description="Also train, for the report's comparison, the same "
        "budget centrally on the pooled records (central) and each client alone on its own records (local); [] = none.")
    privacy: PrivacySection | None = Field(None, description="Differential privacy on client updates, e.g. "
                                           "{clipping_norm: 1.0, noise_multiplier: 0.5}.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Seed of the split and of client sampling (default "
                             "train.seed).")

    @field_validator("split")
    @classmethod
    def _known_split(cls, value: str) -> str:
        if value in ("iid", "non_iid"):
            return value
        if value.startswith("field:"):
            name = value[len("field:"):].strip()
            if not name:
                raise ValueError("field: needs the name of the record field that names each record's client, e.g. "
                                 "field:tenant")
            if not FIELD_NAME.match(name):
                raise ValueError(f"field name {name!r} is not a plain record key (letters, digits, _ . -)")
            return f"field:{name}"
        raise ValueError("must be iid, non_iid or field:<name> (a field of each record names its client)")

    @property
    def split_field(self) -> str | None:
        """The record field of a field:<name> split, else None."""
        return self.split[len("field:"):] if self.split.startswith("field:") else None

    @model_validator(mode="after")
    def _consistent(self) -> FederatedSection:
        if self.mode == "per_tenant":
            if self.split_field is None:
                raise KeyedValueError("federated.split", "mode per_tenant needs split: field:<name>, the record field "
                                                         "that names each record's tenant")
            fields = type(self).model_fields
            unused = [k for k in ("rounds", "local_steps", "local_epochs", "aggregation", "proximal_mu", "fraction",
                                  "privacy", "group_by", "alpha", "baselines")
                      if getattr(self, k) != fields[k].get_default(call_default_factory=True)]
            if unused:
                raise KeyedValueError(f"federated.{unused[0]}", "mode per_tenant trains each tenant's adapter once on "
                                      "its own records (train.max_steps / train.epochs say how long); "
                                      f"{unused[0]} is for mode federated: remove it")
            return self
        if self.local_steps is not None and self.local_epochs is not None:
            raise KeyedValueError("federated.local_epochs", "set local_steps or local_epochs, not both")
        if self.local_steps is None and self.local_epochs is None:
            self.local_steps = DEFAULT_LOCAL_STEPS
        if self.split == "non_iid":
            if not self.group_by:
                raise KeyedValueError("federated.group_by", "split non_iid skews the values of a record field across "
                                      "clients: name it with group_by (e.g. group_by: topic); for a field that names "
                                      "each record's client, use split: field:<name>")
            if self.alpha is None:
                self.alpha = 0.5
        else:
            for key in ("group_by", "alpha"):
                if getattr(self, key) is not None:
                    raise KeyedValueError(f"federated.{key}", f"{key} is for split non_iid (got split {self.split}); "
                                          "remove it")
        if self.split_field is None and self.clients is None:
            self.clients = 4
        if self.aggregation == "fedprox" and self.proximal_mu is None:
            self.proximal_mu = 0.01
        if self.aggregation == "fedavg" and self.proximal_mu is not None:
            raise KeyedValueError("federated.proximal_mu", "proximal_mu is the fedprox term; set aggregation: fedprox "
                                  "or remove it")
        return self
