"""One training document: a tokenized sample with its audio merged in and its targets built (the single shift).

Every audio item becomes a segment of columns, one sequence position per column (docs/higgs_audio_v2.md §3.3, §5.3, §5.4).
For raw codes X [K, T] and the delay pattern on, a segment has T + K + 1 columns::

    input codes  = delay([BOS | X | EOS])   delay filler BOS, tail filler EOS
    label codes  = delay([-100 | X | EOS])  both fillers -100

The targets are built here, once, per document (docs/architecture.md §2):

- ``text_targets[t]`` = merged text label of position t + 1 (-100 at the last position). Merged text labels
  are Boson's ``expanded_labels``: the sample's labels at text positions, -100 at every audio column (so the
  ``<|AUDIO_OUT|>`` label is dropped like the collator's ``mask_audio_out_token_label``).
- ``audio_targets[k, t]`` = label code of codebook k at column t + 1 of the SAME audio-out segment; -100 at
  the segment's last column, at audio-in and text positions, and on every column of an untrained segment
  (its ``<|AUDIO_OUT|>`` label masked by start_index).

Nothing downstream shifts again: logits at position t are compared with the targets at t.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from higgs_tune.data.batch import IGNORE_INDEX
from higgs_tune.data.chatml import AudioRef, SampleError, TokenizedSample

# Values a Higgs Audio config.json implies when it omits a key (HiggsAudioConfig's constructor defaults;
# transformers' save_pretrained drops keys equal to them).
HIGGS_AUDIO_LAYOUT_DEFAULTS = {
    "audio_num_codebooks": 12,
    "audio_codebook_size": 1024,
    "audio_stream_bos_id": 1024,
    "audio_stream_eos_id": 1025,
    "use_delay_pattern": False,
}


@dataclass(frozen=True)
class AudioLayout:
    """How raw codes [K, T] become sequence columns (the model's audio settings)."""

    num_codebooks: int = 8
    codebook_size: int = 1024
    stream_bos_id: int = 1024
    stream_eos_id: int = 1025
    use_delay_pattern: bool = True

    @classmethod
    def from_model_config(cls, hf_config: Mapping) -> AudioLayout:
        """Read ``audio_num_codebooks``, ``audio_codebook_size``, ``audio_stream_bos_id``,
        ``audio_stream_eos_id`` and ``use_delay_pattern`` from a Higgs Audio ``config.json`` dict (absent
        keys take HiggsAudioConfig's defaults, :data:`HIGGS_AUDIO_LAYOUT_DEFAULTS`)."""
        value = {key: hf_config.get(key, default) for key, default in HIGGS_AUDIO_LAYOUT_DEFAULTS.items()}
        return cls(
            num_codebooks=int(value["audio_num_codebooks"]),
            codebook_size=int(value["audio_codebook_size"]),
            stream_bos_id=int(value["audio_stream_bos_id"]),
            stream_eos_id=int(value["audio_stream_eos_id"]),
            use_delay_pattern=bool(value["use_delay_pattern"]),
        )

    def segment_length(self, num_frames: int) -> int:
        """Columns of a segment of ``num_frames`` frames: T + K + 1 with the delay pattern, else T + 2."""
        return num_frames + 2 + (self.num_codebooks - 1 if self.use_delay_pattern else 0)


def apply_delay_pattern(codes: torch.Tensor, leading_fill: int, trailing_fill: int) -> torch.Tensor:
    """Delay codebook k by k columns (MusicGen delay pattern, Boson's ``build_delay_pattern_mask``).

    Args:
        codes: [K, N].
        leading_fill: value of the k columns before row k's codes.
        trailing_fill: value of the K - 1 - k columns after them.

    Returns:
        [K, N + K - 1]: row k = k x leading_fill, codes[k], (K - 1 - k) x trailing_fill.
    """
    num_codebooks, length = codes.shape
    out = codes.new_full((num_codebooks, length + num_codebooks - 1), trailing_fill)
    for k in range(num_codebooks):
        out[k, :k] = leading_fill
        out[k, k : k + length] = codes[k]
    return out


def segment_input_codes(codes: torch.Tensor, layout: AudioLayout) -> torch.Tensor:
    """Input columns of one audio segment: [K, T] -> [K, layout.segment_length(T)] (stream BOS/EOS, delay)."""
    num_codebooks = codes.shape[0]
    framed = torch.cat(
        [
            codes.new_full((num_codebooks, 1), layout.stream_bos_id),
            codes,
            codes.new_full((num_codebooks, 1), layout.stream_eos_id),
        ],
        dim=1,
    )
    if not layout.use_delay_pattern:
        return framed
    return apply_delay_pattern(framed, leading_fill=layout.stream_bos_id, trailing_fill=layout.stream_eos_id)


def segment_label_codes(codes: torch.Tensor, layout: AudioLayout) -> torch.Tensor:
    """Unshifted label columns of one audio-out segment: [K, T] -> [K, layout.segment_length(T)].

    Label column j is the ground truth OF column j: -100 for the stream BOS and the delay fillers, the codes,
    then one stream EOS per codebook.
    """
    num_codebooks = codes.shape[0]
    framed = torch.cat(
        [
            codes.new_full((num_codebooks, 1), IGNORE_INDEX),
            codes,
            codes.new_full((num_codebooks, 1), layout.stream_eos_id),
        ],
        dim=1,
    )
    if not layout.use_delay_pattern:
        return framed
    return apply_delay_pattern(framed, leading_fill=IGNORE_INDEX, trailing_fill=IGNORE_INDEX)


@dataclass(frozen=True)
class DocStats:
    """What the packer needs to know about a document; cheap to compute and to cache (plain ints).

    Attributes:
        length: positions (text tokens + audio columns).
        num_text_positions: positions on the text FFN path (text tokens).
        num_audio_positions: positions on the audio FFN path (audio-in + audio-out columns).
        num_text_targets: positions with a text target.
        num_audio_target_positions: positions with at least one audio target.
    """

    length: int
    num_text_positions: int
    num_audio_positions: int
    num_text_targets: int
    num_audio_target_positions: int


@dataclass(frozen=True, eq=False)
class Document:
    """One sample laid out as it will sit in a packed row (one position per audio column).

    Attributes:
        tokens: [S'] int64, text ids; the ``<|AUDIO|>`` / ``<|AUDIO_OUT|>`` id at audio columns.
        audio_codes: [K, S'] int64, input codes at audio columns (stream BOS/EOS, delay applied), 0 elsewhere.
        audio_in_mask: [S'] bool, audio-in columns.
        audio_out_mask: [S'] bool, audio-out columns.
        text_targets: [S'] int64, text label of position t + 1, or -100.
        audio_targets: [K, S'] int64, audio label of column t + 1 of the same audio-out segment, or -100.
        stats: the counts the packer needs.
    """

    tokens: torch.Tensor
    audio_codes: torch.Tensor
    audio_in_mask: torch.Tensor
    audio_out_mask: torch.Tensor
    text_targets: torch.Tensor
    audio_targets: torch.Tensor
    stats: DocStats

    def __len__(self) -> int:
        return self.stats.length

    @property
    def num_text_positions(self) -> int:
        return self.stats.num_text_positions

    @property
    def num_audio_positions(self) -> int:
        return self.stats.num_audio_positions

    @property
    def num_text_targets(self) -> int:
        return self.stats.num_text_targets

    @property
    def num_audio_target_positions(self) -> int:
        return self.stats.num_audio_target_positions


def _describe(index: int, ref: AudioRef) -> str:
    kind = "audio-out" if ref.is_output else "audio-in"
    return f"audio item {index} ({kind}, messages[{ref.message_index}], {ref.codes_path})"


def validate_codes(codes: np.ndarray | torch.Tensor, layout: AudioLayout, what: str) -> torch.Tensor:
    """Check one item's raw codes and return them as int64 [K, T].

    Raises:
        SampleError: not an integer array, not [num_codebooks, T] with T >= 1, or a value outside
            0..codebook_size-1 (naming ``what``).
    """
    if isinstance(codes, np.ndarray):
        if codes.dtype.kind not in "iu":
            raise SampleError(f"{what}: codes must be integers, got dtype {codes.dtype}")
        tensor = torch.from_numpy(codes.astype(np.int64))
    elif isinstance(codes, torch.Tensor):
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise SampleError(f"{what}: codes must be integers, got dtype {codes.dtype}")
        tensor = codes
    else:
        raise SampleError(f"{what}: codes must be a numpy array or a tensor, got {type(codes).__name__}")
    if tensor.dim() != 2 or tensor.shape[0] != layout.num_codebooks or tensor.shape[1] < 1:
        raise SampleError(
            f"{what}: codes must have shape [{layout.num_codebooks}, T>=1] (codebooks, frames), "
            f"got {list(tensor.shape)}"
        )
    tensor = tensor.long()
    low, high = int(tensor.min()), int(tensor.max())
    if low < 0 or high >= layout.codebook_size:
        raise SampleError(f"{what}: code values must be in 0..{layout.codebook_size - 1}, got {low}..{high}")
    return tensor


def _check_audio_count(tokenized: TokenizedSample, count: int, what: str) -> None:
    if count != len(tokenized.audio):
        raise SampleError(f"the sample has {len(tokenized.audio)} audio items but {count} {what} were given")


def document_stats(tokenized: TokenizedSample, num_frames: Sequence[int], layout: AudioLayout) -> DocStats:
    """The :class:`DocStats` of the document :func:`build_document` would build, from frame counts alone.

    Lets a manifest scan size documents from the codes files' shapes without loading or merging them.

    Args:
        num_frames: T of each audio item, in order.
    """
    _check_audio_count(tokenized, len(num_frames), "frame counts")
    labels = tokenized.label_ids.clone()
    positions = [ref.placeholder_position for ref in tokenized.audio]
    labels[positions] = IGNORE_INDEX
    columns = [layout.segment_length(int(t)) for t in num_frames]
    num_audio_positions = sum(columns)
    length = tokenized.input_ids.numel() - len(columns) + num_audio_positions
    return DocStats(
        length=length,
        num_text_positions=length - num_audio_positions,
        num_audio_positions=num_audio_positions,
        # merged position 0 is input position 0 (the first token is never a placeholder: a header comes first)
        num_text_targets=int((labels[1:] != IGNORE_INDEX).sum()),
        # every label column 1..L-1 of a trained segment holds at least one codebook's target
        num_audio_target_positions=sum(n - 1 for n, ref in zip(columns, tokenized.audio) if ref.trained),
    )


def build_document(
    tokenized: TokenizedSample, codes: Sequence[np.ndarray | torch.Tensor], layout: AudioLayout
) -> Document:
    """Merge the audio segments into the token sequence and build the targets (docs/higgs_audio_v2.md §3.3, §5.3, docs/architecture.md §2).

    Args:
        tokenized: from :func:`higgs_tune.data.chatml.tokenize_sample`.
        codes: raw codes [K, T_i] of each audio item, in order (values 0..codebook_size-1).
        layout: the model's audio settings.

    Returns:
        the :class:`Document`, S' = S - n_audio + sum of segment lengths positions.

    Raises:
        SampleError: wrong number of code arrays, or codes of the wrong shape / dtype / range.
    """
    _check_audio_count(tokenized, len(codes), "code arrays")
    num_codebooks = layout.num_codebooks
    input_ids, label_ids = tokenized.input_ids, tokenized.label_ids

    tokens, text_labels, audio_codes, audio_targets, in_mask, out_mask = [], [], [], [], [], []

    def add_text(start: int, end: int) -> None:
        n = end - start
        tokens.append(input_ids[start:end])
        text_labels.append(label_ids[start:end])
        audio_codes.append(torch.zeros(num_codebooks, n, dtype=torch.long))
        audio_targets.append(torch.full((num_codebooks, n), IGNORE_INDEX, dtype=torch.long))
        in_mask.append(torch.zeros(n, dtype=torch.bool))
        out_mask.append(torch.zeros(n, dtype=torch.bool))

    cursor = 0
    for index, (ref, raw) in enumerate(zip(tokenized.audio, codes)):
        frames = validate_codes(raw, layout, _describe(index, ref))
        add_text(cursor, ref.placeholder_position)
        segment = segment_input_codes(frames, layout)
        n = segment.shape[1]
        tokens.append(input_ids[ref.placeholder_position].repeat(n))
        text_labels.append(torch.full((n,), IGNORE_INDEX, dtype=torch.long))
        audio_codes.append(segment)
        targets = torch.full((num_codebooks, n), IGNORE_INDEX, dtype=torch.long)
        if ref.trained:
            # column t is trained to predict label column t + 1 of the same segment; the last column nothing
            targets[:, :-1] = segment_label_codes(frames, layout)[:, 1:]
        audio_targets.append(targets)
        in_mask.append(torch.full((n,), not ref.is_output))
        out_mask.append(torch.full((n,), ref.is_output))
        cursor = ref.placeholder_position + 1
    add_text(cursor, input_ids.numel())

    merged_labels = torch.cat(text_labels)
    text_targets = torch.cat([merged_labels[1:], merged_labels.new_full((1,), IGNORE_INDEX)])
    audio_targets_t = torch.cat(audio_targets, dim=1)
    audio_in_mask, audio_out_mask = torch.cat(in_mask), torch.cat(out_mask)
    length = merged_labels.numel()
    num_audio_positions = int((audio_in_mask | audio_out_mask).sum())
    stats = DocStats(
        length=length,
        num_text_positions=length - num_audio_positions,
        num_audio_positions=num_audio_positions,
        num_text_targets=int((text_targets != IGNORE_INDEX).sum()),
        num_audio_target_positions=int((audio_targets_t != IGNORE_INDEX).any(0).sum()),
    )
    return Document(
        tokens=torch.cat(tokens),
        audio_codes=torch.cat(audio_codes, dim=1),
        audio_in_mask=audio_in_mask,
        audio_out_mask=audio_out_mask,
        text_targets=text_targets,
        audio_targets=audio_targets_t,
        stats=stats,
    )
