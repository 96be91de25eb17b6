"""Components that fail on purpose, for the fault tests: the recipe instantiates them from YAML like
any other component (``loss._component_=faulty_components.FaultInjectingLoss``, with this folder on
PYTHONPATH), so the faults go through the real recipe end to end."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

import torch

from higgs_tune.loss import AlignedLoss


class FaultInjectingLoss(AlignedLoss):
    """:class:`AlignedLoss` that misbehaves on chosen TRAINING calls (counted from 1; validation runs
    without gradients and is not counted; one call per micro-batch).

    Args:
        nan_at_calls: these calls return a NaN loss (its gradients are NaN too).
        kill_at_call: on this call, the process of rank ``kill_rank`` kills itself with SIGKILL (a rank
            that dies mid-step, as on a node failure or an out-of-memory kill).
        kill_rank: see ``kill_at_call``.
    """

    def __init__(
        self,
        nan_at_calls: Sequence[int] = (),
        kill_at_call: int | None = None,
        kill_rank: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.nan_at_calls = set(nan_at_calls)
        self.kill_at_call = kill_at_call
        self.kill_rank = kill_rank
        self.training_calls = 0

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        if not torch.is_grad_enabled():
            return output
        self.training_calls += 1
        if self.training_calls == self.kill_at_call and int(os.environ.get("RANK", "0")) == self.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.training_calls in self.nan_at_calls:
            return output._replace(loss=output.loss * float("nan"))
        return output
