"""speed.max_micro_batch_tokens: a padding-free micro-batch holding more real tokens than the cap is trained as
several smaller ones inside the same optimizer step. It is split at example boundaries (an example longer than the
cap stays whole), and each part's forward/backward takes the step's token count as its loss denominator, so the
step's loss and gradient are the unsplit ones (tests/test_speed.py).

Why: the memory plan must hold for the worst micro-batch the data can make -- a step drawing the longest examples
(16 of up to 2,048 tokens = 32,768 tokens against a typical step's ~7,400). Planning that worst case keeps every-layer
checkpointing on an 8B model even where the typical step would run without it (bench/results/
2026-12-07-speed-fair-h200.md). With a cap, the plan sizes the cap instead, and only the rare long step pays for the
extra micro-batch.

One process only: with several ranks, one rank's extra backward passes would not match the others' gradient
reductions (the Trainer refuses it before training)."""

from __future__ import annotations

TOKEN_KEYS = ("input_ids", "labels", "position_ids", "seq_idx")  # one entry per token, shape (1, T)
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # recomputed for each part


def spans(position_ids: list[int], cap: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of whole examples (an example starts where its position id is 0), each range as
    many examples as fit in `cap` tokens, an example longer than `cap` alone."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] or [0]
    if starts[0] != 0:
        starts.insert(0, 0)
    bounds = starts + [len(position_ids)]
    out, begin = [], 0
    for start, end in zip(bounds, bounds[1:]):
        if end - begin > cap and start > begin:
            out.append((begin, start))
            begin = start
    out.append((begin, len(position_ids)))
    return out


def split_inputs(inputs: dict, cap: int) -> list[dict] | None:
    """The micro-batch as parts of at most `cap` tokens (whole examples), or None when it needs no split."""
    import torch

    ids = inputs["input_ids"]
    if ids.shape[-1] <= cap:
        return None
    if ids.dim() != 2 or ids.shape[0] != 1 or "position_ids" not in inputs:
        raise ValueError("speed.max_micro_batch_tokens splits padding-free micro-batches (one row with position ids); "
                         f"this one has shape {tuple(ids.shape)}")
    unknown = sorted(set(inputs) - set(TOKEN_KEYS) - set(BOUNDARY_KEYS))
    if unknown:
        raise ValueError(f"speed.max_micro_batch_tokens cannot split a micro-batch with the fields {unknown}")
    ranges = spans(inputs["position_ids"][0].tolist(), cap)
    if len(ranges) == 1:
        return None
    parts = []
    for begin, end in ranges:
        part = {key: inputs[key][:, begin:end] for key in TOKEN_KEYS if key in inputs}
        if any(key in inputs for key in BOUNDARY_KEYS):
            positions = part["position_ids"][0]
            starts = (positions == 0).nonzero().flatten().to("cpu")
            cu = torch.cat([starts, torch.tensor([end - begin])]).to(torch.int32)
            device = inputs.get("cu_seq_lens_q", cu).device
            longest = int(cu.diff().max())
            for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
                if key in inputs:
                    part[key] = cu.to(device)
            for key in ("max_length_q", "max_length_k"):
                if key in inputs:
                    part[key] = longest
        parts.append(part)
    return parts


def install(trainer, cap: int) -> None:
    """Make `trainer.training_step` split micro-batches longer than `cap` tokens."""
    if getattr(trainer.args, "world_size", 1) > 1:
        from tuneforge.errors import RecipeError

        raise RecipeError([f"`speed.max_micro_batch_tokens`: {trainer.args.world_size} processes train together; a "
                           "split micro-batch would add backward passes on one rank only. Remove the key for "
                           "multi-GPU runs"])
    original = trainer.training_step

    def training_step(model, inputs, num_items_in_batch=None):
        parts = split_inputs(inputs, cap)
        if parts is None:
            return original(model, inputs, num_items_in_batch)
        scaled = trainer.loss_is_scaled_for_ga if getattr(trainer, "loss_is_scaled_for_ga", None) is not None else (
            getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
        if not scaled:
            raise RuntimeError("speed.max_micro_batch_tokens needs a loss normalised by the step's token count "
                               "(num_items_in_batch); this trainer averages each micro-batch. Remove the key")
        total = None
        for part in parts:
            loss = original(model, part, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    trainer.training_step = training_step
