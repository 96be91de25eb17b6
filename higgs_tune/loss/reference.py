"""Boson's reference loss (the formula of docs/architecture.md, "The loss"), written literally on Boson-style, UNSHIFTED tensors.

This is the formula the aligned loss must reproduce. It works on the outputs of Boson's
``HiggsAudioModel`` (``logits``, ``expanded_labels``, ``audio_logits``) and collator (``label_audio_ids``,
``audio_out_ids_start``), and does the two next-token shifts itself:

* text: ``logits[:, :-1]`` against ``expanded_labels[:, 1:]`` over the merged sequence;
* audio: over the concatenated audio-out stream of the whole batch, ``audio_logits[:-1]`` against
  ``label_audio_ids[:, 1:]``, after masking the first column of every segment (so a segment's last
  column never predicts the next segment).

Token-mean CE per term (``torch`` ``CrossEntropyLoss`` default), the mean over codebooks with weights
``1/K`` (Boson's ``audio_codebook_weights``), text and audio 1:1. A term with no valid label is
``0 * logits.sum()`` (Boson's guard against the 0/0 of an all-ignored mean). It is a test oracle, not a
training path: it materialises fp32 logits at every position and branches on data.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from higgs_tune.data.batch import IGNORE_INDEX


class ReferenceLossOutput(NamedTuple):
    """Components of the reference loss (all tensors, attached to the graph).

    Fields:
        loss: []             text_loss + audio_loss.
        text_loss: []        token-mean text CE.
        audio_loss: []       sum_k codebook_losses[k] / K.
        codebook_losses: [K] token-mean CE of codebook k.
    """

    loss: torch.Tensor
    text_loss: torch.Tensor
    audio_loss: torch.Tensor
    codebook_losses: torch.Tensor


def reference_loss(
    logits: torch.Tensor,
    expanded_labels: torch.Tensor,
    audio_logits: torch.Tensor,
    label_audio_ids: torch.Tensor,
    audio_out_ids_start: torch.Tensor,
) -> ReferenceLossOutput:
    """Boson's training loss on unshifted tensors.

    Args:
        logits: [B, S', V] text logits at every merged position.
        expanded_labels: [B, S'] text label OF each position (unshifted), -100 where not trained.
        audio_logits: [N_out, K, C] audio logits of every audio-out column of the batch, row-major order.
        label_audio_ids: [K, N_out] audio label OF each column (unshifted), -100 where not trained.
        audio_out_ids_start: [n] first column of each audio-out segment in the concatenated stream.

    Returns:
        :class:`ReferenceLossOutput`. ``label_audio_ids`` is not modified (Boson's code masks the
        segment starts in place; this copies first).
    """
    if logits.shape[:2] != expanded_labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and expanded_labels {tuple(expanded_labels.shape)} differ in [B, S']"
        )
    num_out, num_codebooks, _ = audio_logits.shape
    if label_audio_ids.shape != (num_codebooks, num_out):
        raise ValueError(
            f"label_audio_ids {tuple(label_audio_ids.shape)} must be [K, N_out] = ({num_codebooks}, {num_out}) "
            f"for audio_logits {tuple(audio_logits.shape)}"
        )
    vocab_size = logits.shape[-1]

    # Text: logits at position i predict the label of position i+1.
    shifted_labels = expanded_labels[:, 1:].reshape(-1)
    if (shifted_labels != IGNORE_INDEX).any():
        text_loss = F.cross_entropy(
            logits.float()[:, :-1].reshape(-1, vocab_size), shifted_labels, ignore_index=IGNORE_INDEX
        )
    else:
        text_loss = 0.0 * logits.sum()

    # Audio: column j predicts column j+1 of the flattened stream; segment starts are never targets.
    audio_labels = label_audio_ids.clone()
    audio_labels[:, audio_out_ids_start] = IGNORE_INDEX
    shifted_audio_logits = audio_logits.float()[:-1]  # [N_out - 1, K, C]
    shifted_audio_labels = audio_labels[:, 1:]  # [K, N_out - 1]
    codebook_losses = []
    for k in range(num_codebooks):
        labels_k = shifted_audio_labels[k]
        if (labels_k != IGNORE_INDEX).any():
            codebook_losses.append(
                F.cross_entropy(shifted_audio_logits[:, k, :], labels_k, ignore_index=IGNORE_INDEX)
            )
        else:
            codebook_losses.append(0.0 * audio_logits.sum())
    codebook_losses_tensor = torch.stack(codebook_losses) if codebook_losses else audio_logits.new_zeros(0)
    codebook_weights = torch.full((num_codebooks,), 1.0 / num_codebooks, device=audio_logits.device)
    audio_loss = (codebook_losses_tensor * codebook_weights).sum()

    return ReferenceLossOutput(
        loss=text_loss + audio_loss,
        text_loss=text_loss,
        audio_loss=audio_loss,
        codebook_losses=codebook_losses_tensor,
    )
