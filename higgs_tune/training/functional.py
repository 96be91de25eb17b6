"""A pure gradient function of the trainable parameters (``torch.func``), for per-sample scores
(``tools/score_samples.py`` maps it over single rows with ``vmap``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from higgs_tune.loss import LossOutput


def make_functional_grad_fn(
    model: nn.Module, loss_fn: nn.Module, backend: str | Callable | None = "inductor"
) -> Callable[..., tuple[dict[str, torch.Tensor], LossOutput]]:
    """``grad_fn(params, batch, num_text, num_audio) -> (grads, output)``.

    ``params`` maps names of parameters to tensors (the other parameters and buffers are read from
    ``model``), ``grads`` has the same keys, ``output`` is the :class:`LossOutput` with ``loss`` detached.
    The loss must not use activation checkpoints (``AlignedLoss(checkpoint_text_chunks=False)``):
    ``torch.func`` does not support their saved-tensor hooks. Compiled with ``fullgraph=True`` unless
    ``backend`` is None.
    """
    if getattr(loss_fn, "checkpoint_text_chunks", False):
        raise ValueError(
            "torch.func cannot differentiate through activation checkpoints; build the loss with "
            "checkpoint_text_chunks=False"
        )

    def loss_of(params, batch, num_text, num_audio) -> tuple[torch.Tensor, LossOutput]:
        outputs = torch.func.functional_call(model, params, (batch,), strict=False)
        output = loss_fn(outputs, batch, num_text, num_audio)
        return output.loss, output._replace(loss=output.loss.detach())

    grad_and_value = torch.func.grad_and_value(loss_of, has_aux=True)

    def grad_fn(params, batch, num_text, num_audio) -> tuple[dict[str, torch.Tensor], LossOutput]:
        grads, (_, output) = grad_and_value(params, batch, num_text, num_audio)
        return grads, output

    return grad_fn if backend is None else torch.compile(grad_fn, fullgraph=True, backend=backend)
