"""Teacher-forcing alignment properties of documents and packed rows (docs/architecture.md §2, §11; docs/higgs_audio_v2.md §5.4, §6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sample_strategies import TINY_TOKENIZER, chatml_samples, codes_in_order, make_document

from higgs_tune.data.batch import IGNORE_INDEX, PackingSpec
from higgs_tune.data.chatml import SampleError, parse_sample, tokenize_sample
from higgs_tune.data.document import (
    AudioLayout,
    apply_delay_pattern,
    build_document,
    document_stats,
    segment_input_codes,
    segment_label_codes,
)
from higgs_tune.data.packer import collate_rows
from higgs_tune.data.tokenizer import HiggsTokenizer

TOKENIZER = HiggsTokenizer.from_path(TINY_TOKENIZER)
SPECIAL = TOKENIZER.special
LAYOUT = AudioLayout()
BOS, EOS = LAYOUT.stream_bos_id, LAYOUT.stream_eos_id


def segments(out_mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of true values in a [L] mask (audio segments are never adjacent)."""
    runs, start = [], None
    for t, value in enumerate(out_mask.tolist() + [False]):
        if value and start is None:
            start = t
        elif not value and start is not None:
            runs.append((start, t))
            start = None
    return runs


def check_row_alignment(row: dict[str, torch.Tensor]) -> None:
    """Every alignment property on one row: tokens [L], audio_codes [K, L], ..., doc_ids [L]."""
    tokens, codes, doc_ids = row["tokens"], row["audio_codes"], row["doc_ids"]
    text_targets, audio_targets = row["text_targets"], row["audio_targets"]
    out_mask, in_mask = row["audio_out_mask"], row["audio_in_mask"]
    length = tokens.numel()

    # text: the target at t is the input token at t + 1 of the same document
    for t in torch.nonzero(text_targets != IGNORE_INDEX).flatten().tolist():
        assert t + 1 < length and doc_ids[t + 1] == doc_ids[t], f"text target at {t} crosses a document"
        assert text_targets[t] == tokens[t + 1]
        assert not (in_mask[t + 1] or out_mask[t + 1]), "a text target points at an audio column"

    # audio: targets only at audio-out columns, never BOS, never a delay filler
    has_audio_target = (audio_targets != IGNORE_INDEX).any(0)
    assert not (has_audio_target & ~out_mask).any(), "audio target outside an audio-out segment"
    assert not (audio_targets == BOS).any(), "stream BOS is a target"

    for start, end in segments(in_mask):
        assert (text_targets[start:end] == IGNORE_INDEX).all(), "audio-in columns carry a text target"

    for start, end in segments(out_mask):
        seg_codes, seg_targets = codes[:, start:end], audio_targets[:, start:end]
        num_frames = end - start - codes.shape[0] - 1
        trained = bool((seg_targets != IGNORE_INDEX).any())
        # the last column never has an audio target (its next column is outside the segment)
        assert (seg_targets[:, -1] == IGNORE_INDEX).all()
        if not trained:
            assert (text_targets[start:end] == IGNORE_INDEX).all()
            continue
        for k in range(codes.shape[0]):
            # target = next input code when that code is a payload or the first EOS, else -100 (filler)
            for t in range(end - start - 1):
                nxt, cur = int(seg_codes[k, t + 1]), int(seg_codes[k, t])
                expected = nxt if nxt < BOS or (nxt == EOS and cur != EOS) else IGNORE_INDEX
                assert int(seg_targets[k, t]) == expected, f"codebook {k} column {t}"
            assert int((seg_targets[k] == EOS).sum()) == 1, "EOS must be a target exactly once per codebook"
            assert int((seg_targets[k] != IGNORE_INDEX).sum()) == num_frames + 1
        # text stream around a trained segment (docs/higgs_audio_v2.md §5.5)
        assert (text_targets[start : end - 1] == IGNORE_INDEX).all()
        assert text_targets[end - 1] == SPECIAL.audio_eos, "last audio column must predict <|audio_eos|>"
        assert tokens[start - 1] == SPECIAL.audio_out_bos
        assert text_targets[start - 2] == SPECIAL.audio_out_bos, "the position before <|audio_out_bos|>"


def document_row(doc) -> dict[str, torch.Tensor]:
    return {
        "tokens": doc.tokens,
        "audio_codes": doc.audio_codes,
        "audio_in_mask": doc.audio_in_mask,
        "audio_out_mask": doc.audio_out_mask,
        "text_targets": doc.text_targets,
        "audio_targets": doc.audio_targets,
        "doc_ids": torch.zeros(len(doc), dtype=torch.int32),
    }


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample_and_codes=chatml_samples())
def test_document_alignment_properties(sample_and_codes):
    doc = make_document(*sample_and_codes, TOKENIZER, LAYOUT)
    check_row_alignment(document_row(doc))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(samples=st.lists(chatml_samples(max_messages=4), min_size=2, max_size=4))
def test_packed_row_alignment_properties(samples):
    """No target crosses a document boundary in a packed row, and each document's slice is the document."""
    docs = [make_document(sample, codes, TOKENIZER, LAYOUT) for sample, codes in samples]
    seq_len = sum(len(d) for d in docs) + 5
    spec = PackingSpec(seq_len=seq_len, batch_size=1, num_codebooks=LAYOUT.num_codebooks)
    batch = collate_rows([docs], spec, pad_id=SPECIAL.pad)
    row = {name: value[0] for name, value in batch.items()}
    check_row_alignment(row)
    start = 0
    for doc_id, doc in enumerate(docs):
        end = start + len(doc)
        assert (row["doc_ids"][start:end] == doc_id).all()
        # the last position of every document has no target at all
        assert row["text_targets"][end - 1] == IGNORE_INDEX
        assert (row["audio_targets"][:, end - 1] == IGNORE_INDEX).all()
        assert torch.equal(row["text_targets"][start:end], doc.text_targets)
        assert torch.equal(row["audio_targets"][:, start:end], doc.audio_targets)
        start = end


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample_and_codes=chatml_samples(), delay=st.booleans())
def test_document_stats_from_frame_counts(sample_and_codes, delay):
    """document_stats (manifest scan, shapes only) predicts build_document's counts exactly."""
    sample, codes_by_path = sample_and_codes
    layout = AudioLayout(use_delay_pattern=delay)
    tokenized = tokenize_sample(sample, TOKENIZER)
    codes = codes_in_order(sample, codes_by_path)
    doc = build_document(tokenized, codes, layout)
    assert document_stats(tokenized, [c.shape[1] for c in codes], layout) == doc.stats
    audio = doc.audio_in_mask | doc.audio_out_mask
    assert doc.num_audio_positions == int(audio.sum())
    assert doc.num_text_positions == int((~audio).sum())
    assert doc.num_text_targets == int((doc.text_targets != IGNORE_INDEX).sum())
    assert doc.num_audio_target_positions == int((doc.audio_targets != IGNORE_INDEX).any(0).sum())


def test_spec_worked_delay_example():
    """Spec §5.4 verbatim: K=4, T=3."""
    layout = AudioLayout(num_codebooks=4)
    a = torch.tensor([[10, 11, 12], [20, 21, 22], [30, 31, 32], [40, 41, 42]])
    B, E, _ = BOS, EOS, IGNORE_INDEX
    expected_input = torch.tensor(
        [
            [B, 10, 11, 12, E, E, E, E],
            [B, B, 20, 21, 22, E, E, E],
            [B, B, B, 30, 31, 32, E, E],
            [B, B, B, B, 40, 41, 42, E],
        ]
    )
    expected_label = torch.tensor(
        [
            [_, 10, 11, 12, E, _, _, _],
            [_, _, 20, 21, 22, E, _, _],
            [_, _, _, 30, 31, 32, E, _],
            [_, _, _, _, 40, 41, 42, E],
        ]
    )
    assert torch.equal(segment_input_codes(a, layout), expected_input)
    assert torch.equal(segment_label_codes(a, layout), expected_label)
    assert layout.segment_length(3) == 8

    sample = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": {"type": "audio", "audio_codes": "x"}},
        ]
    }
    doc = build_document(tokenize_sample(sample, TOKENIZER), [a], layout)
    ((start, end),) = segments(doc.audio_out_mask)
    # teacher forcing of docs/higgs_audio_v2.md §5.4: column t is paired with label column t + 1; the last column with nothing
    assert torch.equal(
        doc.audio_targets[:, start:end], torch.cat([expected_label[:, 1:], torch.full((4, 1), _)], 1)
    )
    assert torch.equal(doc.audio_codes[:, start:end], expected_input)
    assert doc.tokens[start - 1] == SPECIAL.audio_out_bos and doc.tokens[end] == SPECIAL.audio_eos
    assert doc.text_targets[start - 2 : end + 1].tolist() == [SPECIAL.audio_out_bos] + [_] * 8 + [
        SPECIAL.audio_eos,
        SPECIAL.eot,
    ]


def test_delay_pattern_matches_boson_helper():
    boson_utils = pytest.importorskip("boson_multimodal.model.higgs_audio.utils")
    codes = torch.arange(3 * 5).reshape(3, 5)
    ours = apply_delay_pattern(codes, leading_fill=-1, trailing_fill=-2)
    theirs = boson_utils.build_delay_pattern_mask(codes.unsqueeze(0), bos_token_id=-1, pad_token_id=-2)[0][0]
    assert torch.equal(ours, theirs)


def test_untrained_reference_segment_has_no_targets():
    """Failure mode 6: the reference clip before start_index is fed but never trained."""
    rng = np.random.default_rng(1)
    codes = {"ref": rng.integers(0, 1024, (8, 4)), "out": rng.integers(0, 1024, (8, 6))}
    sample = {
        "messages": [
            {"role": "user", "content": "ref text"},
            {"role": "assistant", "content": {"type": "audio", "audio_codes": "ref"}},
            {"role": "user", "content": "say this"},
            {"role": "assistant", "content": {"type": "audio", "audio_codes": "out"}},
        ],
        "start_index": 3,
    }
    doc = make_document(sample, codes, TOKENIZER, LAYOUT)
    (ref_start, ref_end), (out_start, out_end) = segments(doc.audio_out_mask)
    assert (doc.audio_targets[:, ref_start:ref_end] == IGNORE_INDEX).all()
    assert (doc.text_targets[: out_start - 2] == IGNORE_INDEX).all()
    assert ((doc.audio_targets[:, out_start:out_end] != IGNORE_INDEX).sum(1) == 6 + 1).all()
    check_row_alignment(document_row(doc))


@pytest.mark.parametrize(
    "codes, message",
    [
        (np.zeros((7, 3), dtype=np.int64), r"shape \[8, T>=1\]"),
        (np.zeros((8, 0), dtype=np.int64), r"shape \[8, T>=1\]"),
        (np.zeros((8, 3), dtype=np.float32), "integers"),
        (np.full((8, 3), 1024, dtype=np.int64), r"0\.\.1023"),
        (np.full((8, 3), -1, dtype=np.int64), r"0\.\.1023"),
    ],
)
def test_bad_codes_are_sample_errors_naming_the_item(codes, message):
    sample = {
        "messages": [
            {"role": "assistant", "content": ["hi", {"type": "audio", "audio_codes": "codes/x.npy"}]}
        ]
    }
    with pytest.raises(SampleError, match=message) as error:
        build_document(tokenize_sample(sample, TOKENIZER), [codes], LAYOUT)
    assert "codes/x.npy" in str(error.value)


def test_codes_storage_dtypes_are_accepted():
    sample = {"messages": [{"role": "assistant", "content": {"type": "audio", "audio_codes": "x"}}]}
    tokenized = tokenize_sample(sample, TOKENIZER)
    values = np.random.default_rng(0).integers(0, 1024, (8, 5))
    reference = build_document(tokenized, [values], LAYOUT)
    for dtype in (np.uint16, np.int16, ">i4"):
        doc = build_document(tokenized, [values.astype(dtype)], LAYOUT)
        assert torch.equal(doc.audio_codes, reference.audio_codes)
    doc = build_document(tokenized, [torch.from_numpy(values).int()], LAYOUT)
    assert torch.equal(doc.audio_targets, reference.audio_targets)


def test_wrong_number_of_code_arrays():
    sample = {"messages": [{"role": "assistant", "content": {"type": "audio", "audio_codes": "x"}}]}
    with pytest.raises(SampleError, match="1 audio items but 0 code arrays"):
        build_document(tokenize_sample(sample, TOKENIZER), [], LAYOUT)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\]: role"),
        ({"messages": [{"role": "user", "content": "x", "name": "a"}]}, r"unknown key\(s\) \['name'\]"),
        ({"messages": [{"role": "assistant", "content": "x"}], "start_idx": 1}, "start_idx"),
        ({"messages": [{"role": "assistant", "content": "x"}], "start_index": 1}, "outside the 1 messages"),
        ({"messages": [{"role": "assistant", "content": "x"}], "start_index": "0"}, "integer"),
        ({"messages": [{"role": "user", "content": "x", "recipient": "tool"}]}, "only allowed on assistant"),
        (
            {"messages": [{"role": "assistant", "content": {"type": "audio", "audio_url": "a.wav"}}]},
            "audio_codes",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "image"}]}]},
            r"content\[0\]: content item type",
        ),
        ({"messages": [{"role": "assistant", "content": {"type": "text"}}]}, "'text' as a string"),
        ({"messages": [{"role": "assistant", "content": None}]}, "string or an object"),
    ],
)
def test_invalid_samples_are_rejected_with_the_field_named(raw, message):
    with pytest.raises(SampleError, match=message):
        parse_sample(raw)


def test_placeholder_in_text_is_rejected():
    sample = {"messages": [{"role": "assistant", "content": "look: <|AUDIO_OUT|>"}]}
    with pytest.raises(SampleError, match=r"messages\[0\]\.content\[0\].*placeholder"):
        tokenize_sample(sample, TOKENIZER)


def test_parsed_sample_keeps_structure():
    parsed = parse_sample(
        {
            "messages": [
                {
                    "role": "system",
                    "content": [{"type": "audio", "audio_codes": "a.npy", "audio_url": "a.wav"}, "x"],
                },
                {"role": "assistant", "content": "y", "recipient": "tool"},
            ],
            "start_index": 1,
            "speaker": "s1",
            "misc": {"id": 3},
        }
    )
    assert parsed.start_index == 1 and parsed.speaker == "s1"
    assert [item.codes_path for item in parsed.audio_items] == ["a.npy"]
    assert parsed.messages[1].recipient == "tool"
