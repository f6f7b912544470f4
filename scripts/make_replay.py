"""Writes src/tuneforge/assets/general/replay.jsonl (recipes name it builtin:general-replay): general-purpose chat
examples to mix into task data against forgetting:
`data.train: [{path: task.jsonl, weight: 0.85}, {path: builtin:general-replay, weight: 0.15}]`.

Every answer is computed here, so it is correct; the tasks are everyday skills an instruction model should keep
(arithmetic in words, unit conversion, ordering, spelling, counting, formatting, dates, plurals, rewriting).
Deterministic: `python scripts/make_replay.py` writes the same file every time. tests/test_mitigations.py checks
that no item repeats a general-probe question (the probe measures forgetting; replaying it would hide it).
"""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "tuneforge" / "assets" / "general" / "replay.jsonl"
WORDS = ["river", "candle", "garden", "window", "pencil", "harbor", "meadow", "lantern", "basket", "ladder", "compass",
         "blanket", "saddle", "violin", "orchard", "kettle", "marble", "feather", "tunnel", "anchor", "puzzle", "mirror",
         "shovel", "teapot", "helmet", "jacket", "button", "carpet", "dolphin", "falcon"]
PLURALS = {"child": "children", "mouse": "mice", "goose": "geese", "tooth": "teeth", "foot": "feet", "leaf": "leaves",
           "knife": "knives", "city": "cities", "box": "boxes", "bus": "buses", "wolf": "wolves", "baby": "babies",
           "potato": "potatoes", "man": "men", "woman": "women", "sheep": "sheep", "fish": "fish", "person": "people"}
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


def examples(rng: random.Random):
    for _ in range(25):
        a, b = rng.randint(120, 980), rng.randint(120, 980)
        yield (f"A shop sold {a} apples in the morning and {b} in the afternoon. How many apples did it sell in total?",
               f"It sold {a} + {b} = {a + b} apples in total.")
    for _ in range(25):
        km = rng.randint(2, 60)
        yield f"How many metres are there in {km} kilometres?", f"{km} kilometres is {km * 1000:,} metres."
    for _ in range(25):
        words = rng.sample(WORDS, 5)
        yield (f"Sort these words alphabetically: {', '.join(words)}.", ", ".join(sorted(words)))
    for _ in range(25):
        word = rng.choice(WORDS)
        yield f"Spell the word \"{word}\" backwards.", word[::-1]
    for _ in range(25):
        word, letter = rng.choice(WORDS), rng.choice("aeiou")
        count = word.count(letter)
        yield (f"How many times does the letter \"{letter}\" appear in \"{word}\"?",
               f"The letter \"{letter}\" appears {count} time{'s' if count != 1 else ''} in \"{word}\".")
    for _ in range(25):
        n = rng.randint(21, 999)
        yield f"Write the number {n} in words.", number_words(n).capitalize() + "."
    for _ in range(25):
        name, age, city = rng.choice(["Ana", "Bo", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana"]), rng.randint(18, 90), \
            rng.choice(["Lima", "Oslo", "Pune", "Quito", "Riga", "Seoul", "Tunis", "Turin"])
        yield (f"Turn this into a JSON object with keys name, age and city: {name} is {age} and lives in {city}.",
               json.dumps({"name": name, "age": age, "city": city}))
    for _ in range(25):
        day = datetime.date(2001, 1, 1) + datetime.timedelta(days=rng.randint(0, 9000))
        yield (f"What day of the week was {day.strftime('%B')} {day.day}, {day.year}?",
               f"{day.strftime('%B')} {day.day}, {day.year} was a {day.strftime('%A')}.")
    for word, plural in PLURALS.items():
        yield f"What is the plural of \"{word}\"?", f"The plural of \"{word}\" is \"{plural}\"."
    for _ in range(25):
        numbers = rng.sample(range(1, 200), 6)
        yield (f"Which is the largest of these numbers: {', '.join(map(str, numbers))}?",
               f"The largest is {max(numbers)}.")
    for _ in range(25):
        words = rng.sample(WORDS, 3)
        sentence = f"the {words[0]} is next to the {words[1]} and the {words[2]}"
        yield f"Rewrite in capital letters: {sentence}", sentence.upper()
    for _ in range(20):
        price, pct = rng.randint(20, 400), rng.choice([10, 20, 25, 50])
        yield (f"A coat costs {price} euros and is reduced by {pct}%. What is the new price?",
               f"{pct}% of {price} is {price * pct / 100:g}, so the new price is {price - price * pct / 100:g} euros.")


def main() -> None:
    rng = random.Random(20261206)
    unique = dict(examples(rng))  # a question drawn twice is kept once
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in unique.items()]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} examples to {OUT}")


if __name__ == "__main__":
    main()
