"""The training step: forward, aligned loss, backward over the micro-batches of one optimizer step,
gradient clipping, optimizer and LR update, in interchangeable modes (design.md §4).

``TrainStep`` is the eager step every other mode is checked against. It normalises the loss by the
GLOBAL number of valid targets of the step (all micro-batches, all data-parallel ranks; the counts come
from the collator as tensors), so the accumulated gradient is the gradient of the true per-token mean
(design.md §2.1, higgs_tune/loss/aligned_loss.py).

Modes (:func:`build_train_step`)::

    eager       TrainStep: plain PyTorch.
    compile     CompiledTrainStep: forward + loss compiled with ``torch.compile(fullgraph=True)``
                (inductor; AOTAutograd compiles the backward), clipping + optimizer step compiled too.
                The LR lives in a tensor (``AdamW(lr=torch.tensor(...))``), so LR schedule changes
                never recompile.
    cudagraph   CudaGraphTrainStep (CUDA only): the decoder blocks compiled, forward + loss + backward
                captured in ONE manual ``torch.cuda.graph`` over static input buffers; accumulation
                replays the graph into the same persistent ``.grad``; optimizer eager (fused AdamW) or
                captured too (``capturable=True``, tensor LR).
    functional  FunctionalTrainStep: ``torch.func.functional_call`` + ``torch.func.grad_and_value``,
                compiled with ``fullgraph=True``: parameters and batch in, gradients and metrics out.
    optimizer_in_backward
                OptimizerInBackwardTrainStep (higgs_tune/training/optimizer_in_backward.py): each
                parameter is updated inside backward and its gradient freed (one micro-batch per step,
                no global clipping); decoder blocks and loss compiled one by one.

Every mode takes the same call, ``step(micro_batches: list[dict]) -> dict[str, Tensor]``, and returns
the same metrics (see :class:`TrainStep`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from higgs_tune.loss import LossOutput, global_target_counts
from higgs_tune.training.distributed import all_reduce_gradients

STEP_MODES = ("eager", "compile", "cudagraph", "functional", "optimizer_in_backward")
CUDAGRAPH_COMPILE_SCOPES = ("forward_loss", "blocks", "none")

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


def move_batch(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    non_blocking = device.type == "cuda"
    return {name: value.to(device, non_blocking=non_blocking) for name, value in batch.items()}


# Smallest LR handed to a compiled or captured AdamW step (see :func:`clamp_tensor_lr`).
MIN_TENSOR_LR = 1e-30


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


def clip_grad_norm_(parameters: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Clip the gradients of ``parameters`` to a total L2 norm of ``max_norm`` (None: only measure);
    returns the pre-clip norm [] (a plain tensor, also when the gradients are FSDP ``DTensor`` shards:
    then it is the norm of the full gradient, reduced over the ranks)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(total_norm, DTensor):
        total_norm = total_norm.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm


class TrainStep:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches, eagerly.

    Args:
        model: returns the training output (``text_logits``, ``audio_logits``) for a batch.
        loss_fn: :class:`higgs_tune.loss.AlignedLoss`.
        optimizer, lr_scheduler: stepped once per call (the scheduler may be None).
        max_grad_norm: clip the total gradient norm to this value (None: no clipping; the norm is
            still computed and returned).
        process_group: data-parallel group whose target counts are summed (None: one process).
        reduce_gradients: sum the gradients over ``process_group`` after backward (replicated
            parameters). False when the model's parameters are FSDP shards: FSDP's reduce-scatter has
            already summed them (higgs_tune/training/parallelize.py).
        skip_nonfinite: when the step's loss or gradient norm is NaN/inf (on any rank), skip the update:
            parameters and optimizer state stay as they were, the gradients are dropped, the LR
            schedule still advances, and ``metrics["update_skipped"]`` is 1. Costs one host sync (and,
            distributed, one tiny all-reduce) per step. False: no check, no sync.

    Call with the list of micro-batches (already on the device); returns the step's metrics as
    tensors (no host synchronisation inside): ``loss`` and the summed :class:`LossOutput` fields,
    ``grad_norm``, ``num_tokens`` (non-padding positions of this rank).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        max_grad_norm: float | None = 1.0,
        process_group: dist.ProcessGroup | None = None,
        *,
        reduce_gradients: bool = True,
        skip_nonfinite: bool = False,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.max_grad_norm = max_grad_norm
        self.process_group = process_group
        self.reduce_gradients = reduce_gradients and process_group is not None
        self.skip_nonfinite = skip_nonfinite
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError(f"{type(model).__name__} has no trainable parameter (requires_grad=True)")

    # -------------------------------------------------------------------- pieces a mode may replace
    def forward_loss(
        self, batch: Mapping[str, torch.Tensor], num_text: torch.Tensor, num_audio: torch.Tensor
    ) -> LossOutput:
        """Model forward + aligned loss of one micro-batch, normalised by the global counts."""
        return self.loss_fn(self.model(batch), batch, num_text, num_audio)

    def accumulate_micro_batch(
        self, batch: Mapping[str, torch.Tensor], num_text: torch.Tensor, num_audio: torch.Tensor
    ) -> LossOutput:
        """Forward, loss and backward of one micro-batch; gradients ADD into ``.grad``.

        Returns the loss output with ``loss`` detached."""
        output = self.forward_loss(batch, num_text, num_audio)
        output.loss.backward()
        return output._replace(loss=output.loss.detach())

    def clip_and_update(self) -> torch.Tensor:
        """Clip the accumulated gradients and step the optimizer; returns the pre-clip total norm []."""
        grad_norm = clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        return grad_norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def is_finite(self, loss: torch.Tensor) -> bool:
        """Whether this step's loss (every rank's) and accumulated gradient norm are finite (host sync)."""
        bad = (~torch.isfinite(loss)).float() + (
            ~torch.isfinite(clip_grad_norm_(self.trainable, None))
        ).float()
        if self.process_group is not None:
            dist.all_reduce(bad, group=self.process_group)
        return not bool(bad.item())

    # -------------------------------------------------------------------- the step
    def __call__(self, micro_batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        self.model.train()
        num_text, num_audio = global_target_counts(micro_batches, self.process_group)
        totals: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            output = self.accumulate_micro_batch(batch, num_text, num_audio)
            for name in ("loss", *_SUMMED_METRICS):
                value = getattr(output, name)
                totals[name] = value if name not in totals else totals[name] + value
        if self.reduce_gradients:
            all_reduce_gradients(self.trainable)
        skipped = self.skip_nonfinite and not self.is_finite(totals["loss"])
        if skipped:
            grad_norm = clip_grad_norm_(self.trainable, None)
        else:
            grad_norm = self.clip_and_update()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.zero_grad()
        metrics = {"loss": totals.pop("loss"), "grad_norm": grad_norm, **totals}
        if self.skip_nonfinite:
            metrics["update_skipped"] = torch.tensor(float(skipped))
        metrics["num_tokens"] = torch.stack([b["num_tokens"].sum() for b in micro_batches]).sum()
        return metrics


class CompiledTrainStep(TrainStep):
    """:class:`TrainStep` with forward + loss compiled (``fullgraph=True``; the backward is compiled by
    AOTAutograd) and clipping + optimizer step compiled.

    The optimizer must hold its LR in a tensor (``torch.optim.AdamW(lr=torch.tensor(lr))``, see
    :func:`higgs_tune.training.optim.build_optimizer` with ``lr_as_tensor=True``): a Python float LR is a
    constant of the compiled graph and every scheduler change would recompile it.

    Args (beyond :class:`TrainStep`):
        backend: ``torch.compile`` backend (``"inductor"``; tests pass a counting backend).
        compile_optimizer: also compile clipping + ``optimizer.step`` (False: eager optimizer, any LR).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        max_grad_norm: float | None = 1.0,
        process_group: dist.ProcessGroup | None = None,
        backend: str | Callable = "inductor",
        compile_optimizer: bool = True,
        **common: Any,
    ) -> None:
        super().__init__(model, loss_fn, optimizer, lr_scheduler, max_grad_norm, process_group, **common)
        if compile_optimizer and not lr_is_tensor(optimizer):
            raise ValueError(
                f"compile mode compiles the optimizer step, so {type(optimizer).__name__} must hold its lr "
                "in a tensor (lr=torch.tensor(...), build_optimizer(..., lr_as_tensor=True)); a float lr "
                "would recompile at every LR schedule change. Or pass compile_optimizer=False."
            )
        self._compiled_forward_loss = torch.compile(super().forward_loss, fullgraph=True, backend=backend)
        # Not fullgraph: torch's Optimizer.step graph-breaks on purpose around the update (pytorch#104053,
        # so AOTAutograd sees an in-place no-grad graph); the update itself is one compiled graph.
        self._compiled_clip_and_update = (
            torch.compile(self._clip_and_update_unwrapped, backend=backend) if compile_optimizer else None
        )

    def _clip_and_update_unwrapped(self) -> torch.Tensor:
        """Clip + the optimizer class's own ``step``, bypassing the LR scheduler's wrapper of
        ``optimizer.step`` (it lives in a file dynamo refuses to trace, which would leave the update eager)."""
        grad_norm = clip_grad_norm_(self.trainable, self.max_grad_norm)
        type(self.optimizer).step(self.optimizer)
        return grad_norm

    def forward_loss(
        self, batch: Mapping[str, torch.Tensor], num_text: torch.Tensor, num_audio: torch.Tensor
    ) -> LossOutput:
        return self._compiled_forward_loss(batch, num_text, num_audio)

    def clip_and_update(self) -> torch.Tensor:
        if self._compiled_clip_and_update is None:
            return super().clip_and_update()
        clamp_tensor_lr(self.optimizer)
        grad_norm = self._compiled_clip_and_update()
        self.optimizer._opt_called = True  # what the bypassed scheduler wrapper records (its order check)
        return grad_norm


class FunctionalTrainStep(TrainStep):
    """Gradients from a pure function: ``grads, (loss, metrics) = grad_fn(params, batch, counts)``.

    ``grad_fn`` is ``torch.func.grad_and_value`` of ``functional_call(model, params) -> loss`` compiled
    with ``fullgraph=True``; parameters and batch go in, gradients and detached metrics come out. The
    step sums the gradients of the micro-batches into ``.grad`` and finishes like :class:`TrainStep`
    (all-reduce, clip, optimizer, LR).

    ``torch.func`` transforms refuse saved-tensor hooks, so the loss must not use activation
    checkpointing (AlignedLoss's text-chunk checkpoint off) and the model's layers must not be wrapped
    by ``apply_activation_checkpointing``.

    Args (beyond :class:`TrainStep`):
        backend: ``torch.compile`` backend; ``None`` runs the transform eagerly.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        max_grad_norm: float | None = 1.0,
        process_group: dist.ProcessGroup | None = None,
        backend: str | Callable | None = "inductor",
        **common: Any,
    ) -> None:
        super().__init__(model, loss_fn, optimizer, lr_scheduler, max_grad_norm, process_group, **common)
        if getattr(loss_fn, "checkpoint_text_chunks", False):
            raise ValueError(
                "functional mode: torch.func cannot differentiate through activation checkpoints; build "
                "the loss with checkpoint_text_chunks=False"
            )
        self.trainable_names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.grad_fn = make_functional_grad_fn(model, loss_fn, backend=backend)

    def accumulate_micro_batch(
        self, batch: Mapping[str, torch.Tensor], num_text: torch.Tensor, num_audio: torch.Tensor
    ) -> LossOutput:
        params = dict(zip(self.trainable_names, (p.detach() for p in self.trainable)))
        grads, output = self.grad_fn(params, dict(batch), num_text, num_audio)
        for name, param in zip(self.trainable_names, self.trainable):
            grad = grads[name]
            if param.grad is None:
                param.grad = grad
            else:
                param.grad.add_(grad)
        return output


def make_functional_grad_fn(
    model: nn.Module, loss_fn: nn.Module, backend: str | Callable | None = "inductor"
) -> Callable[..., tuple[dict[str, torch.Tensor], LossOutput]]:
    """A pure gradient function of the trainable parameters.

    Returns ``grad_fn(params, batch, num_text, num_audio) -> (grads, output)``: ``params`` maps the names
    of the trainable parameters to tensors (frozen parameters and buffers are read from ``model``),
    ``grads`` has the same keys, ``output`` is the :class:`LossOutput` with ``loss`` detached. Compiled
    with ``fullgraph=True`` unless ``backend`` is None.
    """

    def loss_of(
        params: dict[str, torch.Tensor],
        batch: dict[str, torch.Tensor],
        num_text: torch.Tensor,
        num_audio: torch.Tensor,
    ) -> tuple[torch.Tensor, LossOutput]:
        output = loss_fn(
            torch.func.functional_call(model, params, (batch,), strict=False), batch, num_text, num_audio
        )
        return output.loss, output._replace(loss=output.loss.detach())

    grad_and_value = torch.func.grad_and_value(loss_of, has_aux=True)

    def grad_fn(
        params: dict[str, torch.Tensor],
        batch: dict[str, torch.Tensor],
        num_text: torch.Tensor,
        num_audio: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], LossOutput]:
        grads, (_, output) = grad_and_value(params, batch, num_text, num_audio)
        return grads, output

    return grad_fn if backend is None else torch.compile(grad_fn, fullgraph=True, backend=backend)


class CudaGraphTrainStep(TrainStep):
    """Forward + loss + backward of one micro-batch captured in one CUDA graph (torchtitan-style).

    - Compiled before capture (inductor default mode, ``fullgraph=True``), ``compile_scope``:
      ``"forward_loss"`` (default: model + loss in one graph, as the compile mode), ``"blocks"`` (each
      decoder layer; the loss stays eager: it must not restore RNG state in backward, which CUDA graph
      capture forbids; AlignedLoss's text-chunk checkpoint uses ``preserve_rng_state=False``) or
      ``"none"``. ``mode="reduce-overhead"`` is NOT used (broken with gradient accumulation on torch
      2.13).
    - Static input buffers: each micro-batch is copied into them (``copy_``), then the graph replays.
      The global target counts live in static buffers too.
    - ``.grad`` stays allocated (``zero_grad(set_to_none=False)``): every replay ADDS into the same
      gradient memory, so gradient accumulation is N replays.
    - The loss and metrics are cloned after each replay (the next replay overwrites the outputs).
    - Warm-up (compilation, autotuning, lazy optimizer state) runs on a side stream before capture,
      which uses the same stream; its effect on parameters and optimizer state is undone (a resumed
      run's optimizer state is put back), so the first real step starts exactly where eager would.
    - The loss module is moved to the model's device (a host buffer would be a host-to-device copy
      inside the capture, which CUDA forbids).
    - Optimizer: eager (e.g. fused AdamW) by default; ``capture_optimizer=True`` captures clipping +
      ``optimizer.step`` in a second graph (AdamW/Adam with ``capturable=True`` and a tensor LR on
      the device; the LR scheduler writes the tensor in place).
    - ``capture=False`` is the eager fallback switch: the same code path (static buffers, kept grads)
      without any graph, to bisect a numerics problem.

    No data-parallel support (``process_group`` must be None): gradient all-reduce would have to be
    captured or run between replays; not implemented here.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        max_grad_norm: float | None = 1.0,
        process_group: dist.ProcessGroup | None = None,
        capture: bool = True,
        capture_optimizer: bool = False,
        compile_scope: str = "forward_loss",
        warmup_iterations: int = 3,
        **common: Any,
    ) -> None:
        super().__init__(model, loss_fn, optimizer, lr_scheduler, max_grad_norm, process_group, **common)
        device = self.trainable[0].device
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(
                f"cudagraph mode needs the model on a CUDA device, its parameters are on {device}; "
                "use mode=compile (or eager) on CPU"
            )
        if process_group is not None:
            raise ValueError("cudagraph mode does not support data parallelism (process_group must be None)")
        if capture_optimizer:
            if not isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)):
                raise ValueError(
                    f"capture_optimizer=True supports torch.optim.AdamW/Adam, got {type(optimizer).__name__}"
                )
            for i, group in enumerate(optimizer.param_groups):
                if not group["capturable"]:
                    raise ValueError(f"capture_optimizer=True: param group {i} needs capturable=True")
                if not torch.is_tensor(group["lr"]) or group["lr"].device != device:
                    raise ValueError(
                        f"capture_optimizer=True: param group {i} needs its lr in a tensor on {device} "
                        "(build_optimizer(..., lr_as_tensor=True, capturable=True))"
                    )
        loss_fn.to(device)
        self.device = device
        self.capture = capture
        self.capture_optimizer = capture_optimizer and capture
        self.warmup_iterations = warmup_iterations
        if compile_scope not in CUDAGRAPH_COMPILE_SCOPES:
            raise ValueError(f"compile_scope {compile_scope!r} is not one of {CUDAGRAPH_COMPILE_SCOPES}")
        self._compiled_forward_loss = None
        if compile_scope == "forward_loss":
            self._compiled_forward_loss = torch.compile(super().forward_loss, fullgraph=True)
        elif compile_scope == "blocks":
            for layer in getattr(model, "layers", []):
                layer.compile(fullgraph=True)
        self._static_batch: dict[str, torch.Tensor] | None = None
        self._static_counts: tuple[torch.Tensor, torch.Tensor] | None = None
        self._static_output: LossOutput | None = None
        self._step_graph: torch.cuda.CUDAGraph | None = None
        self._optimizer_graph: torch.cuda.CUDAGraph | None = None
        self._static_grad_norm: torch.Tensor | None = None

    # ------------------------------------------------------------------ capture
    def _allocate(self, batch: Mapping[str, torch.Tensor], num_text: torch.Tensor, num_audio: torch.Tensor):
        self._static_batch = {
            name: torch.empty_like(value, device=self.device) for name, value in batch.items()
        }
        self._static_counts = (
            torch.empty_like(num_text, device=self.device),
            torch.empty_like(num_audio, device=self.device),
        )
        for param in self.trainable:
            param.grad = torch.zeros_like(param)

    def _load(self, batch: Mapping[str, torch.Tensor], num_text: torch.Tensor, num_audio: torch.Tensor):
        assert self._static_batch is not None and self._static_counts is not None
        if batch.keys() != self._static_batch.keys():
            raise ValueError(
                f"batch fields {sorted(batch)} differ from the captured ones {sorted(self._static_batch)}"
            )
        for name, value in batch.items():
            static = self._static_batch[name]
            if value.shape != static.shape or value.dtype != static.dtype:
                raise ValueError(
                    f"batch field {name!r} is {tuple(value.shape)} {value.dtype}, the captured graph expects "
                    f"{tuple(static.shape)} {static.dtype} (static shapes: fix seq_len, batch_size, capacities)"
                )
            static.copy_(value, non_blocking=True)
        self._static_counts[0].copy_(num_text, non_blocking=True)
        self._static_counts[1].copy_(num_audio, non_blocking=True)

    def forward_loss(
        self, batch: Mapping[str, torch.Tensor], num_text: torch.Tensor, num_audio: torch.Tensor
    ) -> LossOutput:
        if self._compiled_forward_loss is None:
            return super().forward_loss(batch, num_text, num_audio)
        return self._compiled_forward_loss(batch, num_text, num_audio)

    def _forward_backward_static(self) -> LossOutput:
        assert self._static_batch is not None and self._static_counts is not None
        output = self.forward_loss(self._static_batch, *self._static_counts)
        output.loss.backward()
        return output._replace(loss=output.loss.detach())

    def _clip_and_update_static(self) -> torch.Tensor:
        return super().clip_and_update()

    def _warm_up_and_capture(self) -> None:
        # Warm-up without the optimizer only adds into .grad (zeroed below). With it, one optimizer step
        # runs: parameters and optimizer state (a resumed run's, or none yet) are snapshot to host
        # memory first and put back after, so the first real step starts where eager would.
        snapshot = self._snapshot_on_host() if self.capture_optimizer else None
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            for _ in range(self.warmup_iterations):
                self._forward_backward_static()
            if self.capture_optimizer:
                clamp_tensor_lr(self.optimizer)
                self._clip_and_update_static()  # creates the optimizer state (lazily) outside capture
        torch.cuda.current_stream().wait_stream(side_stream)
        if snapshot is not None:
            self._restore(*snapshot)
        self.optimizer.zero_grad(set_to_none=False)
        torch.cuda.synchronize()

        # Captured on the warm-up stream: its per-stream set-up (e.g. cuBLAS workspaces) is done.
        self._step_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._step_graph, stream=side_stream, capture_error_mode="thread_local"):
            self._static_output = self._forward_backward_static()
        if self.capture_optimizer:
            self._optimizer_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(
                self._optimizer_graph, stream=side_stream, capture_error_mode="thread_local"
            ):
                self._static_grad_norm = self._clip_and_update_static()
        # Capturing does not run the kernels: the gradients are still zero, nothing has been applied.

    @torch.no_grad()
    def _snapshot_on_host(self) -> tuple[list[torch.Tensor], dict[tuple[int, str], torch.Tensor]]:
        """Copies, in host memory, of the trainable parameters and of the optimizer state that exists."""
        params = [p.detach().to("cpu", copy=True) for p in self.trainable]
        state = {
            (id(param), key): value.to("cpu", copy=True)
            for param, param_state in self.optimizer.state.items()
            for key, value in param_state.items()
            if torch.is_tensor(value)
        }
        return params, state

    @torch.no_grad()
    def _restore(self, params: list[torch.Tensor], state: dict[tuple[int, str], torch.Tensor]) -> None:
        """Undo the warm-up's optimizer step in place (same storage: the captured optimizer graph reads
        it): parameters and pre-existing state copied back; state the warm-up created is zeroed, which
        is AdamW's fresh state (step 0, zero moments)."""
        for param, before in zip(self.trainable, params):
            param.copy_(before)
        for param, param_state in self.optimizer.state.items():
            for key, value in param_state.items():
                if not torch.is_tensor(value):
                    continue
                before = state.get((id(param), key))
                if before is None:
                    value.zero_()
                else:
                    value.copy_(before)

    # ------------------------------------------------------------------ the step
    def accumulate_micro_batch(
        self, batch: Mapping[str, torch.Tensor], num_text: torch.Tensor, num_audio: torch.Tensor
    ) -> LossOutput:
        if self._static_batch is None:
            self._allocate(batch, num_text, num_audio)
            self._load(batch, num_text, num_audio)
            if self.capture:
                self._warm_up_and_capture()
        else:
            self._load(batch, num_text, num_audio)
        if not self.capture:
            return _clone_output(self._forward_backward_static())
        assert self._step_graph is not None and self._static_output is not None
        self._step_graph.replay()
        return _clone_output(self._static_output)

    def clip_and_update(self) -> torch.Tensor:
        if self._optimizer_graph is None:
            return super().clip_and_update()
        assert self._static_grad_norm is not None
        clamp_tensor_lr(self.optimizer)
        self._optimizer_graph.replay()
        self.optimizer._opt_called = True  # optimizer.step is not called: tell the LR scheduler it ran
        return self._static_grad_norm.clone()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)  # the captured graph accumulates into this memory


def _clone_output(output: LossOutput) -> LossOutput:
    return LossOutput(*(value.clone() for value in output))


def build_train_step(
    mode: str,
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_grad_norm: float | None = 1.0,
    process_group: dist.ProcessGroup | None = None,
    **mode_options: Any,
) -> TrainStep:
    """Build the training step of ``mode`` (one of :data:`STEP_MODES`).

    ``mode_options`` go to the mode's class; every mode takes :class:`TrainStep`'s ``reduce_gradients``
    and ``skip_nonfinite``; ``compile``: ``backend``, ``compile_optimizer``;
    ``functional``: ``backend``; ``cudagraph``: ``capture``, ``capture_optimizer``, ``compile_scope``,
    ``warmup_iterations``; ``optimizer_in_backward``: ``compile_blocks``, ``compile_loss``, ``backend``.
    See the classes for their requirements (tensor LR for a compiled or captured optimizer, CUDA for
    ``cudagraph``; for ``optimizer_in_backward`` (:mod:`higgs_tune.training.optimizer_in_backward`) an
    ``OptimizerInBackward`` (``build_optimizer(..., in_backward=True)``), one micro-batch per step and
    ``max_grad_norm=None``).
    """
    from higgs_tune.training.optimizer_in_backward import OptimizerInBackwardTrainStep  # imports this module

    classes: dict[str, type[TrainStep]] = {
        "eager": TrainStep,
        "compile": CompiledTrainStep,
        "cudagraph": CudaGraphTrainStep,
        "functional": FunctionalTrainStep,
        "optimizer_in_backward": OptimizerInBackwardTrainStep,
    }
    if mode not in classes:
        raise ValueError(f"train step mode {mode!r} is not one of {STEP_MODES}")
    return classes[mode](
        model, loss_fn, optimizer, lr_scheduler, max_grad_norm, process_group, **mode_options
    )
