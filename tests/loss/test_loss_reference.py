"""Boson's reference formula (docs/higgs_audio_v2.md §6.4): a hand-computed example, and agreement with AlignedLoss."""

import math

import pytest
import torch
from loss_batch_builder import (
    NUM_AUDIO_CLASSES,
    NUM_CODEBOOKS,
    VOCAB_SIZE,
    boson_view,
    logits_at_positions,
    pack,
    text_document,
    tts_document,
)

from higgs_tune.data.batch import IGNORE_INDEX
from higgs_tune.loss import AlignedLoss, reference_loss

X = IGNORE_INDEX


def ce(logits: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


def test_reference_on_a_hand_computed_example():
    text_logits = [[0.5, -1.0, 2.0], [1.5, 0.0, 0.3], [0.0, 0.0, 0.0], [9.0, 9.0, 9.0]]
    labels = [X, 2, 0, X]  # unshifted: position 0 predicts label 2, position 1 predicts 0, position 2 nothing
    audio_logits = [  # [N_out=5, K=2, C=3]; two segments starting at columns 0 and 3
        [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
        [[0.0, 2.0, 0.0], [0.2, 0.1, 0.7]],
        [[0.3, 0.3, 0.9], [5.0, 5.0, 5.0]],
        [[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]],
        [[7.0, 7.0, 7.0], [7.0, 7.0, 7.0]],
    ]
    label_audio_ids = [[X, 1, 2, 0, 1], [X, X, 2, 1, X]]
    out = reference_loss(
        torch.tensor([text_logits]),
        torch.tensor([labels]),
        torch.tensor(audio_logits),
        torch.tensor(label_audio_ids),
        torch.tensor([0, 3]),
    )
    expected_text = (ce(text_logits[0], 2) + ce(text_logits[1], 0)) / 2
    # Column 3 starts segment 2: its labels are masked, so column 2 predicts nothing (no cross-segment leak).
    expected_k0 = (ce(audio_logits[0][0], 1) + ce(audio_logits[1][0], 2) + ce(audio_logits[3][0], 1)) / 3
    expected_k1 = ce(audio_logits[1][1], 2)
    assert out.text_loss.item() == pytest.approx(expected_text, rel=1e-6)
    assert out.codebook_losses.tolist() == pytest.approx([expected_k0, expected_k1], rel=1e-6)
    assert out.audio_loss.item() == pytest.approx((expected_k0 + expected_k1) / 2, rel=1e-6)
    assert out.loss.item() == pytest.approx(expected_text + (expected_k0 + expected_k1) / 2, rel=1e-6)


def test_reference_does_not_modify_its_labels_and_handles_empty_terms():
    label_audio_ids = torch.tensor([[X, 1, 2], [X, X, 2]])
    before = label_audio_ids.clone()
    logits = torch.randn(1, 3, 4, requires_grad=True)
    audio_logits = torch.randn(3, 2, 3, requires_grad=True)
    out = reference_loss(logits, torch.full((1, 3), X), audio_logits, label_audio_ids, torch.tensor([0]))
    assert torch.equal(label_audio_ids, before)
    assert out.text_loss == 0 and torch.isfinite(out.loss)
    out.loss.backward()  # the zero term stays connected to the graph
    assert logits.grad is not None and torch.all(logits.grad == 0)


def build(rows, seq_len, seed=0):
    torch.manual_seed(seed)
    packed = pack(rows, seq_len)
    full_text = torch.randn(len(rows), seq_len, VOCAB_SIZE)
    full_audio = torch.randn(len(rows), seq_len, NUM_CODEBOOKS, NUM_AUDIO_CLASSES)
    return packed, full_text, full_audio


def assert_same(aligned, reference):
    torch.testing.assert_close(aligned.text_loss, reference.text_loss)
    torch.testing.assert_close(aligned.codebook_losses, reference.codebook_losses)
    torch.testing.assert_close(aligned.audio_loss, reference.audio_loss)
    torch.testing.assert_close(aligned.loss.detach(), reference.loss.detach())


def test_aligned_loss_equals_reference_one_document_per_row():
    g = torch.Generator().manual_seed(1)
    rows = [
        [tts_document(num_frames=6, generator=g)],
        [tts_document(num_frames=3, with_reference=True, generator=g)],
    ]
    packed, full_text, full_audio = build(rows, 80)
    aligned = AlignedLoss()(logits_at_positions(full_text, full_audio, packed.batch), packed.batch)
    assert_same(aligned, reference_loss(**boson_view(packed, full_text, full_audio)))


def test_aligned_loss_equals_reference_on_packed_rows_with_several_segments_and_its_gradients():
    """Packed rows: the reference treats a row as one sequence; documents start with unlabelled tokens and
    segments are masked at their starts, so nothing leaks across documents and the two must agree."""
    g = torch.Generator().manual_seed(2)
    rows = [
        [
            tts_document(num_frames=4, generator=g),
            tts_document(num_frames=2, with_audio_in=True, generator=g),
        ],
        [text_document(generator=g), tts_document(num_frames=5, with_reference=True, generator=g)],
        [text_document(reply_len=2, generator=g)],
    ]
    packed, full_text, full_audio = build(rows, 128)
    full_text.requires_grad_()
    full_audio.requires_grad_()
    aligned = AlignedLoss(text_chunk_size=7)(
        logits_at_positions(full_text, full_audio, packed.batch), packed.batch
    )
    aligned_grads = torch.autograd.grad(aligned.loss, [full_text, full_audio])
    reference = reference_loss(**boson_view(packed, full_text, full_audio))
    reference_grads = torch.autograd.grad(reference.loss, [full_text, full_audio])
    assert_same(aligned, reference)
    torch.testing.assert_close(aligned_grads[0], reference_grads[0])
    torch.testing.assert_close(aligned_grads[1], reference_grads[1])
