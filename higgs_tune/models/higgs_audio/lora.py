"""LoRA and parameter-efficient fine-tuning modes for Higgs Audio, applied from outside the model.

LoRA uses torchtune's ``LoRALinear`` (same parameter name ``weight`` for the frozen base, adapters
``lora_a.weight`` / ``lora_b.weight``) swapped in place of selected ``nn.Linear`` modules, so the base
keys of the state dict keep Boson's names, and torchtune's ``get_adapter_params`` /
``set_trainable_params`` select what trains. Merging for export is done here instead of with torchtune's
``get_merged_lora_ckpt``: that helper takes one global rank/alpha and multiplies in the weight dtype
(bf16); :func:`merged_state_dict` computes ``W + (alpha / rank) * B @ A`` per module in fp32 and casts once.

Targets (each selectable): ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (shared attention),
``mlp`` (text FFN: gate/up/down), ``audio_mlp`` (audio FFN), ``text_lm_head``, ``audio_lm_head``.

Fine-tuning modes (:func:`set_trainable`):
    ``full``           every parameter trains;
    ``lora``           only LoRA adapters train;
    ``audio_adapter``  the text backbone is frozen; audio_mlp, the audio norms, the audio codebook
                       embeddings and the audio head train (plus LoRA adapters if any were applied).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torchtune.modules.peft import LoRALinear, get_adapter_params, set_trainable_params

from higgs_tune.models.safetensors_writer import LazyTensor

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp", "audio_mlp", "text_lm_head", "audio_lm_head")
FINETUNE_MODES = ("full", "lora", "audio_adapter")
# Parameter-name pieces of the audio adapter (docs/higgs_audio_v2.md §2): trained in "audio_adapter" mode.
AUDIO_ADAPTER_PARTS = (
    "audio_mlp.",
    "audio_input_layernorm.",
    "audio_post_attention_layernorm.",
    "audio_codebook_embeddings.",
    "audio_decoder_proj.audio_lm_head.",
)
_CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."


def _clean(name: str) -> str:
    """Module/parameter name without activation-checkpoint wrapper prefixes (state-dict spelling)."""
    return name.replace(_CHECKPOINT_PREFIX, "")


def _target_of(module_path: str) -> str | None:
    """Which LoRA target a Linear at ``module_path`` belongs to (None: not a target)."""
    parts = _clean(module_path).split(".")
    leaf = parts[-1]
    if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") and len(parts) >= 2 and parts[-2] == "self_attn":
        return leaf
    if (
        leaf in ("gate_proj", "up_proj", "down_proj")
        and len(parts) >= 2
        and parts[-2] in ("mlp", "audio_mlp")
    ):
        return parts[-2]
    if leaf in ("text_lm_head", "audio_lm_head"):
        return leaf
    return None


def apply_lora(
    model: nn.Module,
    targets: list[str] | tuple[str, ...],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
) -> list[str]:
    """Replace the selected Linear layers by torchtune ``LoRALinear`` sharing the base weight.

    Adapters are created with the base weight's device and dtype; ``lora_b`` starts at zero, so the
    model's outputs do not change.

    Args:
        model: a HiggsAudioModel (or anything with the same module names).
        targets: subset of :data:`LORA_TARGETS`.
        rank, alpha, dropout: LoRA hyper-parameters (scale alpha / rank).

    Returns:
        Names of the wrapped modules.
    """
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be a non-empty subset of {LORA_TARGETS}, got unknown {unknown}")
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not nn.Linear or _target_of(path) not in targets:
                continue
            if child.bias is not None:
                raise ValueError(f"LoRA target {path} has a bias; Higgs Audio linears have none")
            with torch.device("meta"):
                lora = LoRALinear(
                    child.in_features, child.out_features, rank=rank, alpha=alpha, dropout=dropout
                )
            lora.weight = child.weight
            device, dtype = child.weight.device, child.weight.dtype
            lora.lora_a = nn.Linear(child.in_features, rank, bias=False, device=device, dtype=dtype)
            lora.lora_b = nn.Linear(rank, child.out_features, bias=False, device=device, dtype=dtype)
            if device.type != "meta":
                lora.initialize_parameters()
            setattr(parent, child_name, lora)
            wrapped.append(_clean(path))
    if not wrapped:
        raise ValueError(f"no Linear module matched LoRA targets {list(targets)}")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Clean module name -> LoRALinear."""
    return {_clean(name): m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_trainable(model: nn.Module, mode: str) -> list[str]:
    """Set ``requires_grad`` for a fine-tuning mode (see the module docstring).

    Returns:
        Names of the trainable parameters (state-dict spelling).
    """
    if mode not in FINETUNE_MODES:
        raise ValueError(f"fine-tuning mode {mode!r} is not one of {FINETUNE_MODES}")
    adapters = get_adapter_params(model)
    if mode == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    elif mode == "lora":
        if not adapters:
            raise ValueError("mode 'lora' needs LoRA modules: call apply_lora first")
        set_trainable_params(model, adapters)
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(
                name in adapters or any(part in _clean(name) for part in AUDIO_ADAPTER_PARTS)
            )
    return [_clean(name) for name, param in model.named_parameters() if param.requires_grad]


TEXT_HEAD = "audio_decoder_proj.text_lm_head"


def text_only_prefixes(model: nn.Module) -> list[str]:
    """Parameter-name prefixes that only the text logits depend on: the text head; trailing fast-forward
    layers (audio positions skip them and attend only to themselves); then, if the layer before is a
    DualFFN layer, its text FFN and text post-attention norm (they act on text positions after the last
    attention that audio positions read)."""
    prefixes = [TEXT_HEAD]
    for index in reversed(range(len(model.layers))):
        kind = model.layers[index].kind
        if kind == "fast_forward":
            prefixes.append(f"layers.{index}.")
            continue
        if kind == "dual_ffn":
            prefixes += [f"layers.{index}.mlp.", f"layers.{index}.post_attention_layernorm."]
        break
    return prefixes


def freeze_text_only(model: nn.Module) -> list[str]:
    """Freeze what only the text logits depend on (``loss.text_weight: 0``: nothing trains it, see
    :func:`text_only_prefixes`): ``requires_grad=False`` (LoRA adapters included), so no optimizer holds
    it, no gradient is allocated and weight decay cannot shrink it; the export keeps it unchanged.
    Returns the names of the parameters that were trainable."""
    prefixes = tuple(text_only_prefixes(model))
    frozen = []
    for name, param in model.named_parameters():
        if _clean(name).startswith(prefixes) and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(_clean(name))
    return frozen


@torch.no_grad()
def _merge(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * B @ A`` in fp32, cast back to ``W``'s dtype. W [out, in], A [r, in], B [out, r]."""
    return (weight.float() + scale * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def _merged_weight(module: LoRALinear) -> torch.Tensor:
    scale = module.alpha / module.rank
    return _merge(module.weight, module.lora_a.weight, module.lora_b.weight, scale)


def merged_tensors(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor | LazyTensor]:
    """The model's state dict with every LoRA adapter merged into its base weight, each merged weight
    a :class:`LazyTensor` computed only when it is asked for (an export writes them one at a time:
    the whole merged model never exists beside the base). Other tensors are the model's own.

    Args:
        model: gives the LoRA modules (names, rank, alpha).
        state_dict: the tensors to merge (e.g. the full state dict gathered from an FSDP-sharded model);
            None: ``model.state_dict()``.
    """
    source = model.state_dict() if state_dict is None else state_dict
    merged: dict[str, torch.Tensor | LazyTensor] = {_clean(k): v for k, v in source.items()}
    for name, module in lora_modules(model).items():
        lora_a, lora_b = merged.pop(f"{name}.lora_a.weight"), merged.pop(f"{name}.lora_b.weight")
        weight = merged[f"{name}.weight"]
        merged[f"{name}.weight"] = LazyTensor(
            weight.shape,
            weight.dtype,
            functools.partial(_merge, weight, lora_a, lora_b, module.alpha / module.rank),
        )
    return merged


def merged_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """:func:`merged_tensors`, every merged weight computed now (model unchanged): the plain layout of
    the checkpoint adapter, in memory."""
    return {
        k: v.materialize() if isinstance(v, LazyTensor) else v
        for k, v in merged_tensors(model, state_dict).items()
    }


@torch.no_grad()
def merge_lora_(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put plain ``nn.Linear`` back (in place)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                weight = _merged_weight(child)
                linear = nn.Linear(child.in_dim, child.out_dim, bias=False, device="meta")
                linear.weight = nn.Parameter(weight, requires_grad=child.weight.requires_grad)
                setattr(parent, child_name, linear)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA adapter tensors (state-dict spelling)."""
    return {_clean(k): v.detach() for k, v in get_adapter_params(model).items()}


def save_adapter(
    model: nn.Module, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the adapters alone to a safetensors file; rank/alpha per module go in its metadata.

    ``state_dict``: take the adapter tensors from this full state dict (clean names, e.g. gathered from
    an FSDP-sharded model) instead of from the model's parameters."""
    adapters = adapter_state_dict(model)
    if state_dict is not None:
        adapters = {k: state_dict[k] for k in adapters}
    tensors = {k: v.contiguous().cpu() for k, v in adapters.items()}
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save")
    hyper = {name: [m.rank, m.alpha] for name, m in lora_modules(model).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "lora": json.dumps(hyper)})
    return path


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | Path) -> None:
    """Load adapters saved by :func:`save_adapter` into a model with the same LoRA modules.

    Raises:
        ValueError: the file's modules, rank/alpha or shapes differ from the model's (listed).
    """
    current = get_adapter_params(model)
    by_clean = {_clean(k): v for k, v in current.items()}
    hyper = {name: [m.rank, m.alpha] for name, m in lora_modules(model).items()}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        saved_hyper = json.loads((f.metadata() or {}).get("lora", "{}"))
        missing, unexpected = sorted(set(by_clean) - keys), sorted(keys - set(by_clean))
        if missing or unexpected:
            raise ValueError(
                f"adapter file {path} does not match the model: missing {missing}, unexpected {unexpected}"
            )
        differing = sorted(k for k in hyper if saved_hyper.get(k) != hyper[k])
        if differing:
            raise ValueError(f"adapter file {path}: rank/alpha differ from the model for {differing}")
        for key, param in by_clean.items():
            tensor = f.get_tensor(key)
            if tensor.shape != param.shape:
                raise ValueError(
                    f"adapter {key}: file shape {tuple(tensor.shape)} vs model {tuple(param.shape)}"
                )
            param.copy_(tensor)
