"""Parity with Boson's reference data path (docs/higgs_audio_v2.md §5.2, §5.3, §3.3, §6).

For random samples, our per-document layout (tokens, audio codes, masks) and our targets must equal what
``prepare_chatml_sample`` + ``HiggsAudioSampleCollator`` + ``merge_input_ids_with_audio_features``
produce, with Boson's labels shifted by one the way its loss shifts them (text: ``expanded_labels[t + 1]``;
audio: ``label_audio_ids[:, n + 1]`` after masking every segment's first column).
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sample_strategies import TINY_TOKENIZER, chatml_samples, codes_in_order

from higgs_tune import boson_reference as reference
from higgs_tune.data.batch import IGNORE_INDEX
from higgs_tune.data.chatml import SampleError, tokenize_sample
from higgs_tune.data.document import AudioLayout, build_document
from higgs_tune.data.tokenizer import HiggsTokenizer

pytest.importorskip("transformers")
pytest.importorskip("boson_multimodal")
from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample  # noqa: E402
from boson_multimodal.model.higgs_audio.utils import merge_input_ids_with_audio_features  # noqa: E402

TOKENIZER = HiggsTokenizer.from_path(TINY_TOKENIZER)
BOSON_TOKENIZER = reference.boson_tokenizer(TINY_TOKENIZER / "tokenizer.json")
SPECIAL = TOKENIZER.special
LAYOUTS = {
    "delay_k8": AudioLayout(num_codebooks=8, use_delay_pattern=True),
    "no_delay_k4": AudioLayout(num_codebooks=4, use_delay_pattern=False),
}


def boson_dataset_sample(sample: dict, codes: list[np.ndarray], num_codebooks: int):
    return reference.boson_dataset_sample(sample, codes, BOSON_TOKENIZER, num_codebooks)


def boson_collator(layout: AudioLayout):
    """The collator with the 3B training settings of docs/higgs_audio_v2.md §5.3 (ids from the tokenizer, by name)."""
    return reference.boson_training_collator(
        audio_in_token_id=SPECIAL.audio_in,
        audio_out_token_id=SPECIAL.audio_out,
        pad_token_id=SPECIAL.pad,
        layout=layout,
    )


def boson_merge(batch, num_codebooks: int):
    """Boson's merge as ``HiggsAudioModel.forward`` calls it in training (round_to 8, left padding iff B == 1).

    The "embeddings" are the codes themselves (embed dim K, text rows zero), so the merged embedding at
    an audio column IS that column's codes.
    """
    batch_size, seq_len = batch.input_ids.shape

    def as_embed(ids):
        return ids.T.double() if ids is not None and ids.numel() else torch.zeros(0, num_codebooks).double()

    (
        embedding,
        attention_mask,
        labels,
        position_ids,
        input_ids,
        audio_in_mask,
        audio_in_codes_mask,
        audio_out_mask,
    ) = merge_input_ids_with_audio_features(
        None,
        None,
        as_embed(batch.audio_in_ids),
        batch.audio_in_ids_start,
        as_embed(batch.audio_out_ids),
        batch.audio_out_ids_start,
        SPECIAL.audio_in,
        SPECIAL.audio_out,
        torch.zeros(batch_size, seq_len, num_codebooks, dtype=torch.float64),
        batch.input_ids,
        batch.attention_mask,
        batch.label_ids,
        pad_token_id=SPECIAL.pad,
        round_to=8,
        left_padding=batch_size == 1,
    )
    assert torch.equal(audio_in_mask, audio_in_codes_mask)
    return {
        "valid": attention_mask.bool(),
        "tokens": input_ids,
        "audio_codes": embedding.permute(0, 2, 1).round().long(),
        "audio_in_mask": audio_in_mask,
        "audio_out_mask": audio_out_mask,
        "labels": labels,
        "position_ids": position_ids,
    }


def boson_shifted_audio_targets(batch, merged) -> torch.Tensor:
    """[B, K, S'] audio targets as Boson's loss pairs them: column n with label column n + 1, segment
    starts masked (docs/higgs_audio_v2.md §6.3), scattered to the merged positions of the audio-out columns."""
    out_mask = merged["audio_out_mask"]
    batch_size, seq_len = out_mask.shape
    num_codebooks = merged["audio_codes"].shape[1]
    targets = torch.full((num_codebooks, batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
    if batch.label_audio_ids is not None and batch.label_audio_ids.numel():
        labels = batch.label_audio_ids.clone()
        labels[:, batch.audio_out_ids_start] = IGNORE_INDEX
        shifted = torch.cat([labels[:, 1:], torch.full((num_codebooks, 1), IGNORE_INDEX)], dim=1)
        targets[:, out_mask] = shifted
    return targets.permute(1, 0, 2)


def assert_parity(samples_and_codes, layout: AudioLayout) -> None:
    docs, boson_samples = [], []
    for sample, codes_by_path in samples_and_codes:
        codes = codes_in_order(sample, codes_by_path)
        tokenized = tokenize_sample(sample, TOKENIZER)
        boson_sample = boson_dataset_sample(sample, codes, layout.num_codebooks)
        # before the merge: the same tokens and unshifted labels as prepare_chatml_sample
        assert tokenized.input_ids.tolist() == boson_sample.input_ids.tolist()
        assert tokenized.label_ids.tolist() == boson_sample.label_ids.tolist()
        docs.append(build_document(tokenized, codes, layout))
        boson_samples.append(boson_sample)

    batch = boson_collator(layout)(boson_samples)
    merged = boson_merge(batch, layout.num_codebooks)
    audio_targets = boson_shifted_audio_targets(batch, merged)
    for b, doc in enumerate(docs):
        valid = merged["valid"][b]
        assert int(valid.sum()) == len(doc)
        assert torch.equal(merged["position_ids"][b][valid], torch.arange(len(doc)))
        assert doc.tokens.tolist() == merged["tokens"][b][valid].tolist()
        assert torch.equal(doc.audio_codes, merged["audio_codes"][b][:, valid])
        assert torch.equal(doc.audio_in_mask, merged["audio_in_mask"][b][valid])
        assert torch.equal(doc.audio_out_mask, merged["audio_out_mask"][b][valid])
        labels = merged["labels"][b][valid]
        expected_text_targets = torch.cat([labels[1:], torch.tensor([IGNORE_INDEX])])
        assert doc.text_targets.tolist() == expected_text_targets.tolist()
        assert torch.equal(doc.audio_targets, audio_targets[b][:, valid])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(chatml_samples(num_codebooks=8), min_size=1, max_size=3))
def test_layout_and_targets_match_boson_delay_pattern(batch):
    assert_parity(batch, LAYOUTS["delay_k8"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(chatml_samples(num_codebooks=4), min_size=1, max_size=3))
def test_layout_and_targets_match_boson_without_delay_pattern(batch):
    assert_parity(batch, LAYOUTS["no_delay_k4"])


def test_voice_clone_sample_matches_boson():
    """The voice-cloning layout of examples/generation.py: reference turns before start_index."""
    rng = np.random.default_rng(0)
    codes = {"ref.npy": rng.integers(0, 1024, (8, 5)), "target.npy": rng.integers(0, 1024, (8, 7))}
    sample = {
        "messages": [
            {
                "role": "system",
                "content": "Generate audio following instruction.\n\n<|scene_desc_start|>\nquiet room\n<|scene_desc_end|>",
            },
            {"role": "user", "content": "The reference transcript."},
            {"role": "assistant", "content": {"type": "audio", "audio_codes": "ref.npy"}},
            {"role": "user", "content": "The text to speak."},
            {"role": "assistant", "content": [{"type": "audio", "audio_codes": "target.npy"}]},
        ],
        "start_index": 4,
    }
    assert_parity([(sample, codes)], LAYOUTS["delay_k8"])
    doc = build_document(
        tokenize_sample(sample, TOKENIZER), codes_in_order(sample, codes), LAYOUTS["delay_k8"]
    )
    # only the target segment is trained: T + 1 targets per codebook
    assert ((doc.audio_targets != IGNORE_INDEX).sum(-1) == 7 + 1).all()


@settings(max_examples=60, deadline=None)
@given(sample_and_codes=chatml_samples(num_codebooks=8))
def test_nothing_to_train_is_exactly_boson_all_masked(sample_and_codes):
    """We reject a sample iff Boson would give it no label at all (start_index past every assistant turn)."""
    sample, _ = sample_and_codes
    sample = copy.deepcopy(sample)
    sample["start_index"] = len(sample["messages"]) - 1
    sample["messages"][-1]["role"] = "user"
    sample["messages"][-1].pop("recipient", None)
    _, boson_labels, _, _ = prepare_chatml_sample(reference.to_boson_sample(sample), BOSON_TOKENIZER)
    boson_has_labels = any(label != IGNORE_INDEX for label in boson_labels)
    if boson_has_labels:
        tokenize_sample(sample, TOKENIZER)
    else:
        with pytest.raises(SampleError, match="nothing to train on"):
            tokenize_sample(sample, TOKENIZER)


@functools.cache
def tiny_boson_model(layout: AudioLayout):
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel

    config = HiggsAudioConfig(
        text_config={
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "vocab_size": TOKENIZER.vocab_size,
            "pad_token_id": SPECIAL.pad,
        },
        audio_adapter_type="dual_ffn",
        audio_dual_ffn_layers=[0],
        skip_audio_tower=True,
        encode_whisper_embed=False,
        encode_audio_in_tokens=True,
        use_delay_pattern=layout.use_delay_pattern,
        audio_num_codebooks=layout.num_codebooks,
        audio_codebook_size=layout.codebook_size,
        audio_in_token_idx=SPECIAL.audio_in,
        audio_out_token_idx=SPECIAL.audio_out,
        audio_out_bos_token_id=SPECIAL.audio_out_bos,
        audio_eos_token_id=SPECIAL.audio_eos,
        pad_token_id=SPECIAL.pad,
    )
    return HiggsAudioModel(config).eval()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(samples_and_codes=st.lists(chatml_samples(num_codebooks=8), min_size=1, max_size=3))
def test_merge_harness_is_what_the_boson_model_does(samples_and_codes):
    """The direct call of merge_input_ids_with_audio_features above equals the merge inside a (tiny, random)
    HiggsAudioModel.forward: same expanded ids, labels and masks (so the parity tests test the real thing).
    Batches of 1 (left padded by the model) and of several samples (right padded)."""
    layout = LAYOUTS["delay_k8"]
    model = tiny_boson_model(layout)
    boson_samples = [
        boson_dataset_sample(s, codes_in_order(s, c), layout.num_codebooks) for s, c in samples_and_codes
    ]
    batch = boson_collator(layout)(boson_samples)
    merged = boson_merge(batch, layout.num_codebooks)
    with torch.no_grad():
        out = model(**reference.boson_model_inputs(batch))
    assert torch.equal(out.expanded_input_ids, merged["tokens"])
    assert torch.equal(out.expanded_labels, merged["labels"])
    assert torch.equal(out.audio_in_mask, merged["audio_in_mask"])
    assert torch.equal(out.audio_out_mask, merged["audio_out_mask"])
    assert torch.equal(out.attention_mask.bool(), merged["valid"])
