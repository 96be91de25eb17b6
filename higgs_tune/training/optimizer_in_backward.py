"""Optimizer-in-backward for full fine-tuning: each parameter is updated inside the backward pass as soon
as its gradient is complete, and the gradient is freed right after (torchtune's ``OptimizerInBackward``
pattern, ``register_post_accumulate_grad_hook``). The gradients of all parameters never exist at once:
the largest one alive is about one parameter's (for the 3B model: the 128256 x 3072 text head or text
embedding, 1.5 GB in fp32, instead of 12 GB for all of them).

:class:`OptimizerInBackward` is one optimizer per parameter (e.g. ``torch.optim.AdamW([p], fused=True)``
or :class:`~higgs_tune.training.optim.AdamWBF16Moments`), seen from outside as ONE optimizer: one param
group whose hyperparameters an LR scheduler drives (each parameter's optimizer reads them when it steps:
a float LR copied, a tensor LR shared), and ``state_dict`` / ``load_state_dict`` in torch.optim's format
(the one optimizer over the same parameters would produce and accept the same dict). It owns its
gradient hooks; they update only inside :meth:`OptimizerInBackward.updating_in_backward` (the training
step's backward), so another backward on the same model leaves ``.grad`` alone. Built from YAML by
``build_optimizer(..., in_backward=True)``; the training step (:mod:`higgs_tune.training.step`) sees it
and runs its backward inside that context.

What it cannot do, and the step says so:

* gradient accumulation: a step is ONE micro-batch (the update happens inside its backward);
* global gradient-norm clipping: the norm is known only after the last gradient, when every other
  parameter is already updated. ``max_grad_norm`` must be None; the total norm is still measured (the
  norm of the per-parameter norms) and returned as ``grad_norm``;
* data parallelism: not implemented;
* skipping a whole non-finite step: a non-finite loss skips every parameter's update (the flag is on the
  device, computed before the backward); a gradient that is non-finite although the loss is finite
  skips only ITS parameter, the ones updated before it stay updated (``skipped_parameters`` counts them).
  With fused torch AdamW per parameter nothing is read on the host; other per-parameter optimizers read
  each parameter's flag on the host (:mod:`higgs_tune.training.nonfinite`).

Where the memory goes (and why the model transform compiles per block for this optimizer): when forward
+ loss are compiled as one graph, AOTAutograd's backward is one autograd node that returns every gradient
at once, so every gradient is alive together before the first hook runs. With the decoder blocks compiled
one by one (each block's backward returns only that block's gradients) and the embeddings, final norm and
heads eager, the text head's gradient is freed before the embedding's is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from higgs_tune.training.nonfinite import step_unless


@dataclass
class BackwardPass:
    """What one :meth:`OptimizerInBackward.updating_in_backward` backward measured.

    Fields:
        skip: [] bool (device) or None: skip every update (the loss was non-finite); None: no policy.
        grad_norms: parameter -> [] norm of its gradient, for the parameters that got one.
        skipped_parameters: [] int64 (device), updates not applied (non-finite loss or gradient).
    """

    skip: torch.Tensor | None
    grad_norms: dict[torch.Tensor, torch.Tensor] = field(default_factory=dict)
    skipped_parameters: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    def total_grad_norm(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """The norm of the per-parameter norms in ``params`` order (as ``torch.nn.utils.get_total_norm``);
        parameters without a gradient were not updated (as torch optimizers skip grad=None) and do not
        count. Returns [] (0 when no parameter got a gradient)."""
        norms = [self.grad_norms[p] for p in params if p in self.grad_norms]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


class _PerParameterState(Mapping):
    """``optimizer.state`` of :class:`OptimizerInBackward`: parameter -> its own optimizer's state."""

    def __init__(self, optimizers: Mapping[torch.Tensor, torch.optim.Optimizer]) -> None:
        self._optimizers = optimizers

    def __getitem__(self, param: torch.Tensor) -> dict[str, Any]:
        return self._optimizers[param].state[param]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (param for param, optimizer in self._optimizers.items() if optimizer.state.get(param))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per parameter, updated one parameter at a time by :meth:`step_parameter`.

    Args:
        params: the parameters (one param group).
        make_optimizer: ``make_optimizer(param, index) -> Optimizer`` over ``[param]`` alone (``index``:
            the parameter's position in ``params``).

    ``param_groups``: one group holding every parameter and the hyperparameters of the parameters'
    optimizers (an LR scheduler writes here). :meth:`step_parameter` copies them into the parameter's
    own optimizer before stepping it (a tensor LR is shared, not copied). ``state[param]`` is the
    parameter's optimizer state. :meth:`step` steps every parameter that has a gradient (not used by the
    in-backward step).
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        make_optimizer: Callable[[torch.nn.Parameter, int], torch.optim.Optimizer],
    ) -> None:
        params = list(params)
        if not params:
            raise ValueError("OptimizerInBackward got no parameters")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("OptimizerInBackward got the same parameter twice")
        self.optimizers: dict[torch.Tensor, torch.optim.Optimizer] = {}
        for index, param in enumerate(params):
            optimizer = make_optimizer(param, index)
            groups = optimizer.param_groups
            if len(groups) != 1 or len(groups[0]["params"]) != 1 or groups[0]["params"][0] is not param:
                raise ValueError(
                    f"make_optimizer must optimize exactly [param]; got {type(optimizer).__name__}"
                )
            self.optimizers[param] = optimizer
        first = self.optimizers[params[0]].param_groups[0]
        super().__init__(params, {key: value for key, value in first.items() if key != "params"})
        self.state = _PerParameterState(self.optimizers)  # type: ignore[assignment]
        self._backward_pass: BackwardPass | None = None
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in params]

    @contextmanager
    def updating_in_backward(self, skip: torch.Tensor | None = None) -> Iterator[BackwardPass]:
        """Inside this context every gradient that completes updates its parameter and is freed.

        Args:
            skip: [] bool on the device (e.g. ``~isfinite(loss)``): when true no parameter is updated;
                None: no non-finite policy (every gradient is applied).

        Yields the :class:`BackwardPass` that records the gradient norms and skipped updates."""
        if not self._hooks:
            raise RuntimeError("this optimizer's gradient hooks were removed (remove_hooks)")
        record = BackwardPass(skip)
        if skip is not None:
            record.skipped_parameters = record.skipped_parameters.to(skip.device)
        self._backward_pass = record
        try:
            yield record
        finally:
            self._backward_pass = None

    def _on_gradient(self, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: measure the gradient, update the parameter (unless its update is
        skipped), free the gradient. Outside :meth:`updating_in_backward` it leaves ``.grad`` alone."""
        record = self._backward_pass
        if record is None:
            return
        norm = torch.nn.utils.get_total_norm([param.grad])  # as the step's clipping measures it
        record.grad_norms[param] = norm
        if record.skip is None:
            self.step_parameter(param)
            return
        skip = record.skip | ~torch.isfinite(norm)
        record.skipped_parameters = record.skipped_parameters + skip
        self._copy_hyperparameters(param)
        step_unless(self.optimizers[param], skip)
        param.grad = None

    def remove_hooks(self) -> None:
        """Unregister the gradient hooks (the model trains normally again with another optimizer)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _copy_hyperparameters(self, param: torch.Tensor) -> None:
        own = self.optimizers[param].param_groups[0]
        for key, value in self.param_groups[0].items():
            if key != "params":
                own[key] = value

    @torch.no_grad()
    def step_parameter(self, param: torch.Tensor) -> None:
        """Update ``param`` with its optimizer from its ``.grad`` (current hyperparameters of the group),
        then free the gradient."""
        self._copy_hyperparameters(param)
        self.optimizers[param].step()
        param.grad = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Update every parameter that has a gradient, one by one, freeing each gradient.

        After a backward inside :meth:`updating_in_backward` no gradient is left and this does nothing
        (the training step still calls it, which tells an LR scheduler the optimizer stepped); it serves
        an ordinary loop (backward, then ``step``) and torch.distributed.checkpoint, which initialises
        empty optimizer state by stepping once with zero gradients and a zero LR."""
        if closure is not None:
            raise ValueError("OptimizerInBackward.step takes no closure")
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.step_parameter(param)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's format: ``{"state": {index: state}, "param_groups": [{..., "params": [index]}]}``,
        parameters numbered in ``param_groups`` order (as one optimizer over the same parameters)."""
        state: dict[int, dict[str, Any]] = {}
        groups = []
        index = 0
        for group in self.param_groups:
            indices = []
            for param in group["params"]:
                param_state = self.optimizers[param].state.get(param)
                if param_state:
                    state[index] = param_state
                indices.append(index)
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dict of :meth:`state_dict`'s format (also one saved by a single optimizer of the same
        class over the same parameters). A tensor LR keeps its identity (its value is copied)."""
        saved_groups = state_dict["param_groups"]
        sizes = [len(g["params"]) for g in self.param_groups]
        saved_sizes = [len(g["params"]) for g in saved_groups]
        if sizes != saved_sizes:
            raise ValueError(f"optimizer state dict has groups of {saved_sizes} parameters, this one {sizes}")
        for group, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key == "params":
                    continue
                if torch.is_tensor(group.get(key)):
                    group[key].copy_(value)
                else:
                    group[key] = value
            hyperparameters = {k: v for k, v in group.items() if k != "params"}
            for param, saved_id in zip(group["params"], saved["params"]):
                saved_state = state_dict["state"].get(saved_id)
                self.optimizers[param].load_state_dict(
                    {
                        "state": {0: saved_state} if saved_state else {},
                        "param_groups": [{**hyperparameters, "params": [0]}],
                    }
                )
