"""Per-decoder-layer activation checkpointing, applied from outside the model.

Each ``model.layers[i]`` is wrapped in PyTorch's non-reentrant ``checkpoint_wrapper``
(``torch.utils.checkpoint`` underneath): only the layer input is kept for backward and the layer is
recomputed during backward. The wrapper's state-dict hooks strip its ``_checkpoint_wrapped_module.``
prefix, so checkpoints keep Boson's key names. Works with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)


def apply_activation_checkpointing(model: nn.Module, enabled: bool = True, every_n_layers: int = 1) -> int:
    """Wrap decoder layers of ``model.layers`` (config switch ``enabled``).

    Args:
        model: a model with a ``layers`` ModuleList (HiggsAudioModel).
        enabled: False leaves the model unchanged.
        every_n_layers: checkpoint layers ``0, n, 2n, ...`` (1 = every layer).

    Returns:
        Number of layers wrapped.
    """
    if not enabled:
        return 0
    if every_n_layers < 1:
        raise ValueError(f"every_n_layers must be >= 1, got {every_n_layers}")
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `layers` ModuleList to checkpoint")
    wrapped = 0
    for i, layer in enumerate(layers):
        if i % every_n_layers or isinstance(layer, CheckpointWrapper):
            continue
        layers[i] = checkpoint_wrapper(
            layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False
        )
        wrapped += 1
    return wrapped
