"""Record formats -> one canonical example: {"messages": [...]} for chat/instruction data, {"text": ...} for CPT.

Formats: messages (role/content), sharegpt (conversations with from/value), alpaca (instruction/input/output),
prompt_completion (strings, or message lists as TRL allows; loss on the completion only), text (plain documents).
Each is one entry of a table (FORMATS): its name, the keys that identify it, and its reader; detection and
conversion go by the table, so a new format is one entry. preference.py keeps the table of preference formats
(preference, kto) built the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tuneforge.data.readers import Record
from tuneforge.errors import DataError

ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "function_response": "tool"}


def check_text(value, where: str, field: str, *, allow_empty: bool = False) -> str:
    """A string field's value, or a DataError (file:line, field) when it is missing, not a string, or empty."""
    if value is None and allow_empty:
        return ""
    if value is None:
        raise DataError(f"`{field}` is missing (or null)", where=where, fix="fill in the text, or remove the example")
    if not isinstance(value, str):
        raise DataError(f"`{field}` must be a string, got {type(value).__name__}", where=where)
    if not allow_empty and not value.strip():
        raise DataError(f"`{field}` is empty", where=where, fix="remove the example or fill in the text")
    return value


def check_tool_calls(calls, where: str, field: str) -> list[dict]:
    """OpenAI `tool_calls` ([{id, type: function, function: {name, arguments}}]) -> the same list with `arguments` as a
    mapping: OpenAI writes them as a JSON string, while chat templates (transformers' tool-use format) read a mapping."""
    import json

    if not isinstance(calls, list) or not calls:
        raise DataError(f"`{field}` must be a non-empty list of tool calls", where=where,
                        fix='each: {"type": "function", "function": {"name": ..., "arguments": {...} or "<JSON>"}}')
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(f"`{field}[{j}].function.name` is missing", where=where,
                            fix='each tool call is {"type": "function", "function": {"name": ..., "arguments": ...}}')
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise DataError(f"`{field}[{j}].function.arguments` is not valid JSON ({exc.msg} at character "
                                f"{exc.pos})", where=where, fix="write the arguments as a JSON object") from None
        if not isinstance(arguments, dict):
            raise DataError(f"`{field}[{j}].function.arguments` must be a JSON object", where=where)
        out.append({**call, "type": call.get("type", "function"), "function": {"name": function["name"],
                                                                              "arguments": arguments}})
    return out


def check_tools(tools, where: str) -> list[dict]:
    """The record's `tools` list (OpenAI / transformers JSON-schema function definitions), passed to the chat template."""
    ok = isinstance(tools, list) and all(isinstance(t, dict) and isinstance(t.get("function", t).get("name"), str)
                                         for t in tools)
    if not ok:
        raise DataError("`tools` must be a list of function definitions", where=where,
                        fix='each: {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}')
    return tools


def check_messages(messages, where: str, field: str, *, content_key: str = "content") -> list[dict]:
    """Validate role/content messages; `content_key` is the key as the user's file spells it (ShareGPT: value).
    OpenAI's chat fine-tuning extras are kept: an assistant turn's `tool_calls` (its content may then be null), a tool
    turn's `tool_call_id` / `name`, and `weight` (0 or 1) on an assistant turn (0: the turn is context, no loss)."""
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
        extra = {}
        if message.get("tool_calls") is not None:
            if role != "assistant":
                raise DataError(f"`{field}[{i}].tool_calls` is on a {role} message", where=where,
                                fix="only assistant messages make tool calls")
            extra["tool_calls"] = check_tool_calls(message["tool_calls"], where, f"{field}[{i}].tool_calls")
            content = check_text(content, where, name, allow_empty=True)  # null content: the turn is only the call
        elif role == "assistant":
            content = check_text(content, where, name)  # an empty answer teaches nothing but silence
        else:
            content = check_text(content, where, name, allow_empty=(role == "system"))
        if role == "tool":
            extra.update({k: message[k] for k in ("tool_call_id", "name") if isinstance(message.get(k), str)})
        if "weight" in message:
            weight = message["weight"]
            if role != "assistant" or weight not in (0, 1) or isinstance(weight, bool):
                raise DataError(f"`{field}[{i}].weight` is {weight!r} on a {role} message", where=where,
                                fix="weight is 0 (no loss on this assistant turn) or 1 (loss), on assistant messages only")
            extra["weight"] = int(weight)
        out.append({"role": role, "content": content, **extra})
    return out


def message_text(message: dict) -> str:
    """What a message says, tool calls included (for duplicate and overlap checks)."""
    import json

    calls = message.get("tool_calls")
    return message["content"] + (json.dumps(calls, sort_keys=True) if calls else "")


# ---------------------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Format:
    """One record format. `keys`: what a record of it always has (auto-detection takes the first format in the table
    whose keys a record has all of). `read`: record -> canonical example (DataError with file:line on bad data).
    `check_keys`: the table reports missing keys before `read` runs; False when `read` checks them itself."""
    name: str
    keys: tuple[str, ...]
    read: Callable[[Record], dict]
    check_keys: bool = True


@dataclass(frozen=True)
class FormatTable:
    """Formats of one kind of data, in detection order; `what` and `fix` word the error when none matches."""
    what: str
    fix: str
    formats: tuple[Format, ...]

    def get(self, name: str) -> Format:
        for fmt in self.formats:
            if fmt.name == name:
                return fmt
        raise KeyError(name)

    def detect(self, record: Record) -> str:
        keys = set(record.data)
        for fmt in self.formats:
            if set(fmt.keys) <= keys:
                return fmt.name
        fix = self.fix
        if self.what == "data" and {"chosen", "rejected"} <= keys:
            fix = ("these are preference pairs (chosen/rejected, e.g. Anthropic HH-RLHF or UltraFeedback): train them "
                   "with a preference method (method: dpo, orpo, simpo, kto...), or for SFT write the chosen "
                   "conversations as {\"messages\": [...]}")
        raise DataError(f"cannot tell the {self.what} format from the keys {sorted(keys)}", where=record.where,
                        fix=fix)

    def read(self, record: Record, name: str) -> dict:
        fmt = self.get(name)
        missing = [k for k in fmt.keys if k not in record.data] if fmt.check_keys else []
        if missing:
            raise DataError(f"missing field(s) {missing} for format {name}", where=record.where,
                            fix="fix the example, or set data.format to the format the file really has")
        return fmt.read(record)

    def canonicalize(self, records: list[Record], fmt: str) -> tuple[list[dict], str]:
        """All records -> canonical examples. `fmt` may be "auto"; returns the format actually used."""
        detected = self.detect(records[0]) if fmt == "auto" else fmt
        examples = []
        for record in records:
            if fmt == "auto":
                this = self.detect(record)
                if this != detected:
                    raise DataError(f"this example looks like {this} but the file started as {detected}",
                                    where=record.where, fix="use one format per file, or set data.format")
            examples.append(self.read(record, detected))
        return examples, detected


# ---------------------------------------------------------------------------------------------------------------
# Readers of the chat / instruction / text formats


def _conversation(messages: list[dict], where: str) -> dict:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("the conversation has no assistant turn, so there is nothing to learn", where=where,
                        fix="add the assistant's answer, or drop the example")
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
        raise DataError("every assistant turn has weight 0, so there is nothing to learn", where=where,
                        fix="set weight 1 on the turn(s) to learn, or drop the example")
    return {"messages": messages, "where": where}


def read_messages(record: Record) -> dict:
    example = _conversation(check_messages(record.data["messages"], record.where, "messages"), record.where)
    if record.data.get("tools") is not None:  # OpenAI function-calling data: rendered by the chat template
        example["tools"] = check_tools(record.data["tools"], record.where)
    return example


def read_sharegpt(record: Record) -> dict:
    turns, where = record.data["conversations"], record.where
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
    return _conversation(check_messages(converted, where, "conversations", content_key="value"), where)


def read_alpaca(record: Record) -> dict:
    data, where = record.data, record.where
    instruction = check_text(data["instruction"], where, "instruction")
    extra = check_text(data.get("input"), where, "input", allow_empty=True)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return _conversation([{"role": "user", "content": prompt},
                          {"role": "assistant", "content": check_text(data["output"], where, "output")}], where)


def read_prompt_completion(record: Record) -> dict:
    data, where = record.data, record.where
    prompt, completion = data["prompt"], data["completion"]
    if not isinstance(prompt, list):
        # TRL's plain-text layout continues the prompt: " Paris." keeps its leading space for a model without a chat
        # template (raw_completion); inside a chat answer that space would be learned as the answer's first token.
        completion = check_text(completion, where, "completion")
        messages = [{"role": "user", "content": check_text(prompt, where, "prompt")},
                    {"role": "assistant", "content": completion.lstrip()}]
        return {"messages": messages, "raw_prompt_completion": True, "raw_completion": completion, "where": where}
    prompt = check_messages(prompt, where, "prompt")
    completion = check_messages(completion, where, "completion")
    if not any(m["role"] == "assistant" for m in completion):
        raise DataError("the completion has no assistant turn, so there is nothing to learn", where=where,
                        fix="the completion must hold the assistant's answer")
    # Loss on the completion only (as in TRL): assistant turns inside the prompt are context. Counted from the
    # end, so a system message added in front (data.system_prompt) keeps it right.
    return {"messages": prompt + completion, "completion_turns": len(completion), "where": where}


def read_text(record: Record) -> dict:
    return {"text": check_text(record.data["text"], record.where, "text"), "where": record.where}


FORMATS = FormatTable("data", "use one of: messages, conversations (ShareGPT), instruction/input/output (Alpaca), "
                              "prompt/completion, text; or set data.format", (
    Format("messages", ("messages",), read_messages),
    Format("sharegpt", ("conversations",), read_sharegpt),
    Format("alpaca", ("instruction", "output"), read_alpaca),
    Format("prompt_completion", ("prompt", "completion"), read_prompt_completion),
    Format("text", ("text",), read_text),
))
CHAT_FORMATS = {"messages", "sharegpt", "alpaca", "prompt_completion"}


def detect_format(record: Record) -> str:
    return FORMATS.detect(record)


def to_canonical(record: Record, fmt: str) -> dict:
    return FORMATS.read(record, fmt)


def canonicalize(records: list[Record], fmt: str) -> tuple[list[dict], str]:
    """All records -> canonical examples. `fmt` may be "auto"; returns the format actually used."""
    return FORMATS.canonicalize(records, fmt)
