"""Regenerate the datasets and tiny model folders under tests/broken/ (deterministic; the outputs are committed).

    python tests/broken/make_fixtures.py

Model folders hold a config.json and a tiny byte-level tokenizer, no weights: the doctor reads only configs and
tokenizers, so a "model" here is a few kilobytes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "datasets"
MODELS = HERE / "models"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

NAMES = ["Ada", "Bo", "Chen", "Dana", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena", "Mateo", "Nia",
         "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]
ITEMS = ["apples", "books", "chairs", "lamps", "pens", "cups", "shirts", "boxes", "plates", "keys"]


def chat(i: int, rng: random.Random, *, long: bool = False) -> dict:
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    name, item = NAMES[i % len(NAMES)], ITEMS[(i // len(NAMES)) % len(ITEMS)]
    question = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now? (case {i})"
    answer = f"{name} has {a} + {b} = {a + b} {item}."
    if long:
        answer += " " + " ".join(f"Step {k}: recount the {item} in box {k} and confirm the running total." for k in range(20))
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_datasets() -> None:
    rng = random.Random(1234)
    pool = [chat(i, rng) for i in range(180)]
    train, held = pool[:120], pool[120:180]
    write_jsonl(DATA / "clean-train.jsonl", train)
    write_jsonl(DATA / "clean-eval.jsonl", held)
    write_jsonl(DATA / "overlap-eval.jsonl", held[:30] + train[:30])
    write_jsonl(DATA / "small-eval.jsonl", held[:10])
    write_jsonl(DATA / "tiny-train.jsonl", train[:1])
    dupes = train[:100] + [train[i] for i in range(0, 40, 2)]
    write_jsonl(DATA / "dupes-train.jsonl", dupes)
    rng = random.Random(99)
    write_jsonl(DATA / "long-train.jsonl", [chat(1000 + i, rng, long=i % 5 < 2) for i in range(120)])
    texts = []
    for i, row in enumerate(train):
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        texts.append({"text": f"### Instruction:\n{user}\n\n### Response:\n{answer}"})
    write_jsonl(DATA / "instruction-text.jsonl", texts)
    templated = []
    for row in train:
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        templated.append({"messages": [
            {"role": "user", "content": f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"},
            {"role": "assistant", "content": f"<|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>"},
        ]})
    write_jsonl(DATA / "templated-train.jsonl", templated)
    prefs = [{"prompt": r["messages"][0]["content"], "chosen": r["messages"][1]["content"],
              "rejected": "I don't know."} for r in train]
    write_jsonl(DATA / "prefs-train.jsonl", prefs)


def byte_tokenizer(specials: list[str], *, bos: str | None, eos: str, pad: str | None, chat_template: str | None,
                   added: list[str] = ()):
    """A byte-level BPE tokenizer with no merges: 256 byte tokens, then `specials`, then `added` (new tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.eos_token = eos
    if bos:
        tokenizer.bos_token = bos
    if pad:
        tokenizer.pad_token = pad
    base = len(tokenizer)
    if added:
        tokenizer.add_tokens(list(added), special_tokens=False)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer, base


def make_model(name: str, *, specials, bos, eos, pad, chat_template, added=()) -> None:
    from transformers import LlamaConfig

    folder = MODELS / name
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, base = byte_tokenizer(specials, bos=bos, eos=eos, pad=pad, chat_template=chat_template, added=added)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=base, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def make_models() -> None:
    # A base model: no chat template (chat data cannot be rendered).
    make_model("base-no-template", specials=["<s>", "</s>", "<pad>"], bos="<s>", eos="</s>", pad="<pad>", chat_template=None)
    # Two tokens added to the tokenizer beyond the model's embedding rows.
    make_model("new-tokens", specials=["<|im_start|>", "<|im_end|>", "<pad>"], bos=None, eos="<|im_end|>", pad="<pad>",
               chat_template=CHATML, added=["<tool_call>", "</tool_call>"])
    # pad token = eos = the template's end-of-turn token, and nothing else in the vocabulary to pad with.
    make_model("pad-eos", specials=["<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>", pad="<|im_end|>",
               chat_template=CHATML)


if __name__ == "__main__":
    make_datasets()
    make_models()
    print(f"wrote {DATA} and {MODELS}")
