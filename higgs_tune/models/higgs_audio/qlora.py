"""QLoRA for Higgs Audio: the frozen base weight under every LoRA adapter stored in NF4 (torchao).

:func:`quantize_lora_base_` turns each torchtune ``LoRALinear`` made by
:func:`~higgs_tune.models.higgs_audio.lora.apply_lora` (attention, text FFN, the DualFFN audio FFN, the
heads: whatever the LoRA targets cover) into torchtune's QLoRA layer: the forward runs
``torchao``'s ``linear_nf4`` (the NF4 weight is dequantized to the input's dtype for the matmul; its
backward only computes the input gradient) plus the bf16 adapters, exactly as ``LoRALinear(...,
quantize_base=True)`` in torchtune's QLoRA recipes. NF4 (QLoRA paper): blocks of ``block_size`` weights
share one absmax scale, each weight is one of 16 normal-float levels (4 bits); the scales are
quantized again to int8 in blocks of ``scaler_block_size`` ("double quantization"). About 0.52 bytes
per weight instead of 2 (:func:`nf4_bytes`).

By construction the quantized base is never trained, never checkpointed and never exported quantized:
it is held as a NON-PERSISTENT BUFFER named ``weight`` (not an ``nn.Parameter``), so

- ``model.parameters()`` (what optimizers, ``set_trainable`` and gradient clipping see) does not list it;
- ``model.state_dict()`` (what the DCP training checkpoints save) does not contain it: a resumed run
  rebuilds it from the same base checkpoint (or seed) and quantizes it again, which is deterministic;
- the export takes :func:`state_dict_with_dequantized_base`: the state dict plus every base weight
  dequantized to its original dtype, merged with its adapter in fp32 by
  :func:`~higgs_tune.models.higgs_audio.lora.merged_state_dict` and cast to bf16, so Boson's
  ``HiggsAudioModel.from_pretrained`` loads it unchanged.

The merged export therefore equals the model that was trained (dequantized base + adapters), not the
original bf16 base + adapters: NF4 rounding of the base is part of the result.

Single process only: FSDP2 sharding of NF4 tensors is not wired up here (the recipe refuses it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
from torchtune.modules.peft import LoRALinear

from .lora import _clean, lora_modules

NF4_LEVELS = 16  # entries of the NF4 lookup table, stored in every tensor


@dataclass(frozen=True)
class NF4Options:
    """``finetune.quantize_base`` in a config: NF4 block sizes (torchao's defaults, as in QLoRA).

    Every quantized weight's number of elements must be a multiple of ``block_size * scaler_block_size``
    (true for every linear of the 3B model with the defaults; tiny models need a smaller
    ``scaler_block_size``).
    """

    block_size: int = 64
    scaler_block_size: int = 256

    def __post_init__(self) -> None:
        for name in ("block_size", "scaler_block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"finetune.quantize_base.{name} must be a positive int, got {value!r}")


def nf4_bytes(numel: int, options: NF4Options = NF4Options(), dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes torchao's NF4Tensor holds for a weight of ``numel`` elements of ``dtype``: packed 4-bit
    codes (numel / 2), one int8 scale per block, one ``dtype`` factor per scaler block, the ``dtype``
    scale mean and the 16-entry ``dtype`` lookup table."""
    item = torch.empty((), dtype=dtype).element_size()
    blocks = numel // options.block_size
    return numel // 2 + blocks + item * (blocks // options.scaler_block_size) + item + NF4_LEVELS * item


def is_quantized(module: nn.Module) -> bool:
    """A LoRALinear whose base is NF4 (made by :func:`quantize_lora_base_`)."""
    return isinstance(module, LoRALinear) and isinstance(module.weight, NF4Tensor)


def quantized_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Clean module name -> LoRALinear with an NF4 base."""
    return {name: m for name, m in lora_modules(model).items() if is_quantized(m)}


@torch.no_grad()
def quantize_lora_base_(model: nn.Module, block_size: int = 64, scaler_block_size: int = 256) -> list[str]:
    """Quantize the base weight of every LoRA module of ``model`` to NF4, in place (see module docstring).

    Each bf16 (or fp32) base weight [out, in] is replaced by an NF4 non-persistent buffer on the same
    device, one module at a time (the full-precision weight is freed as soon as its NF4 copy exists).

    Returns:
        Names of the quantized modules.

    Raises:
        ValueError: no LoRA modules; a weight on the meta device; a weight whose size is not a multiple
            of ``block_size * scaler_block_size`` (named, with its shape).
    """
    options = NF4Options(block_size=block_size, scaler_block_size=scaler_block_size)
    modules = lora_modules(model)
    if not modules:
        raise ValueError("finetune.quantize_base (QLoRA) needs LoRA modules: set finetune.lora")
    group = options.block_size * options.scaler_block_size
    for name, module in modules.items():
        weight = module.weight
        if is_quantized(module):
            continue
        if weight.device.type == "meta":
            raise ValueError(f"cannot quantize {name}.weight on the meta device: load or initialise it first")
        if weight.numel() % group:
            raise ValueError(
                f"cannot quantize {name}.weight {tuple(weight.shape)} to NF4: {weight.numel()} elements are not "
                f"a multiple of block_size x scaler_block_size = {options.block_size} x "
                f"{options.scaler_block_size}; choose smaller finetune.quantize_base block sizes"
            )
        quantized = to_nf4(weight.detach(), options.block_size, options.scaler_block_size)
        del module.weight  # the Parameter: from now on the base is not trainable and not in state_dict()
        module.register_buffer("weight", quantized, persistent=False)
        module._quantize_base = True  # torchtune's QLoRA forward: linear_nf4(x, weight) + adapters
    return list(modules)


@torch.no_grad()
def state_dict_with_dequantized_base(
    model: nn.Module, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` (clean names) plus every NF4 base weight dequantized to its original dtype,
    ALL on ``device``: the complete state in Boson's key names, for the merged export (the adapters sit
    next to their bases, so the merge runs where they are: the CPU by default).

    Dequantizes one weight at a time, so the model's device holds at most one extra full-precision
    weight besides the model (a 16 GB card cannot hold the whole dequantized base next to it).
    """
    state = {_clean(k): v.to(device) for k, v in model.state_dict().items()}
    for name, module in quantized_modules(model).items():
        state[f"{name}.weight"] = module.weight.get_original_weight().to(device)
    return state
