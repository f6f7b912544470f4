"""The recipe sections that methods and speed levers read (preference, rl and its rewards, distill, speed,
distributed), split from recipe.py, which puts them into the Recipe and re-exports them. Defaults and checks of
each key live here, once."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tuneforge.recipe_base import Section as _Section


class PreferenceSection(_Section):
    """Preference methods (dpo, kto, orpo, simpo, cpo); read by methods/preference.py."""

    beta: float = Field(0.1, gt=0, description="KL strength to the reference (seed 000 step 6: 0.01-0.5, try 0.1). "
                        "For ipo it is the regulariser tau; for orpo the odds-ratio weight lambda.")
    loss_type: str = Field(
        "sigmoid", description="dpo: sigmoid (DPO) | ipo | hinge | robust | exo_pair | nca_pair | bco_pair | sppo_hard | "
        "aot | aot_unpaired | apo_zero | apo_down | discopop | sigmoid_norm (TRL's list). cpo: sigmoid | hinge | ipo. "
        "simpo is always simpo; kto: kto | apo_zero_unpaired.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Probability a label is flipped (robust DPO, cDPO); "
                                   "0.1 is typical for noisy labels.")
    ref: Literal["auto", "peft", "copy", "precomputed"] = Field(
        "auto", description="Reference model: peft = the policy with its adapter as loaded (a fresh adapter disabled), "
        "no second model in memory | copy = a separate frozen copy | precomputed = reference log-probs computed once "
        "before training, then no reference in memory. auto = peft with LoRA, copy for full fine-tuning.")
    max_prompt_length: int | None = Field(None, gt=0, description="Prompt tokens kept (the end of long prompts); "
                                          "None = half of train.max_length (seed 000 step 6).")
    sft_weight: float = Field(0.0, ge=0, description="dpo: weight of an NLL (SFT) term on the chosen answers, added to "
                              "the preference loss (TRL loss_type [<loss_type>, sft]; RPO / MPO). DPO alone can push "
                              "both answers' likelihood down and only widen the gap, so greedy generations need not "
                              "change; 0.2-1.0 keeps the chosen answers likely. 0 = plain DPO.")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin.")
    cpo_alpha: float = Field(1.0, ge=0, description="cpo: weight of the NLL term on chosen answers (simpo sets 0).")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of desirable examples' losses.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable examples' losses.")
    eval_pairs: int | None = Field(200, gt=0, description="Held-out pairs scored for preference accuracy before and "
                                   "after training (None: all).")


class RewardSpec(_Section):
    """One reward function of `rl.rewards` (rewards.py lists the built-ins and their options)."""

    name: str = Field(..., description="exact_answer | regex | json_schema | length | code_tests | reward_model | custom.")
    weight: float = Field(1.0, description="Weight in the weighted sum of rewards (negative = a penalty).")
    options: dict = Field(default_factory=dict, description="The reward's options, e.g. {pattern: '^Answer: \\d+$'} for "
                          "regex, {path: rewards.py, function: score} for custom.")

    @model_validator(mode="after")
    def _known_reward(self) -> RewardSpec:
        from tuneforge.reward_specs import check_reward_spec

        check_reward_spec(self.name, self.options)  # names and options; files are read when the run starts
        return self


class RLSection(_Section):
    """Reward models and RL (reward, ppo, grpo, rloo, online_dpo, gkd); read by methods/reward.py, rl.py, ppo.py,
    gkd.py. Rollouts are sampled with plain transformers generate unless use_vllm is on."""

    rewards: list[RewardSpec] = Field(
        default_factory=list, description="grpo/rloo/online_dpo: reward functions, summed with their weights, e.g. "
        "[{name: exact_answer, weight: 1.0}, {name: regex, weight: 0.2, options: {pattern: 'Answer: -?\\d+$'}}].")
    reward_model: str | None = Field(
        None, description="A trained reward model (a `method: reward` run directory, or a sequence-classification model "
        "folder with one output). ppo: the reward (required); grpo/rloo/online_dpo may add it with {name: reward_model}.")
    num_generations: int = Field(8, ge=2, description="grpo/rloo: completions sampled per prompt (the group); the "
                                 "batch (train.batch_size x grad_accum) must be a multiple of it.")
    max_new_tokens: int = Field(128, gt=0, description="Tokens generated per completion during training.")
    max_prompt_length: int | None = Field(None, gt=0, description="Prompt tokens kept (the end of long prompts); "
                                          "None = train.max_length - max_new_tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts (1.0 = the policy's own "
                               "distribution, which the policy-gradient estimate assumes).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of rollouts (1.0 = off).")
    kl_coef: float | None = Field(None, ge=0, description="KL penalty to the frozen reference: ppo kl_coef, grpo/rloo "
                                  "beta, online_dpo beta. None = per method (ppo 0.05, grpo 0.04, rloo 0.05, "
                                  "online_dpo 0.1). Too small: reward hacking; too large: no progress (seed 003).")
    clip_range: float = Field(0.2, gt=0, description="PPO/GRPO/RLOO ratio clip epsilon (seed 000: typically 0.2).")
    value_clip: float = Field(0.2, gt=0, description="ppo: clip range of the value function (cliprange_value).")
    vf_coef: float = Field(0.1, ge=0, description="ppo: weight of the value loss (TRL's default).")
    gamma: float = Field(1.0, ge=0, le=1, description="ppo: discount (seed 000: 1.0 in RLHF).")
    lam: float = Field(0.95, ge=0, le=1, description="ppo: GAE lambda (seed 000: 0.95).")
    ppo_epochs: int = Field(4, ge=1, description="ppo: optimisation passes over each batch of rollouts (seed 000: 4).")
    num_mini_batches: int = Field(4, ge=1, description="ppo: mini-batches each rollout batch is split into (seed 000: "
                                  "4); batch_size x grad_accum must be a multiple of it.")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="ppo: KL estimator (k1 unbiased; k3 lower variance).")
    whiten_rewards: bool = Field(False, description="ppo: whiten rewards per batch (needs mini-batches of >= 8).")
    missing_eos_penalty: float | None = Field(None, ge=0, description="ppo/online_dpo: subtracted from the reward of a "
                                              "completion that never ends (hit max_new_tokens).")
    num_iterations: int = Field(1, ge=1, description="grpo/rloo: optimisation passes over each batch of rollouts.")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="grpo: divide advantages by the "
                                                               "reward std of the group | the batch | not at all.")
    loss_type: str | None = Field(None, description="grpo: grpo | dr_grpo | dapo | bnpo | ... (TRL's list); online_dpo: "
                                  "sigmoid | ipo. None = TRL's default.")
    teacher: str | None = Field(None, description="gkd: the teacher model (hub id, folder, embedded:..., or a tuneforge "
                                "run directory); it must share the student's tokenizer.")
    gkd_lambda: float = Field(0.5, ge=0, le=1, description="gkd: share of steps on student-generated completions "
                              "(on-policy); 0 = supervised KD on the data's answers.")
    gkd_beta: float = Field(0.5, ge=0, le=1, description="gkd: generalised JSD interpolation (0 = forward KL, 1 = "
                            "reverse KL).")
    use_vllm: bool = Field(False, description="Generate rollouts with vLLM (colocated); needs vllm installed and a GPU.")
    eval_prompts: int | None = Field(50, gt=0, description="Held-out prompts (pairs, for reward) scored before and after "
                                     "training (None: all).")


class DistillSection(_Section):
    teacher: str | None = Field(None, description="distill: the teacher (model name, folder, embedded:..., or a run "
                                "directory); it must share the student's tokenizer.")
    alpha: float = Field(0.5, ge=0, le=1, description="distill: weight of the KL to the teacher; 1 - alpha weights the "
                         "cross-entropy on the answers.")
    temperature: float = Field(2.0, gt=0, le=20, description="distill: softmax temperature of teacher and student in "
                               "the KL (the term is scaled by T^2).")
    top_k: int = Field(20, ge=1, le=1000, description="distill: teacher log-probs kept per answer position.")


class ClassifySection(_Section):
    """method: classify (methods/classify.py): a classification head on an encoder or a decoder."""

    labels: list[str] | None = Field(None, description="classify: the label set, in the order of the head's outputs "
                                     "(e.g. [negative, positive]); None = every label in the training data, sorted. A "
                                     "data label outside this list is an error naming its line.")
    text_field: str = Field("text", min_length=1, description="classify: the record field holding the text.")
    pair_field: str = Field("text_pair", min_length=1, description="classify: the record field holding the second text "
                            "of a pair (entailment, paraphrase); records without it are single texts.")
    label_field: str = Field("label", min_length=1, description="classify: the record field holding the label (a "
                             "string, or a number read as its text).")
    class_weights: bool = Field(False, description="classify: weight the cross-entropy by inverse class frequency in "
                                "the training data (imbalanced labels).")

    @model_validator(mode="after")
    def _labels_distinct(self) -> ClassifySection:
        if self.labels is not None and (len(self.labels) < 2 or len(set(self.labels)) != len(self.labels)):
            raise ValueError("classify.labels must name at least two distinct labels")
        return self


class RFTSection(_Section):
    """method: rft (methods/rft.py): rounds of sample -> score with rl.rewards -> keep -> SFT."""

    rounds: int = Field(3, ge=1, le=100, description="rft: rounds of sample -> score -> keep -> SFT; each round "
                        "samples from the model the previous round trained.")
    samples_per_prompt: int = Field(4, ge=1, le=64, description="rft: answers sampled per training prompt each round.")
    keep: Literal["best", "passing"] = Field("best", description="rft: best = the highest-reward passing answer of each "
                                             "prompt | passing = every distinct answer whose reward reaches threshold.")
    threshold: float = Field(1.0, description="rft: an answer passes when its total reward (rl.rewards, weighted sum) "
                             "is at least this (1.0 = a weight-1 exact_answer reward met).")
    temperature: float = Field(1.0, gt=0, description="rft: sampling temperature of the answers.")
    top_p: float = Field(1.0, gt=0, le=1, description="rft: nucleus sampling of the answers (1.0 = off).")
    prompts_per_round: int | None = Field(None, gt=0, description="rft: training prompts sampled each round (a seeded "
                                          "random subset); None = all.")


class SpeedSection(_Section):
    """Speed levers (src/tuneforge/speed/); auto = on where it is safe, decided when the run starts and saved."""

    padding_free: bool | Literal["auto"] = Field(
        "auto", description="sft/cpt micro-batches without padding: one row of real tokens, attention kept within each "
        "example. auto = on for sft/cpt without train.packing.")
    liger: bool | Literal["auto"] = Field(
        "auto", description="Liger fused Triton kernels (RMSNorm, SwiGLU, RoPE). auto = on with CUDA, liger-kernel "
        "installed (pip install liger-kernel) and a supported model (Llama, Qwen, Mistral, Gemma, Phi3, ...).")
    fused_optimizer: bool | Literal["auto"] = Field(
        "auto", description="Fused AdamW kernel (adamw_torch -> adamw_torch_fused). auto = on with CUDA.")
    attention: Literal["auto", "varlen", "sdpa", "flash_attention_2", "flex_attention", "eager"] = Field(
        "auto", description="Attention kernel: auto = flash_attention_2 where flash-attn is installed on CUDA; else, for "
        "padding-free batches on CUDA, varlen (PyTorch's varlen flash kernel, no mask built; speed/varlen.py); else sdpa.")
    fold_accumulation: bool | Literal["auto"] = Field(
        "auto", description="Merge the grad_accum micro-batches of a step into one (same examples per step, same loss) "
        "when the memory plan fits it. auto = on a GPU when it fits; the saved recipe shows the batch_size/grad_accum run.")
    fused_lora: bool | Literal["auto"] = Field(
        "auto", description="LoRA layers add their scaled update inside one matmul (addmm) instead of two "
        "elementwise passes, without PEFT's fp32 copy of the input under autocast (speed/fused_lora.py; same sum). "
        "auto = on for LoRA; true also fuses QLoRA's 4-bit layers (under autocast; not yet measured on a GPU).")
    fewer_syncs: bool | Literal["auto"] = Field(
        False, description="sft/cpt on one process: TRL's per-micro-batch metrics (entropy, token accuracy, token "
        "counts) and the Trainer's NaN/inf loss filter computed on the GPU and read once per log, so the host does "
        "not wait for the GPU inside a step (speed/syncs.py; same losses and logged values). Off until measured on "
        "a GPU (bench/levers_gpu.sh); auto = on with CUDA where it applies.")
    compile: bool = Field(False, description="torch.compile the model (slow start; pays on long runs with static shapes).")
    layout: Literal["memory", "speed"] = Field(
        "memory", description="What train.gradient_checkpointing: auto and fold_accumulation: auto optimise on a GPU. "
        "memory = checkpoint every layer (checkpoints offloaded to CPU), accumulation micro-batches merged into one "
        "where the memory plan fits the merged worst case. speed = the memory plan picks the fastest layout that "
        "fits speed.memory_fraction (merged micro-batches, fewer recomputed layers).")
    offload_checkpoints: bool | Literal["auto"] = Field(
        "auto", description="With gradient checkpointing on a GPU: keep each layer's saved input in pinned CPU memory "
        "until the backward pass (copied on a side stream; speed/offload.py). auto = on with speed.layout memory.")
    memory_fraction: float = Field(
        0.85, gt=0.1, le=1.0, description="Share of GPU memory the memory plan may fill when train.gradient_checkpointing "
        "is auto (lower it to leave room for other processes).")
    checkpoint_every: int = Field(1, ge=1, description="With gradient checkpointing: checkpoint every n-th decoder layer "
                                  "(set by gradient_checkpointing: auto; 1 = every layer).")
    recompute_lora_dropout: bool = Field(
        False, description="With speed.fused_lora: LoRA's input dropout and A matmul as one function that keeps the "
        "input and the random-number state, and draws the same mask again in the backward, instead of keeping a "
        "dropped-out copy of the input and its mask per adapted projection (speed/lora_dropout.py; less activation "
        "memory without checkpointing, at a cost in speed: on an H100, Qwen2 1.5B LoRA, 0.76x the memory at 0.72x the "
        "step rate).")
    keep_lora_dropout_mask: bool = Field(
        False, description="With speed.fused_lora: LoRA's input dropout and A matmul as one function that keeps the "
        "input (kept by the base layer anyway) and dropout's mask as bits, not the dropped-out 16-bit copy and a byte "
        "mask, per adapted projection (speed/lora_dropout.py; the same masks as PEFT's dropout, a few small kernels "
        "more). Less activation memory without checkpointing.")
    max_micro_batch_tokens: int | None = Field(
        None, ge=1, description="sft/cpt with padding-free batches, one process: a micro-batch with more real tokens "
        "than this is trained as several (whole examples, same loss and gradient; speed/split.py), and the memory plan "
        "sizes this many tokens instead of the data's longest possible micro-batch. None = off.")


class DistributedSection(_Section):
    """Several GPUs (`tuneforge train --gpus N`); distributed.py maps this onto TrainingArguments."""

    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = Field(
        "auto", description="auto = DDP when the model fits one GPU (memory.py), FSDP full-shard when it does not."
    )
    sharding: Literal["auto", "full", "grad_op", "hybrid"] = Field(
        "auto", description="fsdp/deepspeed: full (FSDP full-shard / ZeRO-3), grad_op (shard grads + optimizer / "
        "ZeRO-2), hybrid (FSDP: shard within a node, replicate across nodes); auto = full."
    )
    cpu_offload: bool = Field(False, description="fsdp/deepspeed: keep parameters and optimizer state in CPU memory.")
    activation_checkpointing: bool | None = Field(
        None, description="Recompute activations in backward (FSDP's own under fsdp); None = train.gradient_checkpointing."
    )
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = Field(
        "auto", description="Compute dtype under several processes; auto = train.precision."
    )
