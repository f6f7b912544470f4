"""Record formats -> one canonical example: {"messages": [...]} for chat/instruction data, {"text": ...} for CPT.

Formats: messages (role/content), sharegpt (conversations with from/value), alpaca (instruction/input/output),
prompt_completion (strings, or message lists as TRL allows; loss on the completion only), text (plain documents).
"""

from __future__ import annotations

from tuneforge.data.readers import Record
from tuneforge.errors import DataError

ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "function_response": "tool"}
CHAT_FORMATS = {"messages", "sharegpt", "alpaca", "prompt_completion"}

# The key that identifies each format, in detection order.
_SIGNATURES = [
    ("messages", {"messages"}),
    ("sharegpt", {"conversations"}),
    ("alpaca", {"instruction", "output"}),
    ("prompt_completion", {"prompt", "completion"}),
    ("text", {"text"}),
]


def detect_format(record: Record) -> str:
    keys = set(record.data)
    for name, needed in _SIGNATURES:
        if needed <= keys:
            return name
    raise DataError(
        f"cannot tell the data format from the keys {sorted(keys)}",
        where=record.where,
        fix="use one of: messages, conversations (ShareGPT), instruction/input/output (Alpaca), prompt/completion, "
        "text; or set data.format",
    )


def _text(value, where: str, field: str, *, allow_empty: bool = False) -> str:
    if value is None and allow_empty:
        return ""
    if value is None:
        raise DataError(f"`{field}` is missing (or null)", where=where, fix="fill in the text, or remove the example")
    if not isinstance(value, str):
        raise DataError(f"`{field}` must be a string, got {type(value).__name__}", where=where)
    if not allow_empty and not value.strip():
        raise DataError(f"`{field}` is empty", where=where, fix="remove the example or fill in the text")
    return value


def _check_messages(messages, where: str, field: str, *, content_key: str = "content") -> list[dict]:
    """Validate role/content messages; `content_key` is the key as the user's file spells it (ShareGPT: value)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"`{field}` must be a non-empty list of messages", where=where)
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"`{field}[{i}]` must be an object with role and content", where=where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a list/dict role is unhashable: check the type first
            raise DataError(f"`{field}[{i}].role` is {role!r}: unknown role", where=where,
                            fix=f"use one of {sorted(ROLES)}")
        content = message.get("content")
        name = f"{field}[{i}].{content_key}"
        if role == "assistant":
            content = _text(content, where, name)  # an empty answer teaches nothing but silence
        else:
            content = _text(content, where, name, allow_empty=(role == "system"))
        out.append({"role": role, "content": content})
    return out


def to_canonical(record: Record, fmt: str) -> dict:
    data, where = record.data, record.where
    missing = [k for k in {"messages": ["messages"], "sharegpt": ["conversations"], "alpaca": ["instruction", "output"],
                           "prompt_completion": ["prompt", "completion"], "text": ["text"]}[fmt] if k not in data]
    if missing:
        raise DataError(f"missing field(s) {missing} for format {fmt}", where=where,
                        fix="fix the example, or set data.format to the format the file really has")
    if fmt == "messages":
        messages = _check_messages(data["messages"], where, "messages")
    elif fmt == "sharegpt":
        turns = data["conversations"]
        if not isinstance(turns, list) or not turns:
            raise DataError("`conversations` must be a non-empty list", where=where)
        converted = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn:
                raise DataError(f"`conversations[{i}]` needs `from` and `value`", where=where)
            role = SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
            if role is None:
                raise DataError(f"`conversations[{i}].from` is {turn['from']!r}: unknown role", where=where,
                                fix=f"use one of {sorted(SHAREGPT_ROLES)}")
            converted.append({"role": role, "content": turn.get("value")})
        messages = _check_messages(converted, where, "conversations", content_key="value")
    elif fmt == "alpaca":
        instruction = _text(data["instruction"], where, "instruction")
        extra = _text(data.get("input"), where, "input", allow_empty=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(data["output"], where, "output")}]
    elif fmt == "prompt_completion":
        prompt, completion = data["prompt"], data["completion"]
        if not isinstance(prompt, list):
            messages = [{"role": "user", "content": _text(prompt, where, "prompt")},
                        {"role": "assistant", "content": _text(completion, where, "completion")}]
            return {"messages": messages, "raw_prompt_completion": True, "where": where}
        prompt = _check_messages(prompt, where, "prompt")
        completion = _check_messages(completion, where, "completion")
        if not any(m["role"] == "assistant" for m in completion):
            raise DataError("the completion has no assistant turn, so there is nothing to learn", where=where,
                            fix="the completion must hold the assistant's answer")
        # Loss on the completion only (as in TRL): assistant turns inside the prompt are context. Counted from the
        # end, so a system message added in front (data.system_prompt) keeps it right.
        return {"messages": prompt + completion, "completion_turns": len(completion), "where": where}
    else:
        return {"text": _text(data["text"], where, "text"), "where": where}
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("the conversation has no assistant turn, so there is nothing to learn", where=where,
                        fix="add the assistant's answer, or drop the example")
    return {"messages": messages, "where": where}


def canonicalize(records: list[Record], fmt: str) -> tuple[list[dict], str]:
    """All records -> canonical examples. `fmt` may be "auto"; returns the format actually used."""
    detected = detect_format(records[0]) if fmt == "auto" else fmt
    examples = []
    for record in records:
        if fmt == "auto":
            this = detect_format(record)
            if this != detected:
                raise DataError(f"this example looks like {this} but the file started as {detected}",
                                where=record.where, fix="use one format per file, or set data.format")
        examples.append(to_canonical(record, detected))
    return examples, detected
