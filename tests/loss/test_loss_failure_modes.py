"""One test per known failure mode of docs/architecture.md §11, named after it.

Models are stand-ins with known answers: the ORACLE puts (almost) all mass on the TRUE next token of a
correct batch (built by the single shift), the COPY model on its own input token / code.
"""

import math

import pytest
import torch
from loss_batch_builder import (
    CODEBOOK_SIZE,
    LAYOUT,
    NUM_AUDIO_CLASSES,
    NUM_CODEBOOKS,
    STREAM_EOS,
    VOCAB_SIZE,
    Document,
    logits_at_positions,
    one_hot_logits,
    pack,
    random_codes,
    recount,
    text_document,
    tts_document,
)

from higgs_tune.data.alignment_guard import AlignmentError, check_batch_alignment, warn_if_implausibly_low
from higgs_tune.data.batch import IGNORE_INDEX
from higgs_tune.loss import AlignedLoss

K, C, V = NUM_CODEBOOKS, NUM_AUDIO_CLASSES, VOCAB_SIZE
HIGH = 5.0  # nats; chance is ln(1024) = 6.93 for text and ln(1026) = 6.93 per codebook
loss_fn = AlignedLoss()


def correct_batch(seed: int = 0, with_reference: bool = False):
    g = torch.Generator().manual_seed(seed)
    rows = [
        [
            tts_document(num_frames=4, generator=g),
            tts_document(num_frames=6, with_audio_in=True, generator=g),
        ],
        [tts_document(num_frames=5, with_reference=with_reference, generator=g), text_document(generator=g)],
    ]
    return pack(rows, 128)


def oracle_full_logits(batch):
    """Per-position logits [B, L, V] / [B, L, K, C] on the TRUE next token of a correct batch (uniform
    where the position has no target)."""
    return one_hot_logits(batch["text_targets"], V), one_hot_logits(batch["audio_targets"].transpose(1, 2), C)


def copy_full_logits(batch):
    """Per-position logits on the position's OWN input token and codes (a model that learned to copy)."""
    return one_hot_logits(batch["tokens"], V), one_hot_logits(batch["audio_codes"].transpose(1, 2), C)


def loss_of(full_logits, batch):
    return loss_fn(logits_at_positions(*full_logits, batch), batch)


def shift_again(batch, packed_labels=None):
    """Targets shifted a second time: target[t] = label[t+2] (same document / same audio-out segment)."""
    batch = {name: value.clone() for name, value in batch.items()}
    same_doc = batch["doc_ids"][:, 1:] == batch["doc_ids"][:, :-1]
    text = torch.full_like(batch["text_targets"], IGNORE_INDEX)
    text[:, :-1] = torch.where(same_doc, batch["text_targets"][:, 1:], IGNORE_INDEX)
    audio = torch.full_like(batch["audio_targets"], IGNORE_INDEX)
    audio[:, :, :-1] = batch["audio_targets"][:, :, 1:]
    batch["text_targets"], batch["audio_targets"] = text, audio
    return recount(batch)


def test_oracle_gets_zero_loss_on_a_correct_batch():
    batch = correct_batch().batch
    check_batch_alignment(batch, LAYOUT)
    result = loss_of(oracle_full_logits(batch), batch)
    assert result.loss < 1e-6


def test_1_no_shift_copying_the_input_gets_high_loss_and_an_unshifted_batch_is_rejected():
    packed = correct_batch()
    batch = packed.batch
    copy = loss_of(copy_full_logits(batch), batch)
    assert copy.text_loss > HIGH and torch.all(copy.codebook_losses > HIGH)
    # Without the shift (targets = the labels OF position t), copying the input is rewarded: loss ~0,
    # the leak fingerprint that the low-loss warning and the guard catch.
    unshifted = recount({**batch, "text_targets": packed.text_labels, "audio_targets": packed.audio_labels})
    leak = loss_of(copy_full_logits(unshifted), unshifted)
    assert leak.loss < 1e-6
    assert warn_if_implausibly_low(leak.audio_loss.item(), step=0, codebook_size=CODEBOOK_SIZE)
    with pytest.raises(AlignmentError, match=r"row 0, (codebook \d+, )?position \d+"):
        check_batch_alignment(unshifted, LAYOUT)


def test_2_double_shift_gets_high_loss_under_the_oracle_and_is_rejected():
    batch = correct_batch().batch
    double = shift_again(batch)
    result = loss_of(oracle_full_logits(batch), double)
    assert result.text_loss > HIGH and torch.all(result.codebook_losses > HIGH)
    with pytest.raises(AlignmentError, match=r"row 0, (codebook \d+, )?position \d+: .*(text|audio) target"):
        check_batch_alignment(double, LAYOUT)


def test_3_audio_out_ids_used_as_labels_are_rejected_and_cost_the_oracle():
    batch = correct_batch().batch
    out = batch["audio_out_mask"]
    pair = torch.zeros_like(out)
    pair[:, :-1] = out[:, :-1] & out[:, 1:]
    next_inputs = torch.full_like(batch["audio_codes"], IGNORE_INDEX)
    next_inputs[:, :, :-1] = batch["audio_codes"][:, :, 1:]
    inputs_as_labels = recount(
        {**batch, "audio_targets": torch.where(pair[:, None], next_inputs, IGNORE_INDEX)}
    )
    with pytest.raises(AlignmentError, match=r"stream BOS 1024 \(never a target"):
        check_batch_alignment(inputs_as_labels, LAYOUT)
    # BOS and delay fillers became targets: the oracle of the true targets is charged for them.
    result = loss_of(oracle_full_logits(batch), inputs_as_labels)
    assert torch.all(result.codebook_losses > 1.0)
    filler_targets = (inputs_as_labels["audio_targets"] != IGNORE_INDEX) & (
        batch["audio_targets"] == IGNORE_INDEX
    )
    assert filler_targets.sum() > 0


def test_4_pre_merge_text_labels_truncated_to_the_merged_length_are_rejected():
    packed = correct_batch()
    batch = packed.batch
    out = batch["audio_out_mask"]
    # Boson's pre-merge label_ids: one <|AUDIO_OUT|> position (label -100) per segment, shifted once,
    # then "fixed" to the merged length by padding/truncation.
    pre_merge_targets = torch.full_like(batch["text_targets"], IGNORE_INDEX)
    for b in range(out.shape[0]):
        first_column = out[b].clone()
        first_column[1:] &= ~out[b, :-1]
        keep = ~out[b] | first_column
        labels = torch.where(first_column, IGNORE_INDEX, packed.text_labels[b])[keep]
        pre_merge_targets[b, : labels.numel() - 1] = labels[1:]
    bad = recount({**batch, "text_targets": pre_merge_targets})
    result = loss_of(oracle_full_logits(batch), bad)
    assert result.text_loss > HIGH
    with pytest.raises(AlignmentError, match=r"row \d+, position \d+: text target"):
        check_batch_alignment(bad, LAYOUT)


def test_5_delay_pattern_off_in_training_is_rejected():
    g = torch.Generator().manual_seed(0)
    doc = Document().header([1], True).text([5, 6], trained=False).special("<|eot_id|>", trained=False)
    doc.header([2], False).audio_out_segment(random_codes(12, g), trained=True, delay=False)
    batch = pack([[doc.special("<|eot_id|>", trained=True)]], 48).batch
    with pytest.raises(AlignmentError, match="breaks the delay pattern"):
        check_batch_alignment(batch, LAYOUT)


def test_5_stop_token_is_a_target_once_per_codebook_per_segment_and_its_loss_counts():
    batch = correct_batch().batch
    audio_targets = batch["audio_targets"]
    num_segments = 3  # tts documents in correct_batch()
    assert torch.all((audio_targets == STREAM_EOS).sum((0, 2)) == num_segments)
    # Text head: every trained segment's last audio column predicts <|audio_eos|>.
    assert (batch["text_targets"] == LAYOUT.audio_eos_token_id).sum() == num_segments
    # An oracle that never predicts the stop token pays for every stop target (CE ~ 30 nats each).
    text_full, audio_full = oracle_full_logits(batch)
    no_stop = torch.where(audio_targets == STREAM_EOS, 0, audio_targets).transpose(1, 2)
    never_stops = one_hot_logits(no_stop, C)
    result = loss_of((text_full, never_stops), batch)
    expected = 30.0 * num_segments / batch["num_audio_targets"].sum(0).double()
    torch.testing.assert_close(result.codebook_losses.double(), expected, rtol=1e-4, atol=1e-4)
    # ... and the gradient reaches the stop class at each stop target.
    audio_full = torch.randn(audio_full.shape, requires_grad=True)
    loss_of((text_full, audio_full), batch).loss.backward()
    b, k, t = torch.nonzero(audio_targets == STREAM_EOS, as_tuple=True)
    assert torch.all(audio_full.grad[b, t, k, STREAM_EOS] < 0)
    # A batch whose stop targets were masked is rejected.
    masked = recount(
        {**batch, "audio_targets": torch.where(audio_targets == STREAM_EOS, IGNORE_INDEX, audio_targets)}
    )
    with pytest.raises(AlignmentError, match="stop token masked"):
        check_batch_alignment(masked, LAYOUT)


def test_6_turns_before_start_index_contribute_nothing():
    batch = correct_batch(with_reference=True).batch
    row = 1  # its first document has a voice-cloning reference turn before start_index
    has_target = (batch["text_targets"][row] != IGNORE_INDEX) | (
        batch["audio_targets"][row] != IGNORE_INDEX
    ).any(0)
    first_trained = int(torch.nonzero(has_target)[0])
    reference_audio = torch.nonzero(batch["audio_out_mask"][row, :first_trained]).flatten()
    assert reference_audio.numel() > K  # the reference clip's audio-out columns lie before start_index
    text_full = torch.randn(2, 128, V, requires_grad=True)
    audio_full = torch.randn(2, 128, K, C, requires_grad=True)
    result = loss_of((text_full, audio_full), batch)
    grads = torch.autograd.grad(result.loss, [text_full, audio_full])
    assert torch.all(grads[0][row, :first_trained] == 0) and torch.all(grads[1][row, :first_trained] == 0)

    changed_text = text_full.detach().clone()
    changed_audio = audio_full.detach().clone()
    changed_text[row, :first_trained] = 100.0 * torch.randn(first_trained, V)
    changed_audio[row, :first_trained] = 100.0 * torch.randn(first_trained, K, C)
    changed_text.requires_grad_()
    changed_audio.requires_grad_()
    changed = loss_of((changed_text, changed_audio), batch)
    changed_grads = torch.autograd.grad(changed.loss, [changed_text, changed_audio])
    torch.testing.assert_close(changed.loss, result.loss, rtol=0, atol=0)
    torch.testing.assert_close(changed_grads[0], grads[0], rtol=0, atol=0)
    torch.testing.assert_close(changed_grads[1], grads[1], rtol=0, atol=0)


def test_7_codebook_stride_1024_instead_of_1026_gives_high_loss():
    batch = correct_batch().batch
    text_full, _ = oracle_full_logits(batch)
    audio_targets = batch["audio_targets"].transpose(1, 2)  # [B, L, K]
    # A head whose flat output puts codebook k's classes at k * 1024 + c, then viewed as [K, 1026].
    flat = torch.zeros(*audio_targets.shape[:2], K * C)
    offsets = torch.arange(K) * CODEBOOK_SIZE
    valid = audio_targets != IGNORE_INDEX
    flat.scatter_(-1, (audio_targets.clamp_min(0) + offsets), torch.where(valid, 30.0, 0.0))
    result = loss_of((text_full, flat.view(*audio_targets.shape[:2], K, C)), batch)
    assert result.codebook_losses[0] < 1e-6  # codebook 0 has offset 0 either way
    assert torch.all(result.codebook_losses[1:] > HIGH)
    assert result.codebook_accuracies[1:].max() < 0.05


def test_7_codebook_and_time_axes_swapped_is_a_shape_error():
    batch = correct_batch().batch
    outputs = logits_at_positions(*oracle_full_logits(batch), batch)
    swapped = {**outputs, "audio_logits": outputs["audio_logits"].transpose(1, 2)}
    with pytest.raises(
        ValueError, match=r"audio logits of shape \(2, 8, 128, 1026\) do not match .* \(2, 128, 8\)"
    ):
        loss_fn(swapped, batch)


def test_8_steps_that_silently_do_nothing():
    batch = correct_batch().batch
    text_full = torch.randn(2, 128, V, requires_grad=True)
    audio_full = torch.randn(2, 128, K, C, requires_grad=True)
    result = loss_of((text_full, audio_full), batch)
    # Attached to the graph, a real gradient, and it depends on the logits (no constant loss).
    assert result.loss.requires_grad and result.loss.grad_fn is not None
    grads = torch.autograd.grad(result.loss, [text_full, audio_full])
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    other = loss_of((torch.randn(2, 128, V), torch.randn(2, 128, K, C)), batch)
    assert not torch.isclose(other.loss, result.loss.detach())
    # One gradient step on the logits lowers the loss.
    stepped = loss_of((text_full.detach() - 50.0 * grads[0], audio_full.detach() - 50.0 * grads[1]), batch)
    assert stepped.loss < result.loss - 0.5
    # Bad logits are not hidden: a NaN at a trained position makes the loss NaN.
    poisoned = text_full.detach().clone()
    t = int(batch["text_target_index"][0, 0])
    poisoned[0, t, 3] = math.nan
    assert torch.isnan(loss_of((poisoned, audio_full.detach()), batch).loss)


def test_8_an_all_padding_micro_batch_gives_zero_loss_that_still_backpropagates():
    batch = pack([[]], 32).batch
    assert batch["num_tokens"].sum() == 0
    text_full = torch.randn(1, 32, V, requires_grad=True)
    audio_full = torch.randn(1, 32, K, C, requires_grad=True)
    result = loss_of((text_full, audio_full), batch)
    assert result.loss == 0 and result.loss.requires_grad
    result.loss.backward()
    assert torch.all(text_full.grad == 0) and torch.all(audio_full.grad == 0)


def test_9_full_fp32_text_logits_are_never_materialised():
    batch = correct_batch().batch
    chunk = 4
    outputs = {
        name: value.to(torch.bfloat16).requires_grad_()
        for name, value in logits_at_positions(
            torch.randn(2, 128, V), torch.randn(2, 128, K, C), batch
        ).items()
    }
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        result = AlignedLoss(text_chunk_size=chunk)(outputs, batch)
    fp32_text_sized = [x.numel() for x in saved if x.dtype == torch.float32 and x.dim() and x.shape[-1] == V]
    assert sum(fp32_text_sized) <= chunk * V  # all fp32 [*, V] tensors kept for backward: at most one chunk
    result.loss.backward()
    assert outputs["text_logits"].grad.dtype == torch.bfloat16
