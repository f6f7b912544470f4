"""Generate data/preference/{train,eval}.jsonl: preference pairs whose preferred behaviour is checkable.

Preferred (chosen): a terse one-line answer in the form `Answer: <answer>.` Rejected: the same answer, chatty and
long-winded (the instruct model's habit). A format check on generations (regex ^Answer: [^\\n]{1,60}$) measures
whether a tuned model prefers the behaviour. Deterministic (seeded); run: python scripts/make_preference_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COUNTRIES = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Egypt": "Cairo",
    "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens", "Chile": "Santiago",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna", "Poland": "Warsaw", "Cuba": "Havana",
    "Thailand": "Bangkok", "Sweden": "Stockholm", "Finland": "Helsinki", "Hungary": "Budapest", "Russia": "Moscow",
    "China": "Beijing", "India": "New Delhi", "Mexico": "Mexico City", "Argentina": "Buenos Aires",
}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "open": "closed",
             "early": "late", "full": "empty", "high": "low", "strong": "weak", "rich": "poor", "young": "old",
             "wet": "dry", "hard": "soft", "loud": "quiet", "up": "down", "thick": "thin", "near": "far"}
COLORS = {"the sky on a clear day": "blue", "grass": "green", "snow": "white", "a ripe banana": "yellow",
          "coal": "black", "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow"}
OPENERS = ["Great question! ", "Sure, I'd be happy to help with that. ", "That's an interesting question. ",
           "Of course! Let me explain. ", "Thanks for asking! "]
CLOSERS = [" I hope this helps! Let me know if you have any other questions.",
           " If you want to know more, feel free to ask me anything else.",
           " Please let me know if there is anything else I can help you with today.",
           " I hope that answers your question, and have a wonderful day!"]


def questions(rng: random.Random):
    items = []
    for country, capital in COUNTRIES.items():
        items.append((f"What is the capital of {country}?", capital,
                      f"the capital city of {country} is {capital}, which is also one of its best-known cities"))
    for word, opposite in OPPOSITES.items():
        items.append((f"What is the opposite of the word \"{word}\"?", opposite,
                      f"the opposite of \"{word}\" is \"{opposite}\", as the two words describe contrasting ideas"))
    for thing, color in COLORS.items():
        items.append((f"What color is {thing}?", color, f"{thing} is usually {color}, at least most of the time"))
    for _ in range(260):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        items.append((f"What is {a} {op} {b}?", str(value),
                      f"if we take {a} {word} {b}, we get {value}, which is the result of the calculation"))
    return items


def main() -> None:
    rng = random.Random(0)
    seen, rows = set(), []
    for question, answer, explanation in questions(rng):
        if question in seen:
            continue
        seen.add(question)
        chosen = f"Answer: {answer}."
        rejected = f"{rng.choice(OPENERS)}Well, {explanation}.{rng.choice(CLOSERS)}"
        rows.append({"prompt": question, "chosen": chosen, "rejected": rejected})
    rng.shuffle(rows)
    out = Path(__file__).resolve().parent.parent / "data" / "preference"
    out.mkdir(parents=True, exist_ok=True)
    held = rows[:60]
    train = rows[60:]
    for name, items in (("train", train), ("eval", held)):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in items:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(train)} train / {len(held)} eval pairs to {out}")


if __name__ == "__main__":
    main()
