"""Helpers of the transformers-port tests (second test virtualenv, transformers >= 5.3).

A tiny higgs_tune model is exported in Boson's layout (the checkpoint Boson's ``from_pretrained`` loads,
checked in tests/models), converted with ``tools/convert.py`` to transformers' layout, and loaded by
``HiggsAudioV2ForConditionalGeneration``. Samples are built by transformers' own ``HiggsAudioV2Processor``
(its chat template, delay pattern, placeholder expansion and labels).

Audio tokenizer: transformers' ``HiggsAudioV2TokenizerModel`` requires torchaudio, which has no build for
torch 2.13, so the processor gets a tiny random ``DacModel`` (one of the audio-tokenizer classes it
accepts) with 8 codebooks of 1024: a real encoder whose codes the processor lays out exactly as for the
released tokenizer. The layout is what these tests compare; the codes' meaning is irrelevant.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import DacConfig, DacModel, HiggsAudioV2ForConditionalGeneration, HiggsAudioV2Processor

from higgs_tune.data.batch import IGNORE_INDEX, positions_to_index
from higgs_tune.models.higgs_audio.builders import higgs_audio_tiny
from higgs_tune.models.higgs_audio.checkpoint import save_hf_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY_TOKENIZER = REPO / "higgs_tune" / "assets" / "tiny_tokenizer"
SYSTEM = "Generate audio following instruction."
DAC_HOP = 16  # samples per code frame of the tiny DAC


def tiny_dac(directory: Path) -> Path:
    """A random tiny DacModel (8 codebooks of 1024, hop 16) saved to ``directory``."""
    torch.manual_seed(1)
    config = DacConfig(
        encoder_hidden_size=4,
        downsampling_ratios=[4, 4],
        decoder_hidden_size=8,
        upsampling_ratios=[4, 4],
        n_codebooks=8,
        codebook_size=1024,
        codebook_dim=4,
        hidden_size=16,
        num_quantizers=8,  # the processor reads audio_tokenizer.config.num_quantizers
        sampling_rate=24000,
    )
    DacModel(config).eval().save_pretrained(directory)
    return directory


def convert(source: Path, target: Path, to: str, *extra: str) -> None:
    """Run ``tools/convert.py`` (the command users run); raise with its stderr on failure."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert.py"), str(source), str(target), "--to", to, *extra],
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise AssertionError(f"tools/convert.py failed:\n{result.stderr}")


def boson_and_transformers_checkpoints(tmp_path: Path, dac_dir: Path, **model_overrides) -> tuple[Path, Path]:
    """A tiny random model written in Boson's layout (with the tiny tokenizer), and its conversion to
    transformers' layout by tools/convert.py (processor pointing at ``dac_dir``)."""
    torch.manual_seed(0)
    model = higgs_audio_tiny(**model_overrides)
    with torch.no_grad():  # norm weights away from 1, so a norm applied at the wrong positions shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    boson_dir = save_hf_checkpoint(model.state_dict(), model.args, tmp_path / "boson")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TINY_TOKENIZER / name, boson_dir / name)
    transformers_dir = tmp_path / "transformers"
    convert(boson_dir, transformers_dir, "transformers", "--audio-tokenizer", str(dac_dir))
    return boson_dir, transformers_dir


def load_processor(transformers_dir: Path, dac_dir: Path) -> HiggsAudioV2Processor:
    """The exported processor files, loaded by transformers, with the DacModel stand-in as audio tokenizer
    (a copy whose processor_config names DacModel instead of HiggsAudioV2TokenizerModel, see above)."""
    copy = transformers_dir.parent / (transformers_dir.name + "_dac_processor")
    shutil.copytree(transformers_dir, copy, dirs_exist_ok=True)
    config_path = copy / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["audio_tokenizer"] = {
        "audio_tokenizer_class": "DacModel",
        "audio_tokenizer_name_or_path": str(dac_dir),
    }
    config_path.write_text(json.dumps(config))
    return HiggsAudioV2Processor.from_pretrained(copy)


def load_transformers_model(transformers_dir: Path) -> HiggsAudioV2ForConditionalGeneration:
    """transformers' model with its text head, fp32, eager attention, eval; no missing/unexpected keys."""
    model, info = HiggsAudioV2ForConditionalGeneration.from_pretrained(
        transformers_dir,
        use_text_head=True,
        output_loading_info=True,
        dtype=torch.float32,
        attn_implementation="eager",
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise AssertionError(f"transformers reported {problems}")
    return model.eval()


def waveform(num_frames: int, seed: int) -> np.ndarray:
    """Random mono audio of exactly ``num_frames`` tiny-DAC frames."""
    return np.random.default_rng(seed).standard_normal(num_frames * DAC_HOP).astype(np.float32)


def conversations() -> dict[str, list[dict]]:
    """transformers-format conversations: TTS, voice cloning (reference clip as an earlier assistant
    turn) and audio-in (reference audio in the scene, the only place its chat template takes input audio)."""
    text = lambda s: [{"type": "text", "text": s}]  # noqa: E731
    audio = lambda frames, seed: [{"type": "audio", "audio": waveform(frames, seed)}]  # noqa: E731
    system = {"role": "system", "content": text(SYSTEM)}
    return {
        "tts": [
            system,
            {"role": "user", "content": text("a b c")},
            {"role": "assistant", "content": audio(6, 1)},
        ],
        "voice_cloning": [
            system,
            {"role": "user", "content": text("a b")},
            {"role": "assistant", "content": audio(4, 2)},
            {"role": "user", "content": text("c d e")},
            {"role": "assistant", "content": audio(7, 3)},
        ],
        "audio_in": [
            system,
            {"role": "scene", "content": text("a quiet room") + audio(5, 4)},
            {"role": "user", "content": text("b c")},
            {"role": "assistant", "content": audio(6, 5)},
        ],
    }


def process(processor: HiggsAudioV2Processor, conversation: list[dict]) -> dict[str, torch.Tensor]:
    """transformers' processor on one conversation, with its training labels."""
    return dict(
        processor.apply_chat_template(
            conversation,
            tokenize=True,
            return_dict=True,
            sampling_rate=24000,
            output_labels=True,
            return_tensors="pt",
        )
    )


def batch_from_port_inputs(inputs: dict[str, torch.Tensor], audio_token_id: int, delay_token_id: int) -> dict:
    """Our packed batch (one row, no padding) holding the processor's sequence: every placeholder
    (``<|AUDIO_OUT|>`` or the delay token) is an audio column with the processor's codes, as
    transformers' model treats it; routing and target indices cover every position (no targets)."""
    input_ids = inputs["input_ids"]  # [1, L]
    length = input_ids.shape[1]
    audio_mask = (input_ids == audio_token_id) | (input_ids == delay_token_id)  # [1, L]
    codes = inputs["audio_input_ids"][inputs["audio_input_ids_mask"]]  # [N_audio, K]
    audio_codes = torch.zeros(1, codes.shape[1], length, dtype=torch.long)
    audio_codes[0][:, audio_mask[0]] = codes.T
    every = torch.ones(length, dtype=torch.bool)
    return dict(
        tokens=input_ids,
        audio_codes=audio_codes,
        audio_in_mask=torch.zeros_like(audio_mask),
        audio_out_mask=audio_mask,
        input_pos=torch.arange(length)[None],
        doc_ids=torch.zeros(1, length, dtype=torch.int32),
        text_targets=torch.full((1, length), IGNORE_INDEX),
        audio_targets=torch.full((1, codes.shape[1], length), IGNORE_INDEX),
        text_ffn_index=positions_to_index(~audio_mask[0], length)[None],
        audio_ffn_index=positions_to_index(audio_mask[0], length)[None],
        text_target_index=positions_to_index(every, length)[None],
        audio_target_index=positions_to_index(every, length)[None],
    )
