"""HF checkpoint adapter: Boson's released Higgs Audio layout in and out, and transformers' HiggsAudioV2
layout (names and config mapped by :mod:`.transformers_layout`), told apart by ``config.json``'s
``model_type`` (``higgs_audio`` / ``higgs_audio_v2``).

Boson's layout: ``config.json`` (``model_type: higgs_audio``) plus either one ``model.safetensors`` or
shards with ``model.safetensors.index.json``; keys without a ``model.`` prefix, equal to this project's
module names. Training-time variants of Boson's PartiallyFrozenEmbedding/Linear
(``embed_tokens.embedding_frozen/embedding_trainable.weight``,
``audio_decoder_proj.text_lm_head.linear_frozen/linear_trainable.weight``) are merged by concatenation
on dim 0. Unknown or missing keys are an error that lists them.

Loading a 3B model: the model is built on the meta device and every parameter is replaced by the
tensor read from the safetensors file, cast once to the target dtype on the target device
(``load_state_dict(assign=True)``): no fp32 full-size copy; the RoPE buffer is recomputed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from higgs_tune.data.tokenizer import HiggsTokenizer
from higgs_tune.errors import InvalidInputError, MissingInputError, UserInputError

from ..safetensors_writer import LazyTensor, lazy, write_sharded
from . import transformers_layout
from .config import HiggsAudioModelArgs
from .model import HiggsAudioModel

CONFIG_NAME = "config.json"
LAYOUTS = ("boson", "transformers")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Boson's PartiallyFrozen* modules split one tensor in two on dim 0 (rows [0, idx) frozen, rest trainable).
PARTIALLY_FROZEN_SPLITS = {
    "embed_tokens.weight": (
        "embed_tokens.embedding_frozen.weight",
        "embed_tokens.embedding_trainable.weight",
    ),
    "audio_decoder_proj.text_lm_head.weight": (
        "audio_decoder_proj.text_lm_head.linear_frozen.weight",
        "audio_decoder_proj.text_lm_head.linear_trainable.weight",
    ),
}


class CheckpointKeyError(UserInputError, KeyError):
    """The checkpoint's tensors do not match the model's parameters."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def read_config_json(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Read ``config.json`` of either layout; raise if missing or neither higgs_audio nor higgs_audio_v2."""
    path = Path(checkpoint_dir) / CONFIG_NAME
    if not path.is_file():
        raise MissingInputError(f"no {CONFIG_NAME} in checkpoint directory {checkpoint_dir}")
    config = json.loads(path.read_text())
    if config.get("model_type") not in ("higgs_audio", transformers_layout.MODEL_TYPE):
        raise InvalidInputError(
            f"{path}: model_type is {config.get('model_type')!r}, expected 'higgs_audio' (Boson) or "
            f"{transformers_layout.MODEL_TYPE!r} (transformers)"
        )
    return config


def read_hf_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Boson's ``config.json`` content for a checkpoint directory in either layout: as stored (Boson's),
    or mapped from transformers' config through :func:`read_model_args` (transformers')."""
    config = read_config_json(checkpoint_dir)
    if transformers_layout.is_transformers_config(config):
        return read_model_args(checkpoint_dir).to_hf_config()
    return config


def checkpoint_layout(checkpoint_dir: str | Path) -> str:
    """``"boson"`` or ``"transformers"``, from the directory's ``config.json``."""
    config = read_config_json(checkpoint_dir)
    return "transformers" if transformers_layout.is_transformers_config(config) else "boson"


def read_model_args(checkpoint_dir: str | Path, **overrides: Any) -> HiggsAudioModelArgs:
    """The architecture of a checkpoint directory in either layout (a transformers one also needs its
    ``tokenizer.json``, which holds the ``<|AUDIO|>`` / ``<|audio_eos|>`` ids its config lacks)."""
    config = read_config_json(checkpoint_dir)
    if transformers_layout.is_transformers_config(config):
        tokenizer = HiggsTokenizer.for_checkpoint(checkpoint_dir)
        return transformers_layout.args_from_transformers_config(config, tokenizer, **overrides)
    return HiggsAudioModelArgs.from_hf_config(config, **overrides)


def _weight_files(checkpoint_dir: Path) -> dict[str, list[str]]:
    """File name -> tensor names stored in it (from the index, or the single file)."""
    index_path = checkpoint_dir / INDEX_FILE
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files: dict[str, list[str]] = {}
        for key, file_name in weight_map.items():
            files.setdefault(file_name, []).append(key)
        missing = [name for name in files if not (checkpoint_dir / name).is_file()]
        if missing:
            raise MissingInputError(f"{index_path} names shard files that do not exist: {missing}")
        return files
    single = checkpoint_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {SINGLE_FILE: list(f.keys())}
    raise MissingInputError(f"neither {INDEX_FILE} nor {SINGLE_FILE} in {checkpoint_dir}")


def read_hf_state_dict(
    checkpoint_dir: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory under our (Boson's) names, partially-frozen splits merged;
    a transformers-layout directory's keys are renamed.

    Each tensor is read directly onto ``device`` and cast to ``dtype`` (if given) one at a time.
    """
    checkpoint_dir = Path(checkpoint_dir)
    state_dict: dict[str, torch.Tensor] = {}
    for file_name, keys in _weight_files(checkpoint_dir).items():
        with safe_open(str(checkpoint_dir / file_name), framework="pt", device=str(device)) as f:
            for key in keys:
                tensor = f.get_tensor(key)
                state_dict[key] = tensor if dtype is None else tensor.to(dtype)
    if checkpoint_layout(checkpoint_dir) == "transformers":
        if "text_lm_head.weight" not in state_dict:
            raise CheckpointKeyError(
                f"{checkpoint_dir} has no text_lm_head.weight (transformers saved the model without "
                "use_text_head=True); higgs_tune trains the text head and needs it"
            )
        return transformers_layout.rename_state_dict(state_dict, to_transformers=False)
    return merge_partially_frozen(state_dict)


def merge_partially_frozen(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate Boson's frozen/trainable halves back into the plain tensors (in place)."""
    for merged, (frozen, trainable) in PARTIALLY_FROZEN_SPLITS.items():
        present = [k for k in (frozen, trainable) if k in state_dict]
        if not present:
            continue
        if len(present) == 1:
            raise CheckpointKeyError(f"checkpoint has {present[0]} without its other half")
        if merged in state_dict:
            raise CheckpointKeyError(f"checkpoint has both {merged} and its split {frozen}/{trainable}")
        state_dict[merged] = torch.cat([state_dict.pop(frozen), state_dict.pop(trainable)], dim=0)
    return state_dict


def check_keys(state_dict: Mapping[str, torch.Tensor | LazyTensor], model: torch.nn.Module) -> None:
    """Raise :class:`CheckpointKeyError` listing missing and unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        raise CheckpointKeyError(
            f"checkpoint does not match the model: missing keys {missing}; unexpected keys {unexpected}; "
            f"shape mismatches {wrong_shape}"
        )


def load_state_dict_into(model: HiggsAudioModel, state_dict: dict[str, torch.Tensor]) -> HiggsAudioModel:
    """Assign the tensors to the model (works for a meta-device model), recompute the RoPE buffer."""
    check_keys(state_dict, model)
    model.load_state_dict(state_dict, strict=True, assign=True)
    device = next(iter(state_dict.values())).device
    model.rotary_emb.reset_parameters(device)
    return model


def load_hf_checkpoint(
    checkpoint_dir: str | Path,
    dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str = "cpu",
    **overrides: Any,
) -> HiggsAudioModel:
    """Build the model of a checkpoint directory (Boson's or transformers' layout) on meta and
    materialise it from its weights.

    Args:
        checkpoint_dir: directory with config.json and safetensors.
        dtype: parameter dtype (None: keep the stored dtype).
        device: target device.
        overrides: :class:`HiggsAudioModelArgs` fields to change (e.g. ``attention="flex"``).
    """
    args = read_model_args(checkpoint_dir, **overrides)
    with torch.device("meta"):
        model = HiggsAudioModel(args)
    state_dict = read_hf_state_dict(checkpoint_dir, dtype=dtype, device=device)
    return load_state_dict_into(model, state_dict)


def save_hf_checkpoint(
    state_dict: Mapping[str, torch.Tensor | LazyTensor],
    args: HiggsAudioModelArgs,
    output_dir: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    layout: str = "boson",
    tokenizer_dir: str | Path | None = None,
    audio_tokenizer: str = transformers_layout.DEFAULT_AUDIO_TOKENIZER,
) -> Path:
    """Write a checkpoint directory: config.json + ``model.safetensors`` or shards + index json.

    ``layout="boson"``: Boson's names and config (``HiggsAudioModel.from_pretrained`` loads it; the caller
    copies tokenizer files if it wants them). ``layout="transformers"``: transformers' names, config,
    generation config, processor and tokenizer files (``HiggsAudioV2ForConditionalGeneration`` and
    ``HiggsAudioV2Processor`` load it; see :mod:`.transformers_layout`).

    The tensors are written one at a time (:mod:`higgs_tune.models.safetensors_writer`): a
    :class:`LazyTensor` (e.g. a merged LoRA weight, ``lora.merged_tensors``) is computed when its turn
    comes and dropped once written, so the export needs the model plus one tensor of memory. The
    directory is written to a temporary sibling and renamed into place (replacing an existing one),
    so a crash never leaves a half-written export.

    Args:
        state_dict: plain model state dict (tensors, or lazy ones; LoRA merged:
            ``lora.merged_tensors``).
        args: architecture, written as config.json.
        output_dir: target directory.
        dtype: cast tensors on the way out (None: as they are).
        max_shard_bytes: shard size limit.
        layout: ``"boson"`` or ``"transformers"``.
        tokenizer_dir: the folder of the ``tokenizer.json`` (transformers layout only, required there).
        audio_tokenizer: path or hub id of transformers' HiggsAudioV2TokenizerModel, recorded in the
            processor config (transformers layout only).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "transformers":
        if tokenizer_dir is None:
            raise ValueError("the transformers layout needs tokenizer_dir (its processor files)")
        transformers_layout.check_expressible(args)
    with torch.device("meta"):
        reference = HiggsAudioModel(args)
    check_keys(state_dict, reference)
    tensors = {k: lazy(v).cast(dtype) for k, v in state_dict.items()}
    if layout == "transformers":
        tensors = transformers_layout.rename_state_dict(tensors, to_transformers=True)
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        write_sharded(tmp_dir, tensors, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
        dtype_name = transformers_layout.weight_dtype_name(tensors)
        if layout == "transformers":
            transformers_layout.write_transformers_side_files(
                tmp_dir, args, Path(tokenizer_dir), dtype_name, audio_tokenizer
            )
        else:
            config = args.to_hf_config()
            config["torch_dtype"] = config["text_config"]["torch_dtype"] = dtype_name
            (tmp_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        if output_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old.", dir=output_dir.parent))
            os.replace(output_dir, old / "replaced")
            os.replace(tmp_dir, output_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return output_dir


def save_model(
    model: HiggsAudioModel,
    output_dir: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Export a plain (non-LoRA) model in Boson's layout (see :func:`save_hf_checkpoint`)."""
    return save_hf_checkpoint(
        model.state_dict(), model.args, output_dir, dtype=dtype, max_shard_bytes=max_shard_bytes
    )
