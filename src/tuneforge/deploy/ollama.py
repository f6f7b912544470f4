"""An Ollama Modelfile whose TEMPLATE renders the same prompt as the training chat template.

The Jinja template is not parsed. Its behaviour is read off renders of probe conversations through the tokenizer,
and fitted to the shape most chat templates have (ChatML, Llama-3, Phi-3, ...):

    HEAD + for each message: BEFORE[role] + content + AFTER[role] + GENERATION_PROMPT

with an optional default system prompt the template inserts when a conversation has none (SmolLM2, Qwen do). That
shape is written as a Go template over Ollama's `.Messages`, the default system prompt as the Modelfile's SYSTEM
(Ollama puts it first when a request has no system message), and the result is checked: the Go template, rendered by
`render_go_template` (the small subset it uses) on further probe conversations, must give exactly the tokenizer's
prompt. A template that does not fit (one that merges the system prompt into the first user turn, drops earlier
turns, or renders roles it was not asked about) is refused with ExportError rather than translated approximately.
"""

from __future__ import annotations

import re

from tuneforge.deploy.gguf_convert import ExportError

ROLES = ("system", "user", "assistant")
_MARK = "tfprobe"  # probe contents: plain letters, so no template escapes or trims them


def _render(tokenizer, messages, generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _msg(role: str, n: int) -> dict:
    return {"role": role, "content": f"{_MARK}{role}{n}"}


def _split(text: str, marker: str) -> tuple[str, str]:
    if text.count(marker) != 1:
        raise ValueError(f"the template does not render a message's content exactly once ({marker})")
    before, after = text.split(marker)
    return before, after


def _tail_after(longer: str, prefix: str) -> str:
    if not longer.startswith(prefix):
        raise ValueError("the template renders earlier turns differently once a turn is added")
    return longer[len(prefix):]


def infer_shape(tokenizer) -> dict:
    """Fit the chat template to HEAD + BEFORE/AFTER per role + GENERATION (+ a default system prompt)."""
    u1, a1, u2, s1 = _msg("user", 1), _msg("assistant", 1), _msg("user", 2), _msg("system", 1)
    t_u = _render(tokenizer, [u1], False)
    t_ua = _render(tokenizer, [u1, a1], False)
    t_uau = _render(tokenizer, [u1, a1, u2], False)
    generation = _tail_after(_render(tokenizer, [u1], True), t_u)
    head_and_user, after_user = _split(t_u, u1["content"])
    before_assistant, after_assistant = _split(_tail_after(t_ua, t_u), a1["content"])
    before_user, after_user_2 = _split(_tail_after(t_uau, t_ua), u2["content"])
    if after_user_2 != after_user or not head_and_user.endswith(before_user):
        raise ValueError("the template wraps the first user turn differently from later ones")
    head = head_and_user[: len(head_and_user) - len(before_user)]
    shape = {"before": {"user": before_user, "assistant": before_assistant},
             "after": {"user": after_user, "assistant": after_assistant}, "generation": generation,
             "head": head, "default_system": None}
    try:
        t_su = _render(tokenizer, [s1, u1], False)
    except Exception:  # noqa: BLE001 -- templates raise their own errors for roles they refuse
        return shape  # no system role: conversations with one are not translated (and Ollama gets none)
    head_and_system, rest = _split(t_su, s1["content"])
    after_system = rest[: len(rest) - len(before_user + u1["content"] + after_user)]
    if not rest.endswith(before_user + u1["content"] + after_user):
        raise ValueError("the template renders the user turn after a system message differently")
    if head_and_system.startswith(head) and head_and_system != head:
        shape["before"]["system"] = head_and_system[len(head):]  # no default system prompt: HEAD stays as it is
    elif head.startswith(head_and_system) and head.endswith(after_system):
        # HEAD (no system message given) = HEAD' + BEFORE[system] + default + AFTER[system]: find HEAD' (BOS or "")
        bos = tokenizer.bos_token or ""  # a BOS that opens the prompt once, not one that opens every turn (ChatML)
        once = bos and head_and_system.startswith(bos) and not any(b.startswith(bos) for b in shape["before"].values())
        head_prime = bos if once else ""
        shape["head"] = head_prime
        shape["before"]["system"] = head_and_system[len(head_prime):]
        shape["default_system"] = head[len(head_and_system): len(head) - len(after_system)]
    else:
        raise ValueError("the template's system prompt handling does not fit a plain system turn")
    shape["after"]["system"] = after_system
    return shape


def go_template(shape: dict, *, drop_head: str = "") -> str:
    """The Go template for Ollama. No `{{-` trims: the literal text (newlines included) is emitted verbatim.
    `drop_head` is removed from the start of HEAD (a BOS that llama.cpp adds itself)."""
    head = shape["head"][len(drop_head):] if drop_head and shape["head"].startswith(drop_head) else shape["head"]
    branches = []
    for role in ROLES:
        if role in shape["before"]:
            branches.append((role, shape["before"][role] + "{{ .Content }}" + shape["after"][role]))
    body = "".join(("{{ if" if i == 0 else "{{ else if") + f' eq .Role "{role}" }}}}{text}'
                   for i, (role, text) in enumerate(branches))
    literal = head + "".join(shape["before"].values()) + "".join(shape["after"].values()) + shape["generation"]
    if "{{" in literal or "}}" in literal or '"""' in literal:
        raise ValueError("the template's literal text contains '{{', '}}' or '\"\"\"', which a Modelfile cannot hold verbatim")
    return f"{head}{{{{ range .Messages }}}}{body}{{{{ end }}}}{{{{ end }}}}{shape['generation']}"


_ACTION = re.compile(r"\{\{\s*(.*?)\s*\}\}", re.S)


def render_go_template(template: str, messages: list[dict], system: str | None = None) -> str:
    """Render the Go-template subset `go_template` emits (range .Messages, if/else if eq .Role "x", .Content,
    .Role, end) the way Ollama does, with a Modelfile SYSTEM put first when no message is a system one.
    Anything else is a ValueError: this renderer checks our own output, it is not a Go template engine."""
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}] + messages
    tokens: list[tuple[str, str]] = []
    pos = 0
    for match in _ACTION.finditer(template):
        tokens.append(("text", template[pos: match.start()]))
        tokens.append(("action", match.group(1)))
        pos = match.end()
    tokens.append(("text", template[pos:]))
    out: list[str] = []

    def run(i: int, message: dict | None, emit: bool) -> int:
        """Execute tokens from i until an unmatched `end`/`else`; returns the index of that token."""
        while i < len(tokens):
            kind, value = tokens[i]
            if kind == "text":
                out.append(value if emit else "")
                i += 1
            elif value == "range .Messages":
                start = i + 1
                for item in messages:
                    i = run(start, item, emit)
                if not messages:
                    i = run(start, None, False)
                i += 1  # past `end`
            elif value.startswith("if "):
                i = run_if(i, message, emit)
            elif value in (".Content", ".Role"):
                out.append(message[value[1:].lower()] if emit else "")
                i += 1
            elif value == "end" or value.startswith("else"):
                return i
            else:
                raise ValueError(f"unsupported Go template action {{{{ {value} }}}}")
        return i

    def run_if(i: int, message, emit: bool) -> int:
        taken = False
        while True:
            kind, value = tokens[i]
            condition = value[len("else "):] if value.startswith("else ") else value
            found = re.fullmatch(r'if eq \.Role "(\w+)"', condition)
            if value == "end":
                return i + 1
            if not found and value != "else":
                raise ValueError(f"unsupported Go template condition {{{{ {value} }}}}")
            hit = not taken and (value == "else" or (message is not None and message["role"] == found.group(1)))
            i = run(i + 1, message, emit and hit)
            taken = taken or hit

    end = run(0, None, True)
    if end != len(tokens):
        raise ValueError("unbalanced {{ end }} in the template")
    return "".join(out)


def _probe_conversations() -> list[list[dict]]:
    s, u, a = "system", "user", "assistant"
    tricky = {"role": u, "content": "Line one\n  indented {json: [1, 2]} <b>&amp;</b> café ✓\n"}
    return [[_msg(u, 1)], [_msg(u, 1), _msg(a, 1), _msg(u, 2)], [tricky],
            [_msg(s, 1), _msg(u, 1)], [_msg(s, 1), _msg(u, 1), _msg(a, 1), _msg(u, 2)],
            [{"role": s, "content": "Be brief."}, tricky, {"role": a, "content": " spaced answer "}, _msg(u, 3)]]


def ollama_template(tokenizer, *, bos_added_by_runtime: bool = False) -> tuple[str, str | None]:
    """(TEMPLATE, SYSTEM or None) rendering what the tokenizer's chat template renders with the generation prompt,
    checked on probe conversations; ExportError when the template cannot be translated."""
    if not tokenizer.chat_template:
        raise ExportError("the model has no chat template, so there is no prompt format to give Ollama",
                          where="--format ollama", fix="export --format gguf, or train with model.chat_template set")
    try:
        shape = infer_shape(tokenizer)
        drop = tokenizer.bos_token if bos_added_by_runtime and tokenizer.bos_token else ""
        template = go_template(shape, drop_head=drop)
        for conversation in _probe_conversations():
            if "system" not in shape["before"] and any(m["role"] == "system" for m in conversation):
                continue
            expected = _render(tokenizer, conversation, True)
            got = (drop if shape["head"].startswith(drop) else "") + render_go_template(
                template, conversation, shape["default_system"])
            if got != expected:
                raise ValueError(f"on a probe conversation the translation renders {got!r}, the template {expected!r}")
    except ValueError as exc:
        raise ExportError(f"the chat template cannot be translated into an Ollama TEMPLATE: {exc}",
                          where="--format ollama",
                          fix="export --format gguf (the GGUF carries the template itself for llama.cpp), and write "
                              "the Modelfile's TEMPLATE by hand") from None
    return template, shape["default_system"]


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf_name: str, template: str, system: str | None, stops: list[str]) -> str:
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if system is not None:
        if '"""' in system:
            raise ExportError("the default system prompt contains '\"\"\"', which a Modelfile cannot hold")
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stops]
    lines.append("PARAMETER temperature 0")  # greedy, as tuneforge scored the model
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict:
    """FROM, TEMPLATE, SYSTEM and the stop parameters of a Modelfile written by `modelfile_text`."""
    def block(name):
        found = re.search(rf'^{name} """(.*?)"""$', text, re.S | re.M)
        return found.group(1) if found else None

    stops = [re.sub(r'\\(.)', r'\1', s) for s in re.findall(r'^PARAMETER stop "((?:[^"\\]|\\.)*)"$', text, re.M)]
    source = re.search(r"^FROM (.+)$", text, re.M)
    return {"from": source.group(1) if source else None, "template": block("TEMPLATE"), "system": block("SYSTEM"),
            "stops": stops}
