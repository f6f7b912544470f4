"""Forgetting probe: does fine-tuning cost the model general ability it had before?

The probe ships with tuneforge (assets/probes/): 40 general-knowledge multiple-choice items (science, geography,
history, maths, language, computing, everyday) and 8 short general instructions with a checkable answer. It is
run on the base model before training and on the tuned model after; `compare` flags a drop larger than a
threshold (default 5 points).

Multiple choice is scored MMLU-style by likelihood, not generation: each option's text is scored as the
assistant's answer to the question (through the chat template when the tokenizer has one), and the option with
the highest summed log-likelihood is the model's choice (`accuracy`). `accuracy_norm` divides by the option's
length in characters, which removes the bias toward short options. 40 items is small: one item is 2.5 points, so
treat a flagged drop as a prompt to look, and re-run on a bigger set (e.g. MMLU) before concluding.
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


def load_probe_items() -> list[dict]:
    """[{"id", "subject", "question", "choices": [4 strings], "answer": index}]"""
    return _asset_lines("general_mc.jsonl")


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
    2. each batch's questions after that prefix, padded in the middle ([prefix][pad][question]);
    3. the options (right-padded), the cache repeated once per option.
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
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
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
        length = max(len(o) for o in options)
        option_ids = torch.full((len(options), length), pad, dtype=torch.long)
        option_mask = torch.zeros((len(options), length), dtype=torch.long)
        for row, option in enumerate(options):
            option_ids[row, : len(option)] = torch.tensor(option)
            option_mask[row, : len(option)] = 1
        lengths = torch.tensor([len(prompt) for prompt, _ in batch]).repeat_interleave(n_options)
        option_positions = lengths[:, None] + torch.arange(length)[None, :]
        mask = torch.cat([question_mask.repeat_interleave(n_options, 0), option_mask], dim=1)
        with torch.no_grad():
            logits = model(input_ids=option_ids.to(device), attention_mask=mask.to(device),
                           position_ids=option_positions.to(device), use_cache=True, **{cache_key: cache}).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        ids = option_ids.to(device)
        total = first.gather(1, ids[:, :1])[:, 0]  # first option token, predicted by the question's last position
        if length > 1:
            rest = logprobs[:, :-1].gather(2, ids[:, 1:, None])[..., 0] * option_mask[:, 1:].to(device)
            total = total + rest.sum(1)
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
              batch_size: int = 16, max_new_tokens: int = 40) -> dict:
    """Score a model on the probe.

    -> {"accuracy": % (summed log-likelihood), "accuracy_norm": % (per character), "n": items,
        "per_subject": {subject: %}, "items": [{"id", "subject", "choice", "answer", "correct", "correct_norm"}],
        "instructions": run_instructions(...) or None, "seconds": wall time}
    """
    started = time.time()
    items = items if items is not None else load_probe_items()
    scores = option_logprobs(model, tokenizer, items, batch_size=batch_size)
    results, subjects = [], {}
    for item, option_scores in zip(items, scores):
        choice = max(range(len(option_scores)), key=lambda j: option_scores[j])
        normed = [s / max(1, len(c)) for s, c in zip(option_scores, item["choices"])]
        choice_norm = max(range(len(normed)), key=lambda j: normed[j])
        correct = choice == item["answer"]
        results.append({"id": item["id"], "subject": item.get("subject", "general"), "choice": choice,
                        "answer": item["answer"], "correct": correct, "correct_norm": choice_norm == item["answer"]})
        subjects.setdefault(item.get("subject", "general"), []).append(correct)
    n = len(results)
    out = {
        "accuracy": 100.0 * sum(r["correct"] for r in results) / max(1, n),
        "accuracy_norm": 100.0 * sum(r["correct_norm"] for r in results) / max(1, n),
        "n": n,
        "per_subject": {s: 100.0 * sum(v) / len(v) for s, v in sorted(subjects.items())},
        "items": results,
        "instructions": run_instructions(model, tokenizer, max_new_tokens=max_new_tokens) if instructions else None,
    }
    out["seconds"] = round(time.time() - started, 2)
    return out


def compare(before: dict, after: dict, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """Before/after probe results -> the deltas, and whether any drop is larger than `threshold` points.

    -> {"threshold", "flagged": bool, "message": str,
        "scores": {"accuracy"|"accuracy_norm"|"instructions": {"before", "after", "delta", "flagged"}},
        "per_subject": {subject: {"before", "after", "delta"}},
        "lost": ids right before and wrong after, "gained": ids wrong before and right after}
    """
    scores = {}
    for key in ("accuracy", "accuracy_norm"):
        if before.get(key) is not None and after.get(key) is not None:
            scores[key] = {"before": before[key], "after": after[key]}
    if before.get("instructions") and after.get("instructions"):
        scores["instructions"] = {"before": before["instructions"]["pass_rate"], "after": after["instructions"]["pass_rate"]}
    for values in scores.values():
        values["delta"] = values["after"] - values["before"]
        values["flagged"] = values["delta"] < -threshold
    per_subject = {}
    for subject, value in (before.get("per_subject") or {}).items():
        if subject in (after.get("per_subject") or {}):
            per_subject[subject] = {"before": value, "after": after["per_subject"][subject],
                                    "delta": after["per_subject"][subject] - value}
    right_before = {r["id"]: r["correct"] for r in before.get("items", [])}
    right_after = {r["id"]: r["correct"] for r in after.get("items", [])}
    lost = [i for i in right_before if right_before[i] and right_after.get(i) is False]
    gained = [i for i in right_before if not right_before[i] and right_after.get(i) is True]
    for task, value in (before.get("lm_eval") or {}).items():  # eval.lm_eval_tasks, see evaluate/lm_eval_tasks.py
        if task in (after.get("lm_eval") or {}):
            b, a = value["score"], after["lm_eval"][task]["score"]
            scores[f"lm_eval:{task}"] = {"before": b, "after": a, "delta": a - b, "flagged": a - b < -threshold}
    flagged_keys = [k for k, v in scores.items() if v["flagged"]]
    if flagged_keys:
        message = "; ".join(f"{k} fell {-scores[k]['delta']:.1f} points ({scores[k]['before']:.1f} -> "
                            f"{scores[k]['after']:.1f})" for k in flagged_keys)
        message = f"possible forgetting: {message}, more than the {threshold:g}-point threshold"
    else:
        message = f"no drop larger than {threshold:g} points"
    return {"threshold": threshold, "flagged": bool(flagged_keys), "message": message, "scores": scores,
            "per_subject": per_subject, "lost": lost, "gained": gained}
