"""Checks of the data: the validation set, train/eval overlap, duplicates, chat templates, prompt masking, the stop
token, truncation, the model's context window and packing."""

from __future__ import annotations

import math
import re

from tuneforge.guide.doctor.core import Context, Finding

TRUNCATION_WARN = 0.05  # share of training examples cut by max_length that is worth a warning
TRUNCATION_ERROR = 0.50  # half the data cut: the recipe trains on something else than the data
EVAL_MIN_EXAMPLES = 50  # below this a 10-point change is inside the noise (95% CI half-width ~14 points at 50)
# Markers of chat templates; in message contents they mean the data was templated twice.
TEMPLATE_MARKERS = {
    "<|im_start|>": "ChatML", "<|im_end|>": "ChatML", "<|start_header_id|>": "Llama 3", "<|eot_id|>": "Llama 3",
    "[INST]": "Llama 2 / Mistral", "<start_of_turn>": "Gemma", "<end_of_turn>": "Gemma", "<|user|>": "Zephyr/Phi",
    "<|assistant|>": "Zephyr/Phi", "<|end|>": "Phi-3",
}
PROMPT_RESPONSE_PATTERN = re.compile(
    r"(###\s*(Instruction|Response|Input|Human|Assistant)\s*:|<\|im_start\|>|<\|start_header_id\|>|\[INST\]|"
    r"<start_of_turn>|^\s*(User|Human|Assistant|Question|Answer)\s*:)",
    re.IGNORECASE | re.MULTILINE,
)

# ---------------------------------------------------------------------------------------------------------------
# Validation set, overlap, duplicates


def check_validation_set(ctx: Context):
    """Seed 000 common mistakes: no validation set -> overfitting goes unnoticed; hold out 5 to 10%."""
    data_eval, fraction = ctx.recipe.data.eval, ctx.recipe.data.eval_fraction
    disabled = data_eval in (None, False, "none") and (fraction in (0, None, False))
    empty = ctx.stats is not None and ctx.stats.eval_examples == 0
    if disabled or empty:
        detail = ("no eval file and data.eval_fraction is 0" if disabled else
                  "the held-out set is empty after preparing the data" + (" (the dataset is too small to split)" if ctx.stats and ctx.stats.train_examples < 10 else ""))
        yield Finding("warning", "no-validation-set", f"there is no validation set: {detail}",
                      "without held-out loss you overfit and do not notice until the model is shipped",
                      "give data.eval (a held-out file) or keep data.eval_fraction at 0.05-0.1 of enough data",
                      ctx.where("data.eval"))


def check_eval_size(ctx: Context):
    """An eval set of a few dozen examples cannot tell a real gain from noise."""
    if ctx.stats is None or ctx.stats.eval_examples == 0:
        return
    n = ctx.stats.eval_examples
    scored = ctx.recipe.eval.max_examples
    shown = min(n, scored) if scored else n
    if shown < EVAL_MIN_EXAMPLES:
        margin = 196 * math.sqrt(0.25 / max(1, shown))
        key = "eval.max_examples" if scored and scored < n else ("data.eval" if ctx.recipe.data.eval else "data.eval_fraction")
        yield Finding("warning", "eval-set-too-small",
                      f"only {shown} held-out example(s) are scored",
                      (f"held-out loss over {shown} examples is too noisy to show overfitting or forgetting"
                       if ctx.spec.data == "text" else
                       f"an accuracy measured on {shown} examples is uncertain by about +/-{margin:.0f} points (95%), so "
                       "base-vs-tuned differences mean little"),
                      f"hold out at least {EVAL_MIN_EXAMPLES} examples (a few hundred is better)", ctx.where(key))


def check_train_eval_overlap(ctx: Context):
    """Seed 000 common mistakes: train/test contamination; verify splits are disjoint by hash."""
    if ctx.stats is None or not ctx.stats.overlap_train_eval:
        return
    from tuneforge.data.pipeline import example_hash

    train_hashes = {example_hash(e) for e in ctx.data.train_examples}
    places = [e.get("where", "") for e in ctx.data.eval_examples if example_hash(e) in train_hashes][:3]
    n, total = ctx.stats.overlap_train_eval, max(1, len(ctx.data.eval_examples))
    yield Finding("error", "train-eval-overlap",
                  f"{n} of {total} eval examples ({100 * n / total:.0f}%) also appear in the training set (same content hash)",
                  "the model is scored on examples it trained on: held-out numbers are inflated and say nothing about new prompts",
                  "remove those examples from one of the files (tuneforge hashes content with whitespace and case folded), "
                  "or drop data.eval to let tuneforge split by hash",
                  ", ".join(p for p in places if p) or ctx.where("data.eval"))


def check_duplicates(ctx: Context):
    """Seed 004: dedupe; duplicates overweight some examples and make epochs mean less than they say."""
    if ctx.data is None:
        return
    from tuneforge.data.pipeline import example_hash

    if ctx.recipe.data.dedup:
        removed = ctx.stats.duplicates_removed
        if removed:
            total = removed + len(ctx.data.train_examples) + (0 if ctx.recipe.data.eval else len(ctx.data.eval_examples))
            share = removed / max(1, total)
            yield Finding("warning" if share > 0.1 else "info", "duplicate-examples",
                          f"{removed} duplicate example(s) ({100 * share:.0f}% of the file) were found and removed",
                          "the file holds fewer distinct examples than it seems" + (
                              "; with this many duplicates the source data likely has a bug" if share > 0.1 else ""),
                          "nothing to do for this run (data.dedup is on); clean the source file if this is unexpected",
                          ctx.where("data.train"))
        return
    seen: dict[str, str] = {}
    places, count = [], 0
    for example in ctx.data.train_examples:
        key = example_hash(example)
        if key in seen:
            count += 1
            if len(places) < 3:
                places.append(f"{example.get('where', '?')} (same as {seen[key]})")
        else:
            seen[key] = example.get("where", "?")
    if count:
        yield Finding("warning", "duplicate-examples",
                      f"{count} training example(s) are exact duplicates (whitespace and case folded) and data.dedup is off",
                      "duplicates are trained on several times per epoch: they are memorised and outweigh the rest",
                      "set data.dedup: true (the default), or remove them from the file",
                      "; ".join(places) or ctx.where("data.dedup"))


# ---------------------------------------------------------------------------------------------------------------
# Chat template, masking, stop token


def _chat_like(ctx: Context) -> bool | None:
    """Whether the data needs a chat template (None when the format is unknown)."""
    if ctx.spec.data == "text":
        return False
    fmt = ctx.data_format or (ctx.stats.format if ctx.stats is not None else None) or ctx.recipe.data.format
    if fmt in (None, "auto"):
        return None
    if fmt == "text":
        return False
    if fmt == "prompt_completion":  # plain prompt/completion strings train without a template
        examples = getattr(ctx.data, "train_examples", None) or []
        return any(not e.get("raw_prompt_completion") for e in examples[:50])
    return True


def _normalise(text: str) -> str:
    return " ".join(text.split())


def check_chat_template(ctx: Context):
    """Seed 004 "the chat template trap" / seed 000 "wrong chat template": use the model's own template, at train
    and inference time; chat data on a model with no template cannot be rendered at all."""
    if ctx.tokenizer is None:
        return
    chat = _chat_like(ctx)
    template = getattr(ctx.tokenizer, "chat_template", None)
    if chat and not template:
        fmt = ctx.data_format or (ctx.stats.format if ctx.stats else "chat")
        yield Finding("error", "no-chat-template",
                      f"the data is in a chat format ({fmt}) but the model's tokenizer has no chat template",
                      "conversations cannot be rendered into the token layout the model will see at inference; "
                      "a base model has no template of its own",
                      "use the instruct/chat version of the model, or set model.chat_template to a template (the "
                      "same one you will serve with), or give prompt/completion strings to train as plain text",
                      ctx.where("model.name"))
    native = ctx.native_chat_template
    if ctx.recipe.model.chat_template and native and _normalise(native) != _normalise(template or ""):
        yield Finding("warning", "chat-template-mismatch",
                      "model.chat_template replaces the chat template the model was trained with",
                      "the model learned its own role markers and special tokens; a different template fights what it "
                      "knows and it produces garbage at inference unless served with exactly this template",
                      "remove model.chat_template to use the model's own template (set it only for base models that have none)",
                      ctx.where("model.chat_template"))
    if chat and ctx.data is not None:
        found: dict[str, str] = {}
        for example in ctx.data.train_examples[:500]:
            for message in example.get("messages", []):
                for marker in TEMPLATE_MARKERS:
                    if marker in message.get("content", "") and marker not in found:
                        found[marker] = example.get("where", "?")
        if found:
            foreign = sorted({TEMPLATE_MARKERS[m] for m in found if m not in (template or "")})
            yield Finding("warning", "chat-template-mismatch",
                          "message contents already contain chat-template markers " + ", ".join(sorted(found))
                          + (f" (from the {', '.join(foreign)} template, not this model's)" if foreign else ""),
                          "the data was templated before tuneforge applies the model's template: every example is "
                          "templated twice and the model learns to print role markers",
                          "store plain messages (role + content) and let tuneforge apply the model's chat template",
                          ", ".join(dict.fromkeys(found.values()).keys()))


def check_prompt_masking(ctx: Context):
    """Seed 000 "prompt loss not masked": the model wastes capacity learning to predict the prompt."""
    if ctx.data is None:
        return
    if ctx.spec.data == "text":  # cpt trains on every token: prompt/response pairs in it are not masked
        texts = [e.get("text", "") for e in ctx.data.train_examples[:200]]
        hits = [t for t in texts if PROMPT_RESPONSE_PATTERN.search(t)]
        if texts and len(hits) >= max(1, 0.3 * len(texts)):
            sample = next(e.get("where", "") for e in ctx.data.train_examples[:200] if PROMPT_RESPONSE_PATTERN.search(e.get("text", "")))
            yield Finding("warning", "prompt-loss-not-masked",
                          f"{len(hits)} of {len(texts)} sampled documents look like prompt/response pairs "
                          f"(### Instruction:, User:/Assistant:, template markers), but method {ctx.method} trains on every token",
                          "the prompts carry loss too, and the model learns a hand-made format instead of its chat template",
                          "convert the data to prompt/completion or messages and use method: sft, which masks the prompts",
                          sample or ctx.where("method"))
        return
    if ctx.method != "sft" and ctx.family != "preference":
        return
    from tuneforge.data.template import IGNORE_INDEX

    items = ctx.data.train[:2000]
    unmasked = [t for t in items if t.labels and all(label != IGNORE_INDEX for label in t.labels)]
    if items and len(unmasked) > 0.5 * len(items):
        yield Finding("error", "prompt-loss-not-masked",
                      f"{len(unmasked)} of {len(items)} training examples have loss on every token, the prompt included",
                      "the model spends capacity learning to predict the prompts instead of the answers",
                      "give the data as messages or prompt/completion so the prompts can be masked",
                      unmasked[0].where or ctx.where("data.format"))


def check_stop_token(ctx: Context):
    """The answer's end-of-turn token must carry loss, or the tuned model never learns to stop (seed 004's pad = eos
    trap: a collator that masks pad tokens masks EOS too when they are the same token; tuneforge's does not)."""
    if ctx.tokenizer is None:
        return
    tok = ctx.tokenizer
    from tuneforge.data.template import IGNORE_INDEX, end_of_turn_token_id

    stop_ids = {i for i in (end_of_turn_token_id(tok), tok.eos_token_id) if i is not None}
    pad = tok.pad_token_id
    if pad is not None and pad in stop_ids:
        yield Finding("info", "pad-is-eos",
                      f"the pad token is the stop token ({tok.convert_ids_to_tokens(pad)!r}); tuneforge masks padding "
                      "by position so this run is safe",
                      "other training code (collators that mask pad ids) would mask every end-of-answer token, and "
                      "a model trained that way never learns to stop",
                      "if the vocabulary has a spare token, set it as pad_token in the tokenizer you export",
                      ctx.where("model.name"))
    if ctx.data is None or ctx.family != "supervised":
        return
    complete = [t for t in ctx.data.train[:2000] if not t.truncated]
    if not complete:
        return
    trained = sum(1 for t in complete if any(i in stop_ids and l != IGNORE_INDEX for i, l in zip(t.input_ids, t.labels)))
    if trained < 0.5 * len(complete):
        names = [tok.convert_ids_to_tokens(i) for i in sorted(stop_ids)]
        yield Finding("error", "stop-token-not-trained",
                      f"in {len(complete) - trained} of {len(complete)} complete training examples no stop token "
                      f"({', '.join(map(repr, names))}) carries loss",
                      "the model never sees an answer end, so after tuning it does not stop generating",
                      "use a chat template that closes each assistant turn with an end-of-turn token (the model's own "
                      "template does), or remove model.chat_template",
                      ctx.where("model.chat_template") + (f", e.g. {complete[0].where}" if complete[0].where else ""))


# ---------------------------------------------------------------------------------------------------------------
# Length: truncation, the context window, packing


def check_context_length(ctx: Context):
    """max_length beyond the model's context window: positions it never saw in pre-training."""
    if ctx.model_config is None:
        return
    from tuneforge.guide.plan import _first, _text_config

    limit = _first(_text_config(ctx.model_config), "max_position_embeddings", "n_positions")
    max_length = ctx.recipe.train.max_length
    if limit and max_length and max_length > limit:
        yield Finding("warning", "max-length-truncates",
                      f"train.max_length {max_length} is longer than the model's context window ({limit} positions)",
                      "positions beyond the window were never trained; quality collapses there (or learned position "
                      "tables simply fail)", f"set train.max_length to at most {limit}", ctx.where("train.max_length"))


def check_truncation(ctx: Context):
    """Seed 000 step 3: max_seq_length 512 to 4096; examples longer than max_length lose their end (the answer)."""
    if ctx.stats is None:
        return
    total = ctx.stats.train_examples + ctx.stats.dropped_no_loss
    cut = ctx.stats.truncated
    if not total or cut / total <= TRUNCATION_WARN:
        return
    max_length = ctx.recipe.train.max_length or ctx.stats.max_length
    suggestion = _length_percentile(ctx, 0.95)
    dropped = ctx.stats.dropped_no_loss
    yield Finding("error" if cut / total >= TRUNCATION_ERROR else "warning", "max-length-truncates",
                  f"{cut} of {total} training examples ({100 * cut / total:.0f}%) are longer than max_length {max_length} "
                  "and are cut" + (f"; {dropped} lost their whole answer and were dropped" if dropped else ""),
                  "a cut example loses its end, usually the answer and its stop token: the model learns half answers "
                  "and does not learn to stop",
                  (f"raise train.max_length to {suggestion} (covers 95% of the examples)" if suggestion and suggestion > max_length
                   else "raise train.max_length, or shorten / split the long examples") + " (plan the memory with `tuneforge plan`)",
                  ctx.where("train.max_length"))


def _length_percentile(ctx: Context, q: float) -> int | None:
    """Untruncated token length at quantile q (cut examples are re-tokenized without a limit), rounded up to 64."""
    if ctx.tokenizer is None or ctx.data is None:
        return None
    from tuneforge.data.template import tokenize_example

    by_where = {e.get("where"): e for e in ctx.data.train_examples}
    lengths = []
    for item in ctx.data.train[:2000]:
        if item.truncated and item.where in by_where:
            try:
                lengths.append(len(tokenize_example(ctx.tokenizer, by_where[item.where], 10**9).input_ids))
            except Exception:
                return None
        else:
            lengths.append(len(item.input_ids))
    if not lengths:
        return None
    lengths.sort()
    value = lengths[min(len(lengths) - 1, int(q * len(lengths)))]
    return int(math.ceil(value / 64) * 64)


def check_packing(ctx: Context):
    """Packing concatenates examples into max_length rows; settings that break it: preference pairs, and models
    whose own attention code may not keep packed examples apart."""
    if not ctx.recipe.train.packing:
        return
    where = ctx.where("train.packing")
    if ctx.family == "preference":
        yield Finding("error", "packing-conflict", f"train.packing is on with method {ctx.method}",
                      "preference methods score each chosen/rejected answer as a whole sequence; packed rows mix "
                      "examples and the pairs can no longer be compared (TRL does not pack preference data)",
                      "set train.packing: false", where)
    if ctx.recipe.model.trust_remote_code:
        yield Finding("warning", "packing-conflict", "train.packing is on with a model that runs its own code (trust_remote_code)",
                      "packing keeps examples apart through position ids; custom attention code usually builds its "
                      "mask from attention_mask only, so packed examples attend to each other",
                      "set train.packing: false for remote-code models, unless you know their attention handles packed "
                      "position ids", where)


def check_curriculum(ctx: Context):
    """Seed 000 step 13: ordering data by difficulty "helps in some specialized settings (math, code), hurts in general
    fine-tuning"."""
    order = ctx.recipe.data.order
    if order == "shuffle":
        return
    first = "shortest" if order == "length" else f"lowest {order}"
    yield Finding("warning", "curriculum-order",
                  f"data.order: {order} trains the examples in a fixed order ({first} first) instead of shuffled",
                  "a curriculum helps in specialised settings (math, code) and hurts general fine-tuning (seed 000); "
                  "a fixed order also makes the last examples weigh most",
                  "keep it for a task where difficulty really grows (and compare with a shuffled run); otherwise "
                  "data.order: shuffle", ctx.where("data.order"))
