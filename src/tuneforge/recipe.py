"""The recipe: one YAML file that says everything about a run.

Every default lives here, once, as a `Field(default, description=...)`. Defaults are the seeds' documented
production values; where a default depends on another key (the learning rate on the adapter type) it is
`None` here and resolved in `Recipe.resolve_defaults`, from the tables just below. Recipes are strict:
unknown keys are errors with a "did you mean", and every problem is reported at once with its YAML line.
"""

from __future__ import annotations

import difflib
import unicodedata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from tuneforge.errors import RecipeError
from tuneforge.evaluate.judge_section import JudgeSection
from tuneforge.federated.section import FederatedSection
from tuneforge.recipe_methods import (  # noqa: F401 (re-exported: the sections methods and levers read)
    ClassifySection, DistillSection, DistributedSection, PreferenceSection, RewardSpec, RFTSection, RLSection,
    SpeedSection)
from tuneforge.recipe_base import KeyedValueError, Section as _Section, one_of  # noqa: F401 (re-exported)
from tuneforge.recipe_yaml import _key_lines, load_yaml_bounded, read_recipe_file  # noqa: F401 (doctor: _key_lines)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"

# Learning rates, their documented ranges and KL coefficients are the methods' own: each method module declares them
# (src/tuneforge/methods/, `Method.lr`, `lr_range`, `kl`) and `Recipe.resolve_defaults` fills them in from there.
# The optimizer by adapter type lives with the memory model that sizes its state (memory.py).
from tuneforge.memory import DEFAULT_OPTIMIZER  # noqa: E402


def _method_names() -> list[str]:
    from tuneforge.methods import method_names

    return method_names()


def _methods_help() -> str:
    from tuneforge.methods import method_names, method_spec

    return " | ".join(f"{name} ({method_spec(name).summary})" for name in method_names())


# Optimizer names accepted without importing transformers (the defaults, and what speed.fused_optimizer picks); any
# other name is checked against transformers' own list (`OptimizerNames`), which costs the import.
_COMMON_OPTIMIZERS = frozenset({*DEFAULT_OPTIMIZER.values(), "adamw_torch", "adamw_torch_fused", "paged_adamw_8bit",
                                "paged_adamw_32bit", "adamw_8bit", "adamw_bnb_8bit", "adafactor", "sgd"})


def _optimizer_names() -> list[str]:
    from transformers.training_args import OptimizerNames

    return [o.value for o in OptimizerNames]


class ModelSection(_Section):
    name: str = Field(EMBEDDED_MODEL, description="Hub id, local directory, .gguf file, or embedded:smollm2-135m-instruct.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `name` is a hub id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype: auto = bf16 on a GPU that has it, fp32 on CPU (seed 000: CPU keeps fp32)."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub model. Off unless you trust it.")
    allow_pickle: bool = Field(
        False, description="Allow pickle-based weight files (.bin/.pt). Off: only safetensors load, as pickle can run code."
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template (text or path to a .jinja file) for a model that has none."
    )
    adapter: str | None = Field(
        None, description="Start from a trained LoRA adapter: an adapter folder or a tuneforge run directory (its "
        "adapter/). E.g. the SFT run before DPO. How it is used: `model.adapter_mode`."
    )
    adapter_mode: Literal["continue", "merge"] = Field(
        "continue", description="continue = keep training that same adapter (seed 000 step 12; the adapter as loaded "
        "is the reference) | merge = merge it into the base weights and train a fresh adapter (adapter.*) on top."
    )
    add_tokens: list[str] = Field(default_factory=list, description="New tokens for the tokenizer; the embedding and "
                                  "output rows grow (initialised to the mean of the old rows) and, with LoRA, are "
                                  "trained in full (adapter.modules_to_save is filled in).")
    add_special_tokens: list[str] = Field(default_factory=list, description="New special tokens (never split, e.g. "
                                          "<tool_call>), handled like add_tokens.")


class DataSource(_Section):
    path: str = Field(..., min_length=1, description="A data file (.jsonl/.json/.csv/.parquet) or a hub dataset name.")
    weight: float = Field(..., gt=0, description="This source's share of the mix (weights are normalised to sum to 1).")


class DataSection(_Section):
    train: str | list[DataSource] = Field(
        ..., description="Training data: .jsonl/.json/.csv/.parquet file, or a hub dataset name; or a list of sources "
        "mixed by share, e.g. [{path: task.jsonl, weight: 0.85}, {path: general.jsonl, weight: 0.15}] (replay of "
        "general data against forgetting, seed 000: 5-20%; builtin:general-replay names the shipped general set).")
    eval: str | list[DataSource] | None = Field(
        None, description="Held-out data (a file, or sources with weights as for train); when absent, `eval_fraction` "
        "is split off each training source by hash.")

    @field_validator("train", "eval")
    @classmethod
    def _sources_listed(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("an empty list of sources; give a file, or sources like [{path: a.jsonl, weight: 1}]")
        return value

    def sources(self, which: str = "train") -> list[DataSource]:
        """train or eval as a list of sources (a single file is one source of weight 1)."""
        value = getattr(self, which)
        if value is None:
            return []
        return [DataSource(path=value, weight=1.0)] if isinstance(value, str) else list(value)
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "kto"] = Field(
        "auto", description="Record format; auto detects it from the keys and says what it found. preference = "
        "prompt/chosen/rejected (strings or message lists, or UltraFeedback-style full conversations); kto = "
        "prompt/completion/label."
    )
    eval_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share held out when no eval set is given (seed 000: 5-10%).")
    dedup: bool = Field(True, description="Drop exact duplicate examples (counted and reported).")
    system_prompt: str | None = Field(None, description="System message added to chat examples that have none.")
    max_examples: int | None = Field(None, gt=0, description="Use only the first N training examples (quick trials).")
    split: str = Field("train", description="Split to read when `train` is a hub dataset name.")
    order: str = Field("shuffle", min_length=1, description="Order of training examples: shuffle (random each epoch) | "
                       "length (shortest first) | the name of a numeric field of each record (ascending: a curriculum "
                       "from easy to hard, seed 000 step 13; doctor warns for general SFT).")
    eval_split: str = Field("test", description="Split to read when `eval` is a hub dataset name (e.g. test_sft for "
                            "ultrachat_200k, test_prefs for ultrafeedback_binarized).")


from tuneforge.recipe_adapter import MAX_LORA_RANK, AdapterSection  # noqa: E402,F401 (the adapter: section)


class QuantSection(_Section):
    bits: Literal[4, 8] = Field(4, description="Base-weight bits for QLoRA (bitsandbytes).")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit type; NF4 fits normally-distributed weights best.")
    double_quant: bool = Field(True, description="Quantize the block scales too (~0.37 bit/param saved).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Dtype the 4-bit blocks are dequantized to: auto = bf16 on GPU, fp32 on CPU."
    )


class TrainSection(_Section):
    epochs: float = Field(1, gt=0, description="Passes over the training data (seed 000: 1-3; more overfits).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    lr: float | None = Field(None, gt=0, description="Peak learning rate; default by adapter type (2e-4 LoRA, 2e-5 full).")
    batch_size: int = Field(4, gt=0, description="Examples per device per micro-batch.")
    grad_accum: int = Field(4, gt=0, description="Micro-batches per optimizer step (effective batch = batch_size x grad_accum).")
    max_length: int = Field(2048, gt=8, description="Tokens per example; longer ones are truncated and counted.")
    packing: bool = Field(False, description="Pack examples into max_length rows, attention kept within each example.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field("cosine", description="LR schedule.")
    warmup: float = Field(0.03, ge=0, description="Warmup: a fraction of steps if < 1, else a number of steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (seed 000: 0 or 0.01).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: str | None = Field(None, description="Optimizer name as transformers knows it; default by adapter type.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute activations in backward: less memory, ~30% slower. auto = the memory plan decides "
        "on a GPU (off when the run fits speed.memory_fraction of it, else every 2nd layer, else every layer); off on CPU.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto = bf16 on a GPU that has it, else fp32.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for init, shuffling and dropout (0 to 2**32-1).")
    eval_every: int | None = Field(None, gt=0, description="Held-out loss every N steps (None: at the end only).")
    logging_steps: int = Field(1, gt=0, description="Log loss/lr/throughput every N steps.")
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N steps (None: only the final weights).")
    save_total_limit: int | None = Field(
        None, gt=0, description="Keep only the newest N checkpoints, plus the best one by held-out loss when it is "
        "older (eval_every); None keeps every checkpoint.")
    oom_retry: bool = Field(
        False, description="On out of memory, continue from the last checkpoint with half the micro-batch and twice "
        "grad_accum (the same effective batch), down to batch_size 1; off: stop with the memory plan's advice.")
    skip_nonfinite_batches: int = Field(
        0, ge=0, description="Skip up to N optimizer steps whose gradients are NaN/inf (isolated bad batches; each "
        "counted and reported); one more stops the run. 0: stop at the first.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers besides metrics.jsonl and report.html: tensorboard (local, <run>/tensorboard; "
        "the default), wandb, mlflow, trackio ([] = none). Their settings (project, API key, URL) come from their usual "
        "environment variables (WANDB_PROJECT, MLFLOW_TRACKING_URI, ...); keys are never written to the run directory.",
    )
    early_stopping: EarlyStoppingSection | None = Field(
        None, description="Stop when the held-out loss plateaus (needs eval_every); e.g. {patience: 3, min_delta: 0.01}."
    )
    kl_to_base: float = Field(0.0, ge=0, description="Against forgetting: weight of a per-token KL(tuned || base) term "
                              "in the loss (LoRA: the adapter-off model is the reference; full: a frozen copy). 0 = off.")
    ewc: EWCSection | None = Field(None, description="Against forgetting: elastic weight consolidation, e.g. {lambda: "
                                   "1000, fisher_examples: 64} (Fisher information on the shipped general replay set).")

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str | None) -> str | None:
        if value is None or value in _COMMON_OPTIMIZERS:
            return value
        return one_of(value, _optimizer_names(), "optimizer", "known (transformers' OptimizerNames)")


class EWCSection(_Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, populate_by_name=True)

    strength: float = Field(..., alias="lambda", gt=0, description="EWC's lambda: the weight of the penalty on moving "
                            "parameters that matter for general ability (by their Fisher information).")
    fisher_examples: int = Field(64, ge=1, le=10000, description="General examples (the shipped replay set) the "
                                 "diagonal Fisher information is estimated on before training.")


class EarlyStoppingSection(_Section):
    patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement.")
    metric: str = Field("eval_loss", description="What to watch (lower is better for eval_loss).")


class EvalSection(_Section):
    metrics: list[str | dict] = Field(
        default_factory=lambda: ["exact_match"],
        description="Generation metrics: names (exact_match, contains, regex, json_valid, json_schema, rouge_l, accuracy, "
        "macro_f1, pass_at_k) or mappings with options, e.g. {name: json_schema, schema: schema.json}; see evaluate/metrics.py.",
    )
    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, items: list) -> list:
        """Names and options are checked here; files a metric names are read when the run starts."""
        from tuneforge.errors import RecipeError
        from tuneforge.evaluate.metrics import parse_metric_spec

        for i, item in enumerate(items):
            try:
                parse_metric_spec(item, where=f"eval.metrics.{i}")
            except RecipeError as exc:
                raise ValueError("; ".join(p.split(": ", 1)[-1] for p in exc.problems)) from None
        return items

    few_shot: int = Field(3, ge=0, description="Shots in the prompt-only baseline built from training examples (0: off).")
    forgetting: bool = Field(True, description="Run the shipped general-ability probe before and after training.")
    forgetting_threshold: float = Field(5.0, gt=0, description="Flag a probe drop larger than this many points (and "
                                        "only when its 95% interval excludes zero).")
    judge: JudgeSection | None = Field(None, description="An LLM judge of base vs tuned answers (both orders, position "
                                       "and length bias measured): model, or url + model_name (docs/evaluation.md).")
    forgetting_every: int | None = Field(None, gt=0, description="Also run the probe's multiple-choice items every N "
                                         "optimizer steps during training (seed 000: every 100 or 500), logged as "
                                         "probe_accuracy and plotted.")
    lm_eval_tasks: list[str] = Field(
        default_factory=list, description="lm-evaluation-harness tasks (e.g. [arc_easy, hellaswag]) scored before and "
        "after training beside the shipped probe, each flagged like it; needs `pip install lm-eval` and the tasks' data.")
    lm_eval_limit: int | None = Field(200, gt=0, description="Documents per lm-eval task (None: all).")
    lm_eval_include: str | None = Field(None, description="Folder of your own lm-eval task YAMLs (offline tasks).")
    max_examples: int | None = Field(100, gt=0, description="Held-out examples scored by generation (None: all).")
    max_new_tokens: int = Field(128, gt=0, description="Generation budget per answer.")
    batch_size: int = Field(16, gt=0, description="Prompts per generation batch.")
    baseline: bool = Field(True, description="Also score the base model, so every run is compared against it.")


MAX_NAME_BYTES = 200  # the run's folder name (common filesystems allow 255 bytes; room for suffixes)


class Recipe(_Section):
    name: str = Field(..., min_length=1, description="Run name; the run directory is <output_dir>/<name>.")
    model: ModelSection = Field(default_factory=ModelSection, description="The base model.")
    method: str = Field("sft", description="The training method; each is declared by its module in "
                        "src/tuneforge/methods/ (`tuneforge methods` lists them): " + _methods_help() + ".")
    data: DataSection
    adapter: AdapterSection = Field(default_factory=AdapterSection)
    quant: QuantSection = Field(default_factory=QuantSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection, description="Several GPUs (--gpus N).")
    speed: SpeedSection = Field(default_factory=SpeedSection, description="Speed levers; the defaults are the fast, "
                                "safe choice (see src/tuneforge/speed/).")
    preference: PreferenceSection = Field(default_factory=PreferenceSection, description="dpo/kto/orpo/simpo/cpo settings.")
    rl: RLSection = Field(default_factory=RLSection, description="reward/ppo/grpo/rloo/online_dpo/gkd settings.")
    distill: DistillSection = Field(default_factory=DistillSection, description="distill (offline distillation) settings.")
    classify: ClassifySection = Field(default_factory=ClassifySection, description="classify (sequence classification) settings.")
    rft: RFTSection = Field(default_factory=RFTSection, description="rft (rejection-sampling fine-tuning) settings.")
    stages: list[dict] | None = Field(
        None, description="Run several stages in order, each a partial recipe over this one, e.g. [{name: sft, method: "
        "sft}, {name: dpo, method: dpo, data: {train: prefs.jsonl}}]; each stage starts from the last stage's adapter "
        "(model.adapter) and gets its own run directory <run>/<stage name>.")
    federated: FederatedSection | None = Field(None, description="Federated training: this recipe's data split across "
                                              "clients, trained in rounds on Flower (src/tuneforge/federated/).")
    output_dir: str = Field("runs", description="Parent folder of run directories.")

    # Where the recipe came from (set by load_recipe; not keys): relative data paths resolve against source_dir,
    # doctor's findings point at source_path:line, and a multi-stage recipe builds its stages from the keys as
    # written (stage_base), not from the resolved defaults.
    _source_dir: Path | None = PrivateAttr(None)
    _source_path: str | None = PrivateAttr(None)
    _stage_base: dict | None = PrivateAttr(None)

    @property
    def source_dir(self) -> Path | None:
        return self._source_dir

    @property
    def source_path(self) -> str | None:
        return self._source_path

    @property
    def stage_base(self) -> dict | None:
        return self._stage_base

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return one_of(value, _method_names(), "method", "known")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if "/" in value or value in {".", ".."}:
            raise ValueError("must be a plain folder name (no '/')")
        control = sorted({f"U+{ord(c):04X}" for c in value if unicodedata.category(c) == "Cc"})
        if control:
            raise ValueError(f"must be a plain folder name: it holds control character(s) {', '.join(control)}")
        if len(value.encode("utf-8")) > MAX_NAME_BYTES:
            raise ValueError(f"is {len(value)} characters ({len(value.encode('utf-8'))} bytes in UTF-8); a folder name "
                             f"must be at most {MAX_NAME_BYTES} bytes (filesystems allow 255), so shorten it")
        return value

    @model_validator(mode="after")
    def resolve_defaults(self) -> Recipe:
        """Fill the defaults that depend on other keys, so the saved recipe shows what actually ran; the method's own
        checks (keys it needs, keys it refuses) raise on the key to fix."""
        from tuneforge.methods import method_spec

        spec = method_spec(self.method)
        if self.train.lr is None:
            from tuneforge.adapter_kinds import lr_type

            self.train.lr = spec.default_lr(lr_type(self.adapter))
        if spec.kl is not None and self.rl.kl_coef is None:
            self.rl.kl_coef = spec.kl
        for key, problem in spec.refusals(self):
            raise KeyedValueError(key, f"method {self.method}: {problem}" if not problem.startswith("method") else problem)
        if self.train.optimizer is None:
            self.train.optimizer = DEFAULT_OPTIMIZER[self.adapter.type]
        from tuneforge.recipe_adapter import adapter_problems, settle_adapter_defaults

        for key, problem in adapter_problems(self):  # adapter types the method, optimizer, packing cannot honour
            raise KeyedValueError(key, problem)
        settle_adapter_defaults(self)
        if (self.model.add_tokens or self.model.add_special_tokens) and self.uses_lora:
            wanted = [m for m in ("embed_tokens", "lm_head") if m not in self.adapter.modules_to_save]
            self.adapter.modules_to_save = [*self.adapter.modules_to_save, *wanted]  # seed 000: new rows train fully
        if self.eval.judge is not None and (spec.hooks.get("scores") != "generation" or not self.eval.baseline):
            raise KeyedValueError("eval.judge", f"judges base vs tuned answers, which method {self.method} does not "
                                  "produce" if self.eval.baseline else "needs the base model's answers: eval.baseline: true")
        regularizer = "train.kl_to_base" if self.train.kl_to_base else "train.ewc" if self.train.ewc else None
        if regularizer and spec.family != "supervised":
            raise KeyedValueError(regularizer, f"is a term in the supervised loss (sft, dft, cpt); method {self.method} "
                                  f"has its own KL control" + (" (rl.kl_coef / preference.beta)"
                                                              if spec.family in ("rl", "preference") else ""))
        if self.data.order != "shuffle" and self.train.packing:
            raise KeyedValueError("data.order", "a curriculum needs examples in order, and packing regroups them by "
                                  "length; set train.packing: false, or data.order: shuffle")
        if self.data.order != "shuffle" and spec.data not in ("conversations", "text"):
            raise KeyedValueError("data.order", f"is read for conversation and text methods, not method {self.method}")
        mixed = [k for k in ("train", "eval") if isinstance(getattr(self.data, k), list)]
        if mixed and (spec.data not in ("conversations", "text") or self.federated is not None):
            raise KeyedValueError(f"data.{mixed[0]}", f"a list of sources (mixing) is read for conversation and text "
                                  f"methods, not for method {self.method}" + (" with federated" if self.federated else "")
                                  + "; give one data file")
        if self.train.early_stopping is not None and not self.train.eval_every:
            raise KeyedValueError("train.early_stopping", "needs train.eval_every (how often the held-out loss is measured)")
        if self.model.adapter and self.model.adapter_mode == "continue" and not self.uses_lora:
            raise KeyedValueError("model.adapter_mode", f"continue trains the loaded LoRA adapter, so adapter.type must "
                                                        f"be lora or qlora (got {self.adapter.type}); use adapter_mode: "
                                                        f"merge to fine-tune the merged model fully")
        if self.model.adapter and self.model.adapter_mode == "merge" and self.adapter.type == "qlora":
            raise KeyedValueError("model.adapter_mode", "merge with adapter.type qlora would fold the adapter into the "
                                  "4-bit base, rounding its update away (seed 004: merge into an un-quantized base); "
                                  "fix: adapter_mode: continue, or `tuneforge merge` the adapter into a 16-bit copy "
                                  "first and set model.name to that folder")
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _check_stages(cls, data: Any, handler) -> Recipe:
        """Each stage is validated as the recipe it will run (this recipe's keys as written, the stage's on top), so
        a bad stage fails before the first stage trains; the keys as written are kept to build the stages from."""
        recipe = handler(data)
        if isinstance(data, dict) and data.get("stages"):
            base = {k: v for k, v in data.items() if k != "stages"}
            recipe._stage_base = base
            names = set()
            for i, stage in enumerate(data["stages"]):
                if not isinstance(stage, dict) or not isinstance(stage.get("name"), str) or not stage["name"]:
                    raise KeyedValueError(f"stages.{i}", "each stage is a mapping with a `name` (its run folder) and the "
                                                         "keys it changes, e.g. {name: dpo, method: dpo}")
                if stage["name"] in names:
                    raise KeyedValueError(f"stages.{i}.name", f"stage name {stage['name']!r} is used twice")
                names.add(stage["name"])
                if "stages" in stage or "output_dir" in stage:
                    raise KeyedValueError(f"stages.{i}", "a stage cannot set stages or output_dir")
                try:
                    cls.model_validate(merge_stage(base, stage))
                except ValidationError as exc:
                    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
                    raise KeyedValueError(f"stages.{i}", f"stage {stage['name']!r}: {problems}") from None
        return recipe

    def stage_recipes(self) -> list[Recipe]:
        """The recipes of a multi-stage run, in order (model.adapter of each later stage is set when it starts)."""
        base = self._stage_base or {k: v for k, v in self.model_dump(mode="json", by_alias=True).items() if k != "stages"}
        out = []
        for stage in self.stages or []:
            recipe = Recipe.model_validate(merge_stage(base, stage))
            recipe._source_dir, recipe._source_path = self._source_dir, self._source_path
            out.append(recipe)
        return out

    @property
    def uses_lora(self) -> bool:
        return self.adapter.type in ("lora", "qlora")

    @property
    def uses_peft(self) -> bool:
        """The run saves adapter/ (a PEFT adapter, or tuneforge's bottleneck), not model/."""
        from tuneforge.adapter_kinds import SAVED_AS_MODEL

        return self.adapter.type not in SAVED_AS_MODEL


def merge_stage(base: dict, stage: dict) -> dict:
    """A stage's recipe: the parent's keys as written, the stage's on top (sections merged key by key)."""
    import copy

    merged = copy.deepcopy(base)
    if isinstance(merged.get("model"), str):
        merged["model"] = {"name": merged["model"]}
    for key, value in stage.items():
        if key == "model" and isinstance(value, str):
            value = {"name": value}
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# ---------------------------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _model_for_path(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _short_repr(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(error: dict, lines: dict[tuple, int], source: str | None, set_paths: dict[tuple, str] | None = None) -> str:
    loc = tuple(p for p in error["loc"] if p not in ("function-after[_model_shorthand(), ModelSection]",))
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, KeyedValueError):
        loc = tuple(cause.key.split("."))
    key = ".".join(str(p) for p in loc) or "(top level)"
    where = f"`{key}`"
    for n in range(len(loc), 0, -1):
        if set_paths and loc[:n] in set_paths:
            where += f" (--set {set_paths[loc[:n]]})"
            break
        if loc[:n] in lines:
            where += f" ({source}:{lines[loc[:n]]})" if source else f" (line {lines[loc[:n]]})"
            break
    kind = error["type"]
    if isinstance(cause, KeyedValueError):
        return f"{where}: {cause}"
    if kind == "extra_forbidden":
        parent = _model_for_path(loc)
        known = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean `{'.'.join(str(p) for p in loc[:-1] + (close[0],))}`?" if close else f"known keys: {', '.join(known)}"
        return f"{where}: unknown key; {hint}"
    if kind == "missing":
        return f"{where}: required key is missing"
    got = error.get("input")
    got_text = "" if isinstance(got, (dict, BaseModel)) else f" (got {_short_repr(got)})"
    message = str(cause) if kind == "value_error" and cause is not None else error["msg"]
    return f"{where}: {message}{got_text}"


def parse_recipe(data: dict, *, source: str | None = None, text: str | None = None,
                 overrides: list[str] | None = None) -> Recipe:
    """Validate a recipe mapping; raise one RecipeError that lists every problem with its key and line (or the
    `--set` that put it there). A key written twice in `text` is a problem too."""
    if not isinstance(data, dict):
        raise RecipeError(["the recipe must be a YAML mapping of keys (name:, model:, data:, ...)"], source=source)
    duplicates: list[str] = []
    lines = _key_lines(text, duplicates, source) if text else {}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        set_paths = _override_paths(overrides or [])
        problems = [_describe(e, lines, source, set_paths) for e in exc.errors()]
        raise RecipeError(duplicates + problems, source=source) from None
    if duplicates:
        raise RecipeError(duplicates, source=source)
    return recipe


def _override_path(item: str) -> tuple[str, ...] | None:
    """`--set a.b=value` -> ("a", "b"); None when the syntax is wrong. `--set model=x` is `model.name`."""
    if "=" not in item:
        return None
    keys = tuple(key.strip() for key in item.split("=", 1)[0].split("."))
    if not all(keys):
        return None
    return ("model", "name") if keys == ("model",) else keys


def _override_paths(overrides: list[str]) -> dict[tuple, str]:
    return {path: item for item in overrides if (path := _override_path(item)) is not None}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set key.path=value` overrides; values are parsed as YAML (so 1e-4, true, [a, b] work)."""
    import yaml

    problems = []
    if isinstance(data.get("model"), str):
        data["model"] = {"name": data["model"]}
    for item in overrides:
        keys = _override_path(item)
        if keys is None:
            problems.append(f"--set {item!r}: expected key.path=value, e.g. --set train.lr=1e-4")
            continue
        raw = item.split("=", 1)[1]
        try:
            value = load_yaml_bounded(raw, f"--set {item!r}") if raw.strip() else None
        except RecipeError as exc:
            problems.extend(exc.problems)
            continue
        except yaml.YAMLError as exc:
            problems.append(f"--set {item!r}: the value is not valid YAML ({getattr(exc, 'problem', exc)}); quote it")
            continue
        node, bad = data, None
        for depth, key in enumerate(keys[:-1]):
            if isinstance(node, list):  # stages.1.train.max_steps: a number indexes a list
                if not key.isdigit() or int(key) >= len(node):
                    bad = f"--set {item!r}: {'.'.join(keys[:depth])} has {len(node)} entries; use an index below {len(node)}"
                    break
                node = node[int(key)]
                continue
            if not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]
        if bad or (isinstance(node, list) and not (keys[-1].isdigit() and int(keys[-1]) < len(node))):
            problems.append(bad or f"--set {item!r}: {keys[-1]} is not an index of that list")
            continue
        if isinstance(node, list):
            node[int(keys[-1])] = value
        else:
            node[keys[-1]] = value
    if problems:
        raise RecipeError(problems)
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Relative data paths are resolved against the recipe's folder."""
    path = Path(path)
    text, data = read_recipe_file(path)
    if overrides:
        if not isinstance(data, dict):
            raise RecipeError(["the recipe must be a YAML mapping of keys (name:, model:, data:, ...)"], source=str(path))
        data = apply_overrides(data, overrides)
    recipe = parse_recipe(data, source=str(path), text=text, overrides=overrides)
    recipe._source_dir = path.resolve().parent
    recipe._source_path = str(path)
    return recipe


# The shipped general replay set (scripts/make_replay.py), usable as a data source by this name.
GENERAL_REPLAY = "builtin:general-replay"


def resolve_path(recipe: Recipe, value: str | None) -> str | None:
    """A data path as written in the recipe: relative to the working directory if it exists there, else to the
    recipe's own folder (so `tuneforge train recipes/x.yaml` works from anywhere in the repo)."""
    if value is None:
        return None
    if value == GENERAL_REPLAY:
        return str(Path(__file__).resolve().parent / "assets" / "general" / "replay.jsonl")
    p = Path(value)
    if p.is_absolute() or p.exists():
        return str(p)
    base = recipe.source_dir
    if base is not None:
        for candidate in (base / p, base.parent / p):
            if candidate.exists():
                return str(candidate)
    return value


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default filled in), as saved in the run directory."""
    import yaml

    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False, allow_unicode=True)
