"""Boson's reference data path, the oracle of the parity tests and of ``tools/bench.py``.

Needs Boson's ``boson-multimodal==0.1.1`` and ``transformers`` (the ``parity`` extra plus
``pip install --no-deps boson-multimodal==0.1.1``, README); they are imported when a function is called,
so importing this module costs nothing without them.

One manifest sample goes through exactly what Boson's training code runs: ``prepare_chatml_sample``
(token layout and labels) -> ``ChatMLDatasetSample`` with the raw codes -> ``HiggsAudioSampleCollator``
with the 3B training settings of docs/higgs_audio_v2.md §5.3 (BOS/EOS + delay pattern on inputs, -100 fillers on labels,
right padding to a multiple of 8, audio-in fed as codes).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from higgs_tune.data.document import AudioLayout


def boson_tokenizer(tokenizer_json: str | Path) -> Any:
    """Our ``tokenizer.json`` as the HF fast tokenizer Boson's code expects."""
    import transformers

    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json))


def boson_training_collator(
    *, audio_in_token_id: int, audio_out_token_id: int, pad_token_id: int, layout: AudioLayout
) -> Any:
    """``HiggsAudioSampleCollator`` with the settings of Boson's 3B training (docs/higgs_audio_v2.md §5.3); ids from the
    tokenizer or the model config, never literals."""
    from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioSampleCollator

    return HiggsAudioSampleCollator(
        whisper_processor=None,
        audio_in_token_id=audio_in_token_id,
        audio_out_token_id=audio_out_token_id,
        pad_token_id=pad_token_id,
        audio_stream_bos_id=layout.stream_bos_id,
        audio_stream_eos_id=layout.stream_eos_id,
        round_to=8,
        pad_left=False,
        encode_whisper_embed=False,
        return_audio_in_tokens=True,
        audio_num_codebooks=layout.num_codebooks,
        use_delay_pattern=layout.use_delay_pattern,
        mask_audio_out_token_label=True,
    )


def to_boson_sample(sample: dict) -> dict:
    """Our sample dict in Boson's ChatML form: each audio item's ``audio_codes`` path becomes its
    ``audio_url`` (Boson reads no audio here: the codes are handed over separately)."""
    boson = copy.deepcopy(sample)
    for message in boson["messages"]:
        content = message["content"]
        for item in content if isinstance(content, list) else [content]:
            if isinstance(item, dict) and item.get("type") == "audio":
                item["audio_url"] = item.pop("audio_codes")
    return boson


def boson_dataset_sample(
    sample: dict, codes: Sequence[np.ndarray], tokenizer: Any, num_codebooks: int
) -> Any:
    """``prepare_chatml_sample`` of ``sample`` plus its raw codes as Boson's ``ChatMLDatasetSample``.

    Args:
        sample: our manifest sample dict (audio items name ``audio_codes``).
        codes: raw codes [K, T_i] of the sample's audio items, in order of appearance.
        tokenizer: from :func:`boson_tokenizer`.
        num_codebooks: K (shape of the empty code array of a sample without audio).

    Raises:
        ValueError: Boson rejects the sample, or its audio items do not match ``codes``.
    """
    from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample

    input_ids, label_ids, audio_contents, _ = prepare_chatml_sample(to_boson_sample(sample), tokenizer)
    if input_ids is None:
        raise ValueError("Boson's prepare_chatml_sample rejected the sample")
    if len(audio_contents) != len(codes):
        raise ValueError(f"the sample has {len(audio_contents)} audio items but {len(codes)} code arrays")
    lengths = [c.shape[1] for c in codes]
    audio = (
        torch.from_numpy(np.concatenate(codes, axis=1)).long()
        if codes
        else torch.zeros(num_codebooks, 0, dtype=torch.long)
    )
    return ChatMLDatasetSample(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        label_ids=torch.tensor(label_ids, dtype=torch.long),
        audio_ids_concat=audio,
        audio_ids_start=torch.tensor(np.cumsum([0, *lengths[:-1]]) if codes else [], dtype=torch.long),
        audio_waveforms_concat=torch.tensor([]),
        audio_waveforms_start=torch.tensor([], dtype=torch.long),
        audio_sample_rate=torch.tensor([]),
        audio_speaker_indices=torch.tensor([], dtype=torch.long),
    )


# Fields of Boson's collated batch (HiggsAudioBatchInput) that HiggsAudioModel.forward takes in training.
MODEL_INPUT_FIELDS = (
    "input_ids",
    "attention_mask",
    "audio_in_ids",
    "audio_in_ids_start",
    "audio_out_ids",
    "audio_out_ids_start",
    "label_ids",
    "label_audio_ids",
)


def boson_model_inputs(batch: Any, device: torch.device | str | None = None) -> dict[str, Any]:
    """The keyword arguments of ``HiggsAudioModel.forward`` from a collated batch (on ``device``)."""
    inputs = {name: getattr(batch, name) for name in MODEL_INPUT_FIELDS}
    if device is not None:
        inputs = {k: v.to(device, non_blocking=True) if v is not None else None for k, v in inputs.items()}
    return inputs
