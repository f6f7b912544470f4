"""Records -> clients: the split of a federated (or per-tenant) recipe's training data.

The split is a pure function of the recipe (its data file, format, dedup, federated.split / seed, data.eval_fraction),
so every process that asks for client k's records gets the same ones: the server (for the global held-out set and
the baselines) and each Flower client (which keeps only its own shard; the records never travel in a message).

  iid           records shuffled with the seed, dealt round-robin: even shares of the same distribution
  non_iid       for each value of `group_by`, its records spread over the clients in Dirichlet(alpha) proportions
                (small alpha: each client holds few of the values), redrawn until every client holds some records
  field:<name>  one client per distinct value of the field (sorted), e.g. a tenant, hospital or shop

Each client's records are split into its own training and held-out sets by content hash (data.eval_fraction, as for
an ordinary run). The global held-out set is data.eval when given, else every client's held-out records together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tuneforge.errors import DataError

MIN_CLIENT_RECORDS = 2  # a client needs one record to train on and one to hold out


@dataclass
class Shard:
    """One client's (or tenant's) canonical examples."""

    index: int
    name: str
    train: list[dict]
    held_out: list[dict]
    groups: dict[str, int] = field(default_factory=dict)  # group_by / field value -> records


@dataclass
class Split:
    shards: list[Shard]
    global_held_out: list[dict]
    detected_format: str
    duplicates_removed: int = 0
    global_from: str = "clients"  # "clients" (their held-out sets together) or "data.eval"

    def describe(self) -> dict:
        """What eval/clients.json and summary.json record (counts, never records)."""
        return {"format": self.detected_format, "duplicates_removed": self.duplicates_removed,
                "global_held_out": len(self.global_held_out), "global_held_out_from": self.global_from,
                "clients": [{"index": s.index, "name": s.name, "train": len(s.train), "held_out": len(s.held_out),
                             "groups": s.groups} for s in self.shards]}


def _value(record, name: str) -> str:
    if name not in record.data:
        raise DataError(f"the record has no field {name!r}, which the federated split reads", where=record.where,
                        fix=f"give every record a {name!r} field, or change federated.split / federated.group_by")
    value = record.data[name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value).strip() == "":
        raise DataError(f"field {name!r} must be a non-empty string or number (got {value!r})", where=record.where,
                        fix="name the client / group with a plain value")
    return str(value)


def read_with_groups(path: str, fmt: str, group_field: str | None, *, split: str, limit: int | None,
                     system_prompt: str | None) -> tuple[list[dict], list[str | None], str]:
    """(canonical examples, each one's group value or None, detected format)."""
    from tuneforge.data.formats import canonicalize
    from tuneforge.data.readers import read_records

    records = read_records(path, split=split, limit=limit)
    groups = [_value(r, group_field) for r in records] if group_field else [None] * len(records)
    examples, detected = canonicalize(records, fmt)
    if system_prompt:
        for example in examples:
            messages = example.get("messages")
            if messages and messages[0]["role"] != "system":
                example["messages"] = [{"role": "system", "content": system_prompt}] + messages
    return examples, groups, detected


def _dirichlet(groups: list[str | None], clients: int, alpha: float, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(str(g), []).append(i)
    for _attempt in range(200):
        shares: list[list[int]] = [[] for _ in range(clients)]
        for name in sorted(by_group):
            members = list(by_group[name])
            rng.shuffle(members)
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(members)).round().astype(int)[:-1]
            for k, part in enumerate(np.split(np.array(members, dtype=int), cuts)):
                shares[k].extend(int(i) for i in part)
        if min(len(s) for s in shares) >= MIN_CLIENT_RECORDS:
            return [sorted(s) for s in shares]
    raise DataError(f"split non_iid: {len(groups)} records could not be spread over {clients} clients with every "
                    f"client holding at least {MIN_CLIENT_RECORDS} (Dirichlet alpha {alpha})", where="federated.split",
                    fix="use fewer clients, a larger federated.alpha, or more records")


def assign(groups: list[str | None], *, split: str, clients: int | None, alpha: float | None,
           seed: int) -> tuple[list[str], list[list[int]]]:
    """(client names, record indices per client) for the split kind."""
    n = len(groups)
    if split.startswith("field:"):
        names = sorted({str(g) for g in groups})
        members = {name: [] for name in names}
        for i, g in enumerate(groups):
            members[str(g)].append(i)
        return names, [members[name] for name in names]
    assert clients is not None
    if n < clients * MIN_CLIENT_RECORDS:
        raise DataError(f"{n} training records are too few for {clients} clients (each needs at least "
                        f"{MIN_CLIENT_RECORDS}: one to train on, one to hold out)", where="federated.clients",
                        fix="use fewer clients or more records")
    names = [f"client-{k}" for k in range(clients)]
    if split == "iid":
        order = list(range(n))
        random.Random(seed).shuffle(order)
        return names, [sorted(order[k::clients]) for k in range(clients)]
    return names, _dirichlet(groups, clients, alpha or 0.5, seed)


def split_recipe_data(recipe) -> Split:
    """The recipe's records split into client shards, each with its own held-out set, and the global held-out set."""
    from tuneforge.data.splits import dedup, example_hash, hash_split
    from tuneforge.methods import method_spec
    from tuneforge.recipe import resolve_path

    fed, data = recipe.federated, recipe.data
    kind = method_spec(recipe.method).data
    fmt = "text" if kind == "text" and data.format == "auto" else data.format
    group_field = fed.split_field or (fed.group_by if fed.split == "non_iid" else None)
    path = resolve_path(recipe, data.train)
    examples, groups, detected = read_with_groups(path, fmt, group_field, split=data.split, limit=data.max_examples,
                                                  system_prompt=data.system_prompt)
    if kind == "conversations" and detected == "text":
        raise DataError(f"method {recipe.method} needs prompts and answers, but the data is plain text",
                        where="data.format",
                        fix="use method: cpt for plain text, or give messages / prompt+completion data")
    removed = 0
    pairs = list(zip(examples, groups))
    if data.dedup:
        pairs, removed = dedup(pairs, key=lambda pair: example_hash(pair[0]))
    seed = fed.seed if fed.seed is not None else recipe.train.seed
    names, members = assign([g for _, g in pairs], split=fed.split, clients=fed.clients, alpha=fed.alpha, seed=seed)
    if fed.split_field and fed.clients is not None and fed.clients != len(names):
        raise DataError(f"federated.clients is {fed.clients}, but field {fed.split_field!r} has {len(names)} distinct "
                        f"values ({', '.join(names[:8])}{' ...' if len(names) > 8 else ''})", where="federated.clients",
                        fix="remove federated.clients (it is the number of values), or fix the data")
    if fed.split_field and len(names) < (1 if fed.mode == "per_tenant" else 2):
        raise DataError(f"field {fed.split_field!r} has only {len(names)} distinct value(s): nothing to federate",
                        where="federated.split", fix="name a field whose values differ between clients")
    shards = []
    for index, (name, indices) in enumerate(zip(names, members)):
        own = [pairs[i][0] for i in indices]
        counts: dict[str, int] = {}
        for i in indices:
            if pairs[i][1] is not None and not fed.split_field:  # a field split's groups are the client itself
                counts[pairs[i][1]] = counts.get(pairs[i][1], 0) + 1
        if len(own) < MIN_CLIENT_RECORDS:
            raise DataError(f"client {name!r} holds {len(own)} record(s); each needs at least {MIN_CLIENT_RECORDS} (one "
                            "to train on, one to hold out)", where="federated.split",
                            fix="drop or merge that client's records, or add more")
        train, held = hash_split(own, data.eval_fraction)
        shards.append(Shard(index, name, train, held, dict(sorted(counts.items()))))
    global_from, global_held = "clients", [e for s in shards for e in s.held_out]
    if data.eval:
        from tuneforge.data.pipeline import load_examples

        global_held, _ = load_examples(resolve_path(recipe, data.eval), detected, split="test",
                                       system_prompt=data.system_prompt)
        if data.dedup:
            global_held, _ = dedup(global_held)
        global_from = "data.eval"
    return Split(shards, global_held, detected, removed, global_from)


def safe_folder_name(name: str) -> str:
    """A tenant's name as a folder name: letters, digits, '-', '_', '.'; others become '_'."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "_"
    return cleaned[:100]


def tenant_folders(names: list[str]) -> dict[str, str]:
    """tenant -> folder name, refusing two tenants that would share a folder."""
    folders: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        folder = safe_folder_name(name)
        if folder in seen:
            raise DataError(f"tenants {seen[folder]!r} and {name!r} would share the adapter folder {folder!r}",
                            where="federated.split", fix="give tenants names that differ in letters or digits")
        seen[folder] = name
        folders[name] = folder
    return folders

