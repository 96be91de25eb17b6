"""Optimizers from YAML, with what the compiled/captured steps and bf16 training need.

YAML (``optimizer._component_: higgs_tune.training.optim.build_optimizer``)::

    optimizer:
      _component_: higgs_tune.training.optim.build_optimizer
      name: adamw              # adamw | adamw8bit (torchao, 8-bit moments)
      lr: 2.0e-5
      betas: [0.9, 0.95]
      weight_decay: 0.0
      implementation: null     # adamw only: fused | foreach | for_loop | null (fused; torch's choice when capturable)
      lr_as_tensor: true       # required by compile / cudagraph(capture_optimizer) modes
      capturable: false        # cudagraph with capture_optimizer=true
      master_weights: false    # fp32 master copy of bf16/fp16 parameters
      moment_dtype: fp32       # adamw only: fp32 | bf16 (AdamWBF16Moments: half the state memory)
      in_backward: false       # one optimizer per parameter, stepped inside backward
                               # (higgs_tune/training/optimizer_in_backward.py)

Mixed precision (bf16 parameters and activations): ``torch.optim.AdamW`` keeps its moments in the
parameter dtype, so for bf16 parameters pass ``master_weights: true``: the optimizer then updates fp32
copies (fp32 moments, fp32 update) and writes them back rounded to bf16 after every step; the loss is
computed in fp32 by :class:`higgs_tune.loss.AlignedLoss` either way.

Memory for full fine-tuning with fp32 parameters (per parameter: 4 bytes of weight, 4 of gradient, the
moments): ``moment_dtype: bf16`` stores AdamW's two moments in bfloat16 (4 bytes instead of 8, update
maths in fp32, stochastic rounding so that small updates of the moments are not lost, see
:class:`AdamWBF16Moments`); ``in_backward: true`` frees each gradient right after its parameter's update
inside the backward pass (gradient accumulation 1, no global-norm clipping; see
:mod:`higgs_tune.training.optimizer_in_backward`). Measured in docs/benchmarks.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Any

import torch

from higgs_tune.training.optimizer_in_backward import OptimizerInBackward

OPTIMIZER_NAMES = ("adamw", "adamw8bit")
ADAMW_IMPLEMENTATIONS = ("fused", "foreach", "for_loop", None)
MOMENT_DTYPES = ("fp32", "bf16")


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
    moment_dtype: str = "fp32",
    in_backward: bool = False,
    rounding_seed: int = 0,
) -> torch.optim.Optimizer:
    """Build the optimizer over ``params`` (the trainable parameters).

    Args:
        name: ``"adamw"`` (``torch.optim.AdamW``) or ``"adamw8bit"`` (``torchao.optim.AdamW8bit``:
            block-quantised 8-bit moments, about a quarter of AdamW's state memory for fp32 moments).
        implementation: AdamW kernel: ``"fused"``, ``"foreach"``, ``"for_loop"`` or None: fused (one
            kernel, and the one that skips a non-finite step on the device, see
            :mod:`higgs_tune.training.nonfinite`), torch's choice when ``capturable``.
        lr_as_tensor: hold the LR in a 0-dim tensor (on the parameters' device when ``capturable``) so a
            compiled or captured optimizer step reads it instead of baking it in.
        capturable: AdamW ``capturable=True`` (state on the device, no host syncs: CUDA-graph capture).
        master_weights: wrap in :class:`MasterWeightsOptimizer` (fp32 copies of low-precision params).
        moment_dtype: ``"fp32"`` (torch AdamW: moments in the parameter dtype) or ``"bf16"``
            (:class:`AdamWBF16Moments`: bf16 moments, fp32 update maths; adamw only, no
            ``implementation``/``capturable``).
        in_backward: return an :class:`~higgs_tune.training.optimizer_in_backward.OptimizerInBackward`:
            one optimizer (built by this function with the same arguments) per parameter, stepped inside
            the training step's backward pass.
        rounding_seed: :class:`AdamWBF16Moments` only: varies its stochastic-rounding pattern.
    """
    params = [p for p in params]
    if not params:
        raise ValueError("build_optimizer got no parameters to optimize")
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"optimizer name {name!r} is not one of {OPTIMIZER_NAMES}")
    if implementation not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(f"implementation {implementation!r} is not one of {ADAMW_IMPLEMENTATIONS}")
    if moment_dtype not in MOMENT_DTYPES:
        raise ValueError(f"moment_dtype {moment_dtype!r} is not one of {MOMENT_DTYPES}")
    # The optimizer that in_backward / master_weights wrap: this function with the same settings.
    build_inner = functools.partial(
        build_optimizer,
        name=name,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        implementation=implementation,
        lr_as_tensor=lr_as_tensor,
        capturable=capturable,
        moment_dtype=moment_dtype,
    )
    if in_backward:
        if master_weights:
            raise ValueError("in_backward does not support master_weights")

        def one_parameter_optimizer(param: torch.nn.Parameter, index: int) -> torch.optim.Optimizer:
            # bf16 moments: each parameter's own rounding pattern, as one optimizer over all of them
            return build_inner([param], rounding_seed=rounding_seed + index)

        return OptimizerInBackward(params, one_parameter_optimizer)
    if master_weights:
        masters = [p.detach().float().clone().requires_grad_(True) for p in params]
        inner = build_inner(masters, rounding_seed=rounding_seed)
        return MasterWeightsOptimizer(params, masters, inner)

    lr_value: float | torch.Tensor = float(lr)
    if lr_as_tensor:
        device = params[0].device if capturable else torch.device("cpu")
        lr_value = torch.tensor(float(lr), dtype=torch.float32, device=device)
    if name == "adamw8bit":
        if implementation is not None or capturable or moment_dtype != "fp32":
            raise ValueError("adamw8bit takes neither `implementation`, `capturable` nor `moment_dtype`")
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=lr_value, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    if moment_dtype == "bf16":
        if implementation is not None or capturable:
            raise ValueError("moment_dtype bf16 takes neither `implementation` nor `capturable`")
        return AdamWBF16Moments(
            params,
            lr=lr_value,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            rounding_seed=rounding_seed,
        )
    kernel: dict[str, Any] = {}
    if implementation is None and not capturable:
        implementation = "fused"
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


# ------------------------------------------------------------------ AdamW with bfloat16 moments
_BF16_MOMENTS = ("exp_avg", "exp_avg_sq")
_MASK64 = (1 << 64) - 1


def round_to_bf16_stochastically(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``x`` to bfloat16 stochastically: ``E[result] = x`` over uniform ``noise``.

    A bf16 number is an fp32 number whose low 16 bits are zero. Adding ``noise`` (uniform in
    [0, 2^16)) to the fp32 bit pattern (as int32) and clearing the low 16 bits rounds ``|x|`` up to the
    next bf16 with probability (low 16 bits of x) / 2^16 and down otherwise (the sign bit is untouched,
    so this works on the magnitude of negative numbers alike). Finite values cannot overflow the int32
    (the largest finite pattern plus 2^16 stays below 2^31; it rounds up to inf at most), +-inf stays
    +-inf and so does the default quiet NaN that arithmetic produces (mantissa 0x400000). Only a NaN
    with an unusual payload (mantissa bits 16-22 all ones) could carry into the exponent.
    Round-to-nearest would instead drop every change smaller than half a bf16 step (2^-9 relative): an
    AdamW second moment with beta2 = 0.999 changes by 0.1% per step and would stop following the
    gradients.

    Args:
        x: [...] float32.
        noise: [...] int32 in [0, 2^16) (broadcastable to ``x``).

    Returns:
        [...] bfloat16 (exactly representable, no further rounding).
    """
    # (A NaN guard with torch.where doubled the compiled update's time on CPU.)
    return ((x.view(torch.int32) + noise) & -(1 << 16)).view(torch.float32).to(torch.bfloat16)


# Largest tensor the update handles (element indices are int32).
MAX_BF16_MOMENT_NUMEL = 2**31 - 1


def adamw_bf16_moments_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    scalars: torch.Tensor,
    noise_offsets: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """One AdamW update of one flat tensor, in place: torch.optim.AdamW's formula in fp32, the new
    moments stored in bf16 with stochastic rounding (:func:`round_to_bf16_stochastically`).

    The parameter update uses the fp32 moments of this step (before rounding). The rounding noise of
    element i is ``(i * c + offset) mod 2^16`` (one constant c per moment) with fresh uniform offsets
    every step: for every element it is uniform and independent across steps, so each stored moment is
    unbiased, and within a step neighbouring elements get noises spread over the whole range (their
    rounding errors average out instead of moving together).

    Args:
        param: [N] float32 or bfloat16 (N <= :data:`MAX_BF16_MOMENT_NUMEL`), updated in place.
        grad: [N], same dtype. exp_avg, exp_avg_sq: [N] bfloat16, updated in place.
        scalars: [3] float32: ``1 - lr * weight_decay``, ``lr / (1 - beta1^t)``, ``sqrt(1 - beta2^t)``.
        noise_offsets: [2] int32 in [0, 2^16): this step's offsets for exp_avg and exp_avg_sq.
        beta1, beta2, eps: AdamW's constants.
    """
    g = grad.float()
    m = exp_avg.float().lerp(g, 1 - beta1)
    v = exp_avg_sq.float() * beta2 + (1 - beta2) * g * g
    denom = v.sqrt() / scalars[2] + eps
    param.copy_(param.float() * scalars[0] - scalars[1] * (m / denom))
    # Weyl sequences: i * c mod 2^16 spreads neighbouring elements over the whole noise range (c / 2^16
    # close to 0.382 and 0.207); (i mod 2^16) * c + offset < 2^31 never overflows int32.
    index = torch.arange(param.numel(), dtype=torch.int32, device=param.device) & 0xFFFF
    exp_avg.copy_(round_to_bf16_stochastically(m, (index * 25033 + noise_offsets[0]) & 0xFFFF))
    exp_avg_sq.copy_(round_to_bf16_stochastically(v, (index * 13573 + noise_offsets[1]) & 0xFFFF))


_compiled_adamw_bf16_moments_update: Callable[..., None] | None = None


def compiled_adamw_bf16_moments_update() -> Callable[..., None]:
    """:func:`adamw_bf16_moments_update` compiled once (``dynamic=True``: one kernel for every size)."""
    global _compiled_adamw_bf16_moments_update
    if _compiled_adamw_bf16_moments_update is None:
        # cpp.simdlen 256: on the AVX-512 CPU of docs/benchmarks.md inductor's 256-bit code for this
        # kernel measured ~25% faster than its 512-bit code (bf16 loads/stores); ignored on CUDA.
        _compiled_adamw_bf16_moments_update = torch.compile(
            adamw_bf16_moments_update, dynamic=True, fullgraph=True, options={"cpp.simdlen": 256}
        )
    return _compiled_adamw_bf16_moments_update


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def rounding_noise_offsets(stream: int, step: int) -> tuple[int, int]:
    """Two offsets in [0, 2^16) for step ``step`` of parameter stream ``stream`` (a deterministic hash:
    nothing to checkpoint, a resumed run rounds exactly as an uninterrupted one)."""
    h = _splitmix64(((stream & 0xFFFFFFFF) << 32) | (step & 0xFFFFFFFF))
    return h & 0xFFFF, (h >> 16) & 0xFFFF


class AdamWBF16Moments(torch.optim.Optimizer):
    """AdamW (torch.optim.AdamW's decoupled weight decay and update) with both moments stored in
    bfloat16: 4 bytes of optimizer state per parameter instead of 8 for fp32 moments.

    Every update is computed in fp32 (:func:`adamw_bf16_moments_update`, compiled by default into one
    loop over the tensor); only the stored moments are bf16, written with stochastic rounding so that
    their expected value follows the fp32 recursion (round-to-nearest would freeze a second moment whose
    per-step change, ``1 - beta2`` of it, is below bf16 resolution). The rounding noise is a hash of
    (``rounding_seed`` + the parameter's position, step): deterministic, no RNG state to save.

    State per parameter (torch.optim.AdamW's keys): ``step`` [] fp32 (CPU), ``exp_avg`` and
    ``exp_avg_sq`` bf16 with the parameter's shape. ``load_state_dict`` keeps the moments in bf16 (torch's
    default would cast them to the parameter dtype) and accepts a torch AdamW state dict (fp32 moments
    rounded to nearest bf16).

    Args:
        params: parameters (fp32 or bf16, contiguous) or param groups.
        lr: float or 0-dim tensor (read on the host each step). betas, eps, weight_decay: as AdamW.
        rounding_seed: offsets the rounding-noise streams (parameter i uses stream ``rounding_seed + i``).
        compile_update: run the compiled update (False: the same function eagerly).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        rounding_seed: int = 0,
        compile_update: bool = True,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.rounding_seed = rounding_seed
        self._update = compiled_adamw_bf16_moments_update() if compile_update else adamw_bf16_moments_update

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("AdamWBF16Moments.step takes no closure")
        position = 0
        for group in self.param_groups:
            lr, weight_decay, eps = float(group["lr"]), group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                stream = self.rounding_seed + position
                position += 1
                if param.grad is None:
                    continue
                if param.grad.is_sparse or not param.is_contiguous() or param.numel() > MAX_BF16_MOMENT_NUMEL:
                    raise ValueError(
                        "AdamWBF16Moments needs dense gradients and contiguous parameters of at most "
                        f"{MAX_BF16_MOMENT_NUMEL} elements"
                    )
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.bfloat16)
                state["step"] += 1
                step = int(state["step"])
                scalars = torch.tensor(
                    [1 - lr * weight_decay, lr / (1 - beta1**step), (1 - beta2**step) ** 0.5],
                    dtype=torch.float32,
                    device=param.device,
                )
                offsets = torch.tensor(
                    rounding_noise_offsets(stream, step), dtype=torch.int32, device=param.device
                )
                self._update(
                    param.view(-1),
                    param.grad.reshape(-1),
                    state["exp_avg"].view(-1),
                    state["exp_avg_sq"].view(-1),
                    scalars,
                    offsets,
                    beta1,
                    beta2,
                    eps,
                )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading, except that the moments stay (or become) bf16 instead of being cast to the
        parameter dtype (no transient fp32 copy of the optimizer state)."""
        moments = {
            index: {key: state[key] for key in _BF16_MOMENTS if key in state}
            for index, state in state_dict["state"].items()
        }
        rest = {
            index: {key: value for key, value in state.items() if key not in _BF16_MOMENTS}
            for index, state in state_dict["state"].items()
        }
        super().load_state_dict({**state_dict, "state": rest})
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        for param, saved_id in zip(params, saved_ids):
            for key, value in moments.get(saved_id, {}).items():
                self.state[param][key] = value.to(device=param.device, dtype=torch.bfloat16)
