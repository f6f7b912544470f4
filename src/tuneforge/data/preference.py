"""Preference data: records -> canonical pairs -> token ids, templated with the model's own chat template.

Formats (detected from the keys, or set with data.format):
  preference   {"prompt", "chosen", "rejected"}: each a string, or a list of messages. Two message-list shapes:
               the prompt's messages + chosen/rejected holding only the answer turn(s), or UltraFeedback-style
               full conversations in chosen/rejected that share the prompt (no `prompt` key, or a prompt that is
               their common prefix): the shared leading turns become the prompt.
               Anthropic HH-RLHF: chosen/rejected as single strings of "\n\nHuman: ..." / "\n\nAssistant: ..."
               turns, read as full conversations.
  kto          {"prompt", "completion", "label"} (unpaired; label true = desirable), strings or message lists.

Each pair is checked: chosen and rejected non-empty and different (a DataError with file:line otherwise).
Canonical forms: {"prompt": [messages], "chosen": [messages], "rejected": [messages], "where"} and
{"prompt": [...], "completion": [...], "label": bool, "where"}.

Tokenized: prompt_ids (rendered with the generation prompt, left-truncated to max_prompt_length) and the answer ids
(the rest of the rendered conversation, with its end-of-turn token; cut so prompt + answer fits max_length).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from tuneforge.data.formats import Format, FormatTable, check_messages, check_text
from tuneforge.data.readers import Record
from tuneforge.data.splits import dedup, hash_split, normal_text
from tuneforge.data.template import IGNORE_INDEX, Tokenized, render_chat
from tuneforge.errors import DataError


def _as_messages(value, where: str, field_name: str, role: str) -> list[dict]:
    if isinstance(value, list):
        return check_messages(value, where, field_name)
    text = check_text(value, where, field_name)
    # TRL's plain-text layout continues the prompt (" blue."); as a chat answer the leading space would be learned.
    return [{"role": role, "content": text.lstrip() if role == "assistant" else text}]


# Anthropic HH-RLHF writes a whole conversation as one string: "\n\nHuman: ...\n\nAssistant: ...".
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ")


def is_hh_text(value) -> bool:
    return isinstance(value, str) and bool(re.match(r"\s*(Human|Assistant): ", value)) and "Assistant: " in value


def hh_messages(text: str, where: str, field_name: str) -> list[dict]:
    """An HH-RLHF conversation string -> messages (Human -> user, Assistant -> assistant)."""
    parts = HH_TURN.split("\n\n" + text.lstrip())
    if parts[0].strip():
        raise DataError(f"`{field_name}` has text before its first Human:/Assistant: turn", where=where)
    turns = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
             for who, said in zip(parts[1::2], parts[2::2])]
    return check_messages(turns, where, field_name)


def _split_shared_prefix(chosen: list[dict], rejected: list[dict]) -> int:
    """Number of leading turns chosen and rejected share (up to, not including, the first differing turn)."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return n


def canonical_pair(record: Record) -> dict:
    data, where = record.data, record.where
    for key in ("chosen", "rejected"):
        if key not in data:
            raise DataError(f"missing field `{key}` for a preference pair", where=where)
        value = data[key]
        if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value):
            raise DataError(f"`{key}` is empty", where=where, fix="every pair needs a non-empty chosen and rejected answer")
    if data.get("prompt") is None and is_hh_text(data["chosen"]) and is_hh_text(data["rejected"]):
        data = {**data, "chosen": hh_messages(data["chosen"], where, "chosen"),
                "rejected": hh_messages(data["rejected"], where, "rejected")}
    chosen = _as_messages(data["chosen"], where, "chosen", "assistant")
    rejected = _as_messages(data["rejected"], where, "rejected", "assistant")
    prompt_value = data.get("prompt")
    if prompt_value is None or (isinstance(prompt_value, str) and not prompt_value.strip() and isinstance(data["chosen"], list)):
        # UltraFeedback style: chosen and rejected are whole conversations; their shared turns are the prompt.
        if not isinstance(data["chosen"], list):
            raise DataError("`prompt` is missing and chosen/rejected are plain strings", where=where,
                            fix="add a prompt, or give chosen/rejected as full conversations (message lists)")
        shared = _split_shared_prefix(chosen, rejected)
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        prompt = _as_messages(prompt_value, where, "prompt", "user")
        # chosen/rejected given as full conversations that repeat the prompt: keep only what follows it
        if chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt and len(chosen) > len(prompt):
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    if not prompt:
        raise DataError("the pair has no prompt (chosen and rejected share no leading turn)", where=where,
                        fix="add a `prompt`, or start both conversations with the same user turn")
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in answer):
            raise DataError(f"`{key}` has no assistant turn after the prompt", where=where,
                            fix=f"`{key}` must hold the assistant's answer")
    if _normal_turns(chosen) == _normal_turns(rejected):
        raise DataError("chosen and rejected are the same answer, so the pair teaches nothing", where=where,
                        fix="drop the pair, or fix the answer that was copied")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "where": where}


def canonical_unpaired(record: Record) -> dict:
    data, where = record.data, record.where
    for key in ("prompt", "completion", "label"):
        if key not in data:
            raise DataError(f"missing field `{key}` for an unpaired (kto) example", where=where)
    label = data["label"]
    if not isinstance(label, bool):
        if label in (0, 1) and not isinstance(label, float):
            label = bool(label)
        else:
            raise DataError(f"`label` must be true (desirable) or false (undesirable), got {label!r}", where=where)
    prompt = _as_messages(data["prompt"], where, "prompt", "user")
    completion = _as_messages(data["completion"], where, "completion", "assistant")
    return {"prompt": prompt, "completion": completion, "label": label, "where": where}


# The preference formats, in detection order (each reader checks its own fields: check_keys=False).
PREFERENCE_FORMATS = FormatTable("preference", "give prompt/chosen/rejected (pairs; chosen/rejected may be full "
                                               "conversations) or prompt/completion/label (unpaired, for kto)", (
    Format("preference", ("chosen", "rejected"), canonical_pair, check_keys=False),
    Format("kto", ("prompt", "completion", "label"), canonical_unpaired, check_keys=False),
))


def detect_preference_format(record: Record) -> str:
    return PREFERENCE_FORMATS.detect(record)


def canonicalize_preferences(records: list[Record], fmt: str) -> tuple[list[dict], str]:
    return PREFERENCE_FORMATS.canonicalize(records, fmt)


def _normal_turns(messages: list[dict]) -> list:
    return [(m["role"], normal_text(m["content"])) for m in messages]


def preference_hash(example: dict) -> str:
    """Normalised content hash of a pair (or unpaired example), for dedup and the eval split."""
    parts = {k: _normal_turns(example[k]) for k in ("prompt", "chosen", "rejected", "completion") if k in example}
    if "label" in example:
        parts["label"] = example["label"]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()


def prompt_hash(example: dict) -> str:
    return hashlib.sha256(json.dumps(_normal_turns(example["prompt"])).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Tokenization


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] = field(default_factory=list)  # empty for unpaired examples
    label: bool | None = None  # unpaired only
    prompt_text: str = ""
    chosen_text: str = ""
    rejected_text: str = ""
    truncated: bool = False
    where: str = ""

    def as_tokenized(self) -> Tokenized:
        """The chosen (or unpaired) sequence as an SFT-style example, prompt masked: what doctor's checks read."""
        return Tokenized(self.prompt_ids + self.chosen_ids, [IGNORE_INDEX] * len(self.prompt_ids) + self.chosen_ids,
                         truncated=self.truncated, where=self.where)


def answer_text(tokenizer, prompt: list[dict], answer: list[dict], prompt_text: str, where: str) -> str:
    """The rendered text of `answer` after the rendered prompt: content plus the template's end-of-turn marker."""
    full = render_chat(tokenizer, prompt + answer, add_generation_prompt=False, where=where)
    if not full.startswith(prompt_text):
        raise DataError("the chat template does not render this conversation prefix-stably, so the answer cannot be "
                        "separated from the prompt", where=where,
                        fix="use a template that renders earlier turns unchanged (or set model.chat_template)")
    return full[len(prompt_text):].rstrip()  # the end-of-turn token is kept; trailing newlines are not


def tokenize_preference(tokenizer, example: dict, max_length: int, max_prompt_length: int) -> TokenizedPair:
    where = example.get("where", "")
    prompt_text = render_chat(tokenizer, example["prompt"], add_generation_prompt=True, where=where)
    answers = [example["chosen"], example["rejected"]] if "chosen" in example else [example["completion"]]
    texts = [answer_text(tokenizer, example["prompt"], a, prompt_text, where) for a in answers]
    encoded = tokenizer([prompt_text] + texts, add_special_tokens=False)["input_ids"]
    prompt_ids, answer_ids = list(encoded[0]), [list(ids) for ids in encoded[1:]]
    truncated = False
    if len(prompt_ids) > max_prompt_length:  # keep the end of the prompt: the question sits next to the answer
        prompt_ids, truncated = prompt_ids[-max_prompt_length:], True
    budget = max(1, max_length - len(prompt_ids))
    for i, ids in enumerate(answer_ids):
        if len(ids) > budget:
            answer_ids[i], truncated = ids[:budget], True
    return TokenizedPair(
        prompt_ids=prompt_ids, chosen_ids=answer_ids[0], rejected_ids=answer_ids[1] if len(answer_ids) > 1 else [],
        label=example.get("label"), prompt_text=prompt_text, chosen_text=texts[0],
        rejected_text=texts[1] if len(texts) > 1 else "", truncated=truncated, where=where,
    )


def to_generation_example(example: dict) -> dict:
    """A pair as an SFT-style example (prompt + chosen answer), so generation metrics score the preferred answer."""
    answer = example["chosen"] if "chosen" in example else example["completion"]
    return {"messages": example["prompt"] + answer, "where": example.get("where", "")}


def preference_dataset(items: list[TokenizedPair]):
    """Pre-tokenized rows for TRL's DPO/KTO trainers (prompt_ids + chosen_ids/rejected_ids, or completion_ids + label)."""
    from datasets import Dataset

    if items and items[0].label is not None:
        return Dataset.from_dict({"prompt_ids": [t.prompt_ids for t in items],
                                  "completion_ids": [t.chosen_ids for t in items],
                                  "label": [bool(t.label) for t in items]})
    return Dataset.from_dict({"prompt_ids": [t.prompt_ids for t in items], "chosen_ids": [t.chosen_ids for t in items],
                              "rejected_ids": [t.rejected_ids for t in items]})


def preference_text_dataset(items: list[TokenizedPair]):
    """Rendered text rows (prompt / chosen / rejected strings) for trainers that tokenize themselves (ORPO, CPO)."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [t.prompt_text for t in items], "chosen": [t.chosen_text for t in items],
                              "rejected": [t.rejected_text for t in items]})


# ---------------------------------------------------------------------------------------------------------------
# The pipeline for preference methods: read -> canonical -> dedup -> split (by prompt) -> tokenize -> counts


def prepare_preference_data(recipe, tokenizer, resolve):
    """What `train` needs for a preference method; the same PreparedData shape as SFT data (`train`/`eval` hold the
    chosen sequences as SFT-style examples, for doctor's checks; `train_pairs`/`eval_pairs` the tokenized pairs)."""
    from tuneforge.data.prepared import DataStats, PreparedData
    from tuneforge.data.readers import read_records

    data = recipe.data
    fmt = {"auto": "auto", "preference": "preference", "kto": "kto"}.get(data.format)
    if fmt is None:
        raise DataError(f"method {recipe.method} needs preference data, but data.format is {data.format!r}",
                        where="data.format", fix="set data.format to preference, kto or auto")
    wanted = "kto" if recipe.method == "kto" else "preference"

    def load(path, split, limit=None):
        examples, detected = canonicalize_preferences(read_records(path, split=split, limit=limit), fmt)
        if detected != wanted and not (wanted == "kto" and detected == "preference"):
            raise DataError(f"method {recipe.method} needs {wanted} data, but {path} holds {detected} examples",
                            where="data.train", fix="give prompt/chosen/rejected pairs for dpo, orpo, simpo and cpo")
        if data.system_prompt:
            for example in examples:
                if example["prompt"][0]["role"] != "system":
                    example["prompt"] = [{"role": "system", "content": data.system_prompt}] + example["prompt"]
        return examples, detected

    train_examples, detected = load(resolve(data.train), data.split, data.max_examples)
    stats = DataStats(format=detected, max_length=recipe.train.max_length)
    if data.dedup:
        train_examples, stats.duplicates_removed = dedup(train_examples, preference_hash, keep="last")
    if data.eval:
        eval_examples, _ = load(resolve(data.eval), data.eval_split)
    else:  # split by prompt hash, so one prompt's pairs never straddle train and eval
        train_examples, eval_examples = hash_split(train_examples, data.eval_fraction, prompt_hash)
        stats.eval_split_from_train = True
    max_prompt = recipe.preference.max_prompt_length or recipe.train.max_length // 2
    # Held-out pairs for preference accuracy (kto trains on unpaired examples but is still scored on the pairs)
    accuracy_pairs = [tokenize_preference(tokenizer, e, recipe.train.max_length, max_prompt)
                      for e in eval_examples if "chosen" in e]
    if detected == "preference" and wanted == "kto":  # pairs -> unpaired: chosen desirable, rejected not
        unpair = lambda items: [x for e in items for x in (  # noqa: E731
            {"prompt": e["prompt"], "completion": e["chosen"], "label": True, "where": e["where"]},
            {"prompt": e["prompt"], "completion": e["rejected"], "label": False, "where": e["where"]})]
        train_examples, eval_examples = unpair(train_examples), unpair(eval_examples)
    train_prompts = {prompt_hash(e) for e in train_examples}
    stats.overlap_train_eval = sum(prompt_hash(e) in train_prompts for e in eval_examples)

    train_pairs = [tokenize_preference(tokenizer, e, recipe.train.max_length, max_prompt) for e in train_examples]
    eval_pairs = [tokenize_preference(tokenizer, e, recipe.train.max_length, max_prompt) for e in eval_examples]
    if not train_pairs:
        raise DataError("no training pairs left after the eval split", where="data.train", fix="add pairs")
    stats.truncated = sum(t.truncated for t in train_pairs)
    stats.train_examples, stats.eval_examples = len(train_pairs), len(eval_pairs)
    stats.train_tokens = sum(len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in train_pairs)
    stats.loss_tokens = sum(len(t.chosen_ids) + len(t.rejected_ids) for t in train_pairs)
    # The examples are kept as SFT-style conversations (prompt + chosen answer): generation metrics, contamination
    # counts and doctor's checks read them as they read SFT data.
    generation = lambda items: [to_generation_example(e) for e in items if e.get("label", True)]  # noqa: E731
    prepared = PreparedData([t.as_tokenized() for t in train_pairs], [t.as_tokenized() for t in eval_pairs],
                            generation(train_examples), generation(eval_examples), stats)
    prepared.train_pairs, prepared.eval_pairs = train_pairs, eval_pairs  # type: ignore[attr-defined]
    prepared.accuracy_pairs = accuracy_pairs  # type: ignore[attr-defined]
    return prepared
