"""Writes data/classify/{train,eval}.jsonl: short product and service reviews labelled negative / neutral / positive,
for `method: classify` (recipes/classify.yaml). Written by this script from templates (no outside data), seeded, so
the files are the same on every run:

    python scripts/make_classify_data.py

Each review joins a subject (the hotel room, the battery, ...) with an opinion phrase of its label, sometimes with a
neutral aside, so no single word decides every example; held-out reviews use subjects and phrase pairings the
training set does not have exactly (eval is split by subject, so it tests generalisation over subjects).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = [
    "the hotel room", "the battery", "the pasta", "this phone", "the delivery", "the customer service", "the film",
    "the concert", "the hiking boots", "the coffee", "the laptop screen", "the checkout process", "the novel",
    "the headphones", "the rental car", "the museum tour", "the pizza", "the app update", "the sofa", "the train ride",
    "the keyboard", "the haircut", "the yoga class", "the vacuum cleaner", "the wine", "the camera", "the backpack",
    "the tent", "the dentist visit", "the printer",
]
PHRASES = {
    "positive": [
        "was wonderful", "exceeded my expectations", "is absolutely worth the money", "made my day",
        "works perfectly", "was a real pleasure", "is the best I have tried", "left me very happy",
        "was excellent from start to finish", "deserves five stars", "is fantastic", "is something I would gladly buy again",
    ],
    "negative": [
        "was a complete disappointment", "broke after two days", "is a waste of money", "ruined my evening",
        "never worked properly", "was awful", "is the worst I have tried", "left me angry",
        "was terrible from start to finish", "deserves zero stars", "is useless", "is something I would never buy again",
    ],
    "neutral": [
        "was okay, nothing special", "does what it says, no more", "is average for the price", "was fine I guess",
        "works as described", "was neither good nor bad", "is about what I expected", "left no strong impression",
        "was ordinary", "deserves three stars", "is acceptable", "is something I might or might not buy again",
    ],
}
ASIDES = ["", "", "", " We went on a Tuesday.", " I used it for a week.", " It arrived in a blue box.",
          " My sister recommended it.", " I paid with a card."]
TEMPLATES = ["{Subject} {phrase}.{aside}", "Honestly, {subject} {phrase}.{aside}", "{Subject} {phrase}, in my opinion.{aside}",
             "{aside_lead}{Subject} {phrase}."]


def review(rng: random.Random, subject: str, label: str) -> dict:
    phrase = rng.choice(PHRASES[label])
    template = rng.choice(TEMPLATES)
    aside = rng.choice(ASIDES)
    text = template.format(Subject=subject[0].upper() + subject[1:], subject=subject, phrase=phrase, aside=aside,
                           aside_lead=aside.strip() + " " if aside else "")
    return {"text": text, "label": label}


def main() -> None:
    rng = random.Random(25)
    subjects = list(SUBJECTS)
    rng.shuffle(subjects)
    held_subjects, train_subjects = subjects[:6], subjects[6:]
    out = Path(__file__).resolve().parent.parent / "data" / "classify"
    out.mkdir(parents=True, exist_ok=True)
    for name, pool, per_label in (("train", train_subjects, 80), ("eval", held_subjects, 20)):
        rows, seen = [], set()
        for label in ("negative", "neutral", "positive"):
            count = 0
            while count < per_label:
                row = review(rng, rng.choice(pool), label)
                if row["text"] not in seen:
                    seen.add(row["text"])
                    rows.append(row)
                    count += 1
        rng.shuffle(rows)
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{out / (name + '.jsonl')}: {len(rows)} reviews")


if __name__ == "__main__":
    main()
