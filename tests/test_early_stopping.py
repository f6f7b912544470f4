"""Early stopping: a synthetic plateau of eval losses stops at the right step, and a real (tiny) Trainer stops."""

from __future__ import annotations

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from tuneforge.evaluate.early_stopping import PlateauStopping


def _feed(callback: PlateauStopping, losses: list[float], every: int = 10, tmp_path=None) -> int | None:
    """Evaluate at steps every, 2*every, ...; return the step at which training was told to stop."""
    args = TrainingArguments(output_dir=str(tmp_path or "unused"), report_to=[])
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    for i, loss in enumerate(losses, start=1):
        state.global_step = i * every
        callback.on_evaluate(args, state, control, metrics={"eval_loss": loss})
        if control.should_training_stop:
            return state.global_step
    return None


def test_plateau_stops_after_patience_evaluations_without_improvement(tmp_path):
    # best 0.70 at step 30; 0.69 improves by only 0.01 < min_delta 0.05, 0.695 neither -> stop at step 50
    callback = PlateauStopping(patience=2, min_delta=0.05)
    stopped = _feed(callback, [1.0, 0.8, 0.70, 0.69, 0.695, 0.5, 0.4], tmp_path=tmp_path)
    assert stopped == 50
    summary = callback.summary()
    assert summary["stopped_early"] and summary["stopped_at_step"] == 50
    assert summary["best_step"] == 30 and summary["best_value"] == pytest.approx(0.70)
    assert summary["best_checkpoint"] is None  # none saved at step 30


def test_improvement_resets_patience_and_no_stop_while_improving(tmp_path):
    callback = PlateauStopping(patience=2, min_delta=0.0)
    # one bad evaluation, then an improvement: the count starts again
    assert _feed(callback, [1.0, 1.1, 0.9, 0.95, 0.85, 0.8], tmp_path=tmp_path) is None
    assert callback.best_step == 60 and not callback.summary()["stopped_early"]


def test_baseline_and_repeated_evaluations_do_not_count(tmp_path):
    callback = PlateauStopping(patience=1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state, control = TrainerState(), TrainerControl()
    for step, loss in ((0, 0.1), (10, 1.0), (10, 1.0)):  # step 0 = evaluation before training; step 10 twice
        state.global_step = step
        callback.on_evaluate(args, state, control, metrics={"eval_loss": loss})
    assert not control.should_training_stop and callback.best_step == 10


def test_best_checkpoint_is_found_and_save_best_requests_a_save(tmp_path):
    (tmp_path / "checkpoint-20").mkdir()
    callback = PlateauStopping(patience=1, save_best=True)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    state.global_step = 20
    callback.on_evaluate(args, state, control, metrics={"eval_loss": 0.5})
    assert control.should_save
    assert callback.best_checkpoint() == tmp_path / "checkpoint-20"


def test_greater_is_better_metric(tmp_path):
    callback = PlateauStopping(patience=1, metric="accuracy", greater_is_better=True)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state, control = TrainerState(), TrainerControl()
    for step, value in ((1, 0.5), (2, 0.7), (3, 0.6)):
        state.global_step = step
        callback.on_evaluate(args, state, control, metrics={"eval_accuracy": value})
    assert control.should_training_stop and callback.best_step == 2


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        PlateauStopping(patience=0)
    with pytest.raises(ValueError):
        PlateauStopping(min_delta=-1)


def test_stops_a_real_trainer_on_a_plateau(tmp_path):
    """A 1-layer model with learning rate 0: the eval loss is flat, so with patience 2 and evaluation every step,
    training stops at step 3 (step 1 sets the best, steps 2 and 3 do not improve) instead of running 50."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    rows = [{"input_ids": [(i * 7 + j) % 64 for j in range(8)], "labels": [(i * 7 + j) % 64 for j in range(8)]}
            for i in range(16)]
    data = Dataset.from_list(rows)
    callback = PlateauStopping(patience=2, min_delta=1e-3)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=50, learning_rate=0.0,
                             per_device_train_batch_size=4, per_device_eval_batch_size=8, eval_strategy="steps",
                             eval_steps=1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[callback])
    trainer.train()
    assert trainer.state.global_step == 3
    assert callback.summary()["stopped_at_step"] == 3 and callback.best_step == 1
