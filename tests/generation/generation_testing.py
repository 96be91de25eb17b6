"""Helpers of the generation tests: prompts, and tiny random models with planted behaviour (a
deterministic end of speech, no bare audio placeholders from the text head, audio codes that repeat)."""

from __future__ import annotations

import numpy as np
import torch
from boson_generation import BOS, EOS, LAYOUT, TOKENS, K
from torch import nn

from higgs_tune.generation import GenerationOutput, SamplingConfig, generate


def random_codes(seed: int, frames: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, LAYOUT.codebook_size, size=(K, frames))


def plant_end_of_speech(model: nn.Module, strength: float = 0.3) -> None:
    """Make codebook 0 emit EOS right after the delay pattern has filled (a deterministic end of speech).

    Hidden dimension 0 of the LAST codebook's embedding is +strength for every id but the stream BOS,
    -strength for BOS; codebook 0's EOS row of the audio head reads dimension 0 only. So the EOS logit is
    large and positive exactly at audio columns whose last codebook is no longer the delay filler. Column
    c is chosen from column c-1, whose last row is BOS up to column K-1 (delay), so columns 0..K do not
    end the segment, column K+1 does (codebook 0 emits EOS) and K-1 closing columns follow: 2K+1 columns.
    """
    stride = model.args.codebook_vocab_size
    with torch.no_grad():
        table = model.audio_codebook_embeddings.weight
        last = slice((K - 1) * stride, K * stride)
        table[last, 0] = strength
        table[(K - 1) * stride + BOS, 0] = -strength
        head = model.audio_decoder_proj.audio_lm_head.weight
        head[EOS].zero_()
        head[EOS, 0] = 1.0


def silence_placeholders(model: nn.Module) -> None:
    """Zero the text-head rows of ``<|AUDIO|>`` / ``<|AUDIO_OUT|>``: logit 0 is below the maximum (and
    outside the top 50) of the ~1000 random logits, so the random model, like a trained one, never emits a
    bare placeholder (which Boson's protocol cannot continue from)."""
    with torch.no_grad():
        for token in (TOKENS.audio_in, TOKENS.audio_out):
            model.audio_decoder_proj.text_lm_head.weight[token].zero_()


def plant_repetition(model: nn.Module, code: int, strength: float = 4.0) -> None:
    """Make ``code`` the favourite of every codebook at every audio column, by a margin that leaves the
    untempered distribution some spread (repetition-aware sampling then has something to redraw).

    Hidden dimension 1 of every codebook embedding row is +strength / K, so audio positions carry about
    +strength in it (the K codebooks are summed); the audio head's row of ``code`` in every codebook reads
    dimension 1 only.
    """
    stride = model.args.codebook_vocab_size
    with torch.no_grad():
        model.audio_codebook_embeddings.weight[:, 1] = strength / K
        head = model.audio_decoder_proj.audio_lm_head.weight
        for k in range(K):
            head[k * stride + code].zero_()
            head[k * stride + code, 1] = 1.0


def text_prompt() -> tuple[list[dict], list[np.ndarray]]:
    return [
        {"role": "system", "content": "Generate audio following instruction."},
        {"role": "user", "content": "the small cat sees a big dog"},
    ], []


def voice_clone_prompt(user_text: str = "the moon sings") -> tuple[list[dict], list[np.ndarray]]:
    """Audio-in reference in the system turn, an assistant (audio-out) reference exchange, a new user text."""
    messages = [
        {
            "role": "system",
            "content": [
                {"type": "text", "text": "Generate audio following instruction.\n\nSPEAKER0: "},
                {"type": "audio", "audio_codes": "ref_in.npy"},
            ],
        },
        {"role": "user", "content": "one red bird"},
        {"role": "assistant", "content": {"type": "audio", "audio_codes": "ref_out.npy"}},
        {"role": "user", "content": user_text},
    ]
    return messages, [random_codes(1, 5), random_codes(2, 4)]


def generate_seeded(
    model: nn.Module, prompt, sampling: SamplingConfig, seed: int, max_new_columns: int = 30
) -> GenerationOutput:
    """Our generation of ``prompt`` drawing from a CPU generator seeded ``seed``."""
    return generate(
        model,
        prompt,
        TOKENS,
        max_new_columns=max_new_columns,
        sampling=sampling,
        generator=torch.Generator().manual_seed(seed),
    )
