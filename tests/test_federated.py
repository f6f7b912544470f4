"""Federated and per-tenant fine-tuning (src/tuneforge/federated/): the recipe section and its refusals, the
client split, the wire check, FedProx's proximal term, a whole federated run on Flower's simulation engine (tiny
model, 2 clients, 2 rounds) interrupted after round 1 and resumed, what crossed the client boundary, and per-tenant
adapters."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import tiny_recipe

from tuneforge.errors import DataError, RecipeError, RunDirError

ROOT = Path(__file__).resolve().parent.parent
FEDERATED_DATA = ROOT / "data" / "federated" / "train.jsonl"


@pytest.fixture(scope="module")
def two_shops(tmp_path_factory) -> Path:
    """24 records of two shops (north: mostly orders, east: mostly returns), as shipped in data/federated/."""
    rows = [json.loads(line) for line in FEDERATED_DATA.read_text(encoding="utf-8").splitlines()]
    kept = [r for r in rows if r["shop"] == "north"][:12] + [r for r in rows if r["shop"] == "east"][:12]
    path = tmp_path_factory.mktemp("fed") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return path


def fed_recipe(model_dir, data_file, federated: dict, **sections) -> dict:
    recipe = tiny_recipe(model_dir, data_file)
    recipe["train"] = {k: v for k, v in recipe["train"].items() if k != "max_steps"}
    recipe["train"].update(scheduler="constant", report_to=[])
    recipe["data"]["eval_fraction"] = 0.25
    recipe["eval"].update(max_examples=2, max_new_tokens=4, few_shot=0, forgetting=False)
    recipe["federated"] = federated
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and isinstance(recipe.get(key), dict) else value
    return recipe


def parse(data: dict):
    from tuneforge.recipe import parse_recipe

    return parse_recipe(data)


# ---------------------------------------------------------------------------------------------------------------
# The section and the refusals


@pytest.mark.parametrize("federated, key, words", [
    ({"split": "field:"}, "federated.split", "needs the name of the record field"),
    ({"split": "by_shop"}, "federated.split", "iid, non_iid or field:<name>"),
    ({"local_steps": 2, "local_epochs": 1}, "federated.local_epochs", "not both"),
    ({"split": "non_iid"}, "federated.group_by", "group_by"),
    ({"alpha": 0.3}, "federated.alpha", "split non_iid"),
    ({"proximal_mu": 0.1}, "federated.proximal_mu", "fedprox"),
    ({"mode": "per_tenant", "split": "iid"}, "federated.split", "field:<name>"),
    ({"mode": "per_tenant", "split": "field:shop", "rounds": 5}, "federated.rounds", "mode federated"),
    ({"privacy": {"clipping_norm": 1.0, "secure_aggregation": True}}, "federated.privacy.secure_aggregation",
     "SecAgg+"),
    ({"clients": 1}, "federated.clients", "greater than or equal to 2"),
])
def test_section_errors_name_the_key(tiny_model_dir, two_shops, federated, key, words):
    with pytest.raises(RecipeError) as info:
        parse(fed_recipe(tiny_model_dir, two_shops, federated))
    text = str(info.value)
    assert f"`{key}`" in text and words in text


def test_section_defaults_are_filled_in(tiny_model_dir, two_shops):
    fed = parse(fed_recipe(tiny_model_dir, two_shops, {"split": "non_iid", "group_by": "kind",
                                                        "aggregation": "fedprox"})).federated
    assert (fed.local_steps, fed.alpha, fed.proximal_mu, fed.clients) == (10, 0.5, 0.01, 4)
    assert parse(fed_recipe(tiny_model_dir, two_shops, {"split": "field:shop"})).federated.clients is None


def test_keys_a_federated_run_cannot_honour_are_refused(tiny_model_dir, two_shops):
    from tuneforge.federated.checks import check_recipe

    recipe = parse(fed_recipe(tiny_model_dir, two_shops, {"rounds": 2}, method="dpo",
                              adapter={"type": "full"}, train={"max_steps": 5, "save_every": 2}))
    with pytest.raises(RecipeError) as info:
        check_recipe(recipe)
    text = str(info.value)
    for key in ("`method`", "`adapter.type`", "`train.max_steps`", "`train.save_every`"):
        assert key in text
    recipe = parse(fed_recipe(tiny_model_dir, two_shops, {}, adapter={"modules_to_save": ["embed_tokens"]}))
    with pytest.raises(RecipeError, match="reveals which tokens a client holds"):
        check_recipe(recipe)


def test_bad_input_stops_before_a_run_directory_exists(tiny_model_dir, two_shops, tmp_path):
    from tuneforge.train import train

    cases = [
        (fed_recipe(tiny_model_dir, two_shops, {}, adapter={"modules_to_save": ["embed_tokens"]}), RecipeError,
         "adapter.modules_to_save"),
        (fed_recipe(tiny_model_dir, two_shops, {"split": "field:shop", "clients": 3}), DataError, "federated.clients"),
        (fed_recipe(tiny_model_dir, two_shops, {"clients": 20}), DataError, "too few for 20 clients"),
        (fed_recipe(tiny_model_dir, two_shops, {"split": "field:region"}), DataError, "no field 'region'"),
    ]
    for number, (data, error, words) in enumerate(cases):
        output = tmp_path / f"run-{number}"
        with pytest.raises(error, match=words):
            train(parse(data), output=str(output), doctor=False)
        assert not output.exists()


# ---------------------------------------------------------------------------------------------------------------
# The split


def test_splits_iid_non_iid_and_by_field(tiny_model_dir, tmp_path):
    from tuneforge.federated.split import assign, split_recipe_data

    groups = ["a"] * 40 + ["b"] * 40 + ["c"] * 40 + ["d"] * 40
    names, iid = assign(groups, split="iid", clients=4, alpha=None, seed=1)
    assert names == ["client-0", "client-1", "client-2", "client-3"]
    assert sorted(len(m) for m in iid) == [40, 40, 40, 40]
    assert sorted(i for m in iid for i in m) == list(range(160))
    assert assign(groups, split="iid", clients=4, alpha=None, seed=1)[1] == iid  # the same split in every process
    _, skewed = assign(groups, split="non_iid", clients=4, alpha=0.1, seed=1)
    assert sorted(i for m in skewed for i in m) == list(range(160))
    top_share = [max(sum(groups[i] == g for i in m) for g in "abcd") / len(m) for m in skewed]
    _, mixed = assign(groups, split="non_iid", clients=4, alpha=100.0, seed=1)
    mixed_share = [max(sum(groups[i] == g for i in m) for g in "abcd") / len(m) for m in mixed]
    assert sum(top_share) / 4 > 0.7 and max(mixed_share) < 0.4  # small alpha: clients dominated by one group

    recipe = parse(fed_recipe(tiny_model_dir, FEDERATED_DATA, {"split": "field:shop"},
                              data={"eval": str(FEDERATED_DATA.with_name("eval.jsonl"))}))
    split = split_recipe_data(recipe)
    assert [s.name for s in split.shards] == ["east", "north", "south", "west"]
    for shard in split.shards:
        assert shard.held_out and shard.train and not shard.groups
        held = {json.dumps(e["messages"]) for e in shard.held_out}
        assert not held & {json.dumps(e["messages"]) for e in shard.train}
    assert split.global_from == "data.eval" and len(split.global_held_out) == 40

    by_kind = split_recipe_data(parse(fed_recipe(tiny_model_dir, FEDERATED_DATA, {
        "split": "non_iid", "group_by": "kind", "alpha": 0.1, "clients": 3})))
    assert len(by_kind.shards) == 3 and sum(len(s.train) + len(s.held_out) for s in by_kind.shards) == 229
    concentration = [max(c) / sum(c) for c in ([s.groups.get(k, 0) for s in by_kind.shards]
                                               for k in ("order", "return", "track", "cancel"))]
    assert sum(concentration) / 4 > 0.75  # each kind's records sit mostly on one client (iid: about 1/3)

    with pytest.raises(DataError, match="federated.clients"):
        split_recipe_data(parse(fed_recipe(tiny_model_dir, FEDERATED_DATA, {"split": "field:shop", "clients": 3})))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(FEDERATED_DATA.read_text(encoding="utf-8").splitlines()[0] + "\n"
                      + json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant",
                                                                                     "content": "y"}]}) + "\n")
    with pytest.raises(DataError) as info:
        split_recipe_data(parse(fed_recipe(tiny_model_dir, broken, {"split": "field:shop"})))
    assert "no field 'shop'" in str(info.value) and "broken.jsonl:2" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# The wire check


def test_wire_check_refuses_text_and_foreign_tensors():
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from tuneforge.federated.flower import PayloadError, check_content, wire_bytes

    names = {"layer.lora_A.weight"}
    arrays = ArrayRecord({"layer.lora_A.weight": __import__("flwr").app.Array(np.zeros((2, 3), dtype=np.float32))})
    ok = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 3, "train-loss": 0.5})})
    assert check_content(ok, adapter_names=names, direction="client -> server", message_type="train") > 0
    leaky = RecordDict({"arrays": arrays, "config": ConfigRecord({"note": "Where is my package? Order 48213."})})
    with pytest.raises(PayloadError, match="only a few numbers"):
        check_content(leaky, adapter_names=names, direction="client -> server", message_type="train")
    assert b"Where is my package" in wire_bytes(leaky)  # the payload search below would see text that got through
    foreign = RecordDict({"arrays": ArrayRecord({"layer.lora_A.weight": arrays["layer.lora_A.weight"],
                                                 "model.embed_tokens.weight": arrays["layer.lora_A.weight"]})})
    with pytest.raises(PayloadError, match="exactly the adapter's tensors"):
        check_content(foreign, adapter_names=names, direction="client -> server", message_type="train")


def test_privacy_record_says_how_epsilon_was_or_was_not_computed():
    from tuneforge.federated.privacy import privacy_record
    from tuneforge.federated.section import FederatedSection

    fed = FederatedSection(clients=4, rounds=3, privacy={"clipping_norm": 0.5, "noise_multiplier": 1.2})
    record = privacy_record(fed, sampled=4)
    assert record["noise_stdev"] == pytest.approx(1.2 * 0.5 / 4) and record["clipping"] == "client"
    assert record["epsilon"] is not None or "pip install opacus" in record["accountant"]
    quiet = privacy_record(FederatedSection(privacy={"clipping_norm": 0.5}), sampled=4)
    assert quiet["epsilon"] is None and "no privacy guarantee" in quiet["accountant"]


def test_strategy_fraction_aggregation_and_budgets(tiny_model_dir, two_shops):
    from flwr.serverapp.strategy import (DifferentialPrivacyServerSideFixedClipping, FedAvg, FedProx)

    from tuneforge.federated.flower import ServerJob, build_strategy
    from tuneforge.federated.rounds import budgets
    from tuneforge.federated.section import FederatedSection, PrivacySection

    job = dict(clients=3, rounds_left=2, round_offset=0, proximal_mu=None, privacy=None, seed=0, initial={},
               on_round=None)
    fedavg = build_strategy(ServerJob(fraction=0.67, aggregation="fedavg", **job))
    assert type(fedavg) is FedAvg and fedavg.weighted_by_key == "num-examples"  # weighted by training examples
    assert (fedavg.fraction_train, fedavg.min_train_nodes, fedavg.min_evaluate_nodes) == (0.67, 2, 3)
    private = build_strategy(ServerJob(fraction=1.0, aggregation="fedprox", **{
        **job, "proximal_mu": 0.3, "privacy": PrivacySection(clipping_norm=0.5, noise_multiplier=1.1,
                                                             clipping="server")}))
    assert type(private) is DifferentialPrivacyServerSideFixedClipping
    assert (private.noise_multiplier, private.clipping_norm, private.num_sampled_clients) == (1.1, 0.5, 3)
    assert type(private.strategy) is FedProx and private.strategy.proximal_mu == 0.3

    recipe = parse(fed_recipe(tiny_model_dir, two_shops, {"local_epochs": 1.0}, train={"batch_size": 4}))
    by_epochs = budgets(FederatedSection(rounds=3, local_epochs=1.0), recipe, [8, 13], sampled=2)
    assert by_epochs == {"central": 3 * (2 + 4), "local": [6, 12], "per_round": [2, 4]}
    sampled_half = budgets(FederatedSection(rounds=4, local_steps=5, clients=4), recipe, [9, 9, 9, 9], sampled=2)
    assert sampled_half["central"] == 4 * 2 * 5 and sampled_half["local"] == [10, 10, 10, 10]


# ---------------------------------------------------------------------------------------------------------------
# FedProx's proximal term


def test_proximal_term_keeps_the_client_near_the_global_adapter(tiny_model_dir, two_shops):
    import torch

    from tuneforge import train as life
    from tuneforge.federated.local import Workbench
    from tuneforge.federated.pieces import Pieces

    recipe = parse(fed_recipe(tiny_model_dir, two_shops, {}, train={"lr": 5e-2, "batch_size": 4}))
    bench = Workbench(recipe, Pieces.from_life(life))
    examples = bench.tokenize([json.loads(line) for line in two_shops.read_text().splitlines()][:8])

    def distance(mu):
        state = bench.train(bench.initial, examples, steps=3, seed=0, proximal_mu=mu).state
        return sum(float(torch.sum((state[k] - bench.initial[k]) ** 2)) for k in state) ** 0.5

    free, held = distance(None), distance(20.0)
    assert held < 0.8 * free


def test_the_schedule_runs_over_the_whole_federation_not_each_round(tiny_model_dir, two_shops):
    """Three rounds of 2 local steps with a cosine schedule take the learning rates of one 6-step cosine run (as the
    central baseline's schedule runs over its steps); without federation_round each round would restart it."""
    from tuneforge import train as life
    from tuneforge.federated.local import Workbench
    from tuneforge.federated.pieces import Pieces

    recipe = parse(fed_recipe(tiny_model_dir, two_shops, {}, train={"lr": 1e-2, "batch_size": 4, "scheduler": "cosine",
                                                                    "warmup": 1, "logging_steps": 1}))
    bench = Workbench(recipe, Pieces.from_life(life))
    examples = bench.tokenize([json.loads(line) for line in two_shops.read_text().splitlines()][:8])

    def rates(**kwargs) -> list[float]:
        rows: list[dict] = []
        bench.train(bench.initial, examples, seed=0, sink=rows.append, **kwargs)
        return [r["learning_rate"] for r in rows if "learning_rate" in r]

    whole = rates(steps=6)
    sliced = [lr for n in (1, 2, 3) for lr in rates(steps=2, federation_round=(n, 3))]
    restarted = [lr for _ in (1, 2, 3) for lr in rates(steps=2)]
    assert len(whole) == 6 and len(set(whole)) >= 4
    assert sliced == pytest.approx(whole, rel=1e-9)
    assert restarted[2] == pytest.approx(restarted[0]) and restarted != pytest.approx(whole)


def test_a_soft_prompt_crosses_as_its_virtual_token_embeddings(tiny_model_dir, two_shops):
    import torch

    from tuneforge import train as life
    from tuneforge.federated.checks import check_recipe
    from tuneforge.federated.local import Workbench
    from tuneforge.federated.pieces import Pieces

    recipe = parse(fed_recipe(tiny_model_dir, two_shops, {}, adapter={"type": "prompt_tuning", "num_virtual_tokens": 4},
                              train={"lr": 0.1}))
    check_recipe(recipe)
    bench = Workbench(recipe, Pieces.from_life(life))
    assert list(bench.initial) == ["prompt_embeddings"] and tuple(bench.initial["prompt_embeddings"].shape) == (4, 64)
    records = [json.loads(line) for line in two_shops.read_text().splitlines()][:6]
    examples = bench.tokenize(records)
    result = bench.train(bench.initial, examples, steps=1, seed=0)
    assert not torch.equal(result.state["prompt_embeddings"], bench.initial["prompt_embeddings"])
    assert bench.score(result.state, records[:2], examples[:2], label="soft prompt")["eval_loss"] is not None


# ---------------------------------------------------------------------------------------------------------------
# A whole federated run on Flower, interrupted after round 1 and resumed


def _forbidden(records: list[dict], tokenizer) -> tuple[list[bytes], list[bytes]]:
    """Pieces of the clients' records as they could appear on the wire: text (UTF-8) and windows of 6 token ids
    (int64 and int32, as numpy / torch would store them)."""
    from tuneforge.data.pipeline import tokenize_all

    texts = {m["content"] for r in records for m in r["messages"]}
    pieces = [t[i:i + 16].encode() for t in texts for i in range(0, max(1, len(t) - 16), 16)]
    windows = []
    for item in tokenize_all(tokenizer, records, 128)[0]:
        ids = item.input_ids
        for i in range(0, len(ids) - 6, 6):
            windows += [struct.pack("<6q", *ids[i:i + 6]), struct.pack("<6i", *ids[i:i + 6])]
    return pieces, windows


def test_federated_run_on_flower_resumes_and_sends_only_adapter_tensors(tiny_model_dir, two_shops, tmp_path,
                                                                        monkeypatch, smol_tokenizer):
    import torch
    from safetensors.torch import load_file

    from tuneforge.federated import flower, rounds
    from tuneforge.recipe import load_recipe
    from tuneforge.train import train

    clip = 0.05
    recipe = parse(fed_recipe(tiny_model_dir, two_shops, {
        "split": "field:shop", "rounds": 2, "local_steps": 1, "aggregation": "fedprox", "proximal_mu": 0.1,
        "privacy": {"clipping_norm": clip, "noise_multiplier": 0.0}, "baselines": ["central", "local"]}))
    output = tmp_path / "fed"
    write_round = rounds.write_round

    def crash_after_round_1(run, number, state, history):
        written = write_round(run, number, state, history)
        if number == 1:
            raise RuntimeError("the server went down after round 1")
        return written

    monkeypatch.setattr(rounds, "write_round", crash_after_round_1)
    with pytest.raises(RuntimeError, match="went down"):
        train(recipe, output=str(output), doctor=False)
    assert json.loads((output / "status.json").read_text())["state"] == "failed"
    assert rounds.completed_rounds(type("R", (), {"file": lambda self, n: output / n})()) == [0, 1]
    monkeypatch.setattr(rounds, "write_round", write_round)

    seen: list[tuple[str, str, bytes]] = []
    monkeypatch.setattr(flower, "OBSERVERS", [lambda d, t, data: seen.append((d, t, data))])
    train(load_recipe(output / "recipe.yaml"), output=str(output), resume=True)

    summary = json.loads((output / "summary.json").read_text())
    history = summary["federated"]["rounds_history"]
    assert [e["round"] for e in history] == [0, 1, 2]
    for entry in history[1:]:
        assert set(entry["clients"]) == {"0", "1"} and entry["spread"] is not None
        assert all(c["eval_loss"] is not None for c in entry["clients"].values())
        assert set(entry["trained"]) == {"0", "1"}
    comparison = summary["federated"]["comparison"]
    assert comparison["central"] is not None and set(comparison["local"]) == {"east", "north"}
    assert summary["federated"]["privacy"]["clipping_norm"] == clip
    assert summary["adapters"] == [{"name": "global", "path": "adapter"}]
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in rows if r.get("round") == 2 and "global_exact_match" in r) == 1
    assert any(r.get("baseline") == "central" for r in rows)
    assert (output / "plots" / "federated_rounds.png").stat().st_size > 10_000
    page = (output / "report.html").read_text(encoding="utf-8")
    assert "central, same budget" in page and "east alone" in page and "north alone" in page

    # Flower's client-side clipping: no round moved the global adapter further than the clipping norm
    states = [load_file(str(output / "checkpoints" / f"round-{n}" / "adapter_model.safetensors")) for n in range(3)]
    for before, after in zip(states, states[1:]):
        moved = sum(float(torch.sum((after[k] - before[k]) ** 2)) for k in after) ** 0.5
        assert 0 < moved <= clip * 1.001
    saved = load_file(str(output / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], states[2][k]) for k in saved)
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(output / "adapter")).peft_type.value == "LORA"

    # What crossed the client boundary (round 2, both ways): adapter tensors and numbers, never the records
    assert {d for d, _, _ in seen} == {"server -> client", "client -> server"}
    records = [json.loads(line) for line in two_shops.read_text().splitlines()]
    pieces, windows = _forbidden(records, smol_tokenizer)
    assert pieces and windows
    for _direction, _kind, data in seen:
        assert not [p for p in pieces if p in data]
        assert not [w for w in windows if w in data]
    assert any(b"lora_A" in data for _, kind, data in seen if kind == "train")

    with pytest.raises(RunDirError, match="already completed"):
        train(load_recipe(output / "recipe.yaml"), output=str(output), resume=True)


# ---------------------------------------------------------------------------------------------------------------
# Per-tenant adapters


def test_per_tenant_writes_one_ordinary_adapter_per_tenant(tiny_model_dir, two_shops, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.train import train

    recipe = parse(fed_recipe(tiny_model_dir, two_shops, {"mode": "per_tenant", "split": "field:shop"},
                              train={"max_steps": 1}))
    run = train(recipe, output=str(tmp_path / "tenants"), doctor=False)
    summary = json.loads((run.path / "summary.json").read_text())
    assert [a["name"] for a in summary["adapters"]] == ["east", "north"]
    for tenant in summary["tenants"]:
        assert tenant["held_out"] >= 1 and tenant["metrics"]["exact_match"]["tuned"] is not None
        folder = run.path / tenant["adapter"]
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(folder))
        assert (folder / "tokenizer_config.json").is_file()
    assert (run.path / "report.html").is_file()

    # `tuneforge serve RUN` (or --adapter NAME=RUN) serves every tenant's adapter on the one base, as NAME/TENANT
    from safetensors.torch import load_file

    from tuneforge.deploy.serve import load_served, plan_serving

    plan = plan_serving(str(run.path), [])
    assert plan.names == [str(tiny_model_dir), "tenants/east", "tenants/north"]
    assert [a.folder for a in plan.adapters] == [run.path / "adapter" / "east", run.path / "adapter" / "north"]
    other = plan_serving(str(tiny_model_dir), [("shops", str(run.path))])
    assert other.names == [str(tiny_model_dir), "shops/east", "shops/north"]
    served = load_served(plan, device="cpu")
    for name in ("tenants/east", "tenants/north"):
        internal = served.entries[name].adapter
        saved = load_file(str(plan.adapters[0 if name.endswith("east") else 1].folder / "adapter_model.safetensors"))
        loaded = {k: v for k, v in served.model.state_dict().items() if f".{internal}." in k and "lora_B" in k}
        key = next(k for k in saved if "lora_B" in k)
        match = [v for k, v in loaded.items() if k.replace(f".{internal}", "") == key]
        assert len(match) == 1 and torch.equal(match[0], saved[key])
