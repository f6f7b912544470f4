"""Speed levers (src/tuneforge/speed/): each gives the same per-step losses and gradient norms as the plain path on a
tiny model on CPU, and `auto` resolves as documented. (Liger's Triton kernels need CUDA: bench/speed.py records
their check on the GPU.)"""

from __future__ import annotations

import pytest
from rich.console import Console

from conftest import read_metrics, tiny_recipe
from tuneforge.recipe import parse_recipe
from tuneforge.train import train


def run_steps(tmp_path, tiny_model_dir, small_sft_file, name, *, speed=None, adapter=None, train_section=None):
    recipe = parse_recipe(tiny_recipe(
        tiny_model_dir, small_sft_file,
        # dropout 0 keeps LoRA runs deterministic; full fine-tuning has no dropout key (the schema refuses it)
        adapter={"type": "full", **({"dropout": 0.0} if (adapter or {}).get("type") in ("lora", "qlora") else {}),
                 **(adapter or {})},
        train={"max_steps": 4, "lr": 1e-3, "scheduler": "constant", "batch_size": 4, "grad_accum": 2,
               **(train_section or {})},
        eval={"baseline": False, "forgetting": False, "max_examples": 1, "few_shot": 0},
        speed=speed or {}, name=name))
    run = train(recipe, output=str(tmp_path / name), console=Console(quiet=True), doctor=False)
    rows = [row for row in read_metrics(run.path) if "loss" in row and "eval_loss" not in row]
    return run, rows


def assert_same_steps(a, b, tol=1e-5):
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=tol, abs=tol)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4, abs=1e-6)


def test_padding_free_matches_padded_batches(tmp_path, tiny_model_dir, small_sft_file):
    padded_run, padded = run_steps(tmp_path, tiny_model_dir, small_sft_file, "padded", speed={"padding_free": False})
    free_run, free = run_steps(tmp_path, tiny_model_dir, small_sft_file, "free", speed={"padding_free": "auto"})
    import yaml

    assert yaml.safe_load((free_run.path / "recipe.yaml").read_text())["speed"]["padding_free"] is True  # auto -> on
    assert_same_steps(padded, free)
    # Real tokens are counted the same way (the benchmark's tokens/s relies on it): no padding in either count.
    assert [r["tokens_seen"] for r in padded] == [r["tokens_seen"] for r in free]
    assert padded_run.read_json("summary.json")["eval_loss"]["tuned"] == pytest.approx(
        free_run.read_json("summary.json")["eval_loss"]["tuned"], rel=1e-5)


def test_padding_free_lora_with_gradient_accumulation(tmp_path, tiny_model_dir, small_sft_file):
    _, padded = run_steps(tmp_path, tiny_model_dir, small_sft_file, "lora-padded", adapter={"type": "lora"},
                          speed={"padding_free": False})
    _, free = run_steps(tmp_path, tiny_model_dir, small_sft_file, "lora-free", adapter={"type": "lora"},
                        speed={"padding_free": True})
    assert_same_steps(padded, free)


def test_fused_adamw_matches_adamw(tmp_path, tiny_model_dir, small_sft_file):
    _, plain = run_steps(tmp_path, tiny_model_dir, small_sft_file, "adamw", speed={"fused_optimizer": False})
    fused_run, fused = run_steps(tmp_path, tiny_model_dir, small_sft_file, "fused", speed={"fused_optimizer": True})
    assert_same_steps(plain, fused, tol=1e-5)


def test_selective_checkpointing_matches_no_checkpointing(tmp_path, tiny_model_dir, small_sft_file):
    _, plain = run_steps(tmp_path, tiny_model_dir, small_sft_file, "no-gc", train_section={"gradient_checkpointing": False})
    _, every = run_steps(tmp_path, tiny_model_dir, small_sft_file, "gc-all", train_section={"gradient_checkpointing": True})
    _, second = run_steps(tmp_path, tiny_model_dir, small_sft_file, "gc-2nd",
                          train_section={"gradient_checkpointing": True}, speed={"checkpoint_every": 2})
    assert_same_steps(plain, every)
    assert_same_steps(plain, second)


def test_varlen_attention_matches_sdpa(tmp_path, tiny_model_dir, small_sft_file):
    """speed.attention varlen (example boundaries from the position ids, no mask) gives the sdpa path's steps; on CPU
    it runs per-example causal sdpa, on CUDA torch's varlen kernel (bench/speed.py records that check)."""
    _, plain = run_steps(tmp_path, tiny_model_dir, small_sft_file, "sdpa", speed={"padding_free": True, "attention": "sdpa"})
    run, varlen = run_steps(tmp_path, tiny_model_dir, small_sft_file, "varlen",
                            speed={"padding_free": True, "attention": "varlen"})
    assert_same_steps(plain, varlen)
    # the saved model names no tuneforge-only attention: it loads anywhere
    import json

    saved = json.loads((run.path / "model" / "config.json").read_text())
    assert saved.get("_attn_implementation", "sdpa") != "varlen" and saved.get("attn_implementation") != "varlen"


def test_varlen_boundaries_and_padded_fallback(tiny_model_dir):
    """Boundaries come from the position ids; a padded batch (attention mask given) takes plain sdpa."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.speed import varlen

    cu, longest = varlen.boundaries(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert cu.tolist() == [0, 3, 5, 9] and longest == 4
    assert varlen.boundaries(torch.tensor([[0, 1, 2, 3]])) is None
    varlen.register()
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="sdpa").eval()
    fast = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="varlen").eval()
    ids = torch.randint(5, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        assert torch.allclose(sdpa(ids, attention_mask=mask).logits[mask.bool()],
                              fast(ids, attention_mask=mask).logits[mask.bool()], atol=1e-5)
        packed = torch.cat([ids[0, :4], ids[1, :5]]).unsqueeze(0)
        positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
        one = sdpa(ids[1:, :5]).logits[0]
        assert torch.allclose(fast(packed, position_ids=positions).logits[0, 4:], one, atol=1e-5)
        # boundaries sent by the collator (as TRL's padding-free collator does) give the same result
        sent = fast(packed, position_ids=positions, cu_seq_lens_q=torch.tensor([0, 4, 9]), max_length_q=5,
                    cu_seq_lens_k=torch.tensor([0, 4, 9]), max_length_k=5).logits[0, 4:]
        assert torch.allclose(sent, one, atol=1e-5)


def test_offloaded_checkpoints_give_the_same_step(tiny_model_dir):
    """speed.offload_checkpoints: each checkpointed layer's input goes out through the saved-tensor hooks and comes
    back for the recomputation; losses and gradients equal plain checkpointing. (On CPU the tensors are already in
    host memory: include_cpu runs the same bookkeeping with a copy; the side-stream copy is CUDA-only and recorded
    by bench/speed.py.)"""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.speed import offload

    def run(offloaded: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        model.train()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if offloaded:
            assert offload.install(model, include_cpu=True) == 2
            assert offload.install(model, include_cpu=True) == 2  # idempotent: wrapped once
        ids = torch.randint(5, 100, (2, 16))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    packed = []
    original = offload._pack

    def counting(tensor, include_cpu=False):
        out = original(tensor, include_cpu=include_cpu)
        packed.append(isinstance(out, offload._Offloaded))
        return out

    plain_loss, plain_grads = run(False)
    offload._pack = counting
    try:
        loss, grads = run(True)
    finally:
        offload._pack = original
    assert loss == plain_loss and grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(grad, plain_grads[name], atol=1e-6), name
    assert packed.count(True) == 2  # the input of each of the 2 checkpointed layers, nothing else


def _lora_step(model, ids, autocast=False):
    """One forward/backward of a LoRA model on `ids` (labels = ids): (logits in fp32, {parameter: gradient})."""
    import torch

    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    return out.logits.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_lora_matches_peft_forward(tiny_model_dir):
    """speed.fused_lora: the scaled LoRA update added inside one addmm gives PEFT's values and gradients (fp32: to
    rounding; bf16 autocast: to bf16 rounding), and falls back to PEFT's forward with the adapter disabled."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.speed import fused_lora

    def lora_model(dtype=torch.float32):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=dtype)
        config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
        return get_peft_model(base, config)

    ids = torch.randint(5, 100, (2, 12))

    def step(model, autocast=False):
        return _lora_step(model, ids, autocast)

    def compare(reference, other):
        """Mean relative difference (by norm) over the logits and every adapter gradient."""
        (ref_logits, ref_grads), (logits, grads) = reference, other
        assert ref_grads.keys() == grads.keys() and len(grads) == 28
        errors = [((ref_logits - logits).norm() / ref_logits.norm()).item()]
        errors += [((grad - grads[name]).norm() / grad.norm()).item() for name, grad in ref_grads.items()]
        return sum(errors) / len(errors)

    # fp32: the same values to rounding
    plain, fused = lora_model(), lora_model()
    assert fused_lora.install(fused) == 14 and fused_lora.install(fused) == 14  # idempotent
    assert compare(step(plain), step(fused)) < 1e-5
    # bf16 autocast: each path rounds differently; the fused one stays as close to the fp32 result as PEFT's (within
    # rounding noise: a lost scaling or a dropped term would be off by tens of percent)
    reference = step(lora_model(torch.bfloat16).float())
    plain, fused = lora_model(torch.bfloat16), lora_model(torch.bfloat16)
    fused_lora.install(fused)
    plain_error, fused_error = compare(reference, step(plain, True)), compare(reference, step(fused, True))
    assert 0 < fused_error <= 1.5 * plain_error and fused_error < 0.1, (plain_error, fused_error)
    # ... and without PEFT's copy of each input to the adapter's fp32 (autocast casts it back for the matmul)
    from torch.profiler import profile

    def copies(model):
        with profile() as prof:
            step(model, True)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")

    assert next(p for n, p in fused.named_parameters() if "lora_A" in n).dtype == torch.float32  # PEFT's fp32 adapters
    assert copies(fused) < copies(plain)
    with fused.disable_adapter(), torch.no_grad():  # adapter off: PEFT's forward, the base model's logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
        assert torch.equal(fused(input_ids=ids).logits, base(input_ids=ids).logits)


def test_fused_lora_on_4bit_layers_matches_peft_forward(tmp_path):
    """speed.fused_lora on QLoRA's 4-bit LoRA layers (bitsandbytes' CPU path, bf16 autocast as on a GPU): PEFT's
    logits and adapter gradients to bf16 rounding, the fast path taken (no clone of the base output), and PEFT's
    forward without autocast (where the 4-bit base output's dtype is not known before it is computed)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    from tuneforge.speed import fused_lora

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)

    def qlora_model():
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map={"": "cpu"})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        torch.manual_seed(1)
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                                init_lora_weights=False))

    ids = torch.randint(5, 300, (2, 10))

    def step(model, autocast=True):
        return _lora_step(model, ids, autocast)

    plain, fused = qlora_model(), qlora_model()
    assert fused_lora.install(fused) == 14
    (ref_logits, ref_grads), (logits, grads) = step(plain), step(fused)
    assert ref_grads.keys() == grads.keys() and len(grads) == 28
    assert ((ref_logits - logits).norm() / ref_logits.norm()) < 2e-2
    for name, grad in ref_grads.items():
        assert ((grad - grads[name]).norm() / grad.norm()) < 5e-2, name
    from torch.profiler import profile

    def clones(model, autocast=True):
        with profile() as prof:
            step(model, autocast)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::clone")

    assert clones(fused) + 14 <= clones(plain)  # PEFT clones each 4-bit layer's output; the fused path does not
    assert clones(fused, autocast=False) == clones(plain, autocast=False)  # no autocast: PEFT's forward


def _recipe(**sections):
    return parse_recipe({"name": "t", "data": {"train": "x.jsonl"}, **sections})


def test_auto_levers_resolve_per_device():
    from tuneforge.guide.plan import reference_config
    from tuneforge.speed import resolve, training_arguments

    cpu = _recipe()
    reasons = resolve(cpu, "cpu")
    assert cpu.speed.padding_free is True and cpu.speed.liger is False and cpu.speed.fused_optimizer is False
    assert cpu.train.gradient_checkpointing is False and "CPU" in reasons["layout"]
    assert cpu.speed.attention == "sdpa"
    assert training_arguments(cpu, "cpu") == {}

    dpo = _recipe(method="dpo", data={"train": "x.jsonl", "format": "preference"})
    resolve(dpo, "cpu")
    assert dpo.speed.padding_free is False  # only sft/cpt batches are flattened

    config = reference_config("llama-8b")
    # 8B LoRA, 4 x 2048 tokens: 89 GiB planned without checkpointing, so padded batches of the worst case need it;
    # padding-free batches of real instruction data (a few hundred tokens each) fit an 80 GB GPU without it.
    padded = _recipe(train={"batch_size": 4, "max_length": 2048}, speed={"padding_free": False, "layout": "speed"})
    resolve(padded, "cuda", config, gpu_memory_gib=80.0, lengths=[2048] * 4 + [300] * 100)
    assert padded.train.gradient_checkpointing is True
    roomy = _recipe(train={"batch_size": 4, "max_length": 2048}, speed={"layout": "speed"})
    reasons = resolve(roomy, "cuda", config, gpu_memory_gib=80.0, lengths=[2048] + [300] * 100)
    assert roomy.train.gradient_checkpointing is False and roomy.speed.fused_optimizer is True
    assert roomy.speed.fold_accumulation is False  # 16 of these examples in one micro-batch would not fit
    assert "1 x 2948 tokens" in reasons["layout"]  # the four longest examples, end to end
    assert training_arguments(roomy, "cuda")["optim"] == "adamw_torch_fused"

    tight = _recipe(train={"batch_size": 4, "max_length": 2048}, speed={"layout": "speed"})
    reasons = resolve(tight, "cuda", config, gpu_memory_gib=24.0)
    assert tight.train.gradient_checkpointing is True and tight.speed.checkpoint_every == 1
    assert tight.train.batch_size == 4 and tight.train.grad_accum == 4  # nothing merged when memory is tight
    assert "budget" in reasons["layout"]

    # between the two: checkpoint every second layer, passed to transformers as every_n_layers
    from tuneforge.guide.plan import plan_memory

    on = plan_memory(config, adapter="lora", batch_size=4, seq_len=2048, gradient_checkpointing=True)["reserved_gib"]
    off = plan_memory(config, adapter="lora", batch_size=4, seq_len=2048, gradient_checkpointing=False)["reserved_gib"]
    middle = _recipe(train={"batch_size": 4, "max_length": 2048}, speed={"memory_fraction": 1.0, "fold_accumulation": False,
                                                                       "layout": "speed"})
    resolve(middle, "cuda", config, gpu_memory_gib=(on + (off - on) / 2 + off) / 2)
    assert middle.train.gradient_checkpointing is True and middle.speed.checkpoint_every == 2
    assert training_arguments(middle, "cuda")["activation_checkpointing_kwargs"]["every_n_layers"] == 2

    # the default layout, memory: every layer checkpointed (inputs offloaded to CPU), micro-batches merged when the
    # merged worst case fits the budget by the plan
    lean = _recipe(train={"batch_size": 8, "grad_accum": 2, "max_length": 2048})
    reasons = resolve(lean, "cuda", config, gpu_memory_gib=80.0, lengths=[400] * 500)
    assert lean.train.gradient_checkpointing is True and lean.speed.checkpoint_every == 1
    assert (lean.train.batch_size, lean.train.grad_accum) == (16, 1) and lean.speed.fold_accumulation is True
    assert lean.speed.offload_checkpoints is True
    assert "layout memory" in reasons["layout"] and "merged" in reasons["layout"]
    long_rows = _recipe(train={"batch_size": 8, "grad_accum": 4, "max_length": 2048})
    reasons = resolve(long_rows, "cuda", config, gpu_memory_gib=24.0, lengths=[2048] * 500)
    assert (long_rows.train.batch_size, long_rows.train.grad_accum) == (8, 4)  # 32 x 2048 merged would not fit
    assert long_rows.train.gradient_checkpointing is True and "as written" in reasons["layout"]
    unmerged = _recipe(train={"batch_size": 8, "grad_accum": 2}, speed={"fold_accumulation": False,
                                                                         "offload_checkpoints": False})
    resolve(unmerged, "cuda", config, gpu_memory_gib=80.0, lengths=[400] * 500)
    assert (unmerged.train.batch_size, unmerged.train.grad_accum) == (8, 2)
    assert unmerged.speed.offload_checkpoints is False
    assert cpu.speed.offload_checkpoints is False  # CPU: no checkpointing, nothing to offload

    explicit = _recipe(train={"gradient_checkpointing": True}, speed={"liger": False, "padding_free": False})
    resolve(explicit, "cuda", config, gpu_memory_gib=80.0)
    assert explicit.train.gradient_checkpointing is True and explicit.speed.liger is False  # what the user set stays
    assert explicit.speed.padding_free is False


def test_small_model_merges_accumulation_into_one_micro_batch():
    from tuneforge.guide.plan import reference_config
    from tuneforge.speed import resolve

    recipe = _recipe(train={"batch_size": 8, "grad_accum": 2, "max_length": 2048}, speed={"layout": "speed"})
    reasons = resolve(recipe, "cuda", reference_config("llama-1b"), gpu_memory_gib=80.0, lengths=[400] * 500)
    assert (recipe.train.batch_size, recipe.train.grad_accum) == (16, 1)  # same 16 examples per optimizer step
    assert recipe.speed.fold_accumulation is True and recipe.train.gradient_checkpointing is False
    assert "micro-batch 16 x 1" in reasons["layout"]
    kept = _recipe(train={"batch_size": 8, "grad_accum": 2}, speed={"fold_accumulation": False, "layout": "speed"})
    resolve(kept, "cuda", reference_config("llama-1b"), gpu_memory_gib=80.0, lengths=[400] * 500)
    assert (kept.train.batch_size, kept.train.grad_accum) == (8, 2)
    cpu = _recipe(train={"batch_size": 8, "grad_accum": 2})
    resolve(cpu, "cpu")
    assert (cpu.train.batch_size, cpu.train.grad_accum) == (8, 2) and cpu.speed.fold_accumulation is False
    asked = _recipe(train={"batch_size": 8, "grad_accum": 4}, speed={"fold_accumulation": True})  # explicit: merged
    resolve(asked, "cuda", reference_config("llama-1b"), gpu_memory_gib=80.0, lengths=[400] * 500)
    assert (asked.train.batch_size, asked.train.grad_accum) == (32, 1) and asked.train.gradient_checkpointing is True
    resolve(asked, "cuda", reference_config("llama-1b"), gpu_memory_gib=80.0)  # a resumed run's saved recipe: no change
    assert (asked.train.batch_size, asked.train.grad_accum) == (32, 1)


def test_merged_micro_batch_gives_the_accumulated_losses(tmp_path, tiny_model_dir, small_sft_file):
    """What fold_accumulation does (batch 4 x accumulation 2 -> batch 8 x 1) trains the same: per-step losses and
    gradient norms match."""
    _, accumulated = run_steps(tmp_path, tiny_model_dir, small_sft_file, "accum", speed={"fold_accumulation": False})
    _, merged = run_steps(tmp_path, tiny_model_dir, small_sft_file, "merged", speed={"fold_accumulation": False},
                          train_section={"batch_size": 8, "grad_accum": 1})
    assert_same_steps(accumulated, merged)


def test_flop_count_taken_once_is_the_same_count(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, Trainer

    from tuneforge.speed import reduce_trainer_overhead

    class FakeTrainer:  # only what floating_point_ops reads
        def __init__(self, model):
            self.model = model

        floating_point_ops = Trainer.floating_point_ops

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = FakeTrainer(model)
    inputs = {"input_ids": torch.ones(3, 17, dtype=torch.long)}
    before = trainer.floating_point_ops(inputs)
    reduce_trainer_overhead(trainer)
    assert trainer.floating_point_ops(inputs) == before > 0


def test_split_spans_keep_whole_examples():
    from tuneforge.speed.split import spans

    positions = [0, 1, 2, 0, 1, 0, 1, 2, 3, 0]  # examples of 3, 2, 4 and 1 tokens
    assert spans(positions, 5) == [(0, 5), (5, 10)]
    assert spans(positions, 4) == [(0, 3), (3, 5), (5, 9), (9, 10)]
    assert spans(positions, 100) == [(0, 10)]
    assert spans(list(range(8)), 3) == [(0, 8)]  # one example longer than the cap stays whole


def test_split_micro_batches_give_the_unsplit_step(tmp_path, tiny_model_dir, small_sft_file, monkeypatch):
    """speed.max_micro_batch_tokens: micro-batches longer than the cap trained as parts inside the step give the same
    per-step losses and gradient norms (full fine-tuning and LoRA), and the split really happened."""
    from tuneforge.speed import split

    counted: list[int] = []
    split_inputs = split.split_inputs

    def counting(inputs, cap):
        parts = split_inputs(inputs, cap)
        counted.append(len(parts) if parts else 1)
        return parts

    monkeypatch.setattr(split, "split_inputs", counting)
    for adapter in ({"type": "full"}, {"type": "lora"}):
        tag = adapter["type"]
        _, whole = run_steps(tmp_path, tiny_model_dir, small_sft_file, f"whole-{tag}", adapter=adapter,
                             speed={"padding_free": True, "attention": "sdpa"})
        counted.clear()
        _, parts = run_steps(tmp_path, tiny_model_dir, small_sft_file, f"split-{tag}", adapter=adapter,
                             speed={"padding_free": True, "attention": "sdpa", "max_micro_batch_tokens": 24})
        assert max(counted) >= 2
        assert_same_steps(whole, parts)


def test_split_cap_bounds_the_planned_micro_batch_and_refuses_what_it_cannot_honour():
    from tuneforge.errors import RecipeError
    from tuneforge.guide.plan import reference_config
    from tuneforge.speed import largest_micro_batch, resolve

    lengths = [2000] * 20 + [300] * 980
    capped = _recipe(train={"batch_size": 16, "max_length": 2048},
                     speed={"padding_free": True, "max_micro_batch_tokens": 8192})
    assert largest_micro_batch(capped, lengths) == (1, 8192)
    plain = _recipe(train={"batch_size": 16, "max_length": 2048}, speed={"padding_free": True})
    assert largest_micro_batch(plain, lengths) == (1, 32000)
    # with the cap the speed layout recomputes fewer layers of an 8B model on an 80 GB GPU than without it
    fast = _recipe(train={"batch_size": 16, "max_length": 2048},
                   speed={"layout": "speed", "max_micro_batch_tokens": 8192})
    resolve(fast, "cuda", reference_config("llama-8b"), gpu_memory_gib=80.0, lengths=lengths)
    slow = _recipe(train={"batch_size": 16, "max_length": 2048}, speed={"layout": "speed"})
    resolve(slow, "cuda", reference_config("llama-8b"), gpu_memory_gib=80.0, lengths=lengths)
    assert (fast.train.gradient_checkpointing, fast.speed.checkpoint_every) != (
        slow.train.gradient_checkpointing, slow.speed.checkpoint_every)
    for speed, words in (({"padding_free": False, "max_micro_batch_tokens": 512}, "padding-free"),):
        with pytest.raises(RecipeError, match=words):
            resolve(_recipe(speed=speed), "cpu")
    with pytest.raises(RecipeError, match="kl_to_base"):
        resolve(_recipe(train={"kl_to_base": 0.1}, speed={"max_micro_batch_tokens": 512}), "cpu")


def test_recomputed_lora_dropout_is_the_dropout_it_replaces():
    """speed/lora_dropout.py: lora_A(dropout(x)) keeping only x and the generator state gives the values and
    gradients of the same mask applied the usual way, and leaves the generator where plain dropout leaves it."""
    import torch
    import torch.nn.functional as F

    from tuneforge.speed.lora_dropout import dropout_lora_a

    x0, w0, probe = torch.randn(3, 7, 16), torch.randn(4, 16), torch.randn(3, 7, 4)

    def run(fused: bool):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        torch.manual_seed(11)
        if fused:
            h = dropout_lora_a(x, w, 0.3)
        else:
            h = F.linear(x * torch.empty_like(x).bernoulli_(0.7) / 0.7, w)
        (h * probe).sum().backward()
        return h.detach(), x.grad, w.grad, torch.rand(1)  # the generator's next draw

    for ref, got in zip(run(False), run(True)):
        assert torch.allclose(ref, got, rtol=1e-6, atol=1e-6)


def test_masked_lora_dropout_is_the_dropout_it_replaces():
    """speed/lora_dropout.py masked_lora_a: lora_A(dropout(x)) keeping x and the mask packed to bits gives
    F.dropout's values and gradients (the same draw from the same seed), in fp32 and under bf16 autocast, and keeps
    no 16-bit copy."""
    import torch
    import torch.nn.functional as F

    from tuneforge.speed.lora_dropout import masked_lora_a

    from tuneforge.speed.lora_dropout import pack_mask, unpack_mask

    mask = torch.rand(3, 5, 24) > 0.4
    assert pack_mask(mask).dtype == torch.uint8 and pack_mask(mask).numel() == mask.numel() // 8
    assert torch.equal(unpack_mask(pack_mask(mask), mask.shape), mask) and pack_mask(mask[..., :7]) is None
    x0, w0, probe = torch.randn(3, 7, 16), torch.randn(4, 16), torch.randn(3, 7, 4)
    for dtype in (torch.float32, torch.bfloat16):
        def run(fused: bool):
            x, w = x0.to(dtype).clone().requires_grad_(), w0.clone().requires_grad_()
            torch.manual_seed(11)
            kept = []
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16), \
                    torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
                h = masked_lora_a(x, w, 0.3) if fused else F.linear(F.dropout(x, 0.3, True), w)
            (h.float() * probe).sum().backward()
            return (h.detach().float(), x.grad.float(), w.grad, torch.rand(1)), kept

        ref, _ = run(False)
        got, kept = run(True)
        tol = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: the scale is applied in another order
        for a, b in zip(ref, got):
            assert torch.allclose(a, b, rtol=tol, atol=tol)
        # kept: x itself, the weight and the mask as bits -- nothing else the size of x
        assert [str(t.dtype) for t in kept if t.shape == x0.shape] == [str(dtype)]
        assert [t.numel() for t in kept if t.dtype == torch.uint8] == [x0.numel() // 8]


@pytest.mark.parametrize("saves", ["recompute", "mask"])
def test_lora_dropout_saves_trains_as_peft_and_keeps_less(tiny_model_dir, saves):
    """speed.recompute_lora_dropout / speed.keep_lora_dropout_mask inside the fused LoRA forward: with dropout 0.1 a
    step gives PEFT's logits and adapter gradients (CPU: the same masks), and autograd keeps fewer bytes for the
    backward."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.speed import fused_lora

    def lora_model(dropout_saves=False):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(base, config)
        if dropout_saves is not False:
            fused_lora.install(model, dropout_saves=dropout_saves)
        return model.train()

    ids = torch.randint(5, 100, (2, 12))

    def step(model):
        """-> logits, adapter gradients, bytes of the decoder layers' activations autograd keeps (distinct storages;
        no weights, nothing vocabulary-wide: the logits would hide the layers in a tiny model)"""
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        vocab = model.config.vocab_size
        kept = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights and (tensor.dim() == 0 or tensor.shape[-1] != vocab):
                kept[storage.data_ptr()] = storage.nbytes()
            return tensor

        model.zero_grad()
        torch.manual_seed(5)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads, sum(kept.values())

    plain_logits, plain_grads, _ = step(lora_model())
    _, _, kept_fused = step(lora_model(dropout_saves=None))
    logits, grads, kept_lean = step(lora_model(dropout_saves=saves))
    assert torch.allclose(plain_logits, logits, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == grads.keys() and len(grads) == 28
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, grads[name], rtol=1e-4, atol=1e-6), name
    # fp32 here: recomputing keeps neither the dropped-out copy nor the mask; the mask in bits is 1/8 byte of 5
    assert kept_lean < (0.75 if saves == "recompute" else 0.8) * kept_fused, (kept_lean, kept_fused)


def test_recompute_lora_dropout_needs_the_fused_forward():
    from tuneforge.errors import RecipeError
    from tuneforge.speed import resolve

    with pytest.raises(RecipeError, match="fused LoRA forward"):
        resolve(_recipe(adapter={"type": "lora"}, speed={"fused_lora": False, "recompute_lora_dropout": True}), "cpu")
    ok = _recipe(adapter={"type": "lora"}, speed={"recompute_lora_dropout": True})
    resolve(ok, "cpu")
    assert ok.speed.fused_lora is True
    with pytest.raises(RecipeError, match="fused LoRA forward"):
        resolve(_recipe(adapter={"type": "lora"}, speed={"fused_lora": False, "keep_lora_dropout_mask": True}), "cpu")
    with pytest.raises(RecipeError, match="choose one"):
        resolve(_recipe(adapter={"type": "lora"}, speed={"recompute_lora_dropout": True,
                                                         "keep_lora_dropout_mask": True}), "cpu")


def _bench_module(name: str):
    """bench/<name>.py loaded as a module (bench/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_sweep_candidates_can_be_narrowed_for_tuneforge_only():
    """bench/speed.py --tuneforge-candidates narrows tuneforge's sweep (a call's 10 minutes do not hold every candidate
    on big cases); the peers' sweeps are never narrowed, and an unknown name is refused."""
    import subprocess
    import sys

    bench = _bench_module("speed")
    every = [c["tag"] for c in bench.candidates("tuneforge", "lora")]
    assert every == [name for name in bench.TUNEFORGE_CANDIDATES if name not in bench.OPT_IN]
    assert [c["tag"] for c in bench.candidates("tuneforge", "full", ["syncs_on", "layout_speed"])] == [
        "layout_speed", "syncs_on"]  # opt-in candidates run when named
    full = [c["tag"] for c in bench.candidates("tuneforge", "full")]
    assert "no_checkpointing_recompute_dropout" not in full and "no_checkpointing_keep_mask" not in full
    assert "no_checkpointing_keep_mask" in every
    only = ["no_checkpointing", "layout_speed"]
    assert [c["tag"] for c in bench.candidates("tuneforge", "lora", only)] == ["layout_speed", "no_checkpointing"]
    assert [c["tag"] for c in bench.candidates("unsloth", "lora", only)] == ["ckpt-off", "ckpt-on"]
    proc = subprocess.run([sys.executable, bench.__file__, "--tuneforge-candidates", "layout_speed,nope",
                           "--table", "x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "no candidate nope" in proc.stderr


def test_step_profiler_locates_host_syncs_by_the_line_that_asked():
    """bench/step_profiler.py counts host syncs by the innermost frame outside torch and itself (CUDA-only at run
    time; the attribution is plain Python)."""
    import traceback

    step_profiler = _bench_module("step_profiler")

    def asks_for_a_sync():
        return step_profiler.caller(traceback.extract_stack())

    where = asks_for_a_sync()
    assert where.endswith("asks_for_a_sync") and "test_speed.py" in where
    assert step_profiler.count_syncs(["a.py:1 f", "b.py:2 g", "a.py:1 f"]) == ["    2  a.py:1 f", "    1  b.py:2 g"]


def test_step_profiler_counts_what_would_sync_on_a_gpu_in_a_cpu_run():
    """On a CPU nothing syncs; the profiler counts the calls that would (a value or a data-dependent shape read into
    Python), by the line that made them, and nothing else."""
    import torch

    step_profiler = _bench_module("step_profiler")
    seen = []
    x = torch.tensor([1.0, 0.0, 2.0])
    with step_profiler.would_sync_mode(seen.append):
        y = x * 2 + 1  # stays on the device: not counted
        value = y[0].item()
        if (y > 2).any():
            pass
        x.nonzero()
    assert value == 3.0
    assert [where.split(" [")[1] for where in seen] == ["item]", "__bool__]", "nonzero]"]
    assert all("test_speed.py" in where for where in seen)


def test_fewer_syncs_logs_the_same_losses_metrics_and_token_counts(tmp_path, tiny_model_dir, small_sft_file,
                                                                    monkeypatch):
    """speed.fewer_syncs: TRL's per-micro-batch metrics, the token counts and the NaN/inf filter kept on the device
    and read at log time give the plain path's losses, gradient norms and every logged value (LoRA with gradient
    accumulation, padding-free and padded batches); and the reads that would sync on a GPU in TRL's compute_loss,
    the Trainer's loss filter and its token counter are gone."""
    import json

    import tuneforge.speed as speed_module

    step_profiler = _bench_module("step_profiler")
    prepare_trainer = speed_module.prepare_trainer
    counted: dict[str, list] = {}

    def counting_prepare_trainer(trainer, recipe):  # count what would sync on a GPU during each run's training
        prepare_trainer(trainer, recipe)
        seen = counted.setdefault(recipe.name, [])
        train = trainer.train

        def counted_train(*args, **kwargs):
            with step_profiler.would_sync_mode(seen.append):
                return train(*args, **kwargs)

        trainer.train = counted_train

    monkeypatch.setattr(speed_module, "prepare_trainer", counting_prepare_trainer)
    keys = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens", "tokens_seen")
    moved = ("sft_trainer.py:", "_run_epoch", "_track_num_input_tokens")
    for padding_free in (True, False):
        tag = "free" if padding_free else "padded"
        speed = {"padding_free": padding_free, "attention": "sdpa"}
        runs, saved = {}, {}
        for lever in (True, False):
            # a checkpoint at step 2, between the logs of steps 1 and 3: its trainer state must hold every token
            run, runs[lever] = run_steps(tmp_path, tiny_model_dir, small_sft_file, f"{tag}-{lever}",
                                         adapter={"type": "lora"}, speed={**speed, "fewer_syncs": lever},
                                         train_section={"logging_steps": 3, "save_every": 2})
            state = json.loads((run.path / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
            saved[lever] = state["num_input_tokens_seen"]
        assert saved[True] == saved[False] > 0
        assert len(runs[True]) == len(runs[False]) >= 2
        for a, b in zip(runs[False], runs[True]):
            assert a.get("entropy") is not None and a.get("num_tokens") and a.get("tokens_seen")
            assert {k: a.get(k) for k in keys} == pytest.approx({k: b.get(k) for k in keys}, rel=1e-6)
        for lever, seen in ((True, counted[f"{tag}-True"]), (False, counted[f"{tag}-False"])):
            found = {where for where in seen for line in moved if line in where and "collat" not in where}
            gone = {w for w in found if "torch_call" not in w}  # TRL's collator reads CPU tensors: no GPU sync
            assert bool(gone) is not lever, (lever, sorted(gone))


def test_fewer_syncs_filters_a_nonfinite_loss_as_the_trainer_would():
    """The Trainer's NaN/inf filter, done on the device: a non-finite step loss adds the running loss's average
    since the last log instead of itself; a finite one is kept."""
    import torch

    class State:
        global_step = 5

    class Args:
        logging_nan_inf_filter = True

    class Fake:  # what the training_step wrapper reads
        _tr_loss = torch.tensor(6.0)
        _globalstep_last_logged = 3
        state, args = State(), Args()

    from tuneforge.speed import syncs

    fake = Fake()
    losses = iter([torch.tensor(float("nan")), torch.tensor(float("inf")), torch.tensor(1.5)])
    fake.training_step = lambda model, inputs, n=None: next(losses)
    for name in ("compute_loss", "_track_num_input_tokens", "log", "_save_checkpoint"):
        setattr(fake, name, None)
    fake.args.world_size = 1
    original = syncs.applies
    syncs.applies = lambda trainer: None
    try:
        syncs.install(fake)
    finally:
        syncs.applies = original
    assert fake.args.logging_nan_inf_filter is False  # the Trainer's own check is off; the wrapper does it
    assert [float(fake.training_step(None, {})) for _ in range(3)] == [2.0, 2.0, 1.5]  # 6 / (1 + 5 - 3)


def test_fewer_syncs_refused_where_it_cannot_act():
    from tuneforge.errors import RecipeError
    from tuneforge.speed import resolve

    on = _recipe(speed={"fewer_syncs": "auto"})
    assert resolve(on, "cpu")["fewer_syncs"].startswith("off") and on.speed.fewer_syncs is False
    qlora = _recipe(adapter={"type": "qlora"})
    resolve(qlora, "cuda")
    assert qlora.speed.fused_lora is False  # QLoRA's 4-bit layers are fused only when asked
    assert _recipe().speed.fewer_syncs is False  # off until measured on a GPU
    cuda = _recipe(speed={"fewer_syncs": "auto"})
    resolve(cuda, "cuda")
    assert cuda.speed.fewer_syncs is True
    with pytest.raises(RecipeError, match="fewer_syncs"):
        resolve(_recipe(train={"kl_to_base": 0.1}, speed={"fewer_syncs": True}), "cpu")
    dpo = _recipe(method="dpo", data={"train": "x.jsonl", "format": "preference"}, speed={"fewer_syncs": "auto"})
    resolve(dpo, "cuda")
    assert dpo.speed.fewer_syncs is False


def test_memory_plan_knows_what_lora_dropout_keeps():
    """The plan (and so `layout: speed`) counts what speed.keep_lora_dropout_mask / recompute_lora_dropout leave out:
    per adapted projection and token, the 16-bit dropped-out copy and the byte mask, for the mask as bits (mask kept)
    or nothing (recompute)."""
    from tuneforge.guide.plan import reference_config
    from tuneforge.memory import model_shape, plan_for_recipe

    config = reference_config("llama-8b")
    shape = model_shape(config)
    features = sum(lin.in_features for lin in shape.linears)  # all seven projections are adapted
    tokens = 4096
    plans = {}
    for name, speed in (("copy", {}), ("mask", {"keep_lora_dropout_mask": True}),
                        ("none", {"recompute_lora_dropout": True})):
        recipe = _recipe(adapter={"type": "lora", "target_modules": "all-linear"}, speed=speed)
        plans[name] = plan_for_recipe(recipe, config, seq_len=tokens, batch_size=1, gradient_checkpointing=False,
                                      dtype="bf16")["activations"]
    # the copy (2 bytes) and its 1-byte mask, against the mask as bits (every Llama projection's width divides by 8)
    assert plans["copy"] - plans["mask"] == tokens * shape.layers * features * (2 + 1 - 1 / 8)
    assert plans["mask"] - plans["none"] == tokens * shape.layers * features / 8
    off = _recipe(adapter={"type": "lora"}, speed={"keep_lora_dropout_mask": True, "fused_lora": False})
    assert plan_for_recipe(off, config, seq_len=tokens, batch_size=1, gradient_checkpointing=False,
                           dtype="bf16")["activations"] == plans["copy"]  # PEFT's forward keeps the copy


def test_bench_sweep_table_reads_each_lever_against_the_speed_layout(tmp_path):
    """bench/speed.py --table lists every sweep run, tuneforge's candidates against layout_speed of the same call
    (speed and peak memory), and says which did not run."""
    import json

    bench = _bench_module("speed")

    def row(rate, peak):
        return {"tokens_per_s": rate, "tokens_per_s_median_step": rate, "measured_steps": 20, "peak_gib": peak,
                "layout": [16, 1], "losses": [2.0, 1.0]}

    results = {"cases": {"llama-1b-full": {"sweep": {
        "tuneforge": {"tried": {"layout_speed": row(40000.0, 20.0), "syncs_on": row(46000.0, 20.0),
                                "compiled": {"error": "timed out"}}},
        "unsloth": {"tried": {"ckpt-off": row(45000.0, 19.0)}}}}}}
    path = tmp_path / "levers.json"
    path.write_text(json.dumps(results))
    lines = bench.sweep_table([str(path)])
    assert any("| syncs_on |" in line and "| 1.15x, 1.00x |" in line and "46,000" in line for line in lines)
    assert any("| compiled |" in line and "did not run: timed out" in line for line in lines)
    assert any("| unsloth | ckpt-off |" in line and line.endswith("| 1.5000 |  |") for line in lines)
