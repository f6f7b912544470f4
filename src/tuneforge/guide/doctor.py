"""`tuneforge doctor RECIPE`: preflight checks for the mistakes the seeds list ("common mistakes", troubleshooting),
run before any weight is loaded. `train` runs them too: errors stop the run, warnings are printed.

Each check reads the recipe, and where it needs them the tokenizer, the model's config (no weights: module names
come from a model built on the meta device), the prepared data (`tuneforge.data.pipeline.PreparedData`, whose
stats already count truncation, duplicates and train/eval overlap) and the device. A check whose input is missing
is skipped, so `run_doctor` works on a recipe alone. Checks read recipe fields with `getattr`, so the ones about
preference methods (DPO, KTO, ...) switch on by themselves once the schema has `method: dpo`.

Severity: `error` = the run would fail, or would train something broken or measure nothing (target modules that
match nothing, chat data with no chat template, eval set overlapping the training set, new tokens that cannot
train, a stop token that never carries loss, ...). `warning` = runs, but against the seeds' documented practice
(learning rate outside the method's range, no warmup, fp32 on a bf16 GPU, ...). `info` = worth knowing.

    findings = doctor_recipe("recipes/x.yaml")        # loads tokenizer, config, data itself
    findings = doctor_recipe(recipe, tokenizer=tok, data=prepared)   # inside train: reuse what is loaded
    render_findings(console, findings)
    raise_for_errors(findings)                        # DoctorError (exit 2) when any finding is an error
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tuneforge.errors import TuneforgeError

SEVERITIES = ("error", "warning", "info")

# Thresholds, each from the seeds where they give one.
TRUNCATION_WARN = 0.05  # share of training examples cut by max_length that is worth a warning
TRUNCATION_ERROR = 0.50  # half the data cut: the recipe trains on something else than the data
EVAL_MIN_EXAMPLES = 50  # below this a 10-point change is inside the noise (95% CI half-width ~14 points at 50)
BATCH_RANGE = (16, 128)  # seed 000 step 3: effective batch 16 to 128
WARMUP_RANGE = (0.03, 0.1)  # seed 000 step 3 / seed 002: 3% to 10% of the steps
EVAL_EVERY_MAX = 500  # seed 000 "eval too rarely": every 100 or 500 steps
# Learning-rate ranges for preference methods (seed 000 step 6: 5e-7 to 5e-6 full; LoRA DPO runs up to 5e-5, seed 002).
PREFERENCE_LR_RANGE = {"full": (1e-7, 5e-6), "none": (1e-7, 5e-6), "lora": (1e-7, 5e-5), "qlora": (1e-7, 5e-5)}
PREFERENCE_METHODS = {"dpo", "kto", "ipo", "simpo", "orpo", "cpo", "rpo"}
NEEDS_SFT_START = {"dpo", "kto", "ipo", "simpo", "cpo", "rpo"}  # ORPO folds SFT into its loss and starts from a base
# RL polishes a policy that already answers (seed 001 part 8: SFT -> reward model -> PPO; GRPO needs some correct
# samples in a group to learn anything)
NEEDS_SFT_START |= {"ppo", "grpo", "rloo", "online_dpo"}
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
MASKING_COLLATORS = {"language_modeling", "transformers", "hf", "mlm", "completion_only", "datacollatorforlanguagemodeling",
                     "datacollatorforcompletiononlylm"}


@dataclass
class Finding:
    severity: str  # "error" | "warning" | "info"
    code: str  # stable id, e.g. "lr-out-of-range"
    message: str  # what is wrong, with the numbers
    why: str  # why it matters
    fix: str  # what to change
    where: str = ""  # "`train.lr` (recipe.yaml:12)", or a data file:line

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")


class DoctorError(TuneforgeError):
    """`train` refuses to start: the doctor found errors. `findings` holds all of them."""

    def __init__(self, findings: list[Finding]):
        self.findings = findings
        errors = [f for f in findings if f.severity == "error"]
        lines = [f"doctor found {len(errors)} error(s); the run was not started:"]
        for f in errors:
            lines.append(f"  - {f.code}: {f.message}" + (f" [{f.where}]" if f.where else ""))
            lines.append(f"    fix: {f.fix}")
        super().__init__("\n".join(lines), fix="fix the recipe or data, or pass --no-doctor to train anyway")


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


def raise_for_errors(findings: list[Finding]) -> None:
    if has_errors(findings):
        raise DoctorError(findings)


# ---------------------------------------------------------------------------------------------------------------
# Context passed to every check


def _get(obj, path: str, default=None):
    for part in path.split("."):
        if obj is None:
            return default
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return default if obj is None else obj


@dataclass
class Context:
    recipe: Any
    tokenizer: Any = None
    data: Any = None  # PreparedData
    model_config: Any = None
    device_info: dict | None = None
    source: str | None = None
    data_format: str | None = None
    native_chat_template: str | None = None
    key_lines: dict = field(default_factory=dict)
    _meta: Any = None
    _meta_failed: bool = False

    def where(self, key: str) -> str:
        """"`train.lr` (recipe.yaml:12)", or "(default)" when the key is not written in the recipe file."""
        path = tuple(key.split("."))
        if not self.source:
            return f"`{key}`"
        if path in self.key_lines:
            return f"`{key}` ({self.source}:{self.key_lines[path]})"
        head = path[:1]
        if head in self.key_lines and not any(k[:1] == head and len(k) > 1 for k in self.key_lines):
            return f"`{key}` ({self.source}:{self.key_lines[head]})"  # shorthand such as `model: name`
        return f"`{key}` (default, not set in {self.source})"

    @property
    def method(self) -> str:
        return str(_get(self.recipe, "method", "sft"))

    @property
    def adapter(self) -> str:
        return str(_get(self.recipe, "adapter.type", "lora"))

    @property
    def uses_lora(self) -> bool:
        return self.adapter in ("lora", "qlora")

    @property
    def stats(self):
        return getattr(self.data, "stats", None)

    @property
    def on_gpu(self) -> bool:
        return bool(self.device_info) and self.device_info.get("type") == "cuda"

    def meta_model(self):
        """The model built on the meta device from its config (no weights, no memory), or None."""
        if self._meta is None and not self._meta_failed and self.model_config is not None:
            try:
                from tuneforge.guide.plan import meta_model

                self._meta = meta_model(self.model_config)
            except Exception:  # an architecture transformers cannot build from config alone
                self._meta_failed = True
        return self._meta


Check = Callable[[Context], Iterable[Finding]]
CHECKS: list[Check] = []


def check(function: Check) -> Check:
    """Register a check; checks run in registration order."""
    CHECKS.append(function)
    return function


# ---------------------------------------------------------------------------------------------------------------
# Learning rate, schedule, batch, epochs


@check
def check_learning_rate(ctx: Context):
    """Seed 000 step 3 / common mistakes: 2e-5 to 5e-5 full FT, 1e-4 to 2e-4 LoRA; step 6: 5e-7 to 5e-6 DPO."""
    from tuneforge.recipe import LR_RANGE

    lr = _get(ctx.recipe, "train.lr")
    if lr is None:
        return
    if ctx.method in PREFERENCE_METHODS:
        low, high = PREFERENCE_LR_RANGE.get(ctx.adapter, PREFERENCE_LR_RANGE["full"])
        label = f"{ctx.method} with {ctx.adapter}"
    else:
        low, high = LR_RANGE.get(ctx.adapter, LR_RANGE["full"])
        label = "full fine-tuning" if ctx.adapter in ("full", "none") else ctx.adapter
    if low <= lr <= high:
        return
    far = lr > 10 * high or lr < low / 10
    direction = "high" if lr > high else "low"
    why = ("too high: loss spikes, weights diverge and the model forgets what it knew (catastrophic forgetting)"
           if direction == "high" else "too low: the loss barely moves and the run ends before the model learns the task")
    if ctx.method in PREFERENCE_METHODS and direction == "high":
        why = "preference methods are far more sensitive than SFT: a 1e-5 learning rate often wrecks a model under full DPO"
    typical = {"full": "2e-5", "none": "2e-5", "lora": "2e-4", "qlora": "2e-4"}[ctx.adapter] if ctx.method not in PREFERENCE_METHODS else "5e-7"
    yield Finding(
        "error" if far else "warning", "lr-out-of-range",
        f"learning rate {lr:g} is {'far ' if far else ''}{direction} for {label} (documented range {low:g} to {high:g})",
        why, f"start at {typical} and bisect from there (set train.lr, or remove it for the default)",
        ctx.where("train.lr"))


def _effective_batch(ctx: Context) -> int:
    devices = 1
    if ctx.on_gpu:
        devices = int(ctx.device_info.get("count", 1) or 1)
    devices = int(_get(ctx.recipe, "train.num_devices", devices) or devices)
    return int(_get(ctx.recipe, "train.batch_size", 1)) * int(_get(ctx.recipe, "train.grad_accum", 1)) * devices


def _total_steps(ctx: Context) -> int | None:
    max_steps = _get(ctx.recipe, "train.max_steps")
    if max_steps:
        return int(max_steps)
    if ctx.stats is None or not ctx.stats.train_examples:
        return None
    rows = ctx.stats.train_examples
    if _get(ctx.recipe, "train.packing", False) and ctx.stats.max_length:
        rows = max(1, math.ceil(ctx.stats.train_tokens / ctx.stats.max_length))
    per_epoch = max(1, math.ceil(rows / max(1, _effective_batch(ctx))))
    return max(1, int(per_epoch * float(_get(ctx.recipe, "train.epochs", 1))))


@check
def check_effective_batch(ctx: Context):
    """Seed 000 step 3: effective batch (batch_size x grad_accum x devices) 16 to 128."""
    batch = _effective_batch(ctx)
    low, high = BATCH_RANGE
    where = ctx.where("train.grad_accum") + ", " + ctx.where("train.batch_size")
    if batch < low:
        yield Finding("warning", "effective-batch-size",
                      f"effective batch size is {batch} (batch_size x grad_accum{' x devices' if batch != _get(ctx.recipe, 'train.batch_size', 1) * _get(ctx.recipe, 'train.grad_accum', 1) else ''}), below {low}",
                      "small batches give noisy gradients: the loss jumps around and training is less stable",
                      f"raise train.grad_accum so batch_size x grad_accum is {low} to {high} (e.g. grad_accum {math.ceil(low / max(1, _get(ctx.recipe, 'train.batch_size', 1)))})",
                      where)
    elif batch > high:
        yield Finding("warning", "effective-batch-size",
                      f"effective batch size is {batch}, above {high}",
                      "fewer, larger steps: with a fine-tuning-sized dataset the run takes few optimizer steps and the "
                      "learning rate tuned for 16-128 no longer fits",
                      f"lower train.grad_accum (or batch_size) to reach {low} to {high}", where)
    if ctx.stats is not None and ctx.stats.train_examples and batch > ctx.stats.train_examples:
        yield Finding("warning", "effective-batch-size",
                      f"effective batch size {batch} is larger than the training set ({ctx.stats.train_examples} example(s)): "
                      "every epoch is a single optimizer step",
                      "a handful of steps cannot follow a warmup + decay schedule, and the model barely moves",
                      "lower train.grad_accum / batch_size, or add data", where)


@check
def check_epochs(ctx: Context):
    """Seed 000 step 3: 1 epoch suffices for >10K examples, >3 typically overfits; <1K examples: 5 to 10 can help.
    Seed 003: 5+ epochs on a small dataset memorises it. Seed 000 step 6: DPO usually 1 epoch."""
    n = ctx.stats.train_examples if ctx.stats is not None else None
    max_steps = _get(ctx.recipe, "train.max_steps")
    if max_steps and n:
        epochs = max_steps * _effective_batch(ctx) / n
        key = "train.max_steps"
    else:
        epochs = float(_get(ctx.recipe, "train.epochs", 1))
        key = "train.epochs"
    if ctx.method in PREFERENCE_METHODS:
        limit, reason = 3, f"{ctx.method} over-trains quickly: once chosen answers are far likelier than rejected ones, more epochs only regress"
    elif n is None:
        limit, reason = 10, "this many passes memorise a fine-tuning dataset"
    elif n >= 10_000:
        limit, reason = 3, f"with {n:,} examples one epoch usually suffices and more than 3 typically overfits"
    elif n >= 1_000:
        limit, reason = 5, f"with {n:,} examples more than 5 epochs memorises the data"
    else:
        limit, reason = 10, f"even with only {n:,} examples (where 5 to 10 epochs can help) more than 10 memorises them"
    if epochs > limit:
        yield Finding("warning", "too-many-epochs",
                      f"{epochs:.1f} epochs over {n:,} training examples" if n else f"{epochs:g} epochs",
                      f"{reason}; the model gets better on the training set and worse on real prompts",
                      f"train for at most {limit} epochs (fewer if the held-out loss turns up), or add data",
                      ctx.where(key))


@check
def check_warmup(ctx: Context):
    """Seed 000 step 3: warmup_ratio 0.03 to 0.1; without it Adam's second moment is unstable early and loss spikes."""
    warmup = _get(ctx.recipe, "train.warmup", None)
    scheduler = _get(ctx.recipe, "train.scheduler", "cosine")
    if warmup is None:
        warmup = _get(ctx.recipe, "train.warmup_ratio", None)
    if warmup is None:
        return
    if float(warmup) == 0:
        yield Finding("warning", "warmup-missing", "no learning-rate warmup (train.warmup is 0)",
                      "Adam's running averages start at zero, so the first ~100 steps take badly scaled steps at full "
                      "learning rate and the loss can spike",
                      f"set train.warmup: 0.03 (3% of the steps; {WARMUP_RANGE[0]:g}-{WARMUP_RANGE[1]:g} is typical)",
                      ctx.where("train.warmup"))
        return
    if scheduler == "constant":
        yield Finding("warning", "warmup-missing",
                      f"train.warmup is {warmup:g} but scheduler `constant` ignores warmup: the run starts at full learning rate",
                      "transformers' constant schedule has no warmup phase, so the warmup you set never happens",
                      "use scheduler: constant_with_warmup (or cosine)", ctx.where("train.scheduler"))
    steps = _total_steps(ctx)
    if steps and warmup >= 1 and warmup >= steps:
        yield Finding("warning", "warmup-missing",
                      f"warmup is {int(warmup)} steps but the run has only ~{steps}: it never reaches the peak learning rate",
                      "the whole run is warmup, so the learning rate you chose is never used",
                      "give warmup as a fraction (train.warmup: 0.03)", ctx.where("train.warmup"))


@check
def check_eval_frequency(ctx: Context):
    """Seed 000 common mistakes, "eval too rarely": every 100 or 500 steps, or forgetting goes unnoticed."""
    steps = _total_steps(ctx)
    every = _get(ctx.recipe, "train.eval_every")
    if steps and steps > EVAL_EVERY_MAX and (every is None or every > EVAL_EVERY_MAX):
        yield Finding("info", "eval-too-rare",
                      f"the run has ~{steps} steps and held-out loss is computed " +
                      ("only at the end" if every is None else f"every {every} steps"),
                      "you will not see overfitting or forgetting until the run is over",
                      f"set train.eval_every: {min(EVAL_EVERY_MAX, max(100, steps // 10))}", ctx.where("train.eval_every"))


# ---------------------------------------------------------------------------------------------------------------
# Validation set


@check
def check_validation_set(ctx: Context):
    """Seed 000 common mistakes: no validation set -> overfitting goes unnoticed; hold out 5 to 10%."""
    data_eval = _get(ctx.recipe, "data.eval")
    fraction = _get(ctx.recipe, "data.eval_fraction", 0.1)
    disabled = data_eval in (None, False, "none") and (fraction in (0, None, False))
    empty = ctx.stats is not None and ctx.stats.eval_examples == 0
    if disabled or empty:
        detail = ("no eval file and data.eval_fraction is 0" if disabled else
                  "the held-out set is empty after preparing the data" + (" (the dataset is too small to split)" if ctx.stats and ctx.stats.train_examples < 10 else ""))
        yield Finding("warning", "no-validation-set", f"there is no validation set: {detail}",
                      "without held-out loss you overfit and do not notice until the model is shipped",
                      "give data.eval (a held-out file) or keep data.eval_fraction at 0.05-0.1 of enough data",
                      ctx.where("data.eval"))


@check
def check_eval_size(ctx: Context):
    """An eval set of a few dozen examples cannot tell a real gain from noise."""
    if ctx.stats is None or ctx.stats.eval_examples == 0:
        return
    n = ctx.stats.eval_examples
    scored = _get(ctx.recipe, "eval.max_examples")
    shown = min(n, scored) if scored else n
    if shown < EVAL_MIN_EXAMPLES:
        margin = 196 * math.sqrt(0.25 / max(1, shown))
        key = "eval.max_examples" if scored and scored < n else ("data.eval" if _get(ctx.recipe, "data.eval") else "data.eval_fraction")
        yield Finding("warning", "eval-set-too-small",
                      f"only {shown} held-out example(s) are scored",
                      (f"held-out loss over {shown} examples is too noisy to show overfitting or forgetting"
                       if ctx.method == "cpt" else
                       f"an accuracy measured on {shown} examples is uncertain by about +/-{margin:.0f} points (95%), so "
                       "base-vs-tuned differences mean little"),
                      f"hold out at least {EVAL_MIN_EXAMPLES} examples (a few hundred is better)", ctx.where(key))


@check
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


@check
def check_duplicates(ctx: Context):
    """Seed 004: dedupe; duplicates overweight some examples and make epochs mean less than they say."""
    if ctx.data is None:
        return
    from tuneforge.data.pipeline import example_hash

    dedup = _get(ctx.recipe, "data.dedup", True)
    if dedup:
        removed = ctx.stats.duplicates_removed
        if removed:
            total = removed + len(ctx.data.train_examples) + (0 if _get(ctx.recipe, "data.eval") else len(ctx.data.eval_examples))
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
    if ctx.method == "cpt":
        return False
    fmt = ctx.data_format or (ctx.stats.format if ctx.stats is not None else None) or _get(ctx.recipe, "data.format")
    if fmt in (None, "auto"):
        return None
    if fmt == "text":
        return False
    if fmt == "prompt_completion":  # plain prompt/completion strings train without a template
        examples = getattr(ctx.data, "train_examples", None) or []
        return any(not e.get("raw_prompt_completion") for e in examples[:50])
    return True


@check
def check_chat_template(ctx: Context):
    """Seed 003 "the chat template trap" / seed 000 "wrong chat template": use the model's own template, at train
    and inference time; chat data on a model with no template cannot be rendered at all."""
    if ctx.tokenizer is None:
        return
    chat = _chat_like(ctx)
    template = getattr(ctx.tokenizer, "chat_template", None)
    override = _get(ctx.recipe, "model.chat_template")
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
    if override and native and _normalise(native) != _normalise(getattr(ctx.tokenizer, "chat_template", "") or ""):
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
                for marker, family in TEMPLATE_MARKERS.items():
                    if marker in message.get("content", "") and marker not in found:
                        found[marker] = example.get("where", "?")
        if found:
            own = template or ""
            foreign = sorted({TEMPLATE_MARKERS[m] for m in found if m not in own})
            yield Finding("warning", "chat-template-mismatch",
                          "message contents already contain chat-template markers " + ", ".join(sorted(found))
                          + (f" (from the {', '.join(foreign)} template, not this model's)" if foreign else ""),
                          "the data was templated before tuneforge applies the model's template: every example is "
                          "templated twice and the model learns to print role markers",
                          "store plain messages (role + content) and let tuneforge apply the model's chat template",
                          ", ".join(dict.fromkeys(found.values()).keys()))


def _normalise(text: str) -> str:
    return " ".join(text.split())


@check
def check_prompt_masking(ctx: Context):
    """Seed 000 "prompt loss not masked": the model wastes capacity learning to predict the prompt."""
    for flag in ("train.completion_only_loss", "train.assistant_only_loss", "train.mask_prompt"):
        if _get(ctx.recipe, flag, None) is False:
            yield Finding("warning", "prompt-loss-not-masked", f"{flag} is off: the prompt tokens carry loss",
                          "the model spends capacity learning to predict the prompts instead of the answers",
                          f"remove {flag} (tuneforge masks everything but the answers by default)", ctx.where(flag))
    if _get(ctx.recipe, "train.train_on_prompt", None) is True:
        yield Finding("warning", "prompt-loss-not-masked", "train.train_on_prompt is on: the prompt tokens carry loss",
                      "the model spends capacity learning to predict the prompts instead of the answers",
                      "remove train.train_on_prompt", ctx.where("train.train_on_prompt"))
    if ctx.data is None:
        return
    if ctx.method == "cpt":
        texts = [e.get("text", "") for e in ctx.data.train_examples[:200]]
        hits = [t for t in texts if PROMPT_RESPONSE_PATTERN.search(t)]
        if texts and len(hits) >= max(1, 0.3 * len(texts)):
            sample = next(e.get("where", "") for e in ctx.data.train_examples[:200] if PROMPT_RESPONSE_PATTERN.search(e.get("text", "")))
            yield Finding("warning", "prompt-loss-not-masked",
                          f"{len(hits)} of {len(texts)} sampled documents look like prompt/response pairs "
                          "(### Instruction:, User:/Assistant:, template markers), but method cpt trains on every token",
                          "the prompts carry loss too, and the model learns a hand-made format instead of its chat template",
                          "convert the data to prompt/completion or messages and use method: sft, which masks the prompts",
                          sample or ctx.where("method"))
        return
    if ctx.method not in ("sft",) and ctx.method not in PREFERENCE_METHODS:
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


@check
def check_stop_token(ctx: Context):
    """The answer's end-of-turn token must carry loss, or the tuned model never learns to stop (seed 004's pad = eos
    trap: a collator that masks pad tokens masks EOS too when they are the same token)."""
    if ctx.tokenizer is None:
        return
    tok = ctx.tokenizer
    from tuneforge.data.template import IGNORE_INDEX, end_of_turn_token_id

    stop_ids = {i for i in (end_of_turn_token_id(tok), tok.eos_token_id) if i is not None}
    pad = tok.pad_token_id
    collator = str(_get(ctx.recipe, "train.collator", "") or "").lower().replace("-", "_")
    masks_pad = collator in MASKING_COLLATORS or bool(_get(ctx.recipe, "train.mask_pad_token", False))
    if pad is not None and pad in stop_ids:
        name = tok.convert_ids_to_tokens(pad)
        if masks_pad:
            yield Finding("error", "pad-is-eos",
                          f"the pad token is the stop token ({name!r}) and the collator `{collator or 'mask_pad_token'}` "
                          "masks pad tokens out of the loss",
                          "every end-of-answer token is masked with the padding, so the model never learns to stop and "
                          "rambles until max_new_tokens",
                          "use tuneforge's collator (it masks padding by position, not by token id), or give the "
                          "tokenizer a distinct pad token", ctx.where("train.collator"))
        else:
            yield Finding("info", "pad-is-eos",
                          f"the pad token is the stop token ({name!r}); tuneforge masks padding by position so this run "
                          "is safe",
                          "other training code (collators that mask pad ids) would mask every end-of-answer token, and "
                          "a model trained that way never learns to stop",
                          "if the vocabulary has a spare token, set it as pad_token in the tokenizer you export",
                          ctx.where("model.name"))
    if ctx.data is None or ctx.method not in ("sft", "cpt"):
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
# Preference methods


def _has_sft_start(ctx: Context) -> tuple[bool, bool]:
    """(evidence of an SFT starting point, certainty that the model is a base model)."""
    stages = _get(ctx.recipe, "stages", None)
    if stages:
        names = [s if isinstance(s, str) else _get(s, "method", "") for s in stages]
        if "sft" in names and names.index("sft") < (names.index(ctx.method) if ctx.method in names else len(names)):
            return True, False
    for key in ("model.sft_adapter", "model.adapter", "model.init_adapter", "init_from", "ref_model", "model.ref_model"):
        if _get(ctx.recipe, key, None):
            return True, False
    name = str(_get(ctx.recipe, "model.name", "") or "")
    path = Path(name)
    if (path / "recipe.yaml").exists() or (path / "adapter_config.json").exists() or (path.parent / "recipe.yaml").exists():
        return True, False
    if re.search(r"(instruct|chat|[-_]it\b|[-_]it[-_]|sft|dpo|assistant|embedded:)", name, re.IGNORECASE):
        return True, False
    template = getattr(ctx.tokenizer, "chat_template", None) if ctx.tokenizer is not None else None
    return False, ctx.tokenizer is not None and not template


@check
def check_preference_start(ctx: Context):
    """Seed 000 common mistakes: DPO without an SFT base drifts unpredictably; always SFT first."""
    if ctx.method not in NEEDS_SFT_START:
        return
    evidence, surely_base = _has_sft_start(ctx)
    if evidence:
        return
    yield Finding("error" if surely_base else "warning", "dpo-without-sft",
                  f"method {ctx.method} starts from {_get(ctx.recipe, 'model.name', 'the model')!r}, which does not look "
                  "like an SFT model" + (" (its tokenizer has no chat template: a base model)" if surely_base else ""),
                  f"{ctx.method} uses the starting model as its reference; from a base model the reference is far from "
                  "useful behaviour and training drifts unpredictably. Preference tuning is a polish, not a starter",
                  "run SFT first (stages: [sft, " + ctx.method + "]) and start from its model, or start from an "
                  "instruct checkpoint", ctx.where("model.name"))


@check
def check_rl(ctx: Context):
    """Seed pitfalls of RL: no KL penalty (seed 003: the policy finds outputs that fool the reward), a group too small
    for GRPO's relative advantages, a PPO reward model trained from another base model, a reward model whose data
    has no held-out pairs (handled as a data error)."""
    method = ctx.method
    kl = _get(ctx.recipe, "rl.kl_coef", None)
    if method in ("ppo", "grpo", "rloo", "online_dpo") and kl == 0:
        yield Finding("warning", "rl-no-kl", f"rl.kl_coef is 0 with method {method}: nothing holds the policy near "
                      "its reference", "without the KL penalty the policy drifts into outputs that score high but are "
                      "gibberish or reward hacks (seed 003: 'the KL penalty is critical')",
                      "set rl.kl_coef > 0 (ppo 0.05, grpo 0.04 are the defaults)", ctx.where("rl.kl_coef"))
    if method in ("grpo", "rloo") and (_get(ctx.recipe, "rl.num_generations", 8) or 8) < 4:
        yield Finding("warning", "rl-small-group", f"rl.num_generations is {_get(ctx.recipe, 'rl.num_generations')}",
                      "the group mean is the baseline of each completion's advantage; with 2-3 samples it is noisy and "
                      "groups often score all-equal, which teaches nothing", "use 4-16 (TRL's default is 8)",
                      ctx.where("rl.num_generations"))
    reward_run = _get(ctx.recipe, "rl.reward_model", None)
    if method == "ppo" and reward_run and (Path(str(reward_run)) / "recipe.yaml").is_file():
        import yaml

        try:
            trained = (yaml.safe_load((Path(str(reward_run)) / "recipe.yaml").read_text(encoding="utf-8")) or {})
        except (OSError, yaml.YAMLError):
            trained = {}
        base = (trained.get("model") or {}).get("name") if isinstance(trained.get("model"), dict) else trained.get("model")
        if base and str(base) != str(_get(ctx.recipe, "model.name", "")):
            yield Finding("warning", "rl-reward-base", f"the reward model was trained from {base!r}, the policy is "
                          f"{_get(ctx.recipe, 'model.name')!r}", "PPO feeds the policy's token ids to the reward model: "
                          "it must share the tokenizer (a different vocabulary is refused when training starts)",
                          "train the reward model from the same base model as the policy", ctx.where("rl.reward_model"))


# ---------------------------------------------------------------------------------------------------------------
# Model: target modules, new tokens, context length


def _module_names(model) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def _linear_names(model) -> list[str]:
    from tuneforge.adapters import linear_module_names

    return linear_module_names(model)


def _peft_matches(key: str, target: str) -> bool:
    """PEFT's rule for one name of a target list: the module path equals it or ends with "." + it."""
    return key == target or key.endswith("." + target)


@check
def check_target_modules(ctx: Context):
    """Target modules that match nothing (issue: list what exists); PEFT matches a name against the end of each
    module path, or a single string as a regex against the full path."""
    if not ctx.uses_lora:
        return
    model = ctx.meta_model()
    if model is None:
        return
    import torch

    names = _module_names(model)
    modules = dict(model.named_modules())
    targets = _get(ctx.recipe, "adapter.target_modules", "all-linear")
    if targets != "all-linear":
        if isinstance(targets, str):
            # PEFT reads a single string as a regular expression that must match a module's full path
            matched = [n for n in names if re.fullmatch(targets, n)]
            missing = [] if matched else [targets]
            as_suffix = not matched and any(n.endswith("." + targets) for n in names)
        else:
            matched = [n for n in names if any(_peft_matches(n, t) for t in targets)]
            missing = [t for t in targets if not any(_peft_matches(n, t) for n in names)]
            as_suffix = False
        if as_suffix:
            yield Finding("error", "target-modules-not-found",
                          f"adapter.target_modules is the single string {targets!r}, which PEFT reads as a regular "
                          "expression over full module paths (model.layers.0...), so it matches nothing",
                          "PEFT refuses to build the adapter: no module matched",
                          f"write it as a list: target_modules: [{targets}]", ctx.where("adapter.target_modules"))
        elif missing:
            yield Finding("error", "target-modules-not-found",
                          f"adapter.target_modules {missing} match no module of this model",
                          "PEFT refuses to build the adapter (or, when only some names match, adapts less than you think)",
                          f"use this model's linear layers: {_linear_names(model)}, or all-linear",
                          ctx.where("adapter.target_modules"))
        else:
            adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
            unsupported = sorted({n.split(".")[-1] for n in matched if not isinstance(modules[n], adaptable)
                                  and type(modules[n]).__name__ not in ("Conv1D", "Linear4bit", "Linear8bitLt")})
            if unsupported:
                yield Finding("error", "target-modules-not-found",
                              f"adapter.target_modules {unsupported} name blocks, not layers LoRA can adapt",
                              "LoRA wraps linear (and embedding/conv) layers; PEFT raises on other module types",
                              f"name the linear layers inside them: {_linear_names(model)}, or all-linear",
                              ctx.where("adapter.target_modules"))
    to_save = list(_get(ctx.recipe, "adapter.modules_to_save", []) or [])
    missing_save = [m for m in to_save if not any(_peft_matches(n, m) for n in names)]
    if missing_save:
        top = sorted({n.split(".")[-1] for n in names if n.count(".") <= 1})
        yield Finding("error", "target-modules-not-found",
                      f"adapter.modules_to_save {missing_save} match no module of this model",
                      "those modules will not be trained; PEFT raises or silently skips them",
                      f"use names this model has, e.g. {top}", ctx.where("adapter.modules_to_save"))


def _embedding_names(model) -> tuple[str | None, str | None]:
    names = {id(m): n for n, m in model.named_modules()}
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    short = lambda module: names.get(id(module), "").split(".")[-1] or None  # noqa: E731
    return (short(inp) if inp is not None else None), (short(out) if out is not None else None)


@check
def check_new_tokens(ctx: Context):
    """Seed 000 common mistakes: new tokens have random embeddings that LoRA cannot fix; add modules_to_save
    [embed_tokens, lm_head]."""
    if ctx.tokenizer is None and not _get(ctx.recipe, "model.add_tokens"):
        return
    vocab_size = None
    if ctx.model_config is not None:
        from tuneforge.guide.plan import _text_config

        vocab_size = getattr(_text_config(ctx.model_config), "vocab_size", None)
    declared = list(_get(ctx.recipe, "model.add_tokens", []) or []) + list(_get(ctx.recipe, "data.add_tokens", []) or [])
    vocab = ctx.tokenizer.get_vocab() if ctx.tokenizer is not None else {}
    new_declared = [t for t in declared if t not in vocab]
    beyond = (len(ctx.tokenizer) - vocab_size) if ctx.tokenizer is not None and vocab_size else 0
    if beyond <= 0 and not new_declared:
        return
    if beyond > 0:
        extra = [ctx.tokenizer.convert_ids_to_tokens(i) for i in range(vocab_size, min(len(ctx.tokenizer), vocab_size + 5))]
        what = f"the tokenizer has {beyond} token(s) beyond the model's {vocab_size} embedding rows ({', '.join(map(repr, extra))})"
    else:
        what = f"the recipe adds {len(new_declared)} new token(s) ({', '.join(map(repr, new_declared[:5]))})"
    model = ctx.meta_model()
    embed, head = _embedding_names(model) if model is not None else ("embed_tokens", "lm_head")
    wanted = [n for n in (embed, head) if n]
    if ctx.uses_lora:
        to_save = set(_get(ctx.recipe, "adapter.modules_to_save", []) or [])
        lacking = [n for n in wanted if n not in to_save]
        if lacking:
            yield Finding("error", "new-tokens-without-modules-to-save",
                          f"{what}, but adapter.modules_to_save lacks {lacking}",
                          "new tokens get randomly initialised embedding (and output) rows; LoRA freezes those "
                          "matrices, so the model can neither read nor write the new tokens",
                          f"set adapter.modules_to_save: {wanted}",
                          ctx.where("adapter.modules_to_save"))
    elif beyond > 0:
        yield Finding("error", "new-tokens-without-modules-to-save",
                      f"{what}: their ids are out of range for the embedding matrix",
                      "the first example that uses one fails with an index error (or reads another row on some kernels)",
                      "resize the model's embeddings to the tokenizer (model.resize_token_embeddings) before training",
                      ctx.where("model.name"))


@check
def check_context_length(ctx: Context):
    """max_length beyond the model's context window: positions it never saw in pre-training."""
    if ctx.model_config is None:
        return
    from tuneforge.guide.plan import _first, _text_config

    limit = _first(_text_config(ctx.model_config), "max_position_embeddings", "n_positions")
    max_length = _get(ctx.recipe, "train.max_length")
    if limit and max_length and max_length > limit:
        yield Finding("warning", "max-length-truncates",
                      f"train.max_length {max_length} is longer than the model's context window ({limit} positions)",
                      "positions beyond the window were never trained; quality collapses there (or learned position "
                      "tables simply fail)", f"set train.max_length to at most {limit}", ctx.where("train.max_length"))


# ---------------------------------------------------------------------------------------------------------------
# Data length and packing


@check
def check_truncation(ctx: Context):
    """Seed 000 step 3: max_seq_length 512 to 4096; examples longer than max_length lose their end (the answer)."""
    if ctx.stats is None:
        return
    total = ctx.stats.train_examples + ctx.stats.dropped_no_loss
    cut = ctx.stats.truncated
    if not total or cut / total <= TRUNCATION_WARN:
        return
    max_length = _get(ctx.recipe, "train.max_length", ctx.stats.max_length)
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


@check
def check_packing(ctx: Context):
    """Packing concatenates examples into max_length rows; settings that break it (seed 000: "packing=False,
    incompatible with completion_only_loss" for collators that re-mask the packed row)."""
    if not _get(ctx.recipe, "train.packing", False):
        return
    where = ctx.where("train.packing")
    if ctx.method in PREFERENCE_METHODS:
        yield Finding("error", "packing-conflict", f"train.packing is on with method {ctx.method}",
                      "preference methods score each chosen/rejected answer as a whole sequence; packed rows mix "
                      "examples and the pairs can no longer be compared (TRL does not pack preference data)",
                      "set train.packing: false", where)
    collator = str(_get(ctx.recipe, "train.collator", "") or "").lower().replace("-", "_")
    if collator in MASKING_COLLATORS or _get(ctx.recipe, "train.completion_only_collator", False):
        yield Finding("error", "packing-conflict", f"train.packing is on with the `{collator}` collator",
                      "a completion-only collator looks for one response marker per row; in a packed row it masks "
                      "every answer but one (or none) and the prompt masks are lost",
                      "set train.packing: false, or use tuneforge's default collator (masks are built per example)", where)
    if _get(ctx.recipe, "model.trust_remote_code", False):
        yield Finding("warning", "packing-conflict", "train.packing is on with a model that runs its own code (trust_remote_code)",
                      "packing keeps examples apart through position ids; custom attention code usually builds its "
                      "mask from attention_mask only, so packed examples attend to each other",
                      "set train.packing: false for remote-code models, unless you know their attention handles packed "
                      "position ids", where)
    attention = _get(ctx.recipe, "model.attn_implementation", None)
    if attention and attention not in ("flash_attention_2", "flash_attention_3", "sdpa", "eager", "flex_attention",
                                       "kernels-community/vllm-flash-attn3"):
        yield Finding("warning", "packing-conflict", f"train.packing is on with attention `{attention}`",
                      "this attention implementation may ignore the per-example boundaries of a packed row",
                      "use flash_attention_2 or sdpa with packing", ctx.where("model.attn_implementation"))


# ---------------------------------------------------------------------------------------------------------------
# Precision and device


def _precision(ctx: Context) -> tuple[str, str]:
    """(training precision, weights dtype) as the recipe asks, 'auto' resolved against the device."""
    precision = str(_get(ctx.recipe, "train.precision", "auto"))
    weights = str(_get(ctx.recipe, "model.dtype", "auto"))
    bf16 = bool(ctx.device_info and ctx.device_info.get("bf16"))
    if precision == "auto":
        precision = "bf16" if ctx.on_gpu and bf16 else "fp32"
    if weights == "auto":
        weights = "bfloat16" if ctx.on_gpu and bf16 else "float32"
    return precision, weights


@check
def check_precision(ctx: Context):
    """Seed 000 common mistakes, "forgetting bf16 / fp16": fp32 OOMs; bf16 if available (no loss scaling needed);
    fp16 needs care; CPU keeps fp32."""
    if not ctx.device_info:
        return
    precision, weights = _precision(ctx)
    name = ctx.device_info.get("name", "this GPU")
    compute = str(_get(ctx.recipe, "quant.compute_dtype", "auto"))
    if ctx.on_gpu and ctx.device_info.get("bf16"):
        if precision == "fp32" or weights == "float32":
            key = "train.precision" if precision == "fp32" else "model.dtype"
            yield Finding("warning", "fp32-on-bf16-gpu",
                          f"training in fp32 on {name}, which supports bf16 ({key} = {_get(ctx.recipe, key)})",
                          "fp32 doubles weight, gradient and activation memory (a 7B model OOMs even on large GPUs) "
                          "and runs at a fraction of the tensor-core speed; bf16 needs no loss scaling",
                          f"remove {key} (auto picks bf16 here) or set it to bf16", ctx.where(key))
        if precision == "fp16" or weights == "float16" or (ctx.adapter == "qlora" and compute == "float16"):
            key = "train.precision" if precision == "fp16" else ("model.dtype" if weights == "float16" else "quant.compute_dtype")
            yield Finding("warning", "fp16-on-bf16-gpu", f"fp16 on {name}, which supports bf16 ({key})",
                          "fp16's narrow exponent range overflows and needs loss scaling; bf16 has fp32's range at the "
                          "same speed and memory",
                          f"set {key} to bf16 (or auto)", ctx.where(key))
    elif ctx.on_gpu:
        if precision == "bf16" or weights == "bfloat16" or compute == "bfloat16":
            key = "train.precision" if precision == "bf16" else ("model.dtype" if weights == "bfloat16" else "quant.compute_dtype")
            yield Finding("error", "bf16-unsupported", f"bf16 requested but {name} has no bf16 support",
                          "the run fails at start, or emulates bf16 at a fraction of the speed",
                          "use fp16 (with loss scaling) or fp32 on this GPU", ctx.where(key))
        elif precision == "fp32":
            yield Finding("info", "fp32-on-fp16-gpu", f"{name} has no bf16; the run trains in fp32",
                          "fp16 mixed precision halves activation memory and uses the tensor cores",
                          "set train.precision: fp16 if memory is tight", ctx.where("train.precision"))
    else:
        if precision in ("bf16", "fp16"):
            yield Finding("warning", "fp16-on-bf16-gpu" if precision == "fp16" else "fp32-on-bf16-gpu",
                          f"train.precision {precision} on a CPU",
                          "CPUs have no fast half-precision training path; it is slower and less precise than fp32",
                          "remove train.precision (auto keeps fp32 on CPU)", ctx.where("train.precision"))
        if ctx.adapter == "qlora":
            yield Finding("warning", "qlora-on-cpu", "QLoRA on a CPU",
                          "4-bit matmuls are GPU kernels; on a CPU they run a slow fallback and save nothing useful",
                          "use adapter.type: lora on CPU, QLoRA on a GPU", ctx.where("adapter.type"))


@check
def check_qlora_optimizer(ctx: Context):
    """Seed 000 common mistakes: saving full optimizer state with QLoRA defeats the memory savings; use
    optim=paged_adamw_8bit and save only the adapter."""
    if ctx.adapter != "qlora":
        return
    optimizer = str(_get(ctx.recipe, "train.optimizer", "") or "")
    if optimizer and "8bit" not in optimizer and "paged" not in optimizer:
        yield Finding("warning", "qlora-optimizer",
                      f"QLoRA with optimizer {optimizer} (neither paged nor 8-bit)",
                      "optimizer states in fp32 are the memory spike QLoRA exists to avoid; a paged optimizer moves "
                      "them to CPU when the GPU fills up instead of running out of memory",
                      "set train.optimizer: paged_adamw_8bit (the QLoRA default)", ctx.where("train.optimizer"))
    for key, bad in (("train.save_optimizer_state", True), ("train.save_only_model", False), ("train.save_full_model", True),
                     ("output.save_full_model", True), ("train.save_full_state", True)):
        if _get(ctx.recipe, key, None) is bad:
            yield Finding("warning", "qlora-full-state",
                          f"QLoRA saving full state ({key} = {bad})",
                          "saving the full state dict (and optimizer state) of a QLoRA run writes the whole base "
                          "model and defeats the memory and disk savings",
                          "save only the adapter (the default): remove " + key, ctx.where(key))


@check
def check_memory(ctx: Context):
    """The plan's estimate against the GPU's memory (tuneforge plan)."""
    if not ctx.on_gpu or ctx.model_config is None or not ctx.device_info.get("memory_gib"):
        return
    from tuneforge.guide.plan import GpuSpec, fit_verdict

    try:
        precision, weights = _precision(ctx)
        dtype = {"fp32": "fp32", "fp16": "fp16"}.get(precision, "bf16")
        if weights == "float32":
            dtype = "fp32"
        settings = dict(adapter=ctx.adapter, seq_len=int(_get(ctx.recipe, "train.max_length", 2048)),
                        batch_size=int(_get(ctx.recipe, "train.batch_size", 1)),
                        gradient_checkpointing=bool(_get(ctx.recipe, "train.gradient_checkpointing", False)),
                        optimizer=_get(ctx.recipe, "train.optimizer"), dtype=dtype,
                        lora_r=int(_get(ctx.recipe, "adapter.r", 16)),
                        target_modules=_get(ctx.recipe, "adapter.target_modules", "all-linear"),
                        lora_dropout=float(_get(ctx.recipe, "adapter.dropout", 0.05)),
                        modules_to_save=list(_get(ctx.recipe, "adapter.modules_to_save", []) or []),
                        quant_bits=int(_get(ctx.recipe, "quant.bits", 4)))
        gpu = GpuSpec(ctx.device_info.get("name", "GPU"), float(ctx.device_info["memory_gib"]), bool(ctx.device_info.get("bf16")), 100.0)
        verdict = fit_verdict(ctx.model_config, gpu=gpu, **settings)
    except Exception:
        return
    if not verdict["fits"]:
        yield Finding("warning", "memory-does-not-fit",
                      f"estimated {verdict['needed_gib']:.1f} GiB needed, the GPU has {verdict['available_gib']:.1f} GiB",
                      "the run is likely to stop with CUDA out of memory at its first step",
                      "change one of: " + "; ".join(verdict["changes"]) + " (see `tuneforge plan`)",
                      ctx.where("train.batch_size"))


# ---------------------------------------------------------------------------------------------------------------
# Running the checks


def detect_device() -> dict:
    """{'type': 'cuda'|'cpu', 'name', 'memory_gib', 'bf16', 'count'} for the local machine."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return {"type": "cpu", "name": "CPU", "bf16": False, "count": 1}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": props.name, "memory_gib": props.total_memory / 2**30,
                "bf16": bool(torch.cuda.is_bf16_supported()), "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": "CPU", "bf16": False, "count": 1}


def device_from_gpu(name: str, count: int = 1) -> dict:
    """device_info for a GPU of the plan's table ('H100', 'T4', ...), to check a recipe for a machine you are not on."""
    from tuneforge.guide.plan import find_gpu

    gpu = find_gpu(name)
    return {"type": "cuda", "name": gpu.name, "memory_gib": gpu.memory_gib, "bf16": gpu.bf16, "count": count}


def run_doctor(recipe, *, tokenizer=None, data=None, model_config=None, device_info=None, source: str | None = None,
               data_format: str | None = None, native_chat_template: str | None = None) -> list[Finding]:
    """Run every check that its inputs allow; loads nothing itself (see `doctor_recipe` for that).

    `recipe` is a Recipe or any object with the same attribute paths (tests use SimpleNamespace for fields the
    schema does not have yet). `source` is the recipe file, for `file:line` locations. `native_chat_template` is
    the template the model ships with (to detect a recipe override that differs)."""
    key_lines = {}
    source = source or getattr(recipe, "_source_path", None)
    if source:
        try:
            from tuneforge.recipe import _key_lines

            key_lines = _key_lines(Path(source).read_text(encoding="utf-8"))
        except OSError:
            pass
    ctx = Context(recipe=recipe, tokenizer=tokenizer, data=data, model_config=model_config, device_info=device_info,
                  source=str(source) if source else None, data_format=data_format,
                  native_chat_template=native_chat_template, key_lines=key_lines)
    findings: list[Finding] = []
    for function in CHECKS:
        findings.extend(function(ctx))
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(findings, key=lambda f: order[f.severity])


def doctor_recipe(recipe, *, tokenizer=None, data=None, model_config=None, device_info=None,
                  overrides: list[str] | None = None, source: str | None = None) -> list[Finding]:
    """Doctor a recipe (a path, or a loaded Recipe): loads the tokenizer, the model's config (no weights) and the
    prepared data unless given, turns load failures into findings, then runs every check. `device_info` defaults
    to this machine (`detect_device`); pass `device_from_gpu("H100")` to check for another machine. `source` is
    the recipe file of a loaded Recipe, for file:line locations (or set `recipe._source_path`)."""
    from tuneforge.errors import ModelError
    from tuneforge.recipe import load_recipe

    findings: list[Finding] = []
    if isinstance(recipe, (str, Path)):
        source = str(recipe)
        recipe = load_recipe(recipe, overrides)  # a recipe that does not validate raises RecipeError as usual
    source = source or getattr(recipe, "_source_path", None)
    name = recipe.model.name
    if model_config is None:
        from tuneforge.guide.plan import load_model_config

        try:
            model_config = load_model_config(name, trust_remote_code=recipe.model.trust_remote_code,
                                             revision=recipe.model.revision)
        except TuneforgeError as exc:
            findings.append(Finding("error", "model-unreadable", exc.message, "nothing about the model can be checked or trained",
                                    exc.fix or "check model.name", "`model.name`"))
    native = None
    if tokenizer is None:
        from tuneforge.models import load_tokenizer

        try:
            tokenizer = load_tokenizer(name, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision)
            native = tokenizer.chat_template
            if recipe.model.chat_template:
                template = recipe.model.chat_template
                path = Path(template)
                tokenizer.chat_template = path.read_text(encoding="utf-8") if path.suffix == ".jinja" and path.is_file() else template
        except TuneforgeError as exc:
            if not any(f.code == "model-unreadable" for f in findings):
                findings.append(Finding("error", "model-unreadable", exc.message, "the tokenizer is needed to check the data",
                                        exc.fix or "check model.name", "`model.name`"))
    elif recipe.model.chat_template:
        native = _native_template(recipe)
    data_format = None
    if data is None and tokenizer is not None:
        from tuneforge.data.pipeline import prepare_data
        from tuneforge.recipe import RL_METHODS

        try:
            if recipe.method in RL_METHODS:  # pairs, prompts or conversations (train_rl.py); prompts are not SFT data
                from tuneforge.train_rl import prepare_rl_data

                data = prepare_rl_data(recipe, tokenizer)
                data = data if hasattr(data, "train_examples") else None
            else:
                data = prepare_data(recipe, tokenizer)
        except ModelError as exc:
            if exc.where != "model.chat_template":
                findings.append(_load_finding(exc))
        except TuneforgeError as exc:
            findings.append(_load_finding(exc))
        if data is None and recipe.method not in RL_METHODS:
            data_format = _detect_format(recipe)
    if device_info is None:
        device_info = detect_device()
    findings.extend(run_doctor(recipe, tokenizer=tokenizer, data=data, model_config=model_config, device_info=device_info,
                               source=source, data_format=data_format, native_chat_template=native))
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(findings, key=lambda f: order[f.severity])


def _native_template(recipe) -> str | None:
    try:
        from tuneforge.models import load_tokenizer

        return load_tokenizer(recipe.model.name, trust_remote_code=recipe.model.trust_remote_code,
                              revision=recipe.model.revision).chat_template
    except Exception:
        return None


def _detect_format(recipe) -> str | None:
    try:
        from tuneforge.data.pipeline import load_examples
        from tuneforge.recipe import resolve_path

        _, fmt = load_examples(resolve_path(recipe, recipe.data.train), recipe.data.format, split=recipe.data.split, limit=50)
        return fmt
    except Exception:
        return None


def _load_finding(exc: TuneforgeError) -> Finding:
    return Finding("error", "data-error", exc.message, "the data cannot be prepared, so `train` would stop here",
                   exc.fix or "fix the data file", exc.where or "`data.train`")


# ---------------------------------------------------------------------------------------------------------------
# Output


STYLE = {"error": ("red", "error"), "warning": ("yellow", "warning"), "info": ("blue", "note")}


def render_findings(console, findings: list[Finding], *, title: str | None = None) -> None:
    """Print findings grouped by severity (errors first), each with where, why and fix, then a one-line summary."""
    from rich.markup import escape

    if title:
        console.print(f"[bold]{escape(title)}[/]")
    for f in findings:
        color, label = STYLE[f.severity]
        console.print(f"[bold {color}]{label:7s}[/] [bold]{f.code}[/]" + (f"  [dim]{escape(f.where)}[/]" if f.where else ""))
        console.print(f"        {escape(f.message)}")
        console.print(f"        [dim]why:[/] {escape(f.why)}")
        console.print(f"        [dim]fix:[/] {escape(f.fix)}")
    console.print(summary_line(findings))


def summary_line(findings: list[Finding]) -> str:
    counts = {s: sum(1 for f in findings if f.severity == s) for s in SEVERITIES}
    if not findings:
        return "[green]doctor: no problems found[/]"
    parts = [f"{counts['error']} error(s)", f"{counts['warning']} warning(s)", f"{counts['info']} note(s)"]
    color = "red" if counts["error"] else ("yellow" if counts["warning"] else "green")
    return f"[{color}]doctor: " + ", ".join(parts) + "[/]"
