"""Canonical examples -> token ids and labels, with the tokenizer's own chat template.

Loss is carried only by assistant turns (every one in a multi-turn conversation, each with its end-of-turn
token, so the model learns to stop; for prompt/completion message lists, only the completion's turns). Masks are
computed from character spans: each assistant turn's span is found by rendering the conversation up to that turn
with and without the generation prompt. The text is then tokenized piece by piece at the span boundaries, so no
token straddles prompt and answer (a template's "\n" merged with an answer's leading whitespace would otherwise put
a prompt character under the loss, and the prompt tokens would differ from those seen at inference). Where
piecewise tokenization changes the text (a SentencePiece tokenizer that prefixes every piece with a space), the
whole text is tokenized at once instead and a token carries loss when its characters overlap a span. This works
for any template that renders conversations prefix-stably; one that does not (e.g. rewrites earlier turns) is
refused with a clear error rather than masked wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge.errors import DataError, ModelError

IGNORE_INDEX = -100  # the label that cross-entropy skips


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    where: str = ""
    spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def loss_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool, where: str = "",
                tools: list[dict] | None = None) -> str:
    if not tokenizer.chat_template:
        raise ModelError(
            "chat-format data needs a chat template, and this model's tokenizer has none",
            where="model.chat_template",
            fix="set model.chat_template to a Jinja template (or a .jinja file), or use a chat/instruct model",
        )
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja2 raises TemplateError subclasses, templates may raise their own messages
        raise DataError(f"the chat template refused this conversation: {exc}", where=where,
                        fix="check the role order the template expects (e.g. user/assistant alternation)") from None


def assistant_spans(tokenizer, messages: list[dict], where: str = "", *, first_loss_turn: int = 0,
                    tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (content + end-of-turn marker).
    Assistant turns before `first_loss_turn` (the prompt of a prompt/completion example) and turns with weight 0
    (OpenAI's per-message weight) get no span."""
    full = render_chat(tokenizer, messages, add_generation_prompt=False, where=where, tools=tools)
    check_tools_rendered(full, messages, tools, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first_loss_turn or message.get("weight", 1) == 0:
            continue
        upto = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False, where=where, tools=tools)
        if i:
            before = render_chat(tokenizer, messages[:i], add_generation_prompt=True, where=where, tools=tools)
        else:
            # An opening assistant turn: what precedes it is whatever the template puts before any message (a
            # default system prompt, BOS, the assistant header). Never "": that would put all of it under the loss.
            try:
                before = tokenizer.apply_chat_template([], tokenize=False, add_generation_prompt=True)
            except Exception:  # many templates index messages[0]
                before = ""
            if not before or not upto.startswith(before):
                raise DataError(
                    "the conversation opens with an assistant turn, and this chat template gives no way to tell "
                    "where that turn starts (it renders text of its own before it)",
                    where=where,
                    fix="start the conversation with a user (or system) turn",
                )
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(
                "the chat template does not render this conversation prefix-stably, so the assistant turns cannot "
                "be located for loss masking",
                where=where,
                fix="use a template that renders earlier turns unchanged (or set model.chat_template)",
            )
        end = len(upto.rstrip())  # the end-of-turn token is kept; trailing newlines are not
        if end > len(before):
            spans.append((len(before), end))
    return full, spans


def check_tools_rendered(text: str, messages: list[dict], tools: list[dict] | None, where: str) -> None:
    """A chat template that ignores `tools` / `tool_calls` would train the model on the text alone, silently: every
    tool's and tool call's function name (and every tool result) must appear in the rendered conversation."""
    names = [t.get("function", t)["name"] for t in tools or []]
    names += [c["function"]["name"] for m in messages for c in m.get("tool_calls") or []]
    names += [m["content"] for m in messages if m["role"] == "tool" and m["content"].strip()]
    missing = next((name for name in names if name not in text), None)
    if missing is not None:
        raise DataError(f"the chat template drops tool definitions or calls ({missing[:60]!r} does not appear in the "
                        f"rendered conversation), so the model would learn the text without them", where=where,
                        fix="set model.chat_template to a template that renders `tools`, `tool_calls` and tool "
                            "results (transformers' tool-use format; e.g. a Qwen2.5 or Llama 3.1 template)")


def label_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids and labels for `text`, where exactly the characters inside `spans` carry loss.

    Tokenized piece by piece at the span boundaries, so the loss-carrying tokens decode to exactly the span texts
    and every prompt piece is tokenized as it is at inference. If that changes the decoded text (a tokenizer that
    adds a prefix space to each piece), the whole text is tokenized at once and a token carries loss when it
    overlaps a span.
    """
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for start, end in spans:
        pieces += [(text[cursor:start], False), (text[start:end], True)]
        cursor = end
    pieces.append((text[cursor:], False))
    pieces = [(piece, carries) for piece, carries in pieces if piece]
    # One batched call for the pieces and the whole text (the tokenizer's per-call overhead dominates here).
    encoded = tokenizer([piece for piece, _ in pieces] + [text], add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = []
    labels: list[int] = []
    for (_, carries), piece_ids in zip(pieces, encoded["input_ids"]):
        ids += piece_ids
        labels += piece_ids if carries else [IGNORE_INDEX] * len(piece_ids)
    whole_ids, whole_offsets = encoded["input_ids"][-1], encoded["offset_mapping"][-1]
    if ids == whole_ids or tokenizer.decode(ids, skip_special_tokens=False) == tokenizer.decode(whole_ids, skip_special_tokens=False):
        return ids, labels
    labels = [
        token if any(start < span_end and end > span_start for span_start, span_end in spans) else IGNORE_INDEX
        for token, (start, end) in zip(whole_ids, whole_offsets)
    ]
    return list(whole_ids), labels


def tokenize_chat(tokenizer, messages: list[dict], max_length: int, where: str = "", *, first_loss_turn: int = 0,
                  tools: list[dict] | None = None) -> Tokenized:
    text, spans = assistant_spans(tokenizer, messages, where, first_loss_turn=first_loss_turn, tools=tools)
    ids, labels = label_spans(tokenizer, text, spans)
    return _truncate(Tokenized(ids, labels, where=where, spans=spans), max_length)


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str, max_length: int, where: str = "") -> Tokenized:
    """Plain-text prompt/completion for a model without a chat template: prompt + completion + EOS, loss on the
    completion and EOS only."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [_eos_id(tokenizer)]
    ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return _truncate(Tokenized(ids, labels, where=where), max_length)


def tokenize_text(tokenizer, text: str, max_length: int, where: str = "") -> Tokenized:
    """Continued pre-training: every token carries loss; EOS closes the document."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    eos = _eos_id(tokenizer)
    if not ids or ids[-1] != eos:  # some tokenizers already append EOS with add_special_tokens
        ids.append(eos)
    return _truncate(Tokenized(ids, list(ids), where=where), max_length)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ModelError(
            "the tokenizer has no EOS token, so the model could not learn where a text or answer ends",
            where="model.name",
            fix="use a model whose tokenizer defines eos_token",
        )
    return tokenizer.eos_token_id


def raw_prompt_completion(example: dict) -> tuple[str, str]:
    """(prompt, completion) of a prompt/completion-strings example, for a model without a chat template. A system
    message (data.system_prompt) has no place of its own in plain text, so it opens the prompt."""
    messages = example["messages"]
    system = "\n\n".join(m["content"].strip() for m in messages if m["role"] == "system" and m["content"].strip())
    prompt = next(m["content"] for m in messages if m["role"] == "user")
    completion = example.get("raw_completion") or next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
    return (f"{system}\n\n{prompt}" if system else prompt), completion


def _truncate(example: Tokenized, max_length: int) -> Tokenized:
    if len(example.input_ids) > max_length:
        example.input_ids = example.input_ids[:max_length]
        example.labels = example.labels[:max_length]
        example.truncated = True
    return example


# No token covers more than this many characters in practice, so a text longer than max_length * this cannot fit in
# max_length tokens: it is cut to that many characters before the tokenizer sees it (a 50 MB line would otherwise be
# tokenized whole -- gigabytes of token ids and offsets -- only to be truncated to max_length tokens afterwards).
CHARS_PER_TOKEN_BOUND = 64


def _bounded(text, max_length: int) -> tuple[object, bool]:
    limit = max_length * CHARS_PER_TOKEN_BOUND
    return (text[:limit], True) if isinstance(text, str) and len(text) > limit else (text, False)


def tokenize_example(tokenizer, example: dict, max_length: int) -> Tokenized:
    """An example -> token ids and labels (loss on the answers), truncated at max_length tokens (`truncated` says
    so). Texts far longer than max_length tokens could ever hold are cut by characters first (CHARS_PER_TOKEN_BOUND)."""
    where = example.get("where", "")
    if "text" in example:
        text, cut = _bounded(example["text"], max_length)
        return _mark(tokenize_text(tokenizer, text, max_length, where), cut)
    if example.get("raw_prompt_completion") and not tokenizer.chat_template:
        prompt, completion = raw_prompt_completion(example)
        (prompt, cut_prompt), (completion, cut_completion) = _bounded(prompt, max_length), _bounded(completion, max_length)
        return _mark(tokenize_prompt_completion(tokenizer, prompt, completion, max_length, where),
                     cut_prompt or cut_completion)
    messages, cut = [], False
    for message in example["messages"]:
        content, was_cut = _bounded(message.get("content"), max_length)
        messages.append({**message, "content": content} if was_cut else message)
        cut = cut or was_cut
    first_loss_turn = len(messages) - example.get("completion_turns", len(messages))
    return _mark(tokenize_chat(tokenizer, messages, max_length, where, first_loss_turn=first_loss_turn,
                               tools=example.get("tools")), cut)


def _mark(item: Tokenized, cut: bool) -> Tokenized:
    if cut:
        item.truncated = True
    return item


def prompt_for_generation(tokenizer, example: dict) -> tuple[str, str]:
    """(prompt text, reference answer) for scoring: the conversation up to its last assistant turn, rendered with
    the generation prompt exactly as at inference, and that turn's content as the reference."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if example.get("raw_prompt_completion") and not tokenizer.chat_template:
        return raw_prompt_completion(example)
    where, tools = example.get("where", ""), example.get("tools")
    prompt = render_chat(tokenizer, messages[:last], add_generation_prompt=True, where=where, tools=tools)
    if not messages[last].get("tool_calls"):
        return prompt, messages[last]["content"]
    # A tool-call turn: the reference is the turn as the template writes it (the call's text), end marker excluded.
    upto = render_chat(tokenizer, messages[: last + 1], add_generation_prompt=False, where=where, tools=tools)
    answer = upto[len(prompt):].rstrip() if upto.startswith(prompt) else messages[last]["content"]
    end = end_of_turn_token_id(tokenizer)
    marker = tokenizer.convert_ids_to_tokens(end) if end is not None else None
    if marker and answer.endswith(marker):
        answer = answer[: -len(marker)].rstrip()
    return prompt, answer


def end_of_turn_token_id(tokenizer) -> int | None:
    """The token the chat template puts right after an assistant's answer (e.g. <|im_end|>, <|eot_id|>)."""
    if not tokenizer.chat_template:
        return tokenizer.eos_token_id
    marker = "tuneforge-answer"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:
        return tokenizer.eos_token_id
    tail = text[text.rindex(marker) + len(marker):].lstrip(" ")
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids[0] if ids and ids[0] in special else tokenizer.eos_token_id


def align_eos(tokenizer, model) -> list[int]:
    """Make generation stop where the chat template ends an answer. A template whose end-of-turn token is not in
    the model's EOS list is the classic "tuned model never stops" bug; the token is added to generation_config
    (which is saved with the adapter/model, so exports and serving stop too). Returns the EOS ids in force."""
    end = end_of_turn_token_id(tokenizer)
    config = model.generation_config
    current = config.eos_token_id
    ids = [] if current is None else ([current] if isinstance(current, int) else list(current))
    for token in (end, tokenizer.eos_token_id):
        if token is not None and token not in ids:
            ids.append(token)
    config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return ids
