"""`tuneforge doctor RECIPE`: preflight checks for the mistakes the seeds list ("common mistakes", troubleshooting),
run before any weight is loaded. `train` runs them too: errors stop the run, warnings are printed.

Each check reads the recipe (its attributes), and where it needs them the tokenizer, the model's config (no
weights: module names come from a model built on the meta device), the prepared data
(`tuneforge.data.pipeline.PreparedData`, whose stats already count truncation, duplicates and train/eval overlap)
and the device. A check whose input is missing is skipped, so `run_doctor` works on a recipe alone. Which methods a
check applies to, their learning-rate ranges and defaults come from the method registry (`tuneforge.methods`).

Severity: `error` = the run would fail, or would train something broken or measure nothing (target modules that
match nothing, chat data with no chat template, eval set overlapping the training set, new tokens that cannot
train, a stop token that never carries loss, ...). `warning` = runs, but against the seeds' documented practice
(learning rate outside the method's range, no warmup, fp32 on a bf16 GPU, ...). `info` = worth knowing.

    findings = doctor_recipe("recipes/x.yaml")        # loads tokenizer, config, data itself
    findings = doctor_recipe(recipe, tokenizer=tok, data=prepared)   # inside train: reuse what is loaded
    render_findings(console, findings)
    raise_for_errors(findings)                        # DoctorError (exit 2) when any finding is an error

The package, by topic: core (Finding, DoctorError, the Context a check reads), schedule (learning rate, batch,
epochs, warmup), data (validation set, duplicates, chat template, masking, stop token, truncation, packing),
adapter (LoRA targets, new tokens, QLoRA), preference_rl (SFT start, RL pitfalls), hardware (precision, memory fit,
the device), runner (the list of checks, loading what they read), render (printing).
"""

from tuneforge.guide.doctor.adapter import check_new_tokens, check_qlora_optimizer, check_target_modules
from tuneforge.guide.doctor.core import (
    SEVERITIES,
    Check,
    Context,
    DoctorError,
    Finding,
    has_errors,
    raise_for_errors,
)
from tuneforge.guide.doctor.data import (
    check_chat_template,
    check_context_length,
    check_curriculum,
    check_duplicates,
    check_eval_size,
    check_packing,
    check_prompt_masking,
    check_stop_token,
    check_train_eval_overlap,
    check_truncation,
    check_validation_set,
)
from tuneforge.guide.doctor.hardware import check_memory, check_precision, detect_device, device_from_gpu
from tuneforge.guide.doctor.preference_rl import check_preference_start, check_rl, needs_sft_start
from tuneforge.guide.doctor.render import render_findings, summary_line
from tuneforge.guide.doctor.runner import CHECKS, doctor_recipe, run_doctor
from tuneforge.guide.doctor.schedule import (
    check_effective_batch,
    check_epochs,
    check_eval_frequency,
    check_learning_rate,
    check_warmup,
)

__all__ = [
    "CHECKS", "SEVERITIES", "Check", "Context", "DoctorError", "Finding", "detect_device", "device_from_gpu",
    "doctor_recipe", "has_errors", "needs_sft_start", "raise_for_errors", "render_findings", "run_doctor",
    "summary_line",
    "check_chat_template", "check_context_length", "check_curriculum", "check_duplicates", "check_effective_batch", "check_epochs",
    "check_eval_frequency", "check_eval_size", "check_learning_rate", "check_memory", "check_new_tokens",
    "check_packing", "check_precision", "check_preference_start", "check_prompt_masking", "check_qlora_optimizer",
    "check_rl", "check_stop_token", "check_target_modules", "check_train_eval_overlap", "check_truncation",
    "check_validation_set", "check_warmup",
]
