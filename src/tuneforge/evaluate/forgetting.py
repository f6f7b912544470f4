"""Forgetting probe: does fine-tuning cost the model general ability it had before?

The probe ships with tuneforge (assets/probes/): 536 short multiple-choice items over 16 skills (arithmetic, word
problems, number comparison, sequences, unit conversion, calendar, opposites, analogies, categories, grammar,
spelling, letters, geography, animals, logic, reading), generated with their answers by `scripts/make_probe.py`,
and 8 short general instructions with a checkable answer. It is run on the base model before training and on the
tuned model after, on the same items, so the two are compared item by item.

Multiple choice is scored MMLU-style by likelihood, not generation: each option's text is scored as the
assistant's answer to the question (through the chat template when the tokenizer has one), and the option with
the highest summed log-likelihood is the model's choice (`accuracy`). `accuracy_norm` divides by the option's
length in characters, which removes the bias toward short options.

`compare` takes the per-item scores (0 or 100) of both runs and gives each delta a 95% interval from a paired
bootstrap over items (evaluate/intervals.py); a drop is flagged only when the interval excludes zero AND the drop
is larger than the threshold (default 5 points). The interval's half width is about 1.96 * 100 * sqrt(d - delta^2)
/ sqrt(n) points (d: the share of items that changed, delta: the drop as a share): with 536 items and 15% of them
changed it is about 3.3 points, so a 5-point drop is flagged; how many items change decides it (docs/evaluation.md).
"""

from __future__ import annotations

import json
import re
import time
from importlib import resources

DEFAULT_THRESHOLD = 5.0  # percentage points of probe accuracy


def _asset_lines(name: str) -> list[dict]:
    text = resources.files("tuneforge").joinpath("assets", "probes", name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_probe_items(per_skill: int | None = None) -> list[dict]:
    """[{"id", "subject", "skill", "question", "choices": [4 strings], "answer": index}] (scripts/make_probe.py).
    per_skill: only the first N items of each skill (a quicker probe with every skill, e.g. during training)."""
    items = _asset_lines("general_mc.jsonl")
    if per_skill is None:
        return items
    chosen, taken = [], {}
    for item in items:
        taken[item["skill"]] = taken.get(item["skill"], 0) + 1
        if taken[item["skill"]] <= per_skill:
            chosen.append(item)
    return chosen


def load_instruction_items() -> list[dict]:
    """[{"id", "prompt", "check": {"regex": pattern, "ignore_case": bool}}]"""
    return _asset_lines("general_instructions.jsonl")


def _prompt_ids(tokenizer, question: str) -> list[int]:
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=True)["input_ids"]


def _rows(tokenizer, items: list[dict]) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt ids, [option ids, ...]) per item."""
    lead = "" if tokenizer.chat_template else " "  # after "Answer:" a plain-text option starts with a space
    return [(_prompt_ids(tokenizer, item["question"]),
             [tokenizer(lead + choice, add_special_tokens=False)["input_ids"] for choice in item["choices"]])
            for item in items]


def option_logprobs(model, tokenizer, items: list[dict], *, batch_size: int = 16, shared_prompt: bool = True) -> list[list[float]]:
    """Summed log-likelihood of each option given its question: one list of len(choices) floats per item.

    shared_prompt: run each question once and score its options from the question's KV cache (about 3x less
    compute than one full sequence per option, which `shared_prompt=False` does; both give the same numbers).
    """
    rows = _rows(tokenizer, items)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        if shared_prompt:
            return _cached_logprobs(model, rows, pad, batch_size)
        return _full_logprobs(model, rows, pad, batch_size * 4)
    finally:
        if was_training:
            model.train()


def _common_prefix(prompts: list[list[int]]) -> int:
    """Length of the token prefix all prompts share (the chat template's header and default system prompt), kept
    at least one token short of the shortest prompt so each question still has a last position of its own."""
    if not prompts:
        return 0
    limit = min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def _cached_logprobs(model, rows, pad: int, batch_size: int) -> list[list[float]]:
    """Three forwards, each reusing the KV cache of the one before:
    1. the prefix every question shares (template header, default system prompt), once for the whole probe;
    2. each batch's questions after that prefix, padded in the middle ([prefix][pad][question]); its last logits
       score every option's first token;
    3. the options but their last token (right-padded), the cache repeated once per option; skipped when every
       option of the batch is one token.
    Positions are given explicitly, so padding shifts nothing; the result equals one full sequence per option."""
    import copy

    import torch

    device = next(model.parameters()).device
    cache_key = _cache_argument(model)
    scores: list[list[float]] = [[] for _ in rows]
    shared = _common_prefix([prompt for prompt, _ in rows])
    prefix_cache = None
    if shared:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([rows[0][0][:shared]], device=device), use_cache=True, logits_to_keep=1,
                        position_ids=torch.arange(shared, device=device)[None])
        prefix_cache = _output_cache(out)
    # longest first, grouped by option length then question length: less padding in both batched forwards
    order = sorted(range(len(rows)), key=lambda r: (-max(map(len, rows[r][1]), default=0), -len(rows[r][0])))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = [rows[r] for r in index]
        n_options = len(batch[0][1])
        if any(len(options) != n_options for _, options in batch):  # mixed option counts: score item by item
            for r in index:
                scores[r] = _cached_logprobs(model, [rows[r]], pad, 1)[0]
            continue
        questions = [prompt[shared:] for prompt, _ in batch]
        width = max(len(q) for q in questions)
        question_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        question_mask = torch.zeros((len(batch), shared + width), dtype=torch.long)
        question_mask[:, :shared] = 1
        for row, question in enumerate(questions):
            question_ids[row, width - len(question):] = torch.tensor(question)
            question_mask[row, shared + width - len(question):] = 1
        positions = (question_mask.cumsum(1) - 1).clamp(min=0)[:, shared:]
        kwargs = {}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(batch))
            kwargs[cache_key] = cache
        with torch.no_grad():
            out = model(input_ids=question_ids.to(device), attention_mask=question_mask.to(device),
                        position_ids=positions.to(device), use_cache=True, logits_to_keep=1, **kwargs)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).repeat_interleave(n_options, 0)
        cache = _output_cache(out)
        cache.batch_repeat_interleave(n_options)
        options = [option for _, opts in batch for option in opts]
        ids = [torch.tensor(option, device=device) for option in options]
        total = first.gather(1, torch.stack([o[0] for o in ids])[:, None])[:, 0]  # first token: the question's last logits
        length = max(len(o) for o in options) - 1  # the rest: option[:-1] in, option[1:] predicted
        if length > 0:
            rest_ids = torch.full((len(options), length), pad, dtype=torch.long)
            rest_mask = torch.zeros((len(options), length), dtype=torch.long)
            targets = torch.zeros((len(options), length), dtype=torch.long)
            for row, option in enumerate(options):
                rest_ids[row, : len(option) - 1] = torch.tensor(option[:-1], dtype=torch.long)
                targets[row, : len(option) - 1] = torch.tensor(option[1:], dtype=torch.long)
                rest_mask[row, : len(option) - 1] = 1
            lengths = torch.tensor([len(prompt) for prompt, _ in batch]).repeat_interleave(n_options)
            positions = lengths[:, None] + torch.arange(length)[None, :]
            mask = torch.cat([question_mask.repeat_interleave(n_options, 0), rest_mask], dim=1)
            with torch.no_grad():
                logits = model(input_ids=rest_ids.to(device), attention_mask=mask.to(device),
                               position_ids=positions.to(device), use_cache=True, **{cache_key: cache}).logits
            picked = torch.log_softmax(logits.float(), dim=-1).gather(2, targets.to(device)[..., None])[..., 0]
            total = total + (picked * rest_mask.to(device)).sum(1)
        for k, r in enumerate(index):
            scores[r] = [float(v) for v in total[k * n_options : (k + 1) * n_options]]
    return scores


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cache_argument(model) -> str:
    """transformers 5.24 renamed forward's `past_key_values` to `cache`; use whichever this version takes."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper passes kwargs on
    try:
        parameters = inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def _full_logprobs(model, rows, pad: int, batch_size: int) -> list[list[float]]:
    """Reference path: one right-padded sequence per (question, option)."""
    import torch

    device = next(model.parameters()).device
    flat = [(i, j, len(prompt), prompt + option) for i, (prompt, options) in enumerate(rows)
            for j, option in enumerate(options)]
    scores = [[0.0] * len(options) for _, options in rows]
    order = sorted(range(len(flat)), key=lambda r: -len(flat[r][3]))
    for start in range(0, len(order), batch_size):
        batch = [flat[r] for r in order[start : start + batch_size]]
        width = max(len(ids) for *_, ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        target_mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, (_, _, prompt_len, ids) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            target_mask[row, prompt_len : len(ids)] = True
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        keep = target_mask[:, 1:].to(logits.device)  # token t is predicted by position t-1
        targets = input_ids[:, 1:].to(logits.device)[keep]
        picked = torch.log_softmax(logits[:, :-1][keep].float(), dim=-1).gather(1, targets[:, None])[:, 0]
        owners = torch.arange(len(batch), device=logits.device)[:, None].expand_as(keep)[keep]
        sums = torch.zeros(len(batch), device=logits.device).index_add_(0, owners, picked)
        for row, (i, j, _, _) in enumerate(batch):
            scores[i][j] = float(sums[row])
    return scores


def _check_instruction(answer: str, check: dict) -> bool:
    flags = re.DOTALL | (re.IGNORECASE if check.get("ignore_case") else 0)
    return re.search(check["regex"], answer.strip(), flags) is not None


def run_instructions(model, tokenizer, items: list[dict] | None = None, *, max_new_tokens: int = 40,
                     batch_size: int = 8) -> dict:
    """Greedy answers to the general instructions, each checked by its pattern.
    -> {"pass_rate": %, "n", "items": [{"id", "passed", "answer"}]}"""
    from tuneforge.evaluate.generation import generate_answers

    items = items if items is not None else load_instruction_items()
    prompts = []
    for item in items:
        if tokenizer.chat_template:
            prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": item["prompt"]}], tokenize=False,
                                                         add_generation_prompt=True))
        else:
            prompts.append(f"{item['prompt']}\n")
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    results = [{"id": item["id"], "passed": _check_instruction(answer, item["check"]), "answer": answer}
               for item, answer in zip(items, answers)]
    return {"pass_rate": 100.0 * sum(r["passed"] for r in results) / max(1, len(results)), "n": len(results),
            "items": results}


def run_probe(model, tokenizer, *, items: list[dict] | None = None, instructions: bool = True,
              batch_size: int = 32, max_new_tokens: int = 40) -> dict:
    """Score a model on the probe.

    -> {"accuracy": % (summed log-likelihood), "accuracy_norm": % (per character), "n": items,
        "item_scores": [0 or 100 per item, in item order] (what paired intervals are computed on),
        "per_subject": {subject: %}, "per_skill": {skill: %},
        "items": [{"id", "subject", "skill", "choice", "answer", "correct", "correct_norm"}],
        "instructions": run_instructions(...) or None, "seconds": wall time}
    """
    started = time.time()
    items = items if items is not None else load_probe_items()
    scores = option_logprobs(model, tokenizer, items, batch_size=batch_size)
    results, groups = [], {"per_subject": {}, "per_skill": {}}
    for item, option_scores in zip(items, scores):
        choice = max(range(len(option_scores)), key=lambda j: option_scores[j])
        normed = [s / max(1, len(c)) for s, c in zip(option_scores, item["choices"])]
        choice_norm = max(range(len(normed)), key=lambda j: normed[j])
        correct = choice == item["answer"]
        subject, skill = item.get("subject", "general"), item.get("skill", item.get("subject", "general"))
        results.append({"id": item["id"], "subject": subject, "skill": skill, "choice": choice, "answer": item["answer"],
                        "correct": correct, "correct_norm": choice_norm == item["answer"]})
        groups["per_subject"].setdefault(subject, []).append(correct)
        groups["per_skill"].setdefault(skill, []).append(correct)
    n = len(results)
    out = {
        "accuracy": 100.0 * sum(r["correct"] for r in results) / max(1, n),
        "accuracy_norm": 100.0 * sum(r["correct_norm"] for r in results) / max(1, n),
        "n": n,
        "item_scores": [100.0 if r["correct"] else 0.0 for r in results],
        **{key: {g: 100.0 * sum(v) / len(v) for g, v in sorted(found.items())} for key, found in groups.items()},
        "items": results,
        "instructions": run_instructions(model, tokenizer, max_new_tokens=max_new_tokens) if instructions else None,
    }
    out["seconds"] = round(time.time() - started, 2)
    return out


def _item_scores(result: dict, field: str, group: tuple[str, str] | None = None) -> dict[str, float]:
    """{item id: 0 or 100} from a probe result's items (`field`: correct, correct_norm, or passed for instructions),
    optionally only the items whose group key equals a value, e.g. ("skill", "geography")."""
    items = (result.get("instructions") or {}).get("items", []) if field == "passed" else result.get("items", [])
    return {r["id"]: 100.0 if r[field] else 0.0 for r in items
            if field in r and (group is None or r.get(group[0], r.get("subject")) == group[1])}


def _paired(before: dict[str, float], after: dict[str, float]) -> dict | None:
    """The paired delta (after - before) over the items both results scored, or None if they share none."""
    from tuneforge.evaluate.intervals import paired_delta

    shared = [i for i in before if i in after]
    if not shared:
        return None
    return paired_delta([before[i] for i in shared], [after[i] for i in shared])


def compare(before: dict, after: dict, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Before/after probe results -> the deltas with their 95% intervals, and whether any drop is one the data
    supports and is larger than `threshold` points (`intervals.is_real_drop`).

    -> {"threshold", "flagged": bool, "message": str,
        "scores": {"accuracy"|"accuracy_norm"|"instructions"|"lm_eval:<task>": {"before", "after", "delta", "ci95",
                   "p_value" (exact McNemar, when paired), "n", "flagged"}},
        "per_subject" / "per_skill": {name: {"before", "after", "delta", "ci95"}},
        "lost": ids right before and wrong after, "gained": ids wrong before and right after}
    Rows without per-item scores on both sides (lm-eval tasks, hand-made results) have "ci95": None and are
    flagged on the threshold alone.
    """
    scores = {}
    for key, field in (("accuracy", "correct"), ("accuracy_norm", "correct_norm")):
        if before.get(key) is not None and after.get(key) is not None:
            scores[key] = {"before": before[key], "after": after[key],
                           "paired": _paired(_item_scores(before, field), _item_scores(after, field))}
    if before.get("instructions") and after.get("instructions"):
        scores["instructions"] = {"before": before["instructions"]["pass_rate"], "after": after["instructions"]["pass_rate"],
                                  "paired": _paired(_item_scores(before, "passed"), _item_scores(after, "passed"))}
    for task, value in (before.get("lm_eval") or {}).items():  # eval.lm_eval_tasks, see evaluate/lm_eval_tasks.py
        if task in (after.get("lm_eval") or {}):
            scores[f"lm_eval:{task}"] = {"before": value["score"], "after": after["lm_eval"][task]["score"], "paired": None}
    for values in scores.values():
        _settle(values, threshold)
    groups = {}
    for key, field in (("per_subject", "subject"), ("per_skill", "skill")):
        groups[key] = {}
        for name, value in (before.get(key) or {}).items():
            if name in (after.get(key) or {}):
                paired = _paired(_item_scores(before, "correct", (field, name)), _item_scores(after, "correct", (field, name)))
                groups[key][name] = {"before": value, "after": after[key][name], "delta": after[key][name] - value,
                                     "ci95": paired and paired["ci95"]}
    right_before = {r["id"]: r["correct"] for r in before.get("items", [])}
    right_after = {r["id"]: r["correct"] for r in after.get("items", [])}
    lost = [i for i in right_before if right_before[i] and right_after.get(i) is False]
    gained = [i for i in right_before if not right_before[i] and right_after.get(i) is True]
    return {"threshold": threshold, "flagged": any(v["flagged"] for v in scores.values()),
            "message": _message(scores, threshold), "scores": scores, **groups, "lost": lost, "gained": gained}


def _settle(values: dict, threshold: float) -> None:
    """delta, ci95, p_value, n and flagged of one row, from its paired per-item scores when it has them."""
    from tuneforge.evaluate.intervals import is_real_drop

    paired = values.pop("paired")
    values["delta"] = values["after"] - values["before"]
    values["ci95"] = paired["ci95"] if paired else None
    if paired:
        values["n"] = paired["n"]
        if "p_value" in paired:
            values["p_value"] = paired["p_value"]
        values["flagged"] = is_real_drop(paired, threshold)
    else:
        values["flagged"] = values["delta"] < -threshold


def _describe(key: str, values: dict) -> str:
    ci = values.get("ci95")
    interval = f", 95% CI [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else ", no interval: no per-item scores"
    return f"{key} fell {-values['delta']:.1f} points ({values['before']:.1f} -> {values['after']:.1f}{interval})"


def _message(scores: dict, threshold: float) -> str:
    flagged = [k for k, v in scores.items() if v["flagged"]]
    if flagged:
        return (f"possible forgetting: {'; '.join(_describe(k, scores[k]) for k in flagged)}, more than the "
                f"{threshold:g}-point threshold")
    unclear = [k for k, v in scores.items() if v["delta"] < -threshold]
    if unclear:
        return (f"no drop larger than {threshold:g} points that the probe can tell from noise: "
                f"{'; '.join(_describe(k, scores[k]) for k in unclear)}; the interval reaches zero")
    return f"no drop larger than {threshold:g} points"
