"""The run-time alignment guard: accepts correct packed batches, names the first violation otherwise."""

import logging
from types import SimpleNamespace

import pytest
import torch
from loss_batch_builder import (
    LAYOUT,
    SPECIAL,
    STREAM_EOS,
    Document,
    pack,
    random_codes,
    recount,
    text_document,
    tts_document,
)

from higgs_tune.data.alignment_guard import (
    AlignmentError,
    AlignmentLayout,
    check_batch_alignment,
    warn_if_implausibly_low,
)
from higgs_tune.data.batch import IGNORE_INDEX


def good_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = [
        [tts_document(num_frames=4, generator=g), text_document(generator=g)],
        [tts_document(num_frames=6, with_reference=True, with_audio_in=True, generator=g)],
    ]
    return pack(rows, 112, text_target_capacity=32, audio_target_capacity=48)


def corrupt(batch, **changes):
    batch = {name: value.clone() for name, value in batch.items()}
    for name, fn in changes.items():
        batch[name] = fn(batch[name])
    return recount(batch)


def test_accepts_correct_batches_of_several_layouts():
    check_batch_alignment(good_batch().batch, LAYOUT)
    g = torch.Generator().manual_seed(5)
    check_batch_alignment(pack([[text_document(generator=g)]], 30).batch, LAYOUT)  # no audio at all
    check_batch_alignment(pack([[tts_document(num_frames=1, generator=g)]] * 3, 64).batch, LAYOUT)
    doc = text_document(generator=g)
    full_row = pack([[doc]], len(doc)).batch  # no padding
    check_batch_alignment(full_row, LAYOUT)


def test_layout_from_model_config_and_tokenizer_lookup():
    config = SimpleNamespace(
        audio_in_token_idx=783,
        audio_out_token_idx=784,
        audio_out_bos_token_id=781,
        audio_eos_token_id=780,
        audio_codebook_size=1024,
        audio_stream_bos_id=1024,
        audio_stream_eos_id=1025,
    )
    assert AlignmentLayout.from_model_config(config) == LAYOUT
    with pytest.raises(ValueError, match="stream BOS/EOS"):
        AlignmentLayout.from_model_config(SimpleNamespace(**{**vars(config), "audio_stream_eos_id": 1026}))
    with pytest.raises(ValueError, match="lacks.*audio_eos_token_id"):
        AlignmentLayout.from_model_config(SimpleNamespace(**{**vars(config), "audio_eos_token_id": None}))
    with pytest.raises(ValueError, match=r"no id for \['<\|audio_eos\|>'\]"):
        AlignmentLayout.from_token_to_id({k: v for k, v in SPECIAL.items() if k != "<|audio_eos|>"}.get)


def test_layout_from_boson_config():
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig

    layout = AlignmentLayout.from_model_config(HiggsAudioConfig())
    assert layout.audio_out_token_id == 128016 and layout.stream_eos == 1025


def test_rejects_unshifted_text_targets_with_a_hint():
    packed = good_batch()
    batch = packed.batch
    text_labels = packed.text_labels
    # Unshifted, but only where both t and t+1 are text of the same document (isolates the token check).
    bad = corrupt(batch, text_targets=lambda t: torch.where(t != IGNORE_INDEX, text_labels, t))
    with pytest.raises(
        AlignmentError, match=r"row 0, position \d+: text target \d+ != token at position \d+"
    ):
        check_batch_alignment(bad, LAYOUT)


def test_rejects_unshifted_audio_targets():
    packed = good_batch()
    bad = corrupt(packed.batch, audio_targets=lambda _: packed.audio_labels.clone())
    with pytest.raises(AlignmentError, match=r"row 0, codebook \d+, position \d+: audio target"):
        check_batch_alignment(bad, LAYOUT)


def test_rejects_double_shifted_audio_targets_with_a_hint():
    batch = good_batch().batch

    def shift_again(targets):
        shifted = torch.full_like(targets, IGNORE_INDEX)
        shifted[:, :, :-1] = targets[:, :, 1:]
        return torch.where(targets != IGNORE_INDEX, shifted, IGNORE_INDEX)

    bad = corrupt(batch, audio_targets=shift_again)
    with pytest.raises(AlignmentError, match=r"position \d+: audio target .* shifted twice\?"):
        check_batch_alignment(bad, LAYOUT)


def test_rejects_double_shifted_text_targets():
    batch = good_batch().batch

    def shift_again(targets):
        shifted = torch.full_like(targets, IGNORE_INDEX)
        shifted[:, :-1] = targets[:, 1:]
        return shifted

    with pytest.raises(AlignmentError, match=r"row 0, position \d+: text target"):
        check_batch_alignment(corrupt(batch, text_targets=shift_again), LAYOUT)


def test_rejects_audio_inputs_used_as_labels():
    batch = good_batch().batch
    audio_out = batch["audio_out_mask"][:, None, :]
    unshifted_inputs = corrupt(
        batch, audio_targets=lambda _: torch.where(audio_out, batch["audio_codes"], IGNORE_INDEX)
    )
    with pytest.raises(
        AlignmentError, match=r"stream BOS 1024 \(never a target: audio INPUT codes used as labels\?\)"
    ):
        check_batch_alignment(unshifted_inputs, LAYOUT)
    next_inputs = torch.full_like(batch["audio_codes"], IGNORE_INDEX)
    next_inputs[:, :, :-1] = batch["audio_codes"][:, :, 1:]
    both_out = audio_out.clone()
    both_out[:, :, :-1] &= audio_out[:, :, 1:]
    shifted_inputs = corrupt(batch, audio_targets=lambda _: torch.where(both_out, next_inputs, IGNORE_INDEX))
    with pytest.raises(AlignmentError, match="stream BOS"):
        check_batch_alignment(shifted_inputs, LAYOUT)


def test_rejects_a_target_crossing_a_segment_or_document_boundary():
    batch = good_batch().batch
    last_audio = int(torch.nonzero(batch["audio_out_mask"][0])[-1])

    def leak(targets):
        targets[0, 0, last_audio] = 5
        return targets

    with pytest.raises(
        AlignmentError, match=rf"row 0, codebook 0, position {last_audio}: .* not an audio-out column"
    ):
        check_batch_alignment(corrupt(batch, audio_targets=leak), LAYOUT)
    doc_end = int(torch.nonzero(batch["doc_ids"][0] == 0)[-1])

    def cross_document(targets):
        targets[0, doc_end] = batch["tokens"][0, doc_end + 1]
        return targets

    with pytest.raises(AlignmentError, match=rf"row 0, position {doc_end}: .* last position of a document"):
        check_batch_alignment(corrupt(batch, text_targets=cross_document), LAYOUT)


def test_rejects_audio_targets_at_audio_in_columns():
    batch = good_batch().batch
    audio_in = int(torch.nonzero(batch["audio_in_mask"][1])[2])

    def at_audio_in(targets):
        targets[1, 3, audio_in] = 7
        return targets

    with pytest.raises(AlignmentError, match=rf"row 1, codebook 3, position {audio_in}"):
        check_batch_alignment(corrupt(batch, audio_targets=at_audio_in), LAYOUT)


def test_rejects_a_masked_stop_token():
    batch = good_batch().batch
    no_eos = corrupt(batch, audio_targets=lambda t: torch.where(t == STREAM_EOS, IGNORE_INDEX, t))
    with pytest.raises(AlignmentError, match="stop token masked"):
        check_batch_alignment(no_eos, LAYOUT)
    last_audio = int(torch.nonzero(batch["audio_out_mask"][0])[-1])

    def no_text_eos(targets):
        targets[0, last_audio] = IGNORE_INDEX
        return targets

    with pytest.raises(
        AlignmentError, match=rf"last audio column \(position {last_audio}\) .* <\|audio_eos\|>"
    ):
        check_batch_alignment(corrupt(batch, text_targets=no_text_eos), LAYOUT)


def test_rejects_a_segment_without_the_delay_pattern():
    g = torch.Generator().manual_seed(0)
    doc = Document().header([1], True).text([5, 6], trained=False).special("<|eot_id|>", trained=False)
    doc.header([2], False).audio_out_segment(random_codes(12, g), trained=True, delay=False)
    batch = pack([[doc.special("<|eot_id|>", trained=True)]], 48).batch
    with pytest.raises(AlignmentError, match="breaks the delay pattern"):
        check_batch_alignment(batch, LAYOUT)


@pytest.mark.parametrize(
    "field, edit, message",
    [
        ("num_text_targets", lambda t: t + 1, r"row 0: num_text_targets=\d+, the tensor has"),
        (
            "num_audio_targets",
            lambda t: t.index_fill(1, torch.tensor([4]), 0),
            r"row 0, codebook 4: num_audio_targets",
        ),
        ("text_target_index", lambda t: t.flip(1), r"row 0: text_target_index\[0\]"),
        ("audio_ffn_index", lambda t: t.roll(1, 1), r"row 0: audio_ffn_index\[0\]"),
        (
            "input_pos",
            lambda t: torch.arange(t.shape[1]).expand_as(t).clone(),
            r"row 0, position \d+: input_pos",
        ),
        ("doc_ids", lambda t: t.to(torch.int64), "dtype torch.int64, the contract says torch.int32"),
        (
            "tokens",
            lambda t: torch.where(t == SPECIAL["<|AUDIO_OUT|>"], 5, t),
            "audio-out column holds token 5",
        ),
        (
            "audio_codes",
            lambda t: t.index_fill(2, torch.tensor([1]), 3),
            r"row 0, codebook 0, position 1: audio_codes=3",
        ),
        ("num_tokens", lambda t: t - 1, r"row 0, position \d+: padding doc id 1, expected 2"),
        ("num_tokens", lambda t: t - 2, r"padding \(>= num_tokens\) has text target"),
        (
            "text_ffn_index",
            lambda t: torch.full_like(t, t.shape[1]),
            "a text position missing from text_ffn_index",
        ),
    ],
)
def test_rejects_inconsistent_bookkeeping(field, edit, message):
    batch = {name: value.clone() for name, value in good_batch().batch.items()}
    batch[field] = edit(batch[field])
    with pytest.raises(AlignmentError, match=message):
        check_batch_alignment(batch, LAYOUT)


def test_rejects_a_target_index_that_drops_targets():
    batch = {name: value.clone() for name, value in good_batch().batch.items()}
    batch["text_target_index"] = batch["text_target_index"][:, :5]
    with pytest.raises(AlignmentError, match="text_target_index is too short"):
        check_batch_alignment(batch, LAYOUT)


def test_rejects_missing_fields_and_wrong_shapes():
    batch = dict(good_batch().batch)
    del batch["audio_targets"]
    with pytest.raises(AlignmentError, match=r"lacks fields \['audio_targets'\]"):
        check_batch_alignment(batch, LAYOUT)
    batch = dict(good_batch().batch)
    batch["audio_targets"] = batch["audio_targets"][:, :4]
    with pytest.raises(
        AlignmentError, match=r"batch\['audio_targets'\] has shape \(2, 4, 112\), expected \(2, 8, 112\)"
    ):
        check_batch_alignment(batch, LAYOUT)


def test_warn_if_implausibly_low(caplog):
    with caplog.at_level(logging.WARNING, logger="higgs_tune.data.alignment_guard"):
        assert warn_if_implausibly_low(1e-3, step=0)
    assert "AUDIO LOSS LEAK?" in caplog.text and "ln(1026) = 6.93" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert not warn_if_implausibly_low(6.9, step=0)  # chance level: fine
        assert not warn_if_implausibly_low(3.5, step=2)  # a trained head: fine
        assert not warn_if_implausibly_low(0.2, step=500)  # late in training: may be legitimate overfitting
        assert not warn_if_implausibly_low(float("nan"), step=0)
    assert caplog.text == ""
    assert warn_if_implausibly_low(torch.tensor(0.01).item(), step=3, codebook_size=2048, threshold_nats=0.5)


def test_accepts_batches_from_the_project_packer():
    """The guard and the data pipeline agree on the invariants (voice cloning, audio-in, packing)."""
    import numpy as np

    from higgs_tune.data.batch import PackingSpec
    from higgs_tune.data.chatml import tokenize_sample
    from higgs_tune.data.document import AudioLayout, build_document
    from higgs_tune.data.packer import collate_rows
    from higgs_tune.data.tokenizer import HiggsTokenizer

    tokenizer = HiggsTokenizer.from_path("higgs_tune/assets/tiny_tokenizer")
    layout = AlignmentLayout.from_token_to_id(tokenizer.token_to_id)
    rng = np.random.default_rng(0)

    def audio(path):
        return {"type": "audio", "audio_codes": path}

    voice_clone = {
        "messages": [
            {"role": "system", "content": ["Speak like this: ", audio("ref_in.npy")]},
            {"role": "user", "content": "a reference line"},
            {"role": "assistant", "content": audio("ref_out.npy")},
            {"role": "user", "content": "say something new"},
            {"role": "assistant", "content": ["Sure. ", audio("target.npy")]},
        ],
        "start_index": 3,
    }
    text_only = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    }
    documents = [
        build_document(
            tokenize_sample(voice_clone, tokenizer),
            [rng.integers(0, 1024, (8, frames)) for frames in (3, 4, 6)],
            AudioLayout(),
        ),
        build_document(tokenize_sample(text_only, tokenizer), [], AudioLayout()),
    ]
    length = sum(len(document) for document in documents)
    batch = collate_rows(
        [documents, documents[1:]], PackingSpec(seq_len=length + 3, batch_size=2), tokenizer.special.pad
    )
    check_batch_alignment(batch, layout)
    assert batch["num_audio_targets"][0].tolist() == [7] * 8  # only the target turn: T + 1 = 7 per codebook


def test_layout_lookup_that_raises_key_error_lists_every_missing_token():
    def strict(token):
        if token in ("<|AUDIO|>", "<|audio_eos|>"):
            raise KeyError(token)
        return SPECIAL[token]

    with pytest.raises(ValueError, match=r"no id for \['<\|AUDIO\|>', '<\|audio_eos\|>'\]"):
        AlignmentLayout.from_token_to_id(strict)
