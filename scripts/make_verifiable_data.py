"""Generate data/verifiable/{train,eval}.jsonl: short arithmetic questions with a checkable answer, for RL with
verifiable rewards (GRPO/RLOO/online DPO/PPO; recipes/grpo.yaml).

Each record: {"prompt": "What is 17 + 25? End your reply with a line 'Answer: <number>'.", "answer": 42}.
The rewards check it automatically: exact_answer (the number after "Answer:" equals `answer`) and a format regex
(the reply ends with "Answer: <number>"). Small numbers (one- and two-digit addition/subtraction, small
multiplication) so a 135M model gets some right at the start: GRPO needs groups whose rewards differ.
Deterministic (seeded), no overlap between train and eval prompts. Run: python scripts/make_verifiable_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

INSTRUCTION = "End your reply with a line 'Answer: <number>'."


def question(rng: random.Random) -> tuple[str, int]:
    kind = rng.choice(["add", "add", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        return f"What is {a} + {b}?", a + b
    if kind == "sub":
        a = rng.randint(5, 40)
        b = rng.randint(1, a)
        return f"What is {a} - {b}?", a - b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} * {b}?", a * b


def main() -> None:
    rng = random.Random(5)
    seen: set[str] = set()
    items = []
    while len(items) < 360:
        text, answer = question(rng)
        if text in seen:
            continue
        seen.add(text)
        items.append({"prompt": f"{text} {INSTRUCTION}", "answer": answer})
    out = Path(__file__).resolve().parent.parent / "data" / "verifiable"
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", items[:300]), ("eval", items[300:])):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} examples to {out / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
