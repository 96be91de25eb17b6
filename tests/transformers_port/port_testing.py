"""Helpers of the transformers-port tests (second test virtualenv, transformers >= 5.3).

A tiny random checkpoint made by Boson's own code (in the main test virtualenv) is converted both ways:
loaded by higgs_tune, and converted with ``tools/convert.py`` to transformers' layout for
``HiggsAudioV2ForConditionalGeneration``. Samples are built by transformers' own ``HiggsAudioV2Processor``
(its chat template, delay pattern, placeholder expansion and labels).

Audio tokenizer: transformers' ``HiggsAudioV2TokenizerModel`` requires torchaudio, which has no build for
torch 2.13, so the processor gets a tiny random ``DacModel`` (one of the audio-tokenizer classes it
accepts) with 8 codebooks of 1024: a real encoder whose codes the processor lays out exactly as for the
released tokenizer. The layout is what these tests compare; the codes' meaning is irrelevant.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import DacConfig, DacModel, HiggsAudioV2ForConditionalGeneration, HiggsAudioV2Processor

from higgs_tune.data.batch import IGNORE_INDEX, positions_to_index

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


def boson_made_checkpoint(directory: Path) -> Path:
    """A tiny random checkpoint written by Boson's own ``HiggsAudioModel.save_pretrained`` (2 DualFFN
    layers, norm weights randomised: tests/models/higgs_model_testing.py), with the tiny tokenizer.

    Boson's package needs transformers < 4.47, so it runs in the main test virtualenv, whose python
    ``HIGGS_TUNE_BOSON_PYTHON`` names (README, "Run the tests"; .ci/run sets it).
    """
    boson_python = os.environ.get("HIGGS_TUNE_BOSON_PYTHON")
    if not boson_python:
        raise RuntimeError(
            "set HIGGS_TUNE_BOSON_PYTHON to the python of the main test virtualenv (boson-multimodal "
            "installed): these tests compare against a checkpoint Boson's own code writes"
        )
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from higgs_model_testing import boson_config, boson_model; "
        "boson_model(boson_config(num_layers=2)).save_pretrained(sys.argv[2])"
    )
    result = subprocess.run(
        [boson_python, "-c", script, str(REPO / "tests" / "models"), str(directory)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    if result.returncode:
        raise RuntimeError(f"Boson's save_pretrained failed ({boson_python}):\n{result.stderr[-3000:]}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TINY_TOKENIZER / name, directory / name)
    return directory


def boson_and_transformers_checkpoints(tmp_path: Path, dac_dir: Path) -> tuple[Path, Path]:
    """A Boson-made tiny checkpoint, and its conversion to transformers' layout by tools/convert.py
    (processor pointing at ``dac_dir``)."""
    boson_dir = boson_made_checkpoint(tmp_path / "boson")
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
