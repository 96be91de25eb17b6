"""Optimizers from YAML, with what the compiled/captured steps and bf16 training need.

YAML (``optimizer._component_: higgs_tune.training.optim.build_optimizer``)::

    optimizer:
      _component_: higgs_tune.training.optim.build_optimizer
      name: adamw              # adamw | adamw8bit (torchao, 8-bit moments)
      lr: 2.0e-5
      betas: [0.9, 0.95]
      weight_decay: 0.0
      implementation: fused    # adamw only: fused | foreach | for_loop | null (torch's default)
      lr_as_tensor: true       # required by compile / cudagraph(capture_optimizer) modes
      capturable: false        # cudagraph with capture_optimizer=true
      master_weights: false    # fp32 master copy of bf16/fp16 parameters

Mixed precision (bf16 parameters and activations): ``torch.optim.AdamW`` keeps its moments in the
parameter dtype, so for bf16 parameters pass ``master_weights: true``: the optimizer then updates fp32
copies (fp32 moments, fp32 update) and writes them back rounded to bf16 after every step; the loss is
computed in fp32 by :class:`higgs_tune.loss.AlignedLoss` either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

OPTIMIZER_NAMES = ("adamw", "adamw8bit")
ADAMW_IMPLEMENTATIONS = ("fused", "foreach", "for_loop", None)


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str = "adamw",
    lr: float = 1e-5,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    implementation: str | None = None,
    lr_as_tensor: bool = False,
    capturable: bool = False,
    master_weights: bool = False,
) -> torch.optim.Optimizer:
    """Build the optimizer over ``params`` (the trainable parameters).

    Args:
        name: ``"adamw"`` (``torch.optim.AdamW``) or ``"adamw8bit"`` (``torchao.optim.AdamW8bit``:
            block-quantised 8-bit moments, about a quarter of AdamW's state memory for fp32 moments).
        implementation: AdamW kernel: ``"fused"``, ``"foreach"``, ``"for_loop"`` or None (torch picks).
        lr_as_tensor: hold the LR in a 0-dim tensor (on the parameters' device when ``capturable``) so a
            compiled or captured optimizer step reads it instead of baking it in.
        capturable: AdamW ``capturable=True`` (state on the device, no host syncs: CUDA-graph capture).
        master_weights: wrap in :class:`MasterWeightsOptimizer` (fp32 copies of low-precision params).
    """
    params = [p for p in params]
    if not params:
        raise ValueError("build_optimizer got no parameters to optimize")
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"optimizer name {name!r} is not one of {OPTIMIZER_NAMES}")
    if implementation not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(f"implementation {implementation!r} is not one of {ADAMW_IMPLEMENTATIONS}")
    if master_weights:
        masters = [p.detach().float().clone().requires_grad_(True) for p in params]
        inner = build_optimizer(
            masters, name, lr, betas, eps, weight_decay, implementation, lr_as_tensor, capturable
        )
        return MasterWeightsOptimizer(params, masters, inner)

    lr_value: float | torch.Tensor = float(lr)
    if lr_as_tensor:
        device = params[0].device if capturable else torch.device("cpu")
        lr_value = torch.tensor(float(lr), dtype=torch.float32, device=device)
    if name == "adamw8bit":
        if implementation is not None or capturable:
            raise ValueError("adamw8bit takes neither `implementation` nor `capturable`")
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=lr_value, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    kernel: dict[str, Any] = {}
    if implementation == "fused":
        kernel["fused"] = True
    elif implementation == "foreach":
        kernel["foreach"] = True
    elif implementation == "for_loop":
        kernel["foreach"] = False
    if lr_as_tensor and implementation == "foreach" and not capturable:
        raise ValueError("AdamW(foreach=True) accepts a tensor lr only with capturable=True")
    return torch.optim.AdamW(
        params,
        lr=lr_value,
        betas=tuple(betas),
        eps=eps,
        weight_decay=weight_decay,
        capturable=capturable,
        **kernel,
    )


class MasterWeightsOptimizer(torch.optim.Optimizer):
    """Keeps fp32 master copies of low-precision parameters and optimizes those.

    ``step()``: master.grad = param.grad (upcast), inner step on the masters (fp32 state and update),
    param <- master (rounded). ``param_groups`` and ``state`` ARE the inner optimizer's, so LR schedulers
    and checkpointing work unchanged. ``zero_grad`` clears the low-precision gradients.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        masters: Sequence[torch.Tensor],
        inner: torch.optim.Optimizer,
    ) -> None:
        if len(params) != len(masters):
            raise ValueError(f"{len(params)} parameters but {len(masters)} master copies")
        self.params = list(params)
        self.masters = list(masters)
        self.inner = inner
        # Deliberately not calling Optimizer.__init__: groups and state are the inner optimizer's.
        self.defaults = inner.defaults
        self.param_groups = inner.param_groups
        self.state = inner.state
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("MasterWeightsOptimizer.step takes no closure")
        for param, master in zip(self.params, self.masters):
            master.grad = None if param.grad is None else param.grad.to(master.dtype)
        self.inner.step()
        for param, master in zip(self.params, self.masters):
            param.copy_(master)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.zero_()
        self.inner.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
