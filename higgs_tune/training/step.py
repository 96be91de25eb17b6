"""The training step: forward, aligned loss and backward over the micro-batches of one optimizer step,
gradient clipping, optimizer and LR update (docs/architecture.md, "The step").

There is one step, :class:`TrainStep`. What differs between modes is composed into it by
:func:`build_train_step`, never subclassed:

    eager       forward + loss + backward in plain PyTorch.
    compile     forward + loss compiled as one ``torch.compile(fullgraph=True)`` graph (AOTAutograd
                compiles the backward); with ``compile_model=False`` (the model's decoder blocks were
                already compiled by :func:`higgs_tune.training.parallelize.transform_model`: FSDP runs,
                optimizer-in-backward) only the loss is compiled. ``compile_optimizer`` also compiles
                ``optimizer.step`` (tensor LR: an LR change never recompiles).
    cudagraph   (CUDA) the compiled forward + loss + backward replayed from one CUDA graph
                (:class:`higgs_tune.training.cudagraph.CudaGraphForwardBackward`); ``capture_optimizer``
                replays ``optimizer.step`` from a second graph.

An :class:`~higgs_tune.training.optimizer_in_backward.OptimizerInBackward` optimizer updates each
parameter inside the backward; the step then runs its backward inside the optimizer's context and
neither clips nor steps afterwards (one micro-batch per step, ``max_grad_norm=None``).

Normalisation: the loss of every micro-batch is divided by the GLOBAL number of valid targets of the
step (all micro-batches, all data-parallel ranks; counts from the collator), so the accumulated gradient
is the gradient of the true per-token mean (higgs_tune/loss/aligned_loss.py).

No host synchronisation inside the step: one gradient-norm pass serves the non-finite check and the
clipping; a non-finite step is skipped on the device (:mod:`higgs_tune.training.nonfinite`) and its flag
is returned as a tensor for the caller to read when it logs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from higgs_tune.loss import LossOutput, global_target_counts
from higgs_tune.training.cudagraph import CapturedOptimizerStep, CudaGraphForwardBackward
from higgs_tune.training.distributed import all_reduce_gradients
from higgs_tune.training.nonfinite import skips_on_device, step_unless
from higgs_tune.training.optimizer_in_backward import OptimizerInBackward

STEP_MODES = ("eager", "compile", "cudagraph")

# LossOutput fields summed over micro-batches (each is already normalised by the global counts).
_SUMMED_METRICS = (
    "text_loss",
    "audio_loss",
    "codebook_losses",
    "z_loss",
    "text_accuracy",
    "codebook_accuracies",
    "num_text_targets",
    "num_audio_targets",
)

# Smallest LR handed to a compiled or captured AdamW step (see :func:`clamp_tensor_lr`).
MIN_TENSOR_LR = 1e-30

ForwardLoss = Callable[[Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor], LossOutput]


def move_batch(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    non_blocking = device.type == "cuda"
    return {name: value.to(device, non_blocking=non_blocking) for name, value in batch.items()}


def lr_is_tensor(optimizer: torch.optim.Optimizer) -> bool:
    """True when every param group holds its learning rate in a tensor (compiled/captured optimizer)."""
    return all(torch.is_tensor(group["lr"]) for group in optimizer.param_groups)


@torch.no_grad()
def clamp_tensor_lr(optimizer: torch.optim.Optimizer) -> None:
    """Raise tensor LRs of exactly 0 to :data:`MIN_TENSOR_LR`, in place.

    AdamW's capturable formula (the one ``torch.compile`` and CUDA-graph capture use) divides by the
    step size ``lr / (1 - beta1^t)``: an LR of 0, which warm-up schedules produce at step 0, turns every
    parameter into NaN. An LR of 1e-30 makes an update 1e-30 times a normal one (numerically none) and
    keeps the formula finite (fp32 and bf16 share the exponent range; fp16 does not and is not supported).
    """
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].clamp_(min=MIN_TENSOR_LR)


def total_grad_norm(parameters: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients of ``parameters`` [] (a plain tensor, also for FSDP ``DTensor`` shards:
    then the norm of the full gradient, reduced over the ranks)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class TrainStep:
    """One optimizer step over the micro-batches it is called with.

    Args:
        model, loss_fn: ``loss_fn(model(batch), batch, num_text, num_audio)`` is the aligned loss.
        optimizer, lr_scheduler: stepped once per call (the scheduler may be None).
        forward_loss: one micro-batch's ``(batch, num_text, num_audio) -> LossOutput`` (eager or
            compiled); None: ``loss_fn(model(batch), ...)``.
        forward_backward: replaces ``backward_of(forward_loss)``: one micro-batch's forward + loss +
            backward (gradients ADD into ``.grad``), returning the output with ``loss`` detached (the
            CUDA-graph wrapper). Unused with an optimizer in backward.
        optimizer_step: replaces ``optimizer.step`` (compiled or captured); None: ``optimizer.step``.
        max_grad_norm: clip the total gradient norm to this value (None: no clipping; the norm is
            still computed and returned).
        process_group: data-parallel group whose target counts (and non-finite flags) are summed.
        reduce_gradients: sum the gradients over ``process_group`` after backward (replicated
            parameters). False when the parameters are FSDP shards: FSDP's reduce-scatter has summed them.
        skip_nonfinite: when the loss or the gradient norm is NaN/inf (on any rank), skip the update:
            parameters and optimizer state stay as they were, the LR schedule still advances, and
            ``metrics["update_skipped"]`` is 1. Decided on the device (:mod:`higgs_tune.training.nonfinite`).
        keep_grads: zero ``.grad`` in place instead of freeing it (a captured graph writes into it).

    Call with the list of micro-batches (already on the device); returns tensors, nothing read on the
    host: ``loss`` and the summed :class:`LossOutput` fields, ``grad_norm`` (pre-clip), ``num_tokens``
    (non-padding positions of this rank), ``update_skipped`` (1.0 / 0.0) and, with an
    :class:`OptimizerInBackward`, ``skipped_parameters``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        forward_loss: ForwardLoss | None = None,
        forward_backward: Callable[..., LossOutput] | None = None,
        optimizer_step: Callable[[], None] | None = None,
        max_grad_norm: float | None = 1.0,
        process_group: dist.ProcessGroup | None = None,
        reduce_gradients: bool = True,
        skip_nonfinite: bool = False,
        keep_grads: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.forward_loss = forward_loss or eager_forward_loss(model, loss_fn)
        self.forward_backward = forward_backward or backward_of(self.forward_loss)
        self.optimizer_step = optimizer_step or optimizer.step
        self.max_grad_norm = max_grad_norm
        self.process_group = process_group
        self.reduce_gradients = reduce_gradients and process_group is not None
        self.skip_nonfinite = skip_nonfinite
        self.keep_grads = keep_grads
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError(f"{type(model).__name__} has no trainable parameter (requires_grad=True)")
        self.in_backward = isinstance(optimizer, OptimizerInBackward)
        self._backward_pass = None  # the last in-backward pass (BackwardPass)
        if self.in_backward:
            if max_grad_norm is not None:
                raise ValueError(
                    f"an optimizer in backward cannot clip the global gradient norm (max_grad_norm="
                    f"{max_grad_norm}): each parameter is updated before the next gradient exists. Set "
                    "max_grad_norm: null (the norm is still measured and logged)"
                )
            if process_group is not None:
                raise ValueError("an optimizer in backward does not support data parallelism")
            missing = [
                n for n, p in model.named_parameters() if p.requires_grad and p not in optimizer.optimizers
            ]
            if missing:
                raise ValueError(
                    f"trainable parameters without an optimizer in OptimizerInBackward: {missing[:5]}"
                )

    def describe_nonfinite_policy(self) -> str:
        """One line for the log: how a non-finite step is skipped and whether that reads the host."""
        if not self.skip_nonfinite:
            return "non-finite steps are not checked"
        optimizer = next(iter(self.optimizer.optimizers.values())) if self.in_backward else self.optimizer
        if skips_on_device(optimizer):
            return "a non-finite step is skipped on the device (fused AdamW found_inf; no host read)"
        per = "per parameter" if self.in_backward else "per step"
        return (
            f"a non-finite step is skipped after reading its flag on the host, one read {per} "
            f"({type(optimizer).__name__} cannot skip from a device flag; fused torch AdamW can)"
        )

    def __call__(self, micro_batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if self.in_backward and len(micro_batches) != 1:
            raise ValueError(
                f"an optimizer in backward updates the parameters inside each backward, so a step is one "
                f"micro-batch (gradient_accumulation_steps: 1); got {len(micro_batches)} micro-batches"
            )
        self.model.train()
        num_text, num_audio = global_target_counts(micro_batches, self.process_group)
        totals: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            if self.in_backward:
                output = self._backward_updating(batch, num_text, num_audio)
            else:
                output = self.forward_backward(batch, num_text, num_audio)
            for name in ("loss", *_SUMMED_METRICS):
                value = getattr(output, name)
                totals[name] = value if name not in totals else totals[name] + value
        metrics: dict[str, torch.Tensor] = {"loss": totals.pop("loss")}
        if self.in_backward:
            record = self._backward_pass
            metrics["grad_norm"] = record.total_grad_norm(self.trainable)
            metrics["skipped_parameters"] = record.skipped_parameters.float()
            skip = record.skipped_parameters > 0
            self.optimizer.step()  # every gradient was applied and freed in backward: a no-op
        else:
            if self.reduce_gradients:
                all_reduce_gradients(self.trainable)
            grad_norm = total_grad_norm(self.trainable)  # the one norm pass: non-finite check + clipping
            skip = self._nonfinite(metrics["loss"], grad_norm) if self.skip_nonfinite else None
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self.trainable, self.max_grad_norm, grad_norm)
            step_unless(self.optimizer, skip, self.optimizer_step)
            metrics["grad_norm"] = grad_norm
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=not self.keep_grads)
        metrics.update(totals)
        metrics["update_skipped"] = skip.float() if skip is not None else torch.zeros(())
        metrics["num_tokens"] = torch.stack([b["num_tokens"].sum() for b in micro_batches]).sum()
        return metrics

    def _backward_updating(self, batch, num_text, num_audio) -> LossOutput:
        """Forward + loss, then the backward inside the optimizer-in-backward context."""
        output = self.forward_loss(batch, num_text, num_audio)
        skip = ~torch.isfinite(output.loss) if self.skip_nonfinite else None
        with self.optimizer.updating_in_backward(skip) as self._backward_pass:
            output.loss.backward()
        return output._replace(loss=output.loss.detach())

    def _nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """[] bool on the device: this step's loss or gradient norm is non-finite on some rank."""
        bad = (~torch.isfinite(loss) | ~torch.isfinite(grad_norm)).float()
        if self.process_group is not None:
            dist.all_reduce(bad, group=self.process_group)
        return bad > 0


def eager_forward_loss(model: nn.Module, loss_fn: nn.Module, text_logits: bool = True) -> ForwardLoss:
    """``(batch, num_text, num_audio) -> LossOutput``: model forward + aligned loss of one micro-batch
    (``text_logits=False``: the model skips its text head, for a loss with ``text_weight`` 0)."""
    if not text_logits and getattr(loss_fn, "text_weight", None) != 0:
        raise ValueError("the text head can be skipped only for a loss with text_weight 0")
    forward_kwargs = {} if text_logits else {"text_logits": False}

    def forward_loss(batch, num_text, num_audio) -> LossOutput:
        return loss_fn(model(batch, **forward_kwargs), batch, num_text, num_audio)

    return forward_loss


def backward_of(forward_loss: ForwardLoss) -> Callable[..., LossOutput]:
    """``forward_loss`` followed by ``loss.backward()``; returns the output with ``loss`` detached."""

    def forward_backward(batch, num_text, num_audio) -> LossOutput:
        output = forward_loss(batch, num_text, num_audio)
        output.loss.backward()
        return output._replace(loss=output.loss.detach())

    return forward_backward


def build_train_step(
    mode: str,
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_grad_norm: float | None = 1.0,
    process_group: dist.ProcessGroup | None = None,
    *,
    text_logits: bool = True,
    compile_model: bool = True,
    compile_optimizer: bool = False,
    backend: str | Callable = "inductor",
    capture: bool = True,
    capture_optimizer: bool = False,
    warmup_iterations: int = 3,
    **step_args: Any,
) -> TrainStep:
    """The :class:`TrainStep` of ``mode`` (one of :data:`STEP_MODES`, see the module docstring).

    Args:
        text_logits: compute the model's text head (False: only with a loss of ``text_weight`` 0; the
            caller freezes the head, higgs_tune/models/higgs_audio/lora.py ``freeze_text_only``).
        compile_model: compile and cudagraph modes: compile model + loss as one graph (False: the loss
            alone; the model runs as it is, e.g. with blocks compiled by the model transform).
        compile_optimizer: compile mode: also compile ``optimizer.step`` (needs a tensor LR).
        backend: ``torch.compile`` backend (tests pass a counting backend).
        capture, capture_optimizer, warmup_iterations: cudagraph mode
            (:mod:`higgs_tune.training.cudagraph`).
        step_args: :class:`TrainStep`'s ``reduce_gradients``, ``skip_nonfinite``.
    """
    if mode not in STEP_MODES:
        raise ValueError(f"train step mode {mode!r} is not one of {STEP_MODES}")
    forward_loss = eager_forward_loss(model, loss_fn, text_logits)
    if mode in ("compile", "cudagraph"):
        if compile_model:
            forward_loss = torch.compile(forward_loss, fullgraph=True, backend=backend)
        else:
            compiled_loss = torch.compile(loss_fn, fullgraph=True, backend=backend)
            forward_loss = eager_forward_loss(model, compiled_loss, text_logits)
    trainable = [p for p in model.parameters() if p.requires_grad]
    forward_backward = None
    optimizer_step = None
    if mode == "compile" and compile_optimizer:
        if not lr_is_tensor(optimizer):
            raise ValueError(
                f"compile_optimizer=True compiles the optimizer step, so {type(optimizer).__name__} must hold "
                "its lr in a tensor (lr=torch.tensor(...), build_optimizer(..., lr_as_tensor=True)); a float "
                "lr would recompile at every LR schedule change"
            )
        compiled_step = torch.compile(optimizer.step, backend=backend)

        def optimizer_step() -> None:
            clamp_tensor_lr(optimizer)
            compiled_step()

    if mode == "cudagraph":
        if process_group is not None:
            raise ValueError("cudagraph mode does not support data parallelism (process_group must be None)")
        if isinstance(optimizer, OptimizerInBackward):
            raise ValueError("cudagraph mode cannot capture an optimizer in backward; use mode compile")
        forward_backward = CudaGraphForwardBackward(
            backward_of(forward_loss), trainable, capture, warmup_iterations
        )
        loss_fn.to(forward_backward.device)
        if capture_optimizer and capture:
            captured = CapturedOptimizerStep(optimizer, trainable)

            def optimizer_step() -> None:
                clamp_tensor_lr(optimizer)
                captured()

    return TrainStep(
        model,
        loss_fn,
        optimizer,
        lr_scheduler,
        forward_loss=forward_loss,
        forward_backward=forward_backward,
        optimizer_step=optimizer_step,
        max_grad_norm=max_grad_norm,
        process_group=process_group,
        keep_grads=mode == "cudagraph",
        **step_args,
    )
