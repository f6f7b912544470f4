"""Prompt data for RL (ppo, grpo, rloo, online_dpo): each example is a prompt to sample completions for, plus any
other fields the rewards read (`answer` for exact_answer, `tests` for code_tests, `schema`, ...).

Accepted records (data.format auto, prompt_completion or messages):
  {"prompt": "What is 3 + 4?", "answer": 7, ...}        prompt as a string (or a list of chat messages)
  {"prompt": ..., "completion": ...}                      the completion is kept as `reference` (not trained on)
  {"messages": [..., {"role": "assistant", ...}]}         the turns before the last assistant turn are the prompt,
                                                          that turn's text is kept as `reference`
Every example must carry the same extra fields as the first one (a DataError names the file:line otherwise), as
they become dataset columns passed to the rewards. Prompts become chat turns when the tokenizer has a chat template
(TRL then renders them with it, as SFT does), plain text otherwise.

Dedup and the held-out split go by the prompt (its normalised text), so one prompt never sits on both sides.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from tuneforge.data.formats import check_messages, check_text
from tuneforge.data.readers import Record, read_records
from tuneforge.data.splits import dedup, hash_split, normal_text
from tuneforge.errors import DataError

RESERVED = {"prompt", "completion", "messages", "where", "completions", "prompts", "completion_ids", "trainer_state",
            "log_extra", "log_metric", "environments"}


def canonical_prompt(record: Record, system_prompt: str | None = None) -> dict:
    data, where = record.data, record.where
    if "prompt" in data:
        value = data["prompt"]
        if isinstance(value, list):
            prompt = check_messages(value, where, "prompt")
        else:
            prompt = [{"role": "user", "content": check_text(value, where, "prompt")}]
        reference = data.get("completion")
        if isinstance(reference, list):
            reference = "".join(m.get("content", "") for m in check_messages(reference, where, "completion"))
    elif "messages" in data:
        messages = check_messages(data["messages"], where, "messages")
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            prompt, reference = messages, None
        else:
            prompt, reference = messages[:last], messages[last]["content"]
        if not prompt or prompt[-1]["role"] == "assistant":
            raise DataError("the conversation has no user turn before its last assistant answer, so there is no prompt",
                            where=where, fix="start each conversation with a user message")
    else:
        raise DataError(f"an RL example needs a `prompt` (or `messages`); this one has {sorted(data)}", where=where,
                        fix='give {"prompt": "...", plus the fields your rewards read, e.g. "answer": 42}')
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}] + prompt
    if not any(m["content"].strip() for m in prompt):
        raise DataError("the prompt is empty", where=where, fix="drop the example or write its prompt")
    columns = {k: v for k, v in data.items() if k not in RESERVED}
    if reference is not None and "reference" not in columns:
        columns["reference"] = reference
    return {"prompt": prompt, "columns": columns, "where": where}


def prompt_key(example: dict) -> str:
    turns = [(m["role"], normal_text(m["content"])) for m in example["prompt"]]
    return hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass
class PromptData:
    train: list[dict]  # {"prompt": [messages], "columns": {...}, "where"}
    eval: list[dict]
    columns: list[str]
    stats: object = None
    truncated: int = 0
    extra: dict = field(default_factory=dict)


def _check_columns(examples: list[dict], columns: list[str]) -> None:
    want = set(columns)
    for example in examples:
        have = set(example["columns"])
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            detail = "; ".join(x for x in (f"missing {', '.join(missing)}" if missing else "",
                                           f"extra {', '.join(extra)}" if extra else "") if x)
            raise DataError(f"this example's fields differ from the first example's ({detail})", where=example["where"],
                            fix=f"give every example the same fields ({', '.join(columns) or 'only prompt'}); rewards "
                                f"read them as columns")


def prepare_prompt_data(recipe, tokenizer, resolve) -> PromptData:
    """Read, check, dedup and split RL prompts; prompts are measured (and long ones counted) with the chat template."""
    from tuneforge.data.prepared import DataStats
    from tuneforge.data.template import render_chat

    data = recipe.data
    if data.format not in ("auto", "prompt_completion", "messages"):
        raise DataError(f"method {recipe.method} samples completions for prompts, but data.format is {data.format!r}",
                        where="data.format", fix="use data.format: auto with records holding a `prompt` (and the "
                                                 "fields your rewards read)")

    def load(path, split, limit=None):
        return [canonical_prompt(r, data.system_prompt) for r in read_records(path, split=split, limit=limit)]

    train = load(resolve(data.train), data.split, data.max_examples)
    stats = DataStats(format="prompt", max_length=recipe.train.max_length)
    if data.dedup:
        train, stats.duplicates_removed = dedup(train, prompt_key, keep="last")
    if data.eval:
        held = load(resolve(data.eval), data.eval_split)
    else:
        train, held = hash_split(train, data.eval_fraction, prompt_key)
        stats.eval_split_from_train = True
    if not train:
        raise DataError("no training prompts left after the held-out split", where="data.train", fix="add prompts")
    columns = sorted(train[0]["columns"])
    _check_columns(train, columns)
    _check_columns(held, columns)
    train_keys = {prompt_key(e) for e in train}
    stats.overlap_train_eval = sum(prompt_key(e) in train_keys for e in held)
    limit = recipe.rl.max_prompt_length or max(8, recipe.train.max_length - recipe.rl.max_new_tokens)
    tokens, truncated = 0, 0
    for example in train:
        text = render_chat(tokenizer, example["prompt"], add_generation_prompt=True, where=example["where"]) \
            if tokenizer.chat_template else "".join(m["content"] for m in example["prompt"])
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        example["prompt_text"], example["prompt_tokens"] = text, n
        tokens += min(n, limit)
        truncated += n > limit
    for example in held:
        example["prompt_text"] = render_chat(tokenizer, example["prompt"], add_generation_prompt=True,
                                             where=example["where"]) if tokenizer.chat_template else \
            "".join(m["content"] for m in example["prompt"])
    stats.train_examples, stats.eval_examples = len(train), len(held)
    stats.train_tokens, stats.truncated = tokens, truncated
    return PromptData(train, held, columns, stats, truncated)


def prompt_dataset(examples: list[dict], tokenizer, columns: list[str]):
    """Rows for TRL's GRPO/RLOO/online DPO trainers: `prompt` (chat turns, or text without a chat template) and the
    reward columns."""
    from datasets import Dataset

    rows: dict[str, list] = {"prompt": [e["prompt"] if tokenizer.chat_template else e["prompt_text"] for e in examples]}
    for name in columns:
        values = [e["columns"].get(name) for e in examples]
        # datasets needs one type per column: nested values (schemas, lists) travel as JSON text
        if any(isinstance(v, (dict, list)) for v in values):
            values = [json.dumps(v) if isinstance(v, (dict, list)) else v for v in values]
        rows[name] = values
    return Dataset.from_dict(rows)


def prompt_id_dataset(examples: list[dict], tokenizer, max_prompt_length: int):
    """Rows for PPO: `input_ids` of the rendered prompt (its end kept when longer than max_prompt_length)."""
    from datasets import Dataset

    ids = [tokenizer(e["prompt_text"], add_special_tokens=False)["input_ids"][-max_prompt_length:] for e in examples]
    return Dataset.from_dict({"input_ids": ids})
