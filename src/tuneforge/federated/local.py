"""One process's model for a federated or per-tenant run: the base with the recipe's LoRA adapter, which trains
and scores adapters handed to it as tensors. A Flower client process keeps one for all the clients it serves; the
server keeps one for the global held-out set and the baselines.

Everything here is tuneforge's ordinary run life, called piece by piece (train.py): the base model and EOS as
`load_model` loads them, the adapter as `apply_training_adapter` wraps it, the speed levers, and the method's trainer
as `build_guarded_trainer` builds it (progress and metrics rows, non-finite guard, atomic checkpointing, OOM advice).
Scoring is the run's too: `evaluate_generation` with eval.metrics and the held-out loss of evaluate/loss.py.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

from tuneforge.errors import RecipeError
from tuneforge.run import RunDir

# Adapter tensors of embedding layers change only the rows of tokens a client's records contain: their update would
# tell the server which tokens a client holds. They never cross the client boundary (checks.py refuses them).
TOKEN_ROW_TENSORS = ("lora_embedding_A", "lora_embedding_B", "embed_tokens", "lm_head", "wte", "word_embeddings")


class ScratchRun(RunDir):
    """A RunDir for one local training: the Trainer's scratch folder is a temporary one; its metrics rows go to
    `sink` (tagged by the caller) instead of a file."""

    def __init__(self, sink, tags: dict):
        self._tmp = tempfile.TemporaryDirectory(prefix="tuneforge-local-")
        super().__init__(self._tmp.name)
        self.sink, self.tags = sink, tags

    def append_metrics(self, row: dict) -> None:
        if self.sink is not None:
            self.sink({**self.tags, **row})

    def set_status(self, state: str, **fields) -> None:
        pass

    def close(self) -> None:
        self._tmp.cleanup()


@dataclass
class LocalResult:
    state: dict  # adapter tensor name -> tensor (CPU)
    steps: int
    examples: int
    train_loss: float | None


class ProximalTerm:
    """FedProx: the gradient of (mu/2)||w - w_global||^2, i.e. mu (w - w_global), added to each trainable adapter
    tensor's gradient before the optimizer step (after clipping: the term is the objective's, not the data's)."""

    def __init__(self, model, mu: float):
        from transformers import TrainerCallback

        self.mu = mu
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        class _Callback(TrainerCallback):
            def on_pre_optimizer_step(cb, args, state, control, model=None, **kwargs):  # noqa: N805
                import torch

                with torch.no_grad():
                    for name, parameter in model.named_parameters():
                        anchor = self.anchor.get(name)
                        if anchor is not None and parameter.grad is not None:
                            parameter.grad.add_(parameter.detach() - anchor, alpha=self.mu)

        self.callback = _Callback()


def federation_schedule(trainer, round_number: int, rounds: int) -> None:
    """Make a client's learning rate in round `round_number` (1-based) of `rounds` the slice of train.scheduler
    (with train.warmup) laid over the client's steps of all rounds, rounds x this round's steps, as the central
    baseline's schedule is laid over its steps. Without it the Trainer would restart the schedule every round: a
    cosine would decay within each round's few steps and jump back to the full rate at the next."""

    def create_scheduler(num_training_steps: int, optimizer=None):
        import torch
        from torch.optim.lr_scheduler import LambdaLR
        from transformers import get_scheduler

        if trainer.lr_scheduler is None:
            args = trainer.args
            total, offset = num_training_steps * rounds, num_training_steps * (round_number - 1)
            probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            whole = get_scheduler(args.lr_scheduler_type, optimizer=probe, num_warmup_steps=args.get_warmup_steps(total),
                                  num_training_steps=total, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
            factor = whole.lr_lambdas[0]
            trainer.lr_scheduler = LambdaLR(optimizer or trainer.optimizer, lambda step: factor(offset + step))
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler


class Workbench:
    """The tokenizer, the adapter-wrapped model and the metric specs of one recipe, in this process."""

    def __init__(self, recipe, pieces, console=None, *, base_dir=None):
        from rich.console import Console

        from tuneforge.evaluate.metrics import resolve_metrics
        from tuneforge.methods import method_spec
        from tuneforge.models import load_tokenizer, pick_device, quiet_transformers
        from tuneforge.run import RunContext
        from tuneforge.speed import prepare_model

        quiet_transformers()
        self.recipe, self.pieces, self.console = recipe, pieces, console or Console(quiet=True)
        self.spec = method_spec(recipe.method)
        self.device = pick_device()
        model = recipe.model
        self.tokenizer = load_tokenizer(model.name, chat_template=model.chat_template,
                                        trust_remote_code=model.trust_remote_code, revision=model.revision)
        self.metric_specs = resolve_metrics(recipe.eval.metrics, base_dir=base_dir)
        ctx = RunContext(recipe=recipe, spec=self.spec, tokenizer=self.tokenizer, data=None, device=self.device,
                         console=self.console, metric_specs=self.metric_specs)
        model, loaded = pieces.load_model(ctx)
        self.model = pieces.apply_training_adapter(ctx, model, loaded)
        prepare_model(self.model, recipe)
        self.initial = self.adapter_state()
        leaking = [name for name in self.initial if any(part in name for part in TOKEN_ROW_TENSORS)]
        if leaking:
            raise RecipeError([f"`adapter`: the adapter trains {leaking[0]}, an embedding or output layer whose update "
                               "changes only the rows of tokens in a client's records (it would reveal which tokens a "
                               "client holds); federated runs send only LoRA tensors of linear layers: remove "
                               "embedding layers from adapter.target_modules / adapter.modules_to_save"])

    # -- adapter tensors ------------------------------------------------------------------------------------------
    def adapter_state(self) -> dict:
        """The adapter's tensors by name (CPU copies): all that crosses the client boundary."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().to("cpu").clone().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}

    def load_state(self, state: dict) -> None:
        import torch
        from peft import set_peft_model_state_dict

        expected = set(self.initial)
        if set(state) != expected:
            extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
            raise ValueError(f"adapter tensors do not match this model's adapter (unexpected {extra[:3]}, missing "
                             f"{missing[:3]})")
        dtypes = {k: v.dtype for k, v in self.initial.items()}
        set_peft_model_state_dict(self.model, {k: torch.as_tensor(v).to(dtypes[k]) for k, v in state.items()})

    # -- training -------------------------------------------------------------------------------------------------
    def train(self, state: dict, examples: list, *, steps: int | None = None, epochs: float | None = None, seed: int,
              proximal_mu: float | None = None, sink=None, tags: dict | None = None,
              console=None, federation_round: tuple[int, int] | None = None) -> LocalResult:
        """Train the adapter from `state` on tokenized `examples` for `steps` optimizer steps (or `epochs` passes),
        with the method's trainer as train.py builds it; returns the new adapter tensors. federation_round
        (round, rounds): the learning rate follows the slice of train.scheduler over the whole federation that
        this round covers (see federation_schedule)."""
        from tuneforge.data.prepared import PreparedData
        from tuneforge.run import RunContext
        from tuneforge.speed import prepare_trainer

        self.load_state(state)
        recipe = self.recipe.model_copy(deep=True)
        recipe.train.max_steps = steps
        if epochs is not None:
            recipe.train.epochs = epochs
        recipe.train.seed = seed
        recipe.train.save_every = None
        recipe.train.eval_every = None
        recipe.train.early_stopping = None
        recipe.train.report_to = []
        run = ScratchRun(sink, tags or {})
        try:
            ctx = RunContext(recipe=recipe, spec=self.spec, tokenizer=self.tokenizer, device=self.device,
                             data=PreparedData(list(examples), [], [], []), console=console or self.console,
                             metric_specs=self.metric_specs, run=run)
            train_dataset, _ = self.pieces.method_datasets(ctx)
            self.model.train()
            trainer, numerical, _interrupt, _plateau = self.pieces.build_guarded_trainer(ctx, self.model,
                                                                                        train_dataset, None)
            prepare_trainer(trainer, recipe)
            if federation_round is not None:
                federation_schedule(trainer, *federation_round)
            if proximal_mu:
                trainer.add_callback(ProximalTerm(self.model, proximal_mu).callback)
            output = trainer.train()
            numerical.raise_if_faulted(run)
            loss = getattr(output, "training_loss", None)
            return LocalResult(self.adapter_state(), trainer.state.global_step, len(examples),
                               float(loss) if loss is not None else None)
        finally:
            run.close()

    # -- scoring --------------------------------------------------------------------------------------------------
    def score(self, state: dict, examples: list[dict], tokenized: list, *, label: str) -> dict:
        """The adapter `state` on held-out `examples`: eval.metrics by greedy generation (methods scored by
        generation) and the held-out loss. -> {"metrics": {...}, "eval_loss": ..., "n": ...}"""
        from tuneforge.evaluate.loss import mean_loss

        self.load_state(state)
        self.model.eval()
        out: dict = {"metrics": {}, "n": len(examples)}
        if self.spec.hooks.get("scores") == "generation" and examples:
            from tuneforge.evaluate.scoring import evaluate_generation

            eval_cfg = self.recipe.eval
            result = evaluate_generation(self.model, self.tokenizer, examples, metrics=self.metric_specs,
                                         max_examples=eval_cfg.max_examples, max_new_tokens=eval_cfg.max_new_tokens,
                                         batch_size=eval_cfg.batch_size, label=label)
            out["metrics"], out["n"] = result["metrics"], result["n"]
            out["samples"] = result["samples"][:5]
        if tokenized:
            out["eval_loss"] = mean_loss(self.model, tokenized, batch_size=self.recipe.train.batch_size,
                                         pad_token_id=self.tokenizer.pad_token_id)["loss"]
        return out

    def tokenize(self, examples: list[dict]) -> list:
        from tuneforge.data.pipeline import tokenize_all

        kept, _, _ = tokenize_all(self.tokenizer, examples, self.recipe.train.max_length)
        return kept

    def save(self, state: dict, folder) -> None:
        """An ordinary adapter folder (adapter_config.json, weights, tokenizer, generation config) for `state`."""
        self.load_state(state)
        self.model.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))
        self.model.generation_config.save_pretrained(str(folder))


_BENCHES: dict[str, Workbench] = {}


def workbench_for(recipe_json: dict, pieces, base_dir: str | None = None) -> Workbench:
    """This process's Workbench for a recipe (given as its JSON form), built once."""
    import json

    key = json.dumps(recipe_json, sort_keys=True)
    if key not in _BENCHES:
        from tuneforge.recipe import Recipe

        _BENCHES.clear()  # one model per process
        _BENCHES[key] = Workbench(Recipe.model_validate(recipe_json), pieces, base_dir=base_dir)
    return _BENCHES[key]
