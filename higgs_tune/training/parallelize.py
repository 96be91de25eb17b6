"""The model transform, in torchtitan's order: (LoRA / freezing, done by the caller) -> activation
checkpointing -> per-block compile -> FSDP2 (``fully_shard`` per decoder layer and on the root, for runs
launched by torchrun). :func:`transform_model` is the only place the MODEL is compiled; the training step
may compile its own forward + loss function (higgs_tune/training/step.py), which leaves the model, and
so evaluation and generation, as this transform made it.

The model code knows nothing of this: the transform takes a built (and, if asked, LoRA-wrapped, frozen)
:class:`~higgs_tune.models.higgs_audio.model.HiggsAudioModel` and changes it in place.

Gradient reduction: FSDP2 reduce-scatters every micro-batch's gradients in backward. Our loss is already
divided by the GLOBAL number of targets (all micro-batches, all ranks; see higgs_tune/loss), so the
gradient of the global mean is the SUM over ranks: the default division by the world size is switched
off (``set_gradient_divide_factor(1.0)`` with plain SUM collectives), and the training step must not
all-reduce again.

Mixed precision: the sharded parameters, the gradients and the optimizer state stay in the dtype the
model was built in (``dtype`` in the config); ``param_dtype`` (e.g. bf16 with an fp32 model: fp32 master
weights, bf16 compute) is what the all-gathered parameters are cast to for forward and backward, and
``reduce_dtype`` the dtype of the gradient reduce-scatter.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from higgs_tune.training.activation_checkpointing import apply_activation_checkpointing

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class FSDPOptions:
    """The ``fsdp`` node of the config.

    Args:
        param_dtype: dtype of the all-gathered parameters for compute (``fp32`` | ``bf16``; None: the
            model's dtype).
        reduce_dtype: dtype of the gradient reduce-scatter (None: ``param_dtype``).
        reshard_after_forward: free the gathered parameters of a layer after its forward (ZeRO-3; False:
            keep them until backward, ZeRO-2-like, more memory and less communication).
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory (CUDA runs;
            the optimizer step then runs on the CPU).
    """

    param_dtype: str | None = None
    reduce_dtype: str | None = None
    reshard_after_forward: bool = True
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"fsdp.{name} must be one of {sorted(DTYPES)} or null, got {value!r}")

    def mixed_precision_policy(self) -> MixedPrecisionPolicy:
        param_dtype = DTYPES[self.param_dtype] if self.param_dtype else None
        reduce_dtype = DTYPES[self.reduce_dtype] if self.reduce_dtype else param_dtype
        return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def compile_decoder_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile each decoder layer's ``forward`` (``fullgraph=True``), leaving the module in place.

    The compiled function replaces the layer's ``forward`` attribute, so the module's hooks (FSDP's
    all-gather / reshard, activation checkpointing's wrapper) run outside the compiled graph and state
    dict keys do not change. Returns the number of layers compiled.
    """
    layers = _layers(model)
    for layer in layers:
        layer.forward = torch.compile(layer.forward, fullgraph=True, backend=backend)
    return len(layers)


def transform_model(
    model: nn.Module,
    *,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    fsdp: FSDPOptions | None = None,
) -> nn.Module:
    """Apply, in this order, per-layer activation checkpointing, per-layer compile and FSDP2 sharding
    (``fsdp``: None leaves the model unsharded); returns ``model``, changed in place."""
    apply_activation_checkpointing(model, enabled=activation_checkpointing)
    if compile_blocks:
        compile_decoder_blocks(model)
    if fsdp is not None:
        parallelize(model, fsdp)
    return model


def parallelize(
    model: nn.Module,
    options: FSDPOptions,
    *,
    mesh: torch.distributed.device_mesh.DeviceMesh | None = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2 over ``mesh`` (None: the default process group, 1-D), in place.

    Args:
        model: built on its device, with LoRA / freezing / activation checkpointing / per-block compile
            already applied (a whole-model ``fullgraph`` compile cannot trace FSDP's hooks).
        options: :class:`FSDPOptions`.
        mesh: a 1-D device mesh (data-parallel shards).

    Returns:
        ``model``, now an ``FSDPModule``: its parameters are ``DTensor`` shards.
    """
    policy = options.mixed_precision_policy()
    offload: OffloadPolicy = CPUOffloadPolicy() if options.cpu_offload else OffloadPolicy()
    layers = _layers(model)
    for index, layer in enumerate(layers):
        # The last layer's parameters are needed again right away by backward: keeping them gathered
        # saves one all-gather per step (torchtitan does the same).
        reshard = options.reshard_after_forward and index < len(layers) - 1
        fully_shard(layer, mesh=mesh, mp_policy=policy, offload_policy=offload, reshard_after_forward=reshard)
    fully_shard(
        model,
        mesh=mesh,
        mp_policy=policy,
        offload_policy=offload,
        reshard_after_forward=options.reshard_after_forward,
    )
    # FSDP2 warns when the root returns views (the audio logits are an ``unflatten`` view): the hook it
    # registers on them is lost only if someone modifies them in place, which AlignedLoss never does.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # SUM over ranks: the loss is a global token mean
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model


def _layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `layers` ModuleList to shard")
    return layers
