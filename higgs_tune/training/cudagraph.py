"""CUDA-graph replay of the step's forward + loss + backward (torchtitan's ``distributed/cudagraph.py``
idea, a manual ``torch.cuda.graph`` here), as a wrapper the training step composes.

:class:`CudaGraphForwardBackward` wraps a ``forward_backward(batch, num_text, num_audio) -> LossOutput``
function (compiled or not) of one micro-batch:

- Static input buffers: each micro-batch (and the global target counts) is copied into them
  (``copy_``), then the graph replays.
- ``.grad`` stays allocated (the step zeroes it with ``set_to_none=False``): every replay ADDS into the
  same gradient memory, so gradient accumulation is N replays.
- The loss and metrics are cloned after each replay (the next replay overwrites the outputs).
- Warm-up (compilation, autotuning) runs on a side stream before capture, which uses the same stream;
  it only adds into ``.grad``, which is zeroed before capture. ``mode="reduce-overhead"`` is not used
  (broken with gradient accumulation on torch 2.13).
- The loss module must live on the model's device (a host buffer would be a host-to-device copy inside
  the capture, which CUDA forbids); :func:`~higgs_tune.training.step.build_train_step` moves it.
- ``capture=False``: the same code path (static buffers, kept gradients) without a graph, to bisect a
  numerics problem.

:class:`CapturedOptimizerStep` replays ``optimizer.step()`` as a second graph (AdamW/Adam with
``capturable=True`` and a tensor LR on the device; the LR scheduler writes that tensor in place). Its
warm-up step creates the optimizer state outside the capture; parameters and optimizer state are
snapshot to host memory first and put back after, so the first real step starts exactly where eager
would (a resumed run's state included).

Single process only: a gradient all-reduce would have to be captured or run between replays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from higgs_tune.loss import LossOutput

ForwardBackward = Callable[[Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor], LossOutput]


def check_cuda(params: Sequence[torch.Tensor]) -> torch.device:
    device = params[0].device
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(
            f"cudagraph mode needs the model on a CUDA device, its parameters are on {device}; "
            "use mode=compile (or eager) on CPU"
        )
    return device


class CudaGraphForwardBackward:
    """``forward_backward`` replayed from one CUDA graph captured at the first call (see the module).

    Args:
        forward_backward: one micro-batch's forward + loss + backward (gradients add into ``.grad``);
            returns the :class:`LossOutput` with ``loss`` detached.
        params: the trainable parameters (their ``.grad`` is allocated once, zeros).
        capture: False: run ``forward_backward`` eagerly on the static buffers instead of replaying.
        warmup_iterations: untimed calls on a side stream before capture.
    """

    def __init__(
        self,
        forward_backward: ForwardBackward,
        params: Sequence[torch.Tensor],
        capture: bool = True,
        warmup_iterations: int = 3,
    ) -> None:
        self.device = check_cuda(params)
        self.forward_backward = forward_backward
        self.params = list(params)
        self.capture = capture
        self.warmup_iterations = warmup_iterations
        self.stream: torch.cuda.Stream | None = None
        self._batch: dict[str, torch.Tensor] | None = None
        self._counts: tuple[torch.Tensor, torch.Tensor] | None = None
        self._output: LossOutput | None = None
        self._graph: torch.cuda.CUDAGraph | None = None

    def _allocate(self, batch: Mapping[str, torch.Tensor], num_text: torch.Tensor, num_audio: torch.Tensor):
        self._batch = {name: torch.empty_like(value, device=self.device) for name, value in batch.items()}
        self._counts = (
            torch.empty_like(num_text, device=self.device),
            torch.empty_like(num_audio, device=self.device),
        )
        for param in self.params:
            param.grad = torch.zeros_like(param)

    def _load(self, batch: Mapping[str, torch.Tensor], num_text: torch.Tensor, num_audio: torch.Tensor):
        if batch.keys() != self._batch.keys():
            raise ValueError(
                f"batch fields {sorted(batch)} differ from the captured ones {sorted(self._batch)}"
            )
        for name, value in batch.items():
            static = self._batch[name]
            if value.shape != static.shape or value.dtype != static.dtype:
                raise ValueError(
                    f"batch field {name!r} is {tuple(value.shape)} {value.dtype}, the captured graph expects "
                    f"{tuple(static.shape)} {static.dtype} (static shapes: fix seq_len, batch_size, capacities)"
                )
            static.copy_(value, non_blocking=True)
        self._counts[0].copy_(num_text, non_blocking=True)
        self._counts[1].copy_(num_audio, non_blocking=True)

    def _run_static(self) -> LossOutput:
        return self.forward_backward(self._batch, *self._counts)

    def _warm_up_and_capture(self) -> None:
        self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for _ in range(self.warmup_iterations):
                self._run_static()
        torch.cuda.current_stream().wait_stream(self.stream)
        for param in self.params:
            param.grad.zero_()
        torch.cuda.synchronize()
        # Captured on the warm-up stream: its per-stream set-up (e.g. cuBLAS workspaces) is done.
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph, stream=self.stream, capture_error_mode="thread_local"):
            self._output = self._run_static()
        # Capturing does not run the kernels: the gradients are still zero.

    def __call__(
        self, batch: Mapping[str, torch.Tensor], num_text: torch.Tensor, num_audio: torch.Tensor
    ) -> LossOutput:
        if self._batch is None:
            self._allocate(batch, num_text, num_audio)
            self._load(batch, num_text, num_audio)
            if self.capture:
                self._warm_up_and_capture()
        else:
            self._load(batch, num_text, num_audio)
        if not self.capture:
            return _clone(self._run_static())
        self._graph.replay()
        return _clone(self._output)


def _clone(output: LossOutput) -> LossOutput:
    return LossOutput(*(value.clone() for value in output))


class CapturedOptimizerStep:
    """``optimizer.step()`` replayed from a CUDA graph captured at the first call (see the module).

    Args:
        optimizer: torch AdamW/Adam, every group ``capturable=True`` with its LR in a tensor on the
            parameters' device.
        params: the trainable parameters (snapshot around the warm-up step).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> None:
        self.device = check_cuda(params)
        if not isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)):
            raise ValueError(
                f"capture_optimizer=True supports torch.optim.AdamW/Adam, got {type(optimizer).__name__}"
            )
        for i, group in enumerate(optimizer.param_groups):
            if not group["capturable"]:
                raise ValueError(f"capture_optimizer=True: param group {i} needs capturable=True")
            if not torch.is_tensor(group["lr"]) or group["lr"].device != self.device:
                raise ValueError(
                    f"capture_optimizer=True: param group {i} needs its lr in a tensor on {self.device} "
                    "(build_optimizer(..., lr_as_tensor=True, capturable=True))"
                )
        self.optimizer = optimizer
        self.params = list(params)
        self._graph: torch.cuda.CUDAGraph | None = None

    def __call__(self) -> None:
        if self._graph is None:
            self._warm_up_and_capture()
        self._graph.replay()

    def _warm_up_and_capture(self) -> None:
        snapshot = self._snapshot_on_host()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.optimizer.step()  # creates the optimizer state (lazily) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        self._restore(*snapshot)
        torch.cuda.synchronize()
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph, stream=stream, capture_error_mode="thread_local"):
            self.optimizer.step()

    @torch.no_grad()
    def _snapshot_on_host(self) -> tuple[list[torch.Tensor], dict[tuple[int, str], torch.Tensor]]:
        """Copies, in host memory, of the parameters and of the optimizer state that exists."""
        params = [p.detach().to("cpu", copy=True) for p in self.params]
        state = {
            (id(param), key): value.to("cpu", copy=True)
            for param, param_state in self.optimizer.state.items()
            for key, value in param_state.items()
            if torch.is_tensor(value)
        }
        return params, state

    @torch.no_grad()
    def _restore(self, params: list[torch.Tensor], state: dict[tuple[int, str], torch.Tensor]) -> None:
        """Undo the warm-up step in place (same storage: the captured graph reads it); state the warm-up
        created is zeroed, which is AdamW's fresh state (step 0, zero moments)."""
        for param, before in zip(self.params, params):
            param.copy_(before)
        for param, param_state in self.optimizer.state.items():
            for key, value in param_state.items():
                if torch.is_tensor(value):
                    before = state.get((id(param), key))
                    value.copy_(before) if before is not None else value.zero_()
