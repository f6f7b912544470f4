"""`tuneforge recommend`: the seeds' decision tree, as questions (in the terminal or by flags), ending in a ready,
commented recipe and the reason for each choice.

The tree (seed 004 "the decision tree", seed 001 "choosing a technique", seed 000 step 9):

    what should the model do better?
      know facts from your documents ........... RAG, do not fine-tune
      answer in a tone / format, do a task ..... prompt + few-shot first; fine-tune (SFT) only when measured
                                                  prompts cannot reach the bar
      follow instructions (a base model) ........ SFT on instruction data
      prefer better answers .................... SFT first, then DPO on preference pairs (RLHF/PPO only when DPO
                                                  falls short); no pairs yet: SFT on good answers
      reason with checkable answers ............ GRPO with the verifier, after an SFT warm-up on worked solutions
      a language/domain the model barely saw ... continued pre-training (CPT) on raw text, then SFT
    then, by memory (tuneforge.guide.plan) and data size:
      full fine-tuning only with 100K+ examples after LoRA fell short and when it fits;
      LoRA when the bf16 base fits with room for activations; QLoRA when it does not (seed 004);
      rank, dropout, epochs, batch and learning rate from the seeds' tables by data size.

`recommend(answers)` returns (recipe YAML text or None when the answer is "do not train", reasons). The recipe
parses with `tuneforge.recipe.parse_recipe`; multi-step paths (SFT then DPO or GRPO) are emitted as their
first trainable stage, with the next stage described in the comments and reasons.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from tuneforge.errors import TuneforgeError

GOALS = {
    "knowledge": "know facts from my documents (that may change)",
    "style": "answer in a specific tone, voice or output format",
    "task": "do a specific task or multi-step procedure",
    "chat": "follow instructions / chat (starting from a base model)",
    "preferences": "prefer better answers (more helpful, concise, safe)",
    "reasoning": "reason to answers that can be checked (math, code)",
    "domain": "handle a language or domain the model barely saw",
}


@dataclass
class Question:
    key: str
    text: str
    kind: type = str  # str | int | float | bool
    choices: list[str] | None = None
    default: Any = None
    when: Callable[[dict], bool] = lambda answers: True
    help: str = ""


QUESTIONS: list[Question] = [
    Question("goal", "What should the model do better?", choices=list(GOALS), default="task",
             help="; ".join(f"{k}: {v}" for k, v in GOALS.items())),
    Question("tried_prompting", "Have you tried a system prompt with few-shot examples, and measured it on a held-out set?",
             kind=bool, default=False, when=lambda a: a.get("goal") in ("style", "task")),
    Question("has_preference_data", "Do you have preference pairs (prompt, chosen, rejected)?", kind=bool, default=True,
             when=lambda a: a.get("goal") == "preferences"),
    Question("dpo_underperformed", "Did DPO already fall short on this task?", kind=bool, default=False,
             when=lambda a: a.get("goal") == "preferences" and a.get("has_preference_data", True)),
    Question("has_verifier", "Can answers be checked automatically (unit tests, exact answers)?", kind=bool, default=True,
             when=lambda a: a.get("goal") == "reasoning"),
    Question("model", "Base model (hub id, local folder, embedded:smollm2-135m-instruct, or a size: llama-1b, llama-8b, ...)",
             default="embedded:smollm2-135m-instruct"),
    Question("gpu", "GPU to train on (H100, H200, A100, A100-40, L4, A10, RTX 4090, T4, or cpu)"),
    Question("examples", "How many training examples (or documents) do you have?", kind=int, default=1000),
    Question("max_length", "Tokens in a long example (prompt + answer)?", kind=int, default=1024),
    Question("train", "Training data file", default="data/train.jsonl"),
    Question("eval", "Held-out data file (empty: hold out 10% of the training file by hash)", default=""),
    Question("name", "Run name"),
]


def _local_gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0).replace("NVIDIA", "").strip()
    except ImportError:  # pragma: no cover
        pass
    return "cpu"


def _schema_methods() -> set[str]:
    from tuneforge.methods import method_names

    return set(method_names())


def _looks_instruct(name: str) -> bool:
    return bool(re.search(r"(instruct|chat|[-_]it\b|[-_]it[-_]|sft|embedded:)", name, re.IGNORECASE))


@dataclass
class Decision:
    approach: str  # rag | prompting | sft | cpt | dpo | rlhf | grpo
    method: str | None = None  # the recipe's method (a stage tuneforge can run now)
    next_stage: str | None = None  # the stage after this recipe, when the tree needs more than one
    adapter: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# The tree


def _approach(answers: dict, reasons: list[str]) -> tuple[str, str | None, str | None]:
    """(approach, method for the recipe, next stage)."""
    goal = answers.get("goal", "task")
    if goal not in GOALS:
        raise TuneforgeError(f"unknown goal {goal!r}", where="--goal", fix=f"use one of {', '.join(GOALS)}")
    methods = _schema_methods()
    instruct = answers.get("instruct")
    if instruct is None:
        instruct = _looks_instruct(str(answers.get("model", "")))
    if goal == "knowledge":
        reasons.append("Knowledge that lives in your documents (and changes) belongs in retrieval (RAG), not in the "
                       "weights: fine-tuning teaches behaviour, not reliable facts, and must be redone when the facts "
                       "change (seed 004: 'know about my company's docs -> use RAG. Do not fine-tune').")
        return "rag", None, None
    if goal in ("style", "task") and not answers.get("tried_prompting"):
        reasons.append("Try a system prompt with a few examples first and measure it on held-out prompts: it is free and "
                       "instant, and fine-tuning is the third thing to try, not the first (seed 004). Come back with "
                       "--answer tried_prompting=yes when prompts cannot reach your quality bar.")
        return "prompting", None, None
    if goal in ("style", "task"):
        reasons.append("Measured prompting fell short of the bar, so supervised fine-tuning (SFT) on (prompt, answer) "
                       "examples is the next step: it teaches format and behaviour that prompts cannot reliably elicit.")
        return "sft", "sft", None
    if goal == "chat":
        reasons.append("A base model becomes an instruction follower by SFT on instruction data (seed 001: 'need chat "
                       "behaviour on a base model: LoRA SFT on instruct data').")
        return "sft", "sft", None
    if goal == "domain":
        reasons.append("For a language or domain far from pre-training, continued pre-training (CPT) on raw text comes "
                       "first, then SFT for the task (seed 004; rare, and only when the domain is truly under-represented).")
        return "cpt", "cpt", "sft"
    if goal == "reasoning":
        if answers.get("has_verifier", True):
            reasons.append("Answers that can be checked automatically suit reinforcement learning with verifiable rewards "
                           "(GRPO: groups of sampled answers scored by the checker, seed 001).")
            reasons.append("GRPO starts from a model that already answers in the checkable format (doctor warns on RL "
                           "without an SFT'd policy): this recipe is that SFT warm-up on worked solutions; then run "
                           "method grpo on its output with your checker in rl.rewards (recipes/grpo.yaml).")
            return "grpo", "sft", "grpo"
        reasons.append("Without an automatic checker, reasoning is taught by SFT on worked solutions (step-by-step answers).")
        return "sft", "sft", None
    # preferences
    if not answers.get("has_preference_data", True):
        reasons.append("Preference tuning needs (prompt, chosen, rejected) pairs, 10K-100K typically (seed 001). Until you "
                       "have them, SFT on good answers is what you can train; collect pairs from its outputs.")
        return "sft", "sft", "dpo"
    if answers.get("dpo_underperformed"):
        reasons.append("DPO fell short, so RLHF (a reward model + PPO) is the remaining step; it is far heavier to run "
                       "(seed 000 step 7: reach for it only when DPO underperforms). This recipe is the SFT stage "
                       "both start from; then method reward and method ppo (recipes/reward.yaml, recipes/ppo.yaml).")
        return "rlhf", "sft", "rlhf"
    reasons.append("Preference pairs are learned with DPO (no reward model, no PPO; seed 000 step 6), always after SFT: "
                   "DPO is a polish, not a starter (seed 000 common mistakes).")
    if not instruct:
        reasons.append("The model does not look instruction-tuned, so SFT comes first and DPO starts from its output.")
        return "dpo", "sft", "dpo"
    if "dpo" in methods:
        return "dpo", "dpo", None
    reasons.append("tuneforge has no DPO method yet: this recipe is the SFT stage on the chosen answers; DPO follows "
                   "on its output (settings in the comments).")
    return "dpo", "sft", "dpo"


# Hub ids for the reference sizes `plan` knows (recipes need a loadable model; replace with the one you use).
REFERENCE_HUB_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M", "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "llama-1b": "meta-llama/Llama-3.2-1B", "llama-3b": "meta-llama/Llama-3.2-3B", "llama-8b": "meta-llama/Llama-3.1-8B",
    "llama-13b": "meta-llama/Llama-2-13b-hf", "llama-70b": "meta-llama/Llama-3.1-70B",
}


def _recipe_model(answers: dict) -> tuple[str, str | None]:
    """(model.name for the recipe, a comment) -- a reference size becomes a real hub id (instruct variant unless the
    tree starts from a base model)."""
    from tuneforge.guide.plan import is_reference_name

    name = str(answers.get("model") or "embedded:smollm2-135m-instruct")
    if not is_reference_name(name):
        return name, None
    key = name.lower().removeprefix("reference:")
    key = key if key in REFERENCE_HUB_IDS else f"llama-{key}"
    hub = REFERENCE_HUB_IDS[key]
    if answers.get("goal") not in ("chat", "domain") and answers.get("instruct", True):
        hub += "-Instruct" if hub.startswith(("meta-llama/Llama-3", "HuggingFaceTB")) else ""
        hub = hub.replace("Llama-2-13b-hf", "Llama-2-13b-chat-hf")
    return hub, f"a {key} model; use the one you have"


def _model_shape(answers: dict):
    """(ModelShape, description) from the model answer: a config when it can be read, else a reference size."""
    from tuneforge.guide.plan import is_reference_name, load_model_config, model_shape, nearest_reference, reference_config

    name = str(answers.get("model") or "embedded:smollm2-135m-instruct")
    if answers.get("model_config") is not None:
        return model_shape(answers["model_config"]), name
    if is_reference_name(name):
        return model_shape(reference_config(name)), f"{name} (reference shape)"
    try:
        return model_shape(load_model_config(name)), name
    except TuneforgeError:
        params = answers.get("params_b")
        if not params:
            match = re.search(r"(\d+(?:\.\d+)?)\s*[bB]\b", name.replace("-", " ").replace("_", " "))
            params = float(match.group(1)) if match else None
        if not params:
            raise TuneforgeError(f"cannot read the config of {name!r} and its size is unknown", where="--model",
                                 fix="give a local model folder, or its size with --params-b (e.g. 8)") from None
        ref = nearest_reference(params * 1e9)
        return model_shape(reference_config(ref)), f"{name} (size {params:g}B, planned as {ref})"


def _gpu(answers: dict):
    from tuneforge.guide.plan import GpuSpec, find_gpu

    name = answers.get("gpu") or (None if answers.get("vram_gb") else _local_gpu_name())
    if name and str(name).lower() == "cpu":
        return None
    spec = find_gpu(str(name)) if name else GpuSpec(f"{answers['vram_gb']:g} GB GPU", float(answers["vram_gb"]), True, 100.0)
    if answers.get("vram_gb"):
        spec = GpuSpec(spec.name, float(answers["vram_gb"]), spec.bf16, spec.tflops)
    return spec


def _dtype(gpu, adapter: str) -> str:
    """bf16 where the GPU has it; else fp16 mixed precision for LoRA/QLoRA (frozen fp16 base, fp32 adapters) and
    fp32 for full fine-tuning (fp16 full FT needs fp32 master weights, which tuneforge does not keep)."""
    if gpu is None:
        return "fp32"
    if gpu.bf16:
        return "bf16"
    return "fp32" if adapter == "full" else "fp16"


def _fit(shape, gpu, adapter: str, seq_len: int, r: int, dropout: float) -> dict | None:
    """The cheapest way `adapter` fits: the largest micro-batch (up to 8) without gradient checkpointing, else with
    it; full fine-tuning may also fall back to an 8-bit optimizer."""
    from tuneforge.guide.plan import largest_batch, plan_memory
    from tuneforge.recipe import DEFAULT_OPTIMIZER

    dtype = _dtype(gpu, adapter)
    optimizers = [DEFAULT_OPTIMIZER[adapter]] + (["paged_adamw_8bit"] if adapter == "full" else [])
    for optimizer in optimizers:
        for checkpointing in (False, True):
            settings = dict(adapter=adapter, seq_len=seq_len, gradient_checkpointing=checkpointing, dtype=dtype,
                            lora_r=r, lora_dropout=dropout, optimizer=optimizer)
            batch = largest_batch(shape, vram_gib=gpu.memory_gib, max_batch=8, **settings)
            if batch >= 1:
                batch = 2 ** int(math.log2(batch))
                estimate = plan_memory(shape, batch_size=batch, **settings)
                return {"batch_size": batch, "gradient_checkpointing": checkpointing, "optimizer": optimizer,
                        "needed_gib": estimate["reserved_gib"]}
    return None


def decide(answers: dict) -> Decision:
    """Walk the tree for `answers` (keys: see QUESTIONS; also vram_gb, params_b, instruct, lora_insufficient)."""
    from tuneforge.methods import method_spec

    reasons: list[str] = []
    approach, method, next_stage = _approach(answers, reasons)
    decision = Decision(approach, method, next_stage, reasons=reasons)
    if method is None:
        return decision

    n = int(answers.get("examples") or 1000)
    seq_len = int(answers.get("max_length") or 1024)
    shape, model_label = _model_shape(answers)
    gpu = _gpu(answers)
    goal = answers.get("goal", "task")

    # LoRA rank and dropout by data size (seed 000 step 4, seed 003's rank values); reasons added once LoRA is chosen
    lora_reasons = []
    if goal == "style" or n < 1_000:
        r = 8
        lora_reasons.append(f"LoRA rank 8: {'a style/format change' if goal == 'style' else f'{n:,} examples'} needs "
                            "little capacity (seed 003: r=4 suits simple stylistic changes).")
    elif n > 50_000:
        r = 32
        lora_reasons.append(f"LoRA rank 32: {n:,} examples can use more capacity (seed 003: r=16 covers most tasks, r=64 approaches full fine-tuning).")
    else:
        r = 16
        lora_reasons.append("LoRA rank 16, alpha 32: the common default (seed 000 step 4; alpha = 2r keeps the update scale).")
    dropout = 0.1 if n < 1_000 else (0.0 if n > 100_000 else 0.05)
    if dropout != 0.05:
        lora_reasons.append(f"LoRA dropout {dropout}: " + ("guards a small dataset against overfitting" if dropout > 0.05
                                                           else "not needed with this much data") + " (seed 000 step 4).")

    # adapter by memory (seed 004: QLoRA when the fp16 base does not fit with room for activations)
    params_b = shape.params_total / 1e9
    if gpu is None:
        adapter = "lora"
        fit = {"batch_size": 4, "gradient_checkpointing": False, "needed_gib": None, "optimizer": None}
        reasons.append(f"CPU training: LoRA on a small model only ({model_label}, {params_b:.2f}B parameters); 4-bit "
                       "QLoRA kernels need a GPU" + ("; a model this size will be very slow on CPU" if params_b > 0.5 else "") + ".")
    else:
        full_fit = _fit(shape, gpu, "full", seq_len, r, dropout)
        lora_fit = _fit(shape, gpu, "lora", seq_len, r, dropout)
        qlora_fit = _fit(shape, gpu, "qlora", seq_len, r, dropout)
        wants_full = n >= 100_000 and answers.get("lora_insufficient")
        if wants_full and full_fit:
            adapter, fit = "full", full_fit
            reasons.append(f"Full fine-tuning: {n:,} examples and LoRA already fell short, and it fits on the {gpu.name} "
                           f"(~{full_fit['needed_gib']:.0f} GiB) (seed 004: full FT needs 100K+ examples and a validated "
                           "LoRA shortfall).")
        elif lora_fit:
            adapter, fit = "lora", lora_fit
            reasons.append(f"LoRA: the bf16 base ({params_b:.1f}B parameters) fits on the {gpu.name} with room for "
                           f"activations (~{lora_fit['needed_gib']:.0f} of {gpu.memory_gib:.0f} GiB); base weights stay frozen, "
                           "which is also the best guard against forgetting (seed 000 step 8).")
            if wants_full:
                reasons.append("Full fine-tuning was asked for but does not fit on this GPU.")
        elif qlora_fit:
            adapter, fit = "qlora", qlora_fit
            reasons.append(f"QLoRA: the bf16 base of {params_b:.1f}B parameters does not fit on the {gpu.name} with room for "
                           f"activations, the 4-bit base does (~{qlora_fit['needed_gib']:.0f} of {gpu.memory_gib:.0f} GiB); "
                           "quality is within 1-2% of LoRA (seeds 002, 003).")
        else:
            adapter = "qlora"
            fit = {"batch_size": 1, "gradient_checkpointing": True, "needed_gib": None, "optimizer": "paged_adamw_8bit"}
            reasons.append(f"Even QLoRA does not fit a {params_b:.1f}B model at max_length {seq_len} on the {gpu.name}: "
                           "pick a smaller model, a shorter max_length, or a larger GPU (`tuneforge plan` shows the numbers). "
                           "The recipe below is the smallest setting.")
        if fit["gradient_checkpointing"]:
            reasons.append("Gradient checkpointing on: without it the activations do not fit (it costs ~30% speed).")
        if not gpu.bf16:
            reasons.append(f"The {gpu.name} has no bf16: " + ("fp16 mixed precision (frozen fp16 base, fp32 adapters)."
                                                              if adapter != "full" else "full fine-tuning runs in fp32."))
        if adapter == "full" and fit.get("optimizer") == "paged_adamw_8bit":
            reasons.append("8-bit paged AdamW: full fine-tuning fits only with 8-bit optimizer states (2 bytes per "
                           "parameter instead of 4).")

    if adapter != "full":
        reasons.extend(lora_reasons)

    # batch: effective 16-32 (seed 000 step 3: 16 to 128), micro-batch from the memory plan
    target = 16 if n < 10_000 else 32
    batch = fit["batch_size"]
    grad_accum = max(1, math.ceil(target / batch))
    reasons.append(f"Micro-batch {batch} x grad_accum {grad_accum} = effective batch {batch * grad_accum} "
                   "(seed 000 step 3: 16 to 128; larger micro-batches did not fit or are not needed).")

    # epochs (seed 000 step 3, step 6)
    final_method = method
    if method == "cpt":
        epochs = 1
        reasons.append("1 epoch of continued pre-training: raw text is plentiful and repeated passes memorise it.")
    elif n >= 10_000:
        epochs = 1
        reasons.append(f"1 epoch: with {n:,} examples one epoch usually suffices; more than 3 typically overfits (seed 000).")
    elif n >= 1_000:
        epochs = 2
        reasons.append(f"2 epochs for {n:,} examples (seed 000: 1-3; watch the held-out loss).")
    else:
        epochs = 3
        reasons.append(f"3 epochs for a small dataset ({n:,} examples); stop early if the held-out loss turns up "
                       "(seed 000: with <1K examples more can help, seed 004: 5+ memorises).")
    if final_method == "dpo":
        epochs = 1
        reasons.append("1 epoch of DPO: it over-trains quickly (seed 000 step 6).")

    lr = method_spec(final_method).default_lr(adapter)  # the method's own default, as the recipe would fill it
    reasons.append(f"Learning rate {_yaml_scalar(lr).replace('.0e', 'e').replace('e-0', 'e-')}: " + ("the documented start for LoRA/QLoRA (1e-4 to 2e-4; the frozen base anchors "
                   "the model)" if adapter in ("lora", "qlora") and final_method != "dpo" else
                   "DPO is far more sensitive than SFT (seed 000: 5e-7 for full fine-tuning, 10x that with LoRA)"
                   if final_method == "dpo" else
                   "the documented start for full fine-tuning (2e-5 to 5e-5)") + "; cosine schedule, 3% warmup (defaults).")

    steps = max(1, math.ceil(n / (batch * grad_accum))) * epochs
    eval_every = None
    if steps >= 50:
        eval_every = int(min(500, max(10, steps // 10)))
        reasons.append(f"Held-out loss every {eval_every} steps (~10 times per run; seed 000: eval often, every 100-500 steps).")
    if not answers.get("eval"):
        reasons.append("No eval file: tuneforge holds out 10% of the training file by content hash (seed 000: 5-10%)."
                       + (" With so few examples that is a small eval set; add a held-out file of 50+ examples." if n * 0.1 < 50 else ""))

    decision.adapter = adapter
    recipe_model, model_comment = _recipe_model(answers)
    decision.settings = dict(model=recipe_model, model_comment=model_comment, model_label=model_label,
                             optimizer=fit.get("optimizer"), dtype=_dtype(gpu, adapter),
                             params_b=params_b, gpu=gpu.name if gpu else "cpu", examples=n, seq_len=seq_len, r=r,
                             dropout=dropout, batch_size=batch, grad_accum=grad_accum, epochs=epochs, lr=lr,
                             gradient_checkpointing=fit["gradient_checkpointing"], needed_gib=fit["needed_gib"],
                             eval_every=eval_every, steps=steps)
    return decision


# ---------------------------------------------------------------------------------------------------------------
# Recipe text


def _yaml_scalar(value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0.0"
        text = f"{value:.1e}" if value < 1e-2 else f"{value:g}"
        return text if ("." in text or "e" not in text) else text.replace("e", ".0e", 1)
    if re.fullmatch(r"[A-Za-z0-9_./:-]+", str(value)) and not re.fullmatch(r"(true|false|null|yes|no|on|off|~|[-+.\d].*)",
                                                                              str(value), re.IGNORECASE):
        return str(value)
    return json.dumps(str(value))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "run"


COMMENT_COLUMN = 40


def _line(indent: int, key: str, value: str | None = None, comment: str | None = None) -> str:
    text = " " * indent + (f"{key}: {value}" if value is not None else f"{key}:")
    return text if not comment else text.ljust(COMMENT_COLUMN - 1) + f" # {comment}"


def recipe_text(decision: Decision, answers: dict) -> str:
    """The commented recipe for a decision (every line generated, so comments cannot go stale)."""
    s = decision.settings
    method, adapter = decision.method, decision.adapter
    goal = answers.get("goal", "task")
    model_short = s["model"].split("/")[-1].split(":")[-1]
    name = answers.get("name") or _slug(f"{goal}-{method}-{adapter}-{model_short}")
    lines = [
        f"# Recipe from `tuneforge recommend` ({goal}: {GOALS[goal]}).",
        f"#   model {s['model_label']}: {s['params_b']:.2f}B parameters; {s['gpu']}; ~{s['examples']:,} examples; "
        f"~{s['steps']:,} optimizer steps" + (f"; ~{s['needed_gib']:.0f} GiB estimated" if s["needed_gib"] else "") + ".",
        "#",
        f"#   tuneforge doctor {name}.yaml    # check it against your data before training",
        f"#   tuneforge plan {name}.yaml      # memory and time on your GPU",
        f"#   tuneforge train {name}.yaml",
    ]
    if decision.next_stage:
        lines.append("#")
        lines.extend(f"# {line}" for line in _next_stage_note(decision).splitlines())
    method_comment = {"sft": "loss on the answers only (prompts masked)",
                      "cpt": "continued pre-training: loss on every token of raw text",
                      "dpo": "preference pairs (prompt, chosen, rejected)"}.get(method)
    lines += [
        "",
        _line(0, "name", _yaml_scalar(name)),
    ]
    if s["dtype"] == "fp16":
        lines += [_line(0, "model"), _line(2, "name", _yaml_scalar(s["model"]), s["model_comment"]),
                  _line(2, "dtype", "float16", "this GPU has no bf16: fp16 base weights")]
    else:
        lines.append(_line(0, "model", _yaml_scalar(s["model"]), s["model_comment"]))
    lines += [
        _line(0, "method", method, method_comment),
        _line(0, "data"),
        _line(2, "train", _yaml_scalar(answers.get("train") or "data/train.jsonl"),
              'plain text: one {"text": ...} per line' if method == "cpt" else "messages, prompt/completion, alpaca or sharegpt"),
    ]
    if answers.get("eval"):
        lines.append(_line(2, "eval", _yaml_scalar(answers["eval"]), "held out: never trained on"))
    else:
        lines.append(_line(2, "eval_fraction", "0.1", "no eval file: 10% held out by content hash"))
    if method == "cpt":
        lines.append(_line(2, "format", "text"))
    lines += [_line(0, "adapter"), _line(2, "type", adapter, {
        "lora": "frozen base + low-rank update: least forgetting",
        "qlora": "LoRA on a 4-bit NF4 base: larger models, less memory",
        "full": "every weight trains: most memory and forgetting risk"}[adapter])]
    if adapter != "full":
        lines += [_line(2, "r", str(s["r"]), "rank: capacity of the update"),
                  _line(2, "alpha", str(2 * s["r"]), "alpha = 2r keeps the update scale"),
                  _line(2, "dropout", _yaml_scalar(s["dropout"]), "on the LoRA branch"),
                  _line(2, "target_modules", "all-linear", "every linear layer of the blocks")]
    lines += [
        _line(0, "train"),
        _line(2, "epochs", str(s["epochs"]), "passes over the data (reasons below)"),
        _line(2, "lr", _yaml_scalar(s["lr"]), "peak learning rate; cosine decay, 3% warmup"),
        _line(2, "batch_size", str(s["batch_size"]), "micro-batch that fits in memory"),
        _line(2, "grad_accum", str(s["grad_accum"]), f"effective batch {s['batch_size'] * s['grad_accum']}"),
        _line(2, "max_length", str(s["seq_len"]), "longer examples are cut (doctor counts them)"),
    ]
    if s["dtype"] == "fp16":
        lines.append(_line(2, "precision", "fp16", "mixed precision with loss scaling (no bf16 here)"))
    if s["gradient_checkpointing"]:
        lines.append(_line(2, "gradient_checkpointing", "true", "activations do not fit otherwise (~30% slower)"))
    if adapter == "qlora" or (adapter == "full" and s.get("optimizer") == "paged_adamw_8bit"):
        lines.append(_line(2, "optimizer", "paged_adamw_8bit", "8-bit states, paged to CPU under pressure"))
    if s["eval_every"]:
        lines.append(_line(2, "eval_every", str(s["eval_every"]), "held-out loss during training"))
    lines += ["", "# Why:"]
    for reason in decision.reasons:
        wrapped = _wrap(reason)
        lines += [f"#  - {wrapped[0]}"] + [f"#    {line}" for line in wrapped[1:]]
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int = 110) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def _next_stage_note(decision: Decision) -> str:
    stage = decision.next_stage
    if stage == "dpo":
        from tuneforge.methods import method_spec

        lr = _yaml_scalar(method_spec("dpo").default_lr(decision.adapter or "full"))
        return ("Next stage: DPO on preference pairs, starting from this run's model: method dpo, beta 0.1,\n"
                f"learning rate {lr} (the method's default with this adapter), 1 epoch (seed 000 steps 6 and 12).")
    if stage == "grpo":
        return ("Next stage: GRPO with your answer checker as the reward, starting from this run's model\n"
                "(method grpo, model.adapter: this run, rl.rewards: [{name: exact_answer}]; see recipes/grpo.yaml).")
    if stage == "rlhf":
        return ("Next stages: a reward model on the preference pairs, then PPO against it with a KL penalty to this\n"
                "run's model (method reward, then method ppo with rl.reward_model: the reward run; see\n"
                "recipes/reward.yaml and recipes/ppo.yaml).")
    if stage == "sft":
        return "Next stage: SFT on task examples, starting from this run's model."
    return ""


def recommend(answers: dict) -> tuple[str | None, list[str]]:
    """Walk the decision tree with `answers` (QUESTIONS' keys; unanswered questions take their defaults) and
    return (recipe YAML, reasons). The YAML is None when the answer is not to train (RAG, prompting first)."""
    answers = {**{q.key: q.default for q in QUESTIONS if q.default is not None}, **{k: v for k, v in answers.items() if v is not None}}
    decision = decide(answers)
    if decision.method is None:
        return None, decision.reasons
    return recipe_text(decision, answers), decision.reasons


# ---------------------------------------------------------------------------------------------------------------
# Terminal


TRUE_WORDS, FALSE_WORDS = ("yes", "y", "true", "1", "on"), ("no", "n", "false", "0", "off", "")


def coerce_answers(answers: dict) -> dict:
    """Answers given up front (`--answer key=value`, strings) in the type of their question: `no`/`false`/`0` is
    False for a yes/no question (any non-empty string used to count as yes), numbers for number questions."""
    from tuneforge.errors import RecipeError

    kinds = {q.key: q.kind for q in QUESTIONS}
    out = {}
    for key, value in answers.items():
        kind = kinds.get(key)
        if isinstance(value, str) and kind is bool:
            word = value.strip().lower()
            if word not in TRUE_WORDS + FALSE_WORDS:
                raise RecipeError([f"--answer {key}={value}: a yes/no question; answer yes or no"])
            value = word in TRUE_WORDS
        elif isinstance(value, str) and kind in (int, float):
            try:
                value = kind(value.replace(",", "").replace("_", ""))
            except ValueError:
                raise RecipeError([f"--answer {key}={value}: a number is expected"]) from None
        out[key] = value
    return out


def recommend_interactive(console=None, *, answers: dict | None = None, stream=None) -> tuple[str | None, list[str]]:
    """Ask the questions not already answered (rich prompts), then `recommend`. `stream` is where answers are
    read from (default stdin); tests pass a StringIO."""
    from rich.console import Console
    from rich.prompt import Confirm, IntPrompt, Prompt

    console = console or Console()
    answers = coerce_answers(answers or {})
    for question in QUESTIONS:
        if question.key in answers or not question.when(answers):
            continue
        if question.help:
            console.print(f"[dim]{question.help}[/]")
        default = question.default
        if question.key == "gpu" and default is None:
            default = _local_gpu_name()
        if question.key == "name" and default is None:
            default = _slug(f"{answers.get('goal', 'task')}-run")
        if question.kind is bool:
            answers[question.key] = Confirm.ask(question.text, console=console, default=bool(default), stream=stream)
        elif question.kind is int:
            answers[question.key] = IntPrompt.ask(question.text, console=console, default=default, stream=stream)
        else:
            value = Prompt.ask(question.text, console=console, choices=question.choices, default=default,
                               show_default=True, stream=stream)
            answers[question.key] = value if value != "" else None
    return recommend(answers)


def render_recommendation(console, recipe_yaml: str | None, reasons: list[str]) -> None:
    from rich.markup import escape
    from rich.syntax import Syntax

    if recipe_yaml is None:
        console.print("[bold]Recommendation: do not fine-tune (yet).[/]")
        for reason in reasons:
            console.print(f"  - {escape(reason)}")
        return
    console.print(Syntax(recipe_yaml, "yaml", word_wrap=True))
