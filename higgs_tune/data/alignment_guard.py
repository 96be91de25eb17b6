"""Run-time alignment guard: checks the single-shift invariants on a real packed batch.

The recipe calls :func:`check_batch_alignment` on the FIRST batch of a run (it runs on the CPU, outside
the compiled step) and :func:`warn_if_implausibly_low` on the first logged audio losses. Together they
catch the failure modes of docs/architecture.md ("Failure modes the tests catch") that a loss curve alone hides: no shift, double shift, audio
inputs used as labels, text labels that do not match the merged sequence, the delay pattern missing from
the training layout, the stop token never trained, and a leak that makes the audio loss near zero.

What holds in a correct batch (docs/architecture.md, "Data flow and the one shift"; Boson's layout in higgs_tune/data/document.py), checked here:

* Shapes and dtypes are those of ``higgs_tune/data/batch.py``. The first ``num_tokens[b]`` positions of
  a row are real, the rest is padding (no audio, no targets, one document id of its own =
  max real id + 1). Document ids never decrease along a row; ``input_pos`` restarts at 0 with each
  document and counts up by one.
* Audio columns carry the placeholder token (``<|AUDIO|>`` for audio-in, ``<|AUDIO_OUT|>`` for
  audio-out); ``audio_codes`` are 0 off audio columns. Every audio segment (a maximal run of audio-in or
  audio-out columns of one document) of ``n = T + K + 1`` columns has the delay layout on its INPUT
  codes: codebook k is the stream BOS (``codebook_size``) at segment columns ``c <= k``, the stream EOS
  (``codebook_size + 1``) at ``c >= k + T + 1`` and a payload code (< ``codebook_size``) in between. An
  audio-out segment is preceded by ``<|audio_out_bos|>`` and followed by ``<|audio_eos|>``.
* Text targets: at the last position of a document (and in padding) and where position t+1 is an audio
  column, the target is -100. Where t+1 is a text position of the same document, the target is -100 or
  ``tokens[t+1]``. In particular the last column of an audio-out segment (t+1 = ``<|audio_eos|>``)
  predicts ``<|audio_eos|>``; for a TRAINED segment (one with audio targets) that target and the one
  before ``<|audio_out_bos|>`` (predicting ``<|audio_out_bos|>``) must be present.
* Audio targets: only at an audio-out column whose next column is in the same audio-out segment;
  values in 0..codebook_size+1, never the stream BOS; a valid target of codebook k at t equals the INPUT
  ``audio_codes[k, t+1]`` (teacher forcing under the delay pattern). In a trained segment codebook k has
  targets at exactly the segment columns k..k+T: T codes and then the stream EOS, once.
* ``num_text_targets`` / ``num_audio_targets`` / ``num_tokens`` equal the counts in the tensors; the
  target and audio-FFN index tensors are the ascending positions of their masks, sink-padded with L;
  ``text_ffn_index`` lists ascending, sink-padded positions that include every real text position and
  no audio column (whether padding positions are listed is the packer's choice).

A violation raises :class:`AlignmentError` naming the first violating row / codebook / position and what
was expected there.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from higgs_tune.data.batch import BATCH_FIELDS, IGNORE_INDEX, CapacityError, positions_to_index

logger = logging.getLogger(__name__)


class AlignmentError(ValueError):
    """A packed batch breaks the single-shift invariants (the message names the first violation)."""


@dataclass(frozen=True)
class AlignmentLayout:
    """The special ids the guard needs. Never hard-coded: build it from the tokenizer or the model config.

    Args:
        audio_in_token_id: id of ``<|AUDIO|>`` (placeholder at audio-in columns).
        audio_out_token_id: id of ``<|AUDIO_OUT|>`` (placeholder at audio-out columns).
        audio_out_bos_token_id: id of ``<|audio_out_bos|>`` (text token before an audio-out segment).
        audio_eos_token_id: id of ``<|audio_eos|>`` (text token after an audio segment).
        codebook_size: payload codes per codebook; the stream BOS is ``codebook_size`` and the stream
            EOS ``codebook_size + 1``.
    """

    audio_in_token_id: int
    audio_out_token_id: int
    audio_out_bos_token_id: int
    audio_eos_token_id: int
    codebook_size: int = 1024

    @property
    def stream_bos(self) -> int:
        return self.codebook_size

    @property
    def stream_eos(self) -> int:
        return self.codebook_size + 1

    @classmethod
    def from_model_config(cls, config: Any) -> AlignmentLayout:
        """From a ``HiggsAudioConfig``-like object (Boson's field names)."""
        names = (
            "audio_in_token_idx",
            "audio_out_token_idx",
            "audio_out_bos_token_id",
            "audio_eos_token_id",
            "audio_codebook_size",
            "audio_stream_bos_id",
            "audio_stream_eos_id",
        )
        missing = [name for name in names if getattr(config, name, None) is None]
        if missing:
            raise ValueError(f"model config {type(config).__name__} lacks {missing}")
        codebook_size = int(config.audio_codebook_size)
        if (config.audio_stream_bos_id, config.audio_stream_eos_id) != (codebook_size, codebook_size + 1):
            raise ValueError(
                f"stream BOS/EOS ids ({config.audio_stream_bos_id}, {config.audio_stream_eos_id}) are not "
                f"(codebook_size, codebook_size + 1) = ({codebook_size}, {codebook_size + 1})"
            )
        return cls(
            audio_in_token_id=int(config.audio_in_token_idx),
            audio_out_token_id=int(config.audio_out_token_idx),
            audio_out_bos_token_id=int(config.audio_out_bos_token_id),
            audio_eos_token_id=int(config.audio_eos_token_id),
            codebook_size=codebook_size,
        )

    @classmethod
    def from_token_to_id(
        cls, token_to_id: Callable[[str], int | None], codebook_size: int = 1024
    ) -> AlignmentLayout:
        """From a name -> id lookup that returns None or raises KeyError for an unknown token, e.g.
        ``tokenizers.Tokenizer.token_to_id`` or ``higgs_tune.data.tokenizer.HiggsTokenizer.token_to_id``."""
        names = {
            "audio_in_token_id": "<|AUDIO|>",
            "audio_out_token_id": "<|AUDIO_OUT|>",
            "audio_out_bos_token_id": "<|audio_out_bos|>",
            "audio_eos_token_id": "<|audio_eos|>",
        }

        def lookup(token: str) -> int | None:
            try:
                return token_to_id(token)
            except KeyError:
                return None

        ids = {field: lookup(token) for field, token in names.items()}
        missing = [names[field] for field, value in ids.items() if value is None]
        if missing:
            raise ValueError(f"the tokenizer has no id for {missing}")
        return cls(codebook_size=codebook_size, **{field: int(value) for field, value in ids.items()})


_EXPECTED_DTYPES = {
    "tokens": torch.int64,
    "audio_codes": torch.int64,
    "audio_in_mask": torch.bool,
    "audio_out_mask": torch.bool,
    "input_pos": torch.int64,
    "doc_ids": torch.int32,
    "text_targets": torch.int64,
    "audio_targets": torch.int64,
    "text_ffn_index": torch.int64,
    "audio_ffn_index": torch.int64,
    "text_target_index": torch.int64,
    "audio_target_index": torch.int64,
    "num_text_targets": torch.int64,
    "num_audio_targets": torch.int64,
    "num_tokens": torch.int64,
}


def _raise_at_first(violations: torch.Tensor, describe: Callable[..., str]) -> None:
    """Raise AlignmentError for the first true entry of ``violations``; ``describe(*coords)`` words it."""
    if violations.any():
        coords = [int(c) for c in torch.nonzero(violations)[0]]
        raise AlignmentError(describe(*coords))


def _check_shapes(batch: Mapping[str, torch.Tensor]) -> tuple[int, int, int]:
    missing = [name for name in BATCH_FIELDS if name not in batch]
    if missing:
        raise AlignmentError(f"batch lacks fields {missing}")
    for name, dtype in _EXPECTED_DTYPES.items():
        if batch[name].dtype != dtype:
            raise AlignmentError(f"batch['{name}'] has dtype {batch[name].dtype}, the contract says {dtype}")
    if batch["tokens"].dim() != 2 or batch["audio_codes"].dim() != 3:
        raise AlignmentError(
            f"tokens {tuple(batch['tokens'].shape)} must be [B, L] and audio_codes "
            f"{tuple(batch['audio_codes'].shape)} [B, K, L]"
        )
    b, length = batch["tokens"].shape
    k = batch["audio_codes"].shape[1]
    expected = {
        "audio_codes": (b, k, length),
        "audio_targets": (b, k, length),
        "num_text_targets": (b,),
        "num_audio_targets": (b, k),
        "num_tokens": (b,),
    }
    expected.update(
        {name: (b, length) for name in ("audio_in_mask", "audio_out_mask", "input_pos", "doc_ids")}
    )
    expected["text_targets"] = (b, length)
    for name, shape in expected.items():
        if tuple(batch[name].shape) != shape:
            raise AlignmentError(f"batch['{name}'] has shape {tuple(batch[name].shape)}, expected {shape}")
    for name in ("text_ffn_index", "audio_ffn_index", "text_target_index", "audio_target_index"):
        shape = tuple(batch[name].shape)
        if len(shape) != 2 or shape[0] != b or not 0 < shape[1] <= length:
            raise AlignmentError(
                f"batch['{name}'] has shape {shape}, expected [B={b}, capacity in 1..L={length}]"
            )
    return b, k, length


def _segments(mask_row: torch.Tensor, doc_row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of maximal runs of ``mask_row`` within one document."""
    continues = torch.zeros_like(mask_row)  # position t+1 continues the run that holds t
    continues[:-1] = mask_row[:-1] & mask_row[1:] & (doc_row[1:] == doc_row[:-1])
    starts = mask_row.clone()
    starts[1:] &= ~continues[:-1]
    lasts = mask_row & ~continues
    return [
        (start, last + 1)
        for start, last in zip(
            torch.nonzero(starts).flatten().tolist(), torch.nonzero(lasts).flatten().tolist()
        )
    ]


def check_batch_alignment(batch: Mapping[str, torch.Tensor], layout: AlignmentLayout) -> None:
    """Assert the single-shift invariants (module docstring) on a packed batch; cheap, on the CPU.

    Args:
        batch: a packed batch with the fields of ``higgs_tune.data.batch.BATCH_FIELDS`` (any device).
        layout: the special ids (:class:`AlignmentLayout`).

    Raises:
        AlignmentError: naming the first violating row / codebook / position.
    """
    batch = {name: batch[name].detach().cpu() for name in BATCH_FIELDS if name in batch}
    num_rows, num_codebooks, length = _check_shapes(batch)
    tokens = batch["tokens"]
    codes = batch["audio_codes"]
    audio_in = batch["audio_in_mask"]
    audio_out = batch["audio_out_mask"]
    doc_ids = batch["doc_ids"]
    text_targets = batch["text_targets"]
    audio_targets = batch["audio_targets"]
    num_tokens = batch["num_tokens"]
    audio = audio_in | audio_out
    positions = torch.arange(length)

    # --- rows: real prefix, padding, documents, positions -------------------------------------------
    _raise_at_first(
        (num_tokens < 0) | (num_tokens > length),
        lambda b: f"row {b}: num_tokens={int(num_tokens[b])} outside 0..L={length}",
    )
    real = positions[None, :] < num_tokens[:, None]  # [B, L]
    padding = ~real
    _raise_at_first(
        audio_in & audio_out, lambda b, t: f"row {b}, position {t}: both audio_in_mask and audio_out_mask"
    )
    _raise_at_first(
        padding & audio, lambda b, t: f"row {b}, position {t}: padding (>= num_tokens) marked as audio"
    )
    _raise_at_first(
        padding & (text_targets != IGNORE_INDEX),
        lambda b, t: (
            f"row {b}, position {t}: padding (>= num_tokens) has text target {int(text_targets[b, t])}"
        ),
    )
    _raise_at_first(
        padding[:, None, :] & (audio_targets != IGNORE_INDEX),
        lambda b, k, t: (
            f"row {b}, codebook {k}, position {t}: padding has audio target {int(audio_targets[b, k, t])}"
        ),
    )
    _raise_at_first(
        doc_ids[:, 1:] < doc_ids[:, :-1],
        lambda b, t: (
            f"row {b}, position {t + 1}: doc_ids decrease ({int(doc_ids[b, t])} -> {int(doc_ids[b, t + 1])})"
        ),
    )
    for b in range(num_rows):
        n = int(num_tokens[b])
        if 0 < n < length:
            pad_ids = doc_ids[b, n:]
            expected_pad_id = int(doc_ids[b, n - 1]) + 1
            if (pad_ids != expected_pad_id).any():
                t = n + int(torch.nonzero(pad_ids != expected_pad_id)[0])
                raise AlignmentError(
                    f"row {b}, position {t}: padding doc id {int(doc_ids[b, t])}, expected {expected_pad_id} "
                    "(max document id + 1)"
                )
    doc_start = torch.ones_like(real)
    doc_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    previous_pos = torch.cat([batch["input_pos"].new_full((num_rows, 1), -1), batch["input_pos"][:, :-1]], 1)
    expected_pos = torch.where(doc_start, torch.zeros_like(previous_pos), previous_pos + 1)
    _raise_at_first(
        real & (batch["input_pos"] != expected_pos),
        lambda b, t: (
            f"row {b}, position {t}: input_pos {int(batch['input_pos'][b, t])}, expected "
            f"{int(expected_pos[b, t])} (positions restart at 0 per document)"
        ),
    )

    # --- tokens and input codes at audio columns --------------------------------------------------------
    _raise_at_first(
        audio_in & (tokens != layout.audio_in_token_id),
        lambda b, t: (
            f"row {b}, position {t}: audio-in column holds token {int(tokens[b, t])}, "
            f"expected <|AUDIO|>={layout.audio_in_token_id}"
        ),
    )
    _raise_at_first(
        audio_out & (tokens != layout.audio_out_token_id),
        lambda b, t: (
            f"row {b}, position {t}: audio-out column holds token {int(tokens[b, t])}, "
            f"expected <|AUDIO_OUT|>={layout.audio_out_token_id}"
        ),
    )
    _raise_at_first(
        ~audio[:, None, :] & (codes != 0),
        lambda b, k, t: (
            f"row {b}, codebook {k}, position {t}: audio_codes={int(codes[b, k, t])} at a non-audio position (must be 0)"
        ),
    )

    # --- text targets -----------------------------------------------------------------------------------
    next_same_doc = torch.zeros_like(real)
    next_same_doc[:, :-1] = real[:, 1:] & (doc_ids[:, 1:] == doc_ids[:, :-1])
    next_is_audio = torch.zeros_like(real)
    next_is_audio[:, :-1] = audio[:, 1:]
    next_token = torch.cat([tokens[:, 1:], tokens.new_full((num_rows, 1), -1)], 1)
    has_text_target = text_targets != IGNORE_INDEX
    _raise_at_first(
        has_text_target & ~next_same_doc,
        lambda b, t: (
            f"row {b}, position {t}: text target {int(text_targets[b, t])} at the last position of a "
            "document (nothing follows in the same document)"
        ),
    )
    _raise_at_first(
        has_text_target & next_same_doc & next_is_audio,
        lambda b, t: (
            f"row {b}, position {t}: text target {int(text_targets[b, t])} where position {t + 1} is "
            "an audio column (its text label is -100)"
        ),
    )

    def _text_mismatch(b: int, t: int) -> str:
        found = int(text_targets[b, t])
        hint = ""
        if found == int(tokens[b, t]):
            hint = " (equals the token AT t: targets not shifted?)"
        elif t + 2 < length and found == int(tokens[b, t + 2]):
            hint = " (equals the token at t+2: targets shifted twice?)"
        return (
            f"row {b}, position {t}: text target {found} != token at position {t + 1} "
            f"({int(tokens[b, t + 1])}){hint}"
        )

    _raise_at_first(
        has_text_target & next_same_doc & ~next_is_audio & (text_targets != next_token), _text_mismatch
    )

    # --- audio targets ----------------------------------------------------------------------------------
    has_audio_target = audio_targets != IGNORE_INDEX  # [B, K, L]
    _raise_at_first(
        has_audio_target & ((audio_targets < 0) | (audio_targets > layout.stream_eos)),
        lambda b, k, t: (
            f"row {b}, codebook {k}, position {t}: audio target {int(audio_targets[b, k, t])} "
            f"outside 0..{layout.stream_eos}"
        ),
    )
    _raise_at_first(
        audio_targets == layout.stream_bos,
        lambda b, k, t: (
            f"row {b}, codebook {k}, position {t}: audio target is the stream BOS "
            f"{layout.stream_bos} (never a target: audio INPUT codes used as labels?)"
        ),
    )
    next_audio_out = torch.zeros_like(real)
    next_audio_out[:, :-1] = audio_out[:, :-1] & audio_out[:, 1:]
    next_audio_out &= next_same_doc
    _raise_at_first(
        has_audio_target & ~next_audio_out[:, None, :],
        lambda b, k, t: (
            f"row {b}, codebook {k}, position {t}: audio target {int(audio_targets[b, k, t])} at a "
            "position whose next column is not an audio-out column of the same segment"
        ),
    )
    next_codes = torch.cat([codes[:, :, 1:], codes.new_full((num_rows, num_codebooks, 1), -1)], 2)

    def _audio_mismatch(b: int, k: int, t: int) -> str:
        found = int(audio_targets[b, k, t])
        hint = ""
        if found == int(codes[b, k, t]):
            hint = " (equals the input AT t: targets not shifted?)"
        elif t + 2 < length and found == int(codes[b, k, t + 2]):
            hint = " (equals the input at t+2: targets shifted twice?)"
        return (
            f"row {b}, codebook {k}, position {t}: audio target {found} != input code at column {t + 1} "
            f"({int(codes[b, k, t + 1])}){hint}"
        )

    _raise_at_first(has_audio_target & (audio_targets != next_codes), _audio_mismatch)

    # --- per audio segment: delay layout of the inputs, target windows, stop token ------------------------
    codebook_index = torch.arange(num_codebooks)[:, None]
    for b in range(num_rows):
        for mask, kind in ((audio_out[b], "audio-out"), (audio_in[b], "audio-in")):
            for start, end in _segments(mask, doc_ids[b]):
                columns = end - start
                num_frames = columns - num_codebooks - 1  # T
                where = f"row {b}, {kind} segment at positions {start}..{end - 1}"
                if num_frames < 0:
                    raise AlignmentError(
                        f"{where}: {columns} columns, fewer than K + 1 = {num_codebooks + 1} (BOS column + delay)"
                    )
                column = torch.arange(columns)[None, :]
                is_bos = column <= codebook_index
                is_eos = column >= codebook_index + num_frames + 1
                segment_codes = codes[b, :, start:end]
                bad = (
                    (is_bos & (segment_codes != layout.stream_bos))
                    | (is_eos & (segment_codes != layout.stream_eos))
                    | (~is_bos & ~is_eos & ((segment_codes < 0) | (segment_codes >= layout.codebook_size)))
                )
                if bad.any():
                    k, c = (int(v) for v in torch.nonzero(bad)[0])
                    raise AlignmentError(
                        f"{where}: input code {int(segment_codes[k, c])} at codebook {k}, segment column {c} "
                        f"(position {start + c}) breaks the delay pattern (codebook k: stream BOS "
                        f"{layout.stream_bos} at columns <= k, payload for T={num_frames} columns, then stream "
                        f"EOS {layout.stream_eos})"
                    )
                if kind == "audio-in":
                    continue
                if start == 0 or int(tokens[b, start - 1]) != layout.audio_out_bos_token_id:
                    raise AlignmentError(
                        f"{where}: not preceded by <|audio_out_bos|>={layout.audio_out_bos_token_id}"
                    )
                if end >= length or int(tokens[b, end]) != layout.audio_eos_token_id:
                    raise AlignmentError(
                        f"{where}: not followed by <|audio_eos|>={layout.audio_eos_token_id}"
                    )
                segment_has_target = has_audio_target[b, :, start:end]
                if not segment_has_target.any():
                    continue  # an untrained segment (turn before start_index)
                expected_window = (column >= codebook_index) & (column <= codebook_index + num_frames)
                wrong = segment_has_target != expected_window
                if wrong.any():
                    k, c = (int(v) for v in torch.nonzero(wrong)[0])
                    state = "has a target" if bool(segment_has_target[k, c]) else "has no target"
                    raise AlignmentError(
                        f"{where}: codebook {k} at segment column {c} (position {start + c}) {state}; a trained "
                        f"segment trains codebook k at columns k..k+T (T={num_frames}: the codes, then the stream "
                        "EOS once) — delay pattern missing or stop token masked?"
                    )
                if int(text_targets[b, end - 1]) != layout.audio_eos_token_id:
                    raise AlignmentError(
                        f"{where}: the last audio column (position {end - 1}) has text target "
                        f"{int(text_targets[b, end - 1])}, a trained segment must predict "
                        f"<|audio_eos|>={layout.audio_eos_token_id} there"
                    )
                if start < 2 or int(text_targets[b, start - 2]) != layout.audio_out_bos_token_id:
                    raise AlignmentError(
                        f"{where}: the position before <|audio_out_bos|> (position {start - 2}) does not have "
                        f"text target <|audio_out_bos|>={layout.audio_out_bos_token_id} although the segment is trained"
                    )

    # --- counts and index tensors -----------------------------------------------------------------------
    counted_text = has_text_target.sum(1)
    _raise_at_first(
        batch["num_text_targets"] != counted_text,
        lambda b: (
            f"row {b}: num_text_targets={int(batch['num_text_targets'][b])}, the tensor has {int(counted_text[b])}"
        ),
    )
    counted_audio = has_audio_target.sum(2)
    _raise_at_first(
        batch["num_audio_targets"] != counted_audio,
        lambda b, k: (
            f"row {b}, codebook {k}: num_audio_targets={int(batch['num_audio_targets'][b, k])}, "
            f"the tensor has {int(counted_audio[b, k])}"
        ),
    )
    masks = {
        "text_target_index": has_text_target,
        "audio_target_index": has_audio_target.any(1),
        "audio_ffn_index": audio,
    }
    for b in range(num_rows):
        for name, mask in masks.items():
            index = batch[name][b]
            try:
                expected = positions_to_index(mask[b], index.shape[0], what=name)
            except CapacityError as error:
                raise AlignmentError(f"row {b}: {name} is too short: {error}") from error
            if not torch.equal(index, expected):
                i = int(torch.nonzero(index != expected)[0])
                raise AlignmentError(
                    f"row {b}: {name}[{i}]={int(index[i])}, expected {int(expected[i])} (the ascending positions "
                    f"of its mask, then the sink {length})"
                )
        index = batch["text_ffn_index"][b]
        listed = index[index < length]
        if (
            (index < 0).any()
            or (index > length).any()
            or (listed.diff() <= 0).any()
            or (index[len(listed) :] != length).any()
        ):
            raise AlignmentError(
                f"row {b}: text_ffn_index is not ascending positions then the sink {length}: {index.tolist()}"
            )
        on_text_path = torch.zeros(length, dtype=torch.bool)
        on_text_path[listed] = True
        _raise_at_first(
            on_text_path & audio[b],
            lambda t, b=b: f"row {b}, position {t}: text_ffn_index lists an audio column",
        )
        _raise_at_first(
            real[b] & ~audio[b] & ~on_text_path,
            lambda t, b=b: f"row {b}, position {t}: a text position missing from text_ffn_index",
        )


def warn_if_implausibly_low(
    audio_loss_value: float,
    step: int,
    codebook_size: int = 1024,
    *,
    threshold_nats: float = 1.0,
    first_steps: int = 10,
) -> bool:
    """Warn loudly when the audio loss of one of the first steps is implausibly low.

    Chance level of a codebook is ``ln(codebook_size + 2)`` (6.93 nats for 1026 classes); even a trained
    checkpoint sits at several nats per codebook on new speech. An audio loss below ``threshold_nats``
    within the first ``first_steps`` optimizer steps is the fingerprint of a target leak (loss ~1e-3 and
    silent audio at inference: targets equal to the inputs, missing shift).

    Args:
        audio_loss_value: the logged audio loss (mean over codebooks) of ``step``.
        step: optimizer step (0-based or 1-based; only compared with ``first_steps``).
        codebook_size: payload codes per codebook.
        threshold_nats: warn below this.
        first_steps: only steps ``< first_steps`` are judged (later, overfitting can be legitimate).

    Returns:
        True when it warned.
    """
    value = float(audio_loss_value)
    if step >= first_steps or not math.isfinite(value) or value >= threshold_nats:
        return False
    chance = math.log(codebook_size + 2)
    logger.warning(
        "AUDIO LOSS LEAK? audio loss %.4g nats at step %d is implausibly low (chance level ln(%d) = %.2f "
        "nats, threshold %.2f): the audio targets probably leak the inputs (missing shift, inputs used as "
        "labels). Expect silent output at inference. Run check_batch_alignment on a batch.",
        value,
        step,
        codebook_size + 2,
        chance,
        threshold_nats,
    )
    return True
