"""The packed batch: the one contract between the data pipeline, the model and the loss.

Every tensor has a shape fixed by the config (``batch_size`` B, ``seq_len`` L, ``num_codebooks`` K and
the per-row capacities of :class:`PackingSpec`), so a training step over it can be compiled with
``fullgraph=True`` and replayed as a CUDA graph. Audio is already merged into the sequence: one
position per audio column (docs/architecture.md §3, §4).

Fields (all produced by the collator on the CPU)::

    tokens              [B, L]        int64  text token id; the <|AUDIO|> / <|AUDIO_OUT|> id at audio columns;
                                             the pad id at padding
    audio_codes         [B, K, L]     int64  codebook ids 0..1025 at audio columns (stream BOS/EOS and delay
                                             pattern applied), 0 elsewhere
    audio_in_mask       [B, L]        bool   audio-in columns (user/system reference audio fed as codes)
    audio_out_mask      [B, L]        bool   audio-out columns (assistant speech)
    input_pos           [B, L]        int64  position ids, restarting at 0 for every packed document
    doc_ids             [B, L]        int32  document index within the row for block-causal attention;
                                             padding gets one id of its own (max document id + 1)
    text_targets        [B, L]        int64  text label of position t+1 of the same document, or -100
    audio_targets       [B, K, L]     int64  audio label of codebook k at column t+1 of the same audio-out
                                             segment, or -100
    text_ffn_index      [B, C_text]   int64  positions taking the text FFN path (text tokens)
    audio_ffn_index     [B, C_audio]  int64  positions taking the audio FFN path (audio-in + audio-out)
    text_target_index   [B, C_tt]     int64  positions t with text_targets[b, t] != -100
    audio_target_index  [B, C_at]     int64  positions t with any audio_targets[b, :, t] != -100
    num_text_targets    [B]           int64  valid text targets per row
    num_audio_targets   [B, K]        int64  valid audio targets per row and codebook
    num_tokens          [B]           int64  non-padding positions per row (text tokens + audio columns)

Index tensors hold row-local positions in ascending order, filled up to their capacity with the SINK
value L (one past the last position). Consumers append one scratch row at position L before gathering
(``torch.cat([x, zeros[:, :1]], 1)``) and drop it after scattering, so filler entries never touch a
real position; targets gathered at the sink are -100 by construction (:func:`gather_at`).

The targets are built ONCE, per document, by the packer (docs/architecture.md §2). Nothing downstream shifts:
the model returns logits for the gathered positions and the loss compares them with the targets
gathered at the same indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

BATCH_FIELDS = (
    "tokens",
    "audio_codes",
    "audio_in_mask",
    "audio_out_mask",
    "input_pos",
    "doc_ids",
    "text_targets",
    "audio_targets",
    "text_ffn_index",
    "audio_ffn_index",
    "text_target_index",
    "audio_target_index",
    "num_text_targets",
    "num_audio_targets",
    "num_tokens",
)


class CapacityError(ValueError):
    """More positions of one kind than the configured fixed capacity of a row."""


@dataclass(frozen=True)
class PackingSpec:
    """Static shapes of a packed batch. All capacities are per row.

    Args:
        seq_len: L, positions per row.
        batch_size: B, rows per micro-batch.
        num_codebooks: K.
        text_ffn_capacity: max positions per row on the text FFN path (text tokens).
        audio_ffn_capacity: max positions per row on the audio FFN path (audio-in + audio-out columns).
        text_target_capacity: max positions per row that carry a text target.
        audio_target_capacity: max positions per row that carry at least one audio target.

    A capacity of ``None`` means ``seq_len`` (always enough, no saving).
    """

    seq_len: int
    batch_size: int
    num_codebooks: int = 8
    text_ffn_capacity: int | None = None
    audio_ffn_capacity: int | None = None
    text_target_capacity: int | None = None
    audio_target_capacity: int | None = None

    def capacity(self, name: str) -> int:
        value = getattr(self, f"{name}_capacity")
        cap = self.seq_len if value is None else int(value)
        if not 0 < cap <= self.seq_len:
            raise ValueError(f"{name}_capacity must be in 1..seq_len={self.seq_len}, got {cap}")
        return cap


def positions_to_index(mask: torch.Tensor, capacity: int, what: str = "positions") -> torch.Tensor:
    """Row-local positions where ``mask`` is true, sink-padded to a fixed capacity.

    Args:
        mask: [L] bool.
        capacity: length of the returned index.
        what: name used in the error message.

    Returns:
        [capacity] int64: ascending positions, then the sink value L.

    Raises:
        CapacityError: when the mask has more than ``capacity`` true entries.
    """
    (length,) = mask.shape
    positions = torch.nonzero(mask, as_tuple=False).flatten()
    if positions.numel() > capacity:
        raise CapacityError(f"{positions.numel()} {what} in a row of {length}, capacity is {capacity}")
    index = torch.full((capacity,), length, dtype=torch.long)
    index[: positions.numel()] = positions
    return index


def append_sink(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Append one zero slice along ``dim`` (the sink position L) so sink-padded indices can gather."""
    shape = list(x.shape)
    shape[dim] = 1
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def gather_at(values: torch.Tensor, index: torch.Tensor, fill: int | float = IGNORE_INDEX) -> torch.Tensor:
    """Gather per-row positions, the sink yielding ``fill``.

    Args:
        values: [B, L] or [B, K, L] (positions on the last dim).
        index: [B, C] row-local positions in 0..L (L = sink).
        fill: value returned at the sink.

    Returns:
        [B, C] or [B, K, C].
    """
    pad_shape = list(values.shape)
    pad_shape[-1] = 1
    padded = torch.cat([values, values.new_full(pad_shape, fill)], dim=-1)
    if values.dim() == 3:
        index = index.unsqueeze(1).expand(-1, values.shape[1], -1)
    return torch.gather(padded, -1, index)
