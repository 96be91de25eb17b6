"""Model builders (YAML components: ``_component_: higgs_tune.models.higgs_audio.higgs_audio_tiny``).

``higgs_audio_3b`` is the released architecture (docs/higgs_audio_v2.md §1.1); ``higgs_audio_tiny`` a small model with the
project's tiny tokenizer ids for tests and demos; ``from_checkpoint_dir`` builds from a Boson checkpoint
directory (its ``config.json`` defines the architecture) and loads its weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import HiggsAudioModelArgs
from .model import HiggsAudioModel


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    names.update({"fp16": torch.float16, "float16": torch.float16})
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def build_model(
    args: HiggsAudioModelArgs,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> HiggsAudioModel:
    """Build a model with random weights (Boson's init), or uninitialised on ``device="meta"``.

    Args:
        args: architecture.
        device: where to allocate ("meta": no memory, materialise later, e.g. from a checkpoint).
        dtype: parameter dtype (default: torch's default dtype).
    """
    device = torch.device(device) if device is not None else torch.get_default_device()
    with torch.device(device):
        model = HiggsAudioModel(args)
    if dtype is not None:
        model.to(dtype=_dtype(dtype))
    if device.type != "meta":
        model.init_weights()
    return model


def higgs_audio_3b(
    device: torch.device | str | None = None, dtype: torch.dtype | str | None = None, **overrides: Any
) -> HiggsAudioModel:
    """The released ``higgs-audio-v2-generation-3B-base`` architecture (5,771,283,456 parameters).

    Use ``device="meta"`` to build without memory; ``overrides`` change :class:`HiggsAudioModelArgs` fields.
    """
    return build_model(HiggsAudioModelArgs(**overrides), device=device, dtype=dtype)


def tiny_model_args(**overrides: Any) -> HiggsAudioModelArgs:
    """Tiny architecture with the project's tiny tokenizer layout (vocab 1024, Llama-3 specials at 768+)."""
    values: dict[str, Any] = dict(
        vocab_size=1024,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=131072,
        text_bos_token_id=768,
        text_eos_token_id=769,
        num_codebooks=8,
        codebook_size=1024,
        audio_stream_bos_id=1024,
        audio_stream_eos_id=1025,
        audio_adapter_type="dual_ffn_fast_forward",
        audio_dual_ffn_layers=None,
        audio_ffn_hidden_size=64,
        audio_ffn_intermediate_size=128,
        pad_token_id=769,
        audio_in_token_id=783,
        audio_out_token_id=784,
        audio_out_bos_token_id=781,
        audio_eos_token_id=780,
    )
    values.update(overrides)
    if values["audio_dual_ffn_layers"] is None and values["audio_adapter_type"] != "stack":
        values["audio_dual_ffn_layers"] = tuple(range(values["num_layers"]))
    return HiggsAudioModelArgs(**values)


def higgs_audio_tiny(
    device: torch.device | str | None = None, dtype: torch.dtype | str | None = None, **overrides: Any
) -> HiggsAudioModel:
    """Tiny Higgs Audio for tests and demos: H 64, 2 layers (all DualFFN), 4 heads / 2 kv heads, FFN 128,
    8 codebooks of 1024, vocab 1024 with the tiny tokenizer's special-token ids."""
    return build_model(tiny_model_args(**overrides), device=device, dtype=dtype)


def from_hf_config(
    config: dict[str, Any],
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    **overrides: Any,
) -> HiggsAudioModel:
    """Random-init model from a Boson ``config.json`` dict (no weights loaded)."""
    return build_model(HiggsAudioModelArgs.from_hf_config(config, **overrides), device=device, dtype=dtype)


def from_checkpoint_dir(
    path: str | Path,
    dtype: torch.dtype | str | None = torch.bfloat16,
    device: torch.device | str | None = "cpu",
    **overrides: Any,
) -> HiggsAudioModel:
    """Build the architecture of a checkpoint directory (Boson's or transformers' layout) and load its weights
    (meta build, then materialised from the safetensors: see :func:`checkpoint.load_hf_checkpoint`)."""
    from .checkpoint import load_hf_checkpoint

    return load_hf_checkpoint(path, dtype=_dtype(dtype), device=device, **overrides)
