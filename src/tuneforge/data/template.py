"""Canonical examples -> token ids and labels, with the tokenizer's own chat template.

Loss is carried only by assistant turns (every one in a multi-turn conversation, each with its end-of-turn
token, so the model learns to stop). Masks are computed from character spans: each assistant turn's span is
found by rendering the conversation up to that turn with and without the generation prompt, and a token
carries loss when its characters overlap a span. This works for any template that renders conversations
prefix-stably; one that does not (e.g. rewrites earlier turns) is refused with a clear error rather than
masked wrongly.
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


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool, where: str = "") -> str:
    if not tokenizer.chat_template:
        raise ModelError(
            "chat-format data needs a chat template, and this model's tokenizer has none",
            where="model.chat_template",
            fix="set model.chat_template to a Jinja template (or a .jinja file), or use a chat/instruct model",
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja2 raises TemplateError subclasses, templates may raise their own messages
        raise DataError(f"the chat template refused this conversation: {exc}", where=where,
                        fix="check the role order the template expects (e.g. user/assistant alternation)") from None


def assistant_spans(tokenizer, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (content + end-of-turn marker)."""
    full = render_chat(tokenizer, messages, add_generation_prompt=False, where=where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True, where=where) if i else ""
        upto = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False, where=where)
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


def tokenize_chat(tokenizer, messages: list[dict], max_length: int, where: str = "") -> Tokenized:
    text, spans = assistant_spans(tokenizer, messages, where)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    labels = [
        token if any(start < span_end and end > span_start for span_start, span_end in spans) else IGNORE_INDEX
        for token, (start, end) in zip(ids, offsets)
    ]
    return _truncate(Tokenized(ids, labels, where=where, spans=spans), max_length)


def tokenize_prompt_completion(tokenizer, prompt: str, completion: str, max_length: int, where: str = "") -> Tokenized:
    """Plain-text prompt/completion for a model without a chat template: prompt + completion + EOS, loss on the
    completion and EOS only."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return _truncate(Tokenized(ids, labels, where=where), max_length)


def tokenize_text(tokenizer, text: str, max_length: int, where: str = "") -> Tokenized:
    """Continued pre-training: every token carries loss; EOS closes the document."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return _truncate(Tokenized(ids, list(ids), where=where), max_length)


def _truncate(example: Tokenized, max_length: int) -> Tokenized:
    if len(example.input_ids) > max_length:
        example.input_ids = example.input_ids[:max_length]
        example.labels = example.labels[:max_length]
        example.truncated = True
    return example


def tokenize_example(tokenizer, example: dict, max_length: int) -> Tokenized:
    where = example.get("where", "")
    if "text" in example:
        return tokenize_text(tokenizer, example["text"], max_length, where)
    if example.get("raw_prompt_completion") and not tokenizer.chat_template:
        messages = example["messages"]
        return tokenize_prompt_completion(tokenizer, messages[0]["content"], messages[1]["content"], max_length, where)
    return tokenize_chat(tokenizer, example["messages"], max_length, where)


def prompt_for_generation(tokenizer, example: dict) -> tuple[str, str]:
    """(prompt text, reference answer) for scoring: the conversation up to its last assistant turn, rendered with
    the generation prompt exactly as at inference, and that turn's content as the reference."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if example.get("raw_prompt_completion") and not tokenizer.chat_template:
        return messages[0]["content"], messages[last]["content"]
    prompt = render_chat(tokenizer, messages[:last], add_generation_prompt=True, where=example.get("where", ""))
    return prompt, messages[last]["content"]


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
