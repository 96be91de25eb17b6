"""Optimizer-in-backward for full fine-tuning: each parameter is updated inside the backward pass as soon
as its gradient is complete, and the gradient is freed right after (torchtune's pattern,
``register_post_accumulate_grad_hook``). The gradients of all parameters never exist at once: the
largest one alive is about one parameter's (for the 3B model: the 128256 x 3072 text head or text
embedding, 1.5 GB in fp32, instead of 12 GB for all of them).

Two pieces:

* :class:`OptimizerInBackward`: one optimizer per parameter (e.g. ``torch.optim.AdamW([p])`` or
  :class:`~higgs_tune.training.optim.AdamWBF16Moments`), seen from outside as ONE optimizer: one param
  group whose hyperparameters an LR scheduler drives (each parameter's optimizer reads them when it
  steps: a float LR copied, a tensor LR shared), and ``state_dict`` / ``load_state_dict`` in
  torch.optim's format (the one optimizer over the same parameters would produce and accept the same
  dict). Built from YAML by ``build_optimizer(..., in_backward=True)``.
* :class:`OptimizerInBackwardTrainStep` (step mode ``optimizer_in_backward``): forward, loss, and a
  backward whose post-accumulate-grad hooks step each parameter's optimizer.

What the mode cannot do, and says so:

* gradient accumulation: a step is ONE micro-batch (the update happens inside its backward);
* global gradient-norm clipping: the norm is known only after the last gradient, when every other
  parameter is already updated. ``max_grad_norm`` must be None; the total norm is still measured (sum of
  the per-parameter squared norms) and returned as ``grad_norm``;
* data parallelism (``process_group``): not implemented;
* skipping a non-finite step: the loss is checked BEFORE the backward (a non-finite loss updates
  nothing); a gradient that is non-finite although the loss is finite skips only ITS parameter, the
  ones updated before it stay updated (``skipped_parameters`` counts them).

Where the memory goes (and why the step compiles per block): when forward + loss are compiled as one
graph, AOTAutograd's backward is one autograd node that returns every gradient at once, so every
gradient is alive together before the first hook runs. Here the decoder blocks are compiled one by one
(each block's backward returns only that block's gradients) and the embeddings, final norm and heads
stay eager, so the text head's gradient is freed before the embedding's is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from higgs_tune.loss import LossOutput, global_target_counts
from higgs_tune.training.step import TrainStep


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

    @torch.no_grad()
    def step_parameter(self, param: torch.Tensor) -> None:
        """Update ``param`` with its optimizer from its ``.grad`` (current hyperparameters of the group),
        then free the gradient."""
        optimizer = self.optimizers[param]
        own = optimizer.param_groups[0]
        for key, value in self.param_groups[0].items():
            if key != "params":
                own[key] = value
        optimizer.step()
        param.grad = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Update every parameter that has a gradient, one by one, freeing each gradient.

        The in-backward step never calls this (its hooks call :meth:`step_parameter`); it serves an
        ordinary loop (backward, then ``step``) and torch.distributed.checkpoint, which initialises empty
        optimizer state by stepping once with zero gradients and a zero LR."""
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


class OptimizerInBackwardTrainStep(TrainStep):
    """One optimizer step = one micro-batch: forward, loss, and a backward that updates each parameter
    as soon as its gradient is complete (see the module docstring for what this mode refuses and why).

    Args (beyond :class:`TrainStep`):
        optimizer: an :class:`OptimizerInBackward` over every trainable parameter
            (``build_optimizer(..., in_backward=True)``).
        max_grad_norm: must be None (no global-norm clipping in backward); the norm is still returned.
        process_group: must be None.
        compile_blocks: compile each decoder layer (``layer.compile(fullgraph=True)``, in place: evaluation
            and generation run the compiled layers too). The embeddings, final norm and heads stay eager
            so that their large gradients are produced (and freed) one at a time.
        compile_loss: compile the loss (``fullgraph=True``); it holds no parameters.
        backend: ``torch.compile`` backend.

    Metrics: as :class:`TrainStep`; with ``skip_nonfinite`` also ``skipped_parameters`` (parameters whose
    non-finite gradient was not applied; all of them when the loss is non-finite, then ``grad_norm`` is
    NaN since no backward ran) and ``update_skipped`` (1 when at least one parameter was not updated).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        max_grad_norm: float | None = None,
        process_group: dist.ProcessGroup | None = None,
        compile_blocks: bool = True,
        compile_loss: bool = True,
        backend: str | Callable = "inductor",
        **common: Any,
    ) -> None:
        super().__init__(model, loss_fn, optimizer, lr_scheduler, max_grad_norm, process_group, **common)
        if not isinstance(optimizer, OptimizerInBackward):
            raise TypeError(
                f"step mode optimizer_in_backward needs an OptimizerInBackward (build_optimizer(..., "
                f"in_backward=True)), got {type(optimizer).__name__}"
            )
        if max_grad_norm is not None:
            raise ValueError(
                f"optimizer_in_backward cannot clip the global gradient norm (max_grad_norm={max_grad_norm}): "
                "each parameter is updated before the next gradient exists. Set max_grad_norm: null "
                "(the norm is still measured and logged)"
            )
        if process_group is not None:
            raise ValueError(
                "optimizer_in_backward does not support data parallelism (process_group must be None)"
            )
        missing = [
            name for name, p in model.named_parameters() if p.requires_grad and p not in optimizer.optimizers
        ]
        if missing:
            raise ValueError(
                f"trainable parameters without an optimizer in OptimizerInBackward: {missing[:5]}"
            )
        if compile_blocks:
            layers = getattr(model, "layers", None)
            if not isinstance(layers, nn.ModuleList):
                raise ValueError(
                    f"compile_blocks=True needs model.layers (a ModuleList); {type(model).__name__} has none"
                )
            for layer in layers:
                layer.compile(fullgraph=True, backend=backend)
        self._loss = torch.compile(loss_fn, fullgraph=True, backend=backend) if compile_loss else loss_fn
        self._in_backward = False
        self._grad_norms: dict[torch.Tensor, torch.Tensor] = {}
        self._skipped_parameters = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._update_parameter) for p in self.trainable]

    def _update_parameter(self, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: measure the gradient, update the parameter, free the gradient.
        Outside this step's backward (another backward on the same model) it leaves ``.grad`` alone."""
        if not self._in_backward:
            return
        norm = torch.nn.utils.get_total_norm([param.grad])  # as TrainStep's clipping measures it
        self._grad_norms[param] = norm
        if self.skip_nonfinite and not bool(torch.isfinite(norm)):
            self._skipped_parameters += 1
            param.grad = None
            return
        self.optimizer.step_parameter(param)

    def remove_hooks(self) -> None:
        """Unregister the gradient hooks (the model trains normally again with another step)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def forward_loss(
        self, batch: Mapping[str, torch.Tensor], num_text: torch.Tensor, num_audio: torch.Tensor
    ) -> LossOutput:
        return self._loss(self.model(batch), batch, num_text, num_audio)

    def __call__(self, micro_batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if len(micro_batches) != 1:
            raise ValueError(
                f"optimizer_in_backward updates the parameters inside each backward, so a step is one "
                f"micro-batch (gradient_accumulation_steps: 1); got {len(micro_batches)} micro-batches"
            )
        if not self._hooks:
            raise RuntimeError("this step's gradient hooks were removed (remove_hooks)")
        self.model.train()
        num_text, num_audio = global_target_counts(micro_batches, None)
        output = self.forward_loss(micro_batches[0], num_text, num_audio)
        self._grad_norms, self._skipped_parameters = {}, 0
        if self.skip_nonfinite and not bool(torch.isfinite(output.loss)):
            grad_norm = torch.tensor(float("nan"))
            self._skipped_parameters = len(self.trainable)
        else:
            self._in_backward = True
            try:
                output.loss.backward()
            finally:
                self._in_backward = False
            # The total norm as torch.nn.utils.get_total_norm: the norm of the per-parameter norms in
            # parameter order. Parameters that got no gradient were not updated (as torch optimizers
            # skip grad=None) and do not count.
            norms = [self._grad_norms[p] for p in self.trainable if p in self._grad_norms]
            grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)
        self.optimizer._opt_called = True  # for the LR scheduler's order check (optimizer.step is unused)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        metrics = {"loss": output.loss.detach(), "grad_norm": grad_norm}
        metrics.update((name, value) for name, value in output._asdict().items() if name != "loss")
        if self.skip_nonfinite:
            metrics["skipped_parameters"] = torch.tensor(float(self._skipped_parameters))
            metrics["update_skipped"] = torch.tensor(float(self._skipped_parameters > 0))
        metrics["num_tokens"] = micro_batches[0]["num_tokens"].sum()
        return metrics
