"""Generate the quickstart task: pull four fields out of a short order note into one exact JSON shape.

The base SmolLM2-135M-Instruct cannot do this reliably (it wraps JSON in prose or code fences, renames keys,
drops fields), so exact match separates base and tuned model clearly. Deterministic: the same files every run.

    python scripts/make_quickstart_data.py            # writes data/quickstart/{train,eval}.jsonl
"""

import json
import random
from pathlib import Path

FIRST = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kara", "Liam", "Maya",
         "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wei", "Xenia", "Yusuf", "Zoe"]
LAST = ["Smith", "Garcia", "Chen", "Müller", "Rossi", "Novak", "Okafor", "Silva", "Kim", "Dubois", "Haddad", "Berg",
        "Tanaka", "Lopez", "Ivanova", "Nair", "Walsh", "Costa"]
CITIES = ["Berlin", "Lisbon", "Toronto", "Osaka", "Nairobi", "Lyon", "Austin", "Krakow", "Dublin", "Seoul", "Porto",
          "Denver", "Madrid", "Oslo", "Cairo", "Lima", "Perth", "Zurich", "Hanoi", "Boston"]
ITEMS = ["lamp", "chair", "notebook", "kettle", "backpack", "monitor", "desk", "mug", "keyboard", "blanket", "helmet",
         "jacket", "printer", "speaker", "tent", "umbrella"]
TEMPLATES = [
    "Hi, this is {name} from {city}. I'd like {qty} {items}, please.",
    "{name} ({city}) ordered {qty} x {item}.",
    "Please ship {qty} {items} to {name} in {city}.",
    "New order: {qty} {items}. Customer: {name}, {city}.",
    "Customer {name} in {city} wants {qty} {items} delivered next week.",
    "From {city}: {name} is asking for {qty} {items}.",
    "Order for {name}. Deliver {qty} {items} to our {city} branch.",
    "{qty} {items} for {name}, shipping address in {city}.",
]
INSTRUCTION = 'Extract the order as JSON with keys "name", "city", "item", "quantity".\n\nText: '


def make_example(rng: random.Random) -> dict:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    city, item, qty = rng.choice(CITIES), rng.choice(ITEMS), rng.randint(2, 40)
    note = rng.choice(TEMPLATES).format(name=name, city=city, qty=qty, item=item, items=item + "s")
    answer = json.dumps({"name": name, "city": city, "item": item, "quantity": qty}, ensure_ascii=False)
    return {"messages": [{"role": "user", "content": INSTRUCTION + note}, {"role": "assistant", "content": answer}]}


def main(out: Path = Path(__file__).resolve().parent.parent / "data" / "quickstart", n_train: int = 400, n_eval: int = 60):
    rng = random.Random(1234)
    seen, examples = set(), []
    while len(examples) < n_train + n_eval:
        example = make_example(rng)
        key = example["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            examples.append(example)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", examples[:n_train]), ("eval", examples[n_train:])):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for example in part:
                handle.write(json.dumps(example, ensure_ascii=False) + "\n")
    print(f"wrote {n_train} train and {n_eval} eval examples to {out}")


if __name__ == "__main__":
    main()
