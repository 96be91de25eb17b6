"""Test helpers: tiny Boson reference models, Boson-format samples and the matching packed batches.

A sample is described by a list of segments ``("text", n)``, ``("audio_in", T)``, ``("audio_out", T)``.
:func:`make_boson_sample` turns it into Boson's model inputs (one placeholder per audio segment, codes
with stream BOS/EOS and the delay pattern applied). :func:`batch_from_boson` builds our packed batch
(every field of ``higgs_tune/data/batch.py``) from Boson's merged outputs, so both models see exactly the
same merged sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel
from boson_multimodal.model.higgs_audio.utils import build_delay_pattern_mask

from higgs_tune.data.batch import IGNORE_INDEX, positions_to_index

# The tiny tokenizer's ids (common context). Tests only: library code reads them from the config.
TINY_IDS = dict(
    pad_token_id=769,
    audio_in_token_idx=783,
    audio_out_token_idx=784,
    audio_out_bos_token_id=781,
    audio_eos_token_id=780,
)
AUDIO_BOS_TEXT_ID = 779  # <|audio_bos|>
NUM_CODEBOOKS = 8
CODEBOOK_SIZE = 1024


def boson_config(
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    dual_ffn_layers: list[int] | None = None,
    adapter: str = "dual_ffn_fast_forward",
    embed_avg: bool = False,
    original_max_positions: int = 8192,
    attn_implementation: str = "eager",
) -> HiggsAudioConfig:
    """A tiny HiggsAudioConfig (Llama text config, tiny tokenizer ids, 8 codebooks of 1024)."""
    text_config = dict(
        model_type="llama",
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=64 // num_heads,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=original_max_positions,
        ),
        bos_token_id=768,
        eos_token_id=769,
    )
    config = HiggsAudioConfig(
        text_config=text_config,
        audio_adapter_type=adapter,
        audio_dual_ffn_layers=list(range(num_layers)) if dual_ffn_layers is None else dual_ffn_layers,
        audio_embed_avg=embed_avg,
        audio_ffn_hidden_size=64,
        audio_ffn_intermediate_size=128,
        encode_whisper_embed=False,
        encode_audio_in_tokens=True,
        skip_audio_tower=True,
        use_delay_pattern=True,
        audio_num_codebooks=NUM_CODEBOOKS,
        audio_codebook_size=CODEBOOK_SIZE,
        **TINY_IDS,
    )
    config._attn_implementation = attn_implementation
    return config


def boson_model(config: HiggsAudioConfig, seed: int = 0) -> HiggsAudioModel:
    """Random Boson model in eval mode, fp32; norm weights randomised too (so norms matter)."""
    torch.manual_seed(seed)
    model = HiggsAudioModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


@dataclass
class BosonSample:
    input_ids: torch.Tensor  # [1, S]
    audio_in_ids: torch.Tensor  # [K, N_in]
    audio_in_ids_start: torch.Tensor  # [n_in]
    audio_out_ids: torch.Tensor  # [K, N_out]
    audio_out_ids_start: torch.Tensor  # [n_out]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return dict(
            input_ids=self.input_ids,
            attention_mask=torch.ones_like(self.input_ids),
            audio_in_ids=self.audio_in_ids,
            audio_in_ids_start=self.audio_in_ids_start,
            audio_out_ids=self.audio_out_ids,
            audio_out_ids_start=self.audio_out_ids_start,
        )


def delayed_codes(num_frames: int, generator: torch.Generator) -> torch.Tensor:
    """Random codes [K, T] -> [K, T + K + 1] with stream BOS/EOS and the delay pattern (Boson's code)."""
    raw = torch.randint(0, CODEBOOK_SIZE, (NUM_CODEBOOKS, num_frames), generator=generator)
    codes = torch.cat(
        [
            torch.full((NUM_CODEBOOKS, 1), CODEBOOK_SIZE),
            raw,
            torch.full((NUM_CODEBOOKS, 1), CODEBOOK_SIZE + 1),
        ],
        1,
    )
    return build_delay_pattern_mask(codes[None], bos_token_id=CODEBOOK_SIZE, pad_token_id=CODEBOOK_SIZE + 1)[
        0
    ][0]


def make_boson_sample(segments: list[tuple[str, int]], seed: int = 0) -> BosonSample:
    """Boson's model inputs for one sample (B = 1)."""
    generator = torch.Generator().manual_seed(seed)
    ids: list[int] = [768]
    audio_in: list[torch.Tensor] = []
    audio_out: list[torch.Tensor] = []
    for kind, size in segments:
        if kind == "text":
            ids += torch.randint(0, 768, (size,), generator=generator).tolist()
        elif kind == "audio_in":
            ids += [AUDIO_BOS_TEXT_ID, TINY_IDS["audio_in_token_idx"], TINY_IDS["audio_eos_token_id"]]
            audio_in.append(delayed_codes(size, generator))
        elif kind == "audio_out":
            ids += [
                TINY_IDS["audio_out_bos_token_id"],
                TINY_IDS["audio_out_token_idx"],
                TINY_IDS["audio_eos_token_id"],
            ]
            audio_out.append(delayed_codes(size, generator))
        else:
            raise ValueError(f"unknown segment kind {kind!r}")

    def concat(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if not parts:
            return torch.zeros((NUM_CODEBOOKS, 0), dtype=torch.long), torch.zeros((0,), dtype=torch.long)
        lengths = torch.tensor([p.shape[1] for p in parts])
        return torch.cat(parts, 1), torch.cumsum(lengths, 0) - lengths

    in_ids, in_start = concat(audio_in)
    out_ids, out_start = concat(audio_out)
    return BosonSample(torch.tensor([ids]), in_ids, in_start, out_ids, out_start)


@dataclass
class BosonResult:
    """Boson's outputs restricted to the real (non-padding) positions of the merged sequence."""

    text_logits: torch.Tensor  # [S_real, V]
    audio_logits: torch.Tensor  # [N_out, K, C] (at audio-out positions, in order)
    tokens: torch.Tensor  # [S_real]
    audio_in_mask: torch.Tensor  # [S_real] bool
    audio_out_mask: torch.Tensor  # [S_real] bool
    audio_codes: torch.Tensor  # [K, S_real]


@torch.no_grad()
def run_boson(model: HiggsAudioModel, sample: BosonSample) -> BosonResult:
    out = model(**sample.model_inputs())
    real = out.attention_mask[0].bool()  # B == 1 is left-padded to a multiple of 8: drop the pads
    audio_in = out.audio_in_discrete_codes_mask[0][real]
    audio_out = out.audio_out_mask[0][real]
    codes = torch.zeros((NUM_CODEBOOKS, int(real.sum())), dtype=torch.long)
    codes[:, audio_in] = sample.audio_in_ids
    codes[:, audio_out] = sample.audio_out_ids
    return BosonResult(
        text_logits=out.logits[0][real],
        audio_logits=out.audio_logits,
        tokens=out.expanded_input_ids[0][real],
        audio_in_mask=audio_in,
        audio_out_mask=audio_out,
        audio_codes=codes,
    )


def pack_batch(
    rows: list[list[BosonResult]], seq_len: int, pad_token_id: int = 769
) -> dict[str, torch.Tensor]:
    """Our packed batch: each row holds the given documents back to back, then padding.

    Every field of batch.py is filled. Text targets are the next token of the same document (enough to
    exercise the contract); audio targets the next column's codes inside an audio-out segment. Index
    capacities are ``seq_len`` and the target indices select EVERY position, so logits at all positions
    come out of the training forward too.
    """
    batch_size, k = len(rows), NUM_CODEBOOKS
    tokens = torch.full((batch_size, seq_len), pad_token_id)
    audio_codes = torch.zeros((batch_size, k, seq_len), dtype=torch.long)
    audio_in_mask = torch.zeros((batch_size, seq_len), dtype=torch.bool)
    audio_out_mask = torch.zeros((batch_size, seq_len), dtype=torch.bool)
    input_pos = torch.zeros((batch_size, seq_len), dtype=torch.long)
    doc_ids = torch.zeros((batch_size, seq_len), dtype=torch.int32)
    text_targets = torch.full((batch_size, seq_len), IGNORE_INDEX)
    audio_targets = torch.full((batch_size, k, seq_len), IGNORE_INDEX)
    num_tokens = torch.zeros(batch_size, dtype=torch.long)
    for b, docs in enumerate(rows):
        start = 0
        for d, doc in enumerate(docs):
            n = doc.tokens.shape[0]
            end = start + n
            if end > seq_len:
                raise ValueError(f"row {b} needs {end} positions, seq_len is {seq_len}")
            sl = slice(start, end)
            tokens[b, sl] = doc.tokens
            audio_codes[b, :, sl] = doc.audio_codes
            audio_in_mask[b, sl] = doc.audio_in_mask
            audio_out_mask[b, sl] = doc.audio_out_mask
            input_pos[b, sl] = torch.arange(n)
            doc_ids[b, sl] = d
            text_targets[b, start : end - 1] = torch.where(
                doc.audio_in_mask[1:] | doc.audio_out_mask[1:], IGNORE_INDEX, doc.tokens[1:]
            )
            both_out = doc.audio_out_mask[:-1] & doc.audio_out_mask[1:]
            audio_targets[b, :, start : end - 1] = torch.where(both_out, doc.audio_codes[:, 1:], IGNORE_INDEX)
            start = end
        doc_ids[b, start:] = len(docs)
        num_tokens[b] = start
    audio_any = audio_in_mask | audio_out_mask
    every = torch.ones(seq_len, dtype=torch.bool)
    return dict(
        tokens=tokens,
        audio_codes=audio_codes,
        audio_in_mask=audio_in_mask,
        audio_out_mask=audio_out_mask,
        input_pos=input_pos,
        doc_ids=doc_ids,
        text_targets=text_targets,
        audio_targets=audio_targets,
        text_ffn_index=torch.stack([positions_to_index(~m, seq_len, "text") for m in audio_any]),
        audio_ffn_index=torch.stack([positions_to_index(m, seq_len, "audio") for m in audio_any]),
        text_target_index=torch.stack([positions_to_index(every, seq_len) for _ in rows]),
        audio_target_index=torch.stack([positions_to_index(every, seq_len) for _ in rows]),
        num_text_targets=(text_targets != IGNORE_INDEX).sum(-1),
        num_audio_targets=(audio_targets != IGNORE_INDEX).sum(-1),
        num_tokens=num_tokens,
    )


def select_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same batch with target indices that select only positions carrying a target (capacity L)."""
    seq_len = batch["tokens"].shape[1]
    has_text = batch["text_targets"] != IGNORE_INDEX
    has_audio = (batch["audio_targets"] != IGNORE_INDEX).any(1)
    out = dict(batch)
    out["text_target_index"] = torch.stack([positions_to_index(m, seq_len) for m in has_text])
    out["audio_target_index"] = torch.stack([positions_to_index(m, seq_len) for m in has_audio])
    return out
