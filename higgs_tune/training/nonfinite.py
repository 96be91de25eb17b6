"""Skipping the update of a non-finite step, decided on the device.

The step computes one flag ``skip`` ([] bool, on the device): the loss or the gradient norm is NaN/inf
on some rank. Reading it on the host would stall the step until the device has finished, so the
optimizer itself is told: torch's fused Adam/AdamW take a ``found_inf`` tensor (the attribute
``torch.amp.GradScaler`` sets for the same purpose) and leave parameters, moments and step counts
untouched where it is 1. Other optimizers (torchao's AdamW8bit, :class:`~higgs_tune.training.optim.
AdamWBF16Moments`, non-fused or capturable torch AdamW) have no such input: for them the flag is read on
the host once per step (:func:`skips_on_device` says which case applies; the recipe logs it at set-up).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` can skip an update from a device flag: torch Adam/AdamW with the fused
    kernel in every param group, over plain (not FSDP ``DTensor``) parameters."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return False
    groups = optimizer.param_groups
    return all(group.get("fused") for group in groups) and not any(
        isinstance(param, DTensor) for group in groups for param in group["params"]
    )


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor | None, step=None) -> None:
    """``step()`` (default ``optimizer.step``) unless ``skip`` ([] bool) is true.

    With :func:`skips_on_device` the flag goes to the fused kernel as ``found_inf`` (no host read);
    otherwise it is read on the host (one synchronisation). ``skip=None``: always step.
    """
    step = optimizer.step if step is None else step
    if skip is None:
        step()
    elif skips_on_device(optimizer):
        optimizer.found_inf = skip.to(torch.float32)
        try:
            step()
        finally:
            del optimizer.found_inf
    elif not bool(skip):  # host read: this optimizer cannot skip from a device flag
        step()
