"""Write data/federated/: a small support-desk task whose records carry the fields that make federated splits
meaningful.

Each record is a customer message turned into a JSON record. There are four kinds of request, each with its own
record layout, which the prompt does not spell out (so it has to be learned from examples):

  order   {"intent": "order", "item": "lamp", "qty": 3, "city": "Oslo"}
  return  {"intent": "return", "item": "kettle", "reason": "broken"}
  track   {"intent": "track", "order": 48213}
  cancel  {"intent": "cancel", "order": 77120, "reason": "changed mind"}

Fields beside `messages`: `kind` (the request kind) and `shop` (which of four shops received it). Each shop mostly
receives one kind (80%), so `split: field:shop` gives four clients with skewed (non-IID) data, and `split: non_iid,
group_by: kind` skews kinds over any number of clients. A client that trains alone learns mostly its own kind's
layout; the global held-out set (eval.jsonl) holds every kind equally.

    python scripts/make_federated_data.py            # writes data/federated/train.jsonl (240) and eval.jsonl (40)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PROMPT = "Turn this customer message into a JSON record.\n\nMessage: {text}"
ITEMS = {"lamp": "lamps", "kettle": "kettles", "jacket": "jackets", "tent": "tents", "chair": "chairs",
         "blender": "blenders", "helmet": "helmets", "backpack": "backpacks", "mirror": "mirrors", "clock": "clocks"}
CITIES = ["Oslo", "Lima", "Porto", "Quito", "Dakar", "Hanoi", "Perth", "Tunis", "Cork", "Riga", "Accra", "Turin"]
REASONS = {"broken": ["arrived broken", "is broken", "was damaged in the box"],
           "wrong size": ["is the wrong size", "does not fit"],
           "not as described": ["looks nothing like the photo", "is not as described"]}
CANCEL_REASONS = {"changed mind": ["I changed my mind", "I do not need it any more"],
                  "too slow": ["it is taking too long", "delivery is too slow"],
                  "ordered twice": ["I ordered it twice by mistake", "it is a duplicate order"]}
SHOPS = {"north": "order", "east": "return", "south": "track", "west": "cancel"}


def _order(rng: random.Random) -> tuple[str, dict]:
    item, city, qty = rng.choice(list(ITEMS)), rng.choice(CITIES), rng.randint(2, 40)
    text = rng.choice([f"I'd like {qty} {ITEMS[item]} delivered to {city}.",
                       f"Please send {qty} {ITEMS[item]} to our office in {city}.",
                       f"Can I order {qty} {ITEMS[item]}? Shipping to {city}.",
                       f"{qty} {ITEMS[item]} for {city}, please."])
    return text, {"intent": "order", "item": item, "qty": qty, "city": city}


def _return(rng: random.Random) -> tuple[str, dict]:
    item, reason = rng.choice(list(ITEMS)), rng.choice(list(REASONS))
    said = rng.choice(REASONS[reason])
    text = rng.choice([f"The {item} I got {said}, I want to send it back.",
                       f"I want to return my {item} because it {said}.",
                       f"Returning a {item}: it {said}.",
                       f"My new {item} {said}. How do I return it?"])
    return text, {"intent": "return", "item": item, "reason": reason}


def _track(rng: random.Random) -> tuple[str, dict]:
    order = rng.randint(10000, 99999)
    text = rng.choice([f"Where is my package? Order {order}.", f"Any news on order {order}? It has not arrived.",
                       f"Can you tell me the status of order #{order}?", f"Tracking for {order} please."])
    return text, {"intent": "track", "order": order}


def _cancel(rng: random.Random) -> tuple[str, dict]:
    order, reason = rng.randint(10000, 99999), rng.choice(list(CANCEL_REASONS))
    said = rng.choice(CANCEL_REASONS[reason])
    text = rng.choice([f"Please cancel order {order}, {said}.", f"Cancel #{order}: {said}.",
                       f"I want to cancel order {order} because {said}.", f"Order {order} - cancel it, {said}."])
    return text, {"intent": "cancel", "order": order, "reason": reason}


MAKERS = {"order": _order, "return": _return, "track": _track, "cancel": _cancel}


def record(rng: random.Random, kind: str, shop: str) -> dict:
    text, answer = MAKERS[kind](rng)
    return {"messages": [{"role": "user", "content": PROMPT.format(text=text)},
                         {"role": "assistant", "content": json.dumps(answer)}], "kind": kind, "shop": shop}


def make(train_per_shop: int, eval_per_kind: int, own_share: float, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train = []
    for shop, main in SHOPS.items():
        for _ in range(train_per_shop):
            kind = main if rng.random() < own_share else rng.choice([k for k in MAKERS if k != main])
            train.append(record(rng, kind, shop))
    rng.shuffle(train)
    seen = {r["messages"][0]["content"] for r in train}
    evaluation = []
    for shop, kind in SHOPS.items():  # every kind equally, none of them a training message
        kept = 0
        while kept < eval_per_kind:
            candidate = record(rng, kind, shop)
            if candidate["messages"][0]["content"] not in seen:
                seen.add(candidate["messages"][0]["content"])
                evaluation.append(candidate)
                kept += 1
    return train, evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "data" / "federated"))
    parser.add_argument("--train-per-shop", type=int, default=60)
    parser.add_argument("--eval-per-kind", type=int, default=10)
    parser.add_argument("--own-share", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    train, evaluation = make(args.train_per_shop, args.eval_per_kind, args.own_share, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(train)} training and {len(evaluation)} held-out records to {out}")


if __name__ == "__main__":
    main()
