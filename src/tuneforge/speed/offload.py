"""speed.offload_checkpoints -- gradient checkpointing keeps each decoder layer's input until the backward pass needs
it to recompute the layer; with this lever those inputs wait in pinned CPU memory instead of on the GPU
(layers x tokens x hidden x 2 bytes: 1.7 GiB for an 8B model on 6,400 tokens).

Why not transformers' own `activation_checkpointing_kwargs={"offload": True}`: it wraps each checkpoint in
`torch.autograd.graph.save_on_cpu`, whose copy to the host is synchronous -- the Python thread waits for the GPU at
every layer, so the GPU idles while the next layer's kernels are queued. Here the copy runs on a side CUDA stream
(non-blocking, into pinned memory, the source kept alive for that stream), and the copy back is queued on the compute
stream after the side stream's event, when the backward pass reaches the layer. The arithmetic is unchanged: the same
values come back (tests/test_speed.py checks losses and gradients against plain checkpointing).

It works through saved-tensor hooks around each layer's checkpoint call: under non-reentrant checkpointing the only
tensors saved there are the checkpoint's inputs (torch saves them through `save_for_backward`); the layer's own
saved activations go through the checkpoint's inner hooks and are recomputed, never offloaded.
"""

from __future__ import annotations

import functools

MIN_BYTES = 1 << 20  # smaller saved tensors (position ids, masks) stay where they are: not worth a copy


class _Offloaded:
    __slots__ = ("device", "host", "event")

    def __init__(self, device, host, event):
        self.device, self.host, self.event = device, host, event


@functools.lru_cache(maxsize=None)
def _side_stream(device_index: int):
    import torch

    return torch.cuda.Stream(device=device_index)


def _pack(tensor, include_cpu: bool = False):
    import torch

    if tensor.element_size() * tensor.numel() < MIN_BYTES and not include_cpu:
        return tensor
    if tensor.is_cuda:
        stream = _side_stream(tensor.device.index if tensor.device.index is not None else torch.cuda.current_device())
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)  # the allocator keeps its memory until the copy is done
        return _Offloaded(tensor.device, host, stream.record_event())
    if include_cpu:  # CPU tensors are already in host memory; tests use this path to check the hooks' bookkeeping
        return _Offloaded(tensor.device, tensor.detach().clone(), None)
    return tensor


def _unpack(packed):
    import torch

    if not isinstance(packed, _Offloaded):
        return packed
    if packed.event is None:
        return packed.host
    torch.cuda.current_stream(packed.device).wait_event(packed.event)
    return packed.host.to(packed.device, non_blocking=True)


def hooks(include_cpu: bool = False):
    """Saved-tensor hooks that move large saved tensors to pinned host memory (CUDA) and bring them back on use."""
    import torch

    return torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, include_cpu=include_cpu), _unpack)


def offloaded(checkpoint_fn, include_cpu: bool = False):
    """Wrap a layer's checkpoint function (transformers' `_gradient_checkpointing_func`) so its inputs are offloaded."""

    @functools.wraps(checkpoint_fn)
    def run(function, *args, **kwargs):
        with hooks(include_cpu):
            return checkpoint_fn(function, *args, **kwargs)

    run._tuneforge_offloaded = True
    return run


def install(model, include_cpu: bool = False) -> int:
    """Offload the inputs of every checkpointed decoder layer of `model` (after the Trainer has switched
    checkpointing on). Returns the number of layers; idempotent."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for module in model.modules():
        if not (isinstance(module, GradientCheckpointingLayer) and getattr(module, "gradient_checkpointing", False)):
            continue
        current = getattr(module, "_gradient_checkpointing_func", None)
        if current is None:
            continue
        if not getattr(current, "_tuneforge_offloaded", False):
            module._gradient_checkpointing_func = offloaded(current, include_cpu)
        count += 1
    return count


def callback(include_cpu: bool = False):
    """A TrainerCallback installing the offload when training starts (the Trainer switches checkpointing on in
    train(), just before on_train_begin)."""
    from transformers import TrainerCallback

    class OffloadCheckpoints(TrainerCallback):
        layers = 0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                OffloadCheckpoints.layers = install(model, include_cpu)

    return OffloadCheckpoints()
