"""Small, obviously-correct builder of packed batches for the loss tests.

It lays out documents position by position the way Boson's merge does (docs/higgs_audio_v2.md §3.3, §5.2-§5.5): one
position per text token and per audio column, the UNSHIFTED label of every position (Boson's
``expanded_labels`` / ``label_audio_ids``), then derives the targets by the single shift of
docs/architecture.md §2: target[t] = label[t+1] within the same document (audio: within the same audio-out segment).

Special ids follow the project's tiny tokenizer layout (common brief); they live here, in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from higgs_tune.data.alignment_guard import AlignmentLayout
from higgs_tune.data.batch import IGNORE_INDEX, positions_to_index

NUM_CODEBOOKS = 8
CODEBOOK_SIZE = 1024
NUM_AUDIO_CLASSES = CODEBOOK_SIZE + 2
STREAM_BOS = CODEBOOK_SIZE
STREAM_EOS = CODEBOOK_SIZE + 1
VOCAB_SIZE = 1024

SPECIAL = {
    "<|begin_of_text|>": 768,
    "<|end_of_text|>": 769,
    "<|start_header_id|>": 774,
    "<|end_header_id|>": 775,
    "<|eom_id|>": 776,
    "<|eot_id|>": 777,
    "<|audio_bos|>": 779,
    "<|audio_eos|>": 780,
    "<|audio_out_bos|>": 781,
    "<|AUDIO|>": 783,
    "<|AUDIO_OUT|>": 784,
}
PAD_ID = SPECIAL["<|end_of_text|>"]
LAYOUT = AlignmentLayout.from_token_to_id(SPECIAL.get, codebook_size=CODEBOOK_SIZE)


def delay_pattern(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """[K, T'] -> [K, T' + K - 1]: row k gets k ``before`` fillers, its values, K-1-k ``after`` fillers."""
    num_codebooks, length = x.shape
    out = torch.empty(num_codebooks, length + num_codebooks - 1, dtype=torch.long)
    for k in range(num_codebooks):
        out[k, :k] = before
        out[k, k : k + length] = x[k]
        out[k, k + length :] = after
    return out


@dataclass
class Document:
    """One ChatML sample laid out per merged position (one position per audio column)."""

    tokens: list[int] = field(default_factory=list)
    text_labels: list[int] = field(default_factory=list)  # label OF each position (unshifted)
    audio_in: list[bool] = field(default_factory=list)
    audio_out: list[bool] = field(default_factory=list)
    codes: list[torch.Tensor] = field(default_factory=list)  # [K] input codes per position
    audio_labels: list[torch.Tensor] = field(default_factory=list)  # [K] label codes per position
    segment: list[int] = field(default_factory=list)  # audio-out segment number, -1 elsewhere

    def text(self, ids: list[int], trained: bool) -> Document:
        for token in ids:
            self._append(token, token if trained else IGNORE_INDEX)
        return self

    def special(self, name: str, trained: bool) -> Document:
        return self.text([SPECIAL[name]], trained)

    def header(self, role_ids: list[int], first: bool) -> Document:
        if first:
            self.special("<|begin_of_text|>", trained=False)
        self.special("<|start_header_id|>", trained=False).text(role_ids, trained=False)
        return self.special("<|end_header_id|>", trained=False).text([13], trained=False)  # "\n\n"

    def audio_out_segment(self, raw_codes: torch.Tensor, trained: bool, delay: bool = True) -> Document:
        """``<|audio_out_bos|>`` + T+K+1 audio-out columns + ``<|audio_eos|>`` (docs/higgs_audio_v2.md §5.4, §5.5).

        ``delay=False`` builds the (wrong) layout without the delay pattern: T+2 aligned columns.
        """
        num_codebooks = raw_codes.shape[0]
        bos = torch.full((num_codebooks, 1), STREAM_BOS)
        eos = torch.full((num_codebooks, 1), STREAM_EOS)
        inputs = torch.cat([bos, raw_codes, eos], 1)
        labels = torch.cat([torch.full((num_codebooks, 1), IGNORE_INDEX), raw_codes, eos], 1)
        if delay:
            inputs = delay_pattern(inputs, STREAM_BOS, STREAM_EOS)
            labels = delay_pattern(labels, IGNORE_INDEX, IGNORE_INDEX)
        if not trained:
            labels.fill_(IGNORE_INDEX)
        segment_number = max(self.segment, default=-1) + 1
        self.special("<|audio_out_bos|>", trained)
        for column in range(inputs.shape[1]):
            self._append(
                SPECIAL["<|AUDIO_OUT|>"], IGNORE_INDEX, inputs[:, column], labels[:, column], out=True
            )
            self.segment[-1] = segment_number
        return self.special("<|audio_eos|>", trained)

    def audio_in_segment(self, raw_codes: torch.Tensor) -> Document:
        """``<|audio_bos|>`` + audio-in columns (same BOS/EOS + delay transform) + ``<|audio_eos|>``."""
        num_codebooks = raw_codes.shape[0]
        inputs = delay_pattern(
            torch.cat(
                [
                    torch.full((num_codebooks, 1), STREAM_BOS),
                    raw_codes,
                    torch.full((num_codebooks, 1), STREAM_EOS),
                ],
                1,
            ),
            STREAM_BOS,
            STREAM_EOS,
        )
        self.special("<|audio_bos|>", trained=False)
        for column in range(inputs.shape[1]):
            self._append(SPECIAL["<|AUDIO|>"], IGNORE_INDEX, inputs[:, column], None, audio_in=True)
        return self.special("<|audio_eos|>", trained=False)

    def _append(self, token, text_label, codes=None, audio_labels=None, out=False, audio_in=False) -> None:
        self.tokens.append(token)
        self.text_labels.append(text_label)
        self.audio_in.append(audio_in)
        self.audio_out.append(out)
        self.codes.append(torch.zeros(NUM_CODEBOOKS, dtype=torch.long) if codes is None else codes.clone())
        self.audio_labels.append(
            torch.full((NUM_CODEBOOKS,), IGNORE_INDEX) if audio_labels is None else audio_labels.clone()
        )
        self.segment.append(-1)

    def __len__(self) -> int:
        return len(self.tokens)


def random_codes(num_frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, CODEBOOK_SIZE, (NUM_CODEBOOKS, num_frames), generator=generator)


def random_text(n: int, generator: torch.Generator | None = None) -> list[int]:
    return torch.randint(0, 768, (n,), generator=generator).tolist()


def tts_document(
    num_frames: int = 5,
    prompt_len: int = 4,
    with_reference: bool = False,
    with_audio_in: bool = False,
    generator: torch.Generator | None = None,
) -> Document:
    """user text -> assistant speech. ``with_reference``: a voice-cloning reference (user transcript +
    assistant audio) before ``start_index``, untrained. ``with_audio_in``: user reference audio in codes."""
    doc = Document()
    first = True
    if with_reference:
        doc.header([1], first).text(random_text(3, generator), trained=False).special(
            "<|eot_id|>", trained=False
        )
        doc.header([2], False).audio_out_segment(random_codes(num_frames + 1, generator), trained=False)
        doc.special("<|eot_id|>", trained=False)
        first = False
    doc.header([1], first).text(random_text(prompt_len, generator), trained=False)
    if with_audio_in:
        doc.audio_in_segment(random_codes(3, generator))
    doc.special("<|eot_id|>", trained=False)
    doc.header([2], False).audio_out_segment(random_codes(num_frames, generator), trained=True)
    return doc.special("<|eot_id|>", trained=True)


def text_document(reply_len: int = 6, generator: torch.Generator | None = None) -> Document:
    """A text-only chat: user turn, trained assistant text reply."""
    doc = Document().header([1], True).text(random_text(3, generator), trained=False)
    doc.special("<|eot_id|>", trained=False).header([2], False).text(
        random_text(reply_len, generator), trained=True
    )
    return doc.special("<|eot_id|>", trained=True)


@dataclass
class PackedBatch:
    """A packed batch (``higgs_tune.data.batch`` fields) plus the unshifted labels it was built from."""

    batch: dict[str, torch.Tensor]
    text_labels: torch.Tensor  # [B, L] label OF each position (Boson's expanded_labels layout)
    audio_labels: torch.Tensor  # [B, K, L] label OF each audio-out column (label_audio_ids layout)


def pack(
    rows: list[list[Document]], seq_len: int, text_target_capacity=None, audio_target_capacity=None
) -> PackedBatch:
    """Concatenate documents into rows of ``seq_len`` and build targets by the single shift, per document."""
    num_rows, k = len(rows), NUM_CODEBOOKS
    tokens = torch.full((num_rows, seq_len), PAD_ID)
    codes = torch.zeros(num_rows, k, seq_len, dtype=torch.long)
    audio_in = torch.zeros(num_rows, seq_len, dtype=torch.bool)
    audio_out = torch.zeros(num_rows, seq_len, dtype=torch.bool)
    input_pos = torch.zeros(num_rows, seq_len, dtype=torch.long)
    doc_ids = torch.zeros(num_rows, seq_len, dtype=torch.int32)
    text_labels = torch.full((num_rows, seq_len), IGNORE_INDEX)
    audio_labels = torch.full((num_rows, k, seq_len), IGNORE_INDEX)
    text_targets = torch.full((num_rows, seq_len), IGNORE_INDEX)
    audio_targets = torch.full((num_rows, k, seq_len), IGNORE_INDEX)
    num_tokens = torch.zeros(num_rows, dtype=torch.long)
    for b, docs in enumerate(rows):
        offset = 0
        for d, doc in enumerate(docs):
            n = len(doc)
            if offset + n > seq_len:
                raise ValueError(f"row {b} needs more than seq_len={seq_len} positions")
            span = slice(offset, offset + n)
            tokens[b, span] = torch.tensor(doc.tokens)
            codes[b, :, span] = torch.stack(doc.codes, 1)
            audio_in[b, span] = torch.tensor(doc.audio_in)
            audio_out[b, span] = torch.tensor(doc.audio_out)
            input_pos[b, span] = torch.arange(n)
            doc_ids[b, span] = d
            doc_text_labels = torch.tensor(doc.text_labels)
            doc_audio_labels = torch.stack(doc.audio_labels, 1)
            text_labels[b, span] = doc_text_labels
            audio_labels[b, :, span] = doc_audio_labels
            # The single shift: target[t] = label[t+1] of the same document / audio-out segment.
            text_targets[b, offset : offset + n - 1] = doc_text_labels[1:]
            segment = torch.tensor(doc.segment)
            same_segment = (segment[:-1] >= 0) & (segment[:-1] == segment[1:])
            audio_targets[b, :, offset : offset + n - 1] = torch.where(
                same_segment, doc_audio_labels[:, 1:], IGNORE_INDEX
            )
            offset += n
        num_tokens[b] = offset
        doc_ids[b, offset:] = len(docs)
    text_capacity = text_target_capacity or seq_len
    audio_capacity = audio_target_capacity or seq_len
    audio = audio_in | audio_out
    batch = {
        "tokens": tokens,
        "audio_codes": codes,
        "audio_in_mask": audio_in,
        "audio_out_mask": audio_out,
        "input_pos": input_pos,
        "doc_ids": doc_ids,
        "text_targets": text_targets,
        "audio_targets": audio_targets,
        "text_ffn_index": torch.stack([positions_to_index(~audio[b], seq_len) for b in range(num_rows)]),
        "audio_ffn_index": torch.stack([positions_to_index(audio[b], seq_len) for b in range(num_rows)]),
        "text_target_index": torch.stack(
            [positions_to_index(text_targets[b] != IGNORE_INDEX, text_capacity) for b in range(num_rows)]
        ),
        "audio_target_index": torch.stack(
            [
                positions_to_index((audio_targets[b] != IGNORE_INDEX).any(0), audio_capacity)
                for b in range(num_rows)
            ]
        ),
        "num_text_targets": (text_targets != IGNORE_INDEX).sum(1),
        "num_audio_targets": (audio_targets != IGNORE_INDEX).sum(2),
        "num_tokens": num_tokens,
    }
    return PackedBatch(batch=batch, text_labels=text_labels, audio_labels=audio_labels)


def recount(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Recompute counts and target indices after a test corrupts the targets (keeps capacities)."""
    batch = dict(batch)
    has_text = batch["text_targets"] != IGNORE_INDEX
    has_audio = batch["audio_targets"] != IGNORE_INDEX
    rows = range(batch["tokens"].shape[0])
    batch["num_text_targets"] = has_text.sum(1)
    batch["num_audio_targets"] = has_audio.sum(2)
    batch["text_target_index"] = torch.stack(
        [positions_to_index(has_text[b], batch["text_target_index"].shape[1]) for b in rows]
    )
    batch["audio_target_index"] = torch.stack(
        [positions_to_index(has_audio[b].any(0), batch["audio_target_index"].shape[1]) for b in rows]
    )
    return batch


def one_hot_logits(targets: torch.Tensor, num_classes: int, scale: float = 30.0) -> torch.Tensor:
    """Logits putting (almost) all mass on ``targets``; ignored entries (-100) get uniform logits."""
    logits = torch.zeros(*targets.shape, num_classes)
    valid = targets != IGNORE_INDEX
    logits.scatter_(
        -1, targets.clamp_min(0).unsqueeze(-1), torch.where(valid, scale, 0.0).unsqueeze(-1).float()
    )
    return logits


def gathered_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(text targets [B, C_tt], audio targets [B, C_at, K]) gathered at the batch's target indices."""
    from higgs_tune.data.batch import gather_at

    text = gather_at(batch["text_targets"], batch["text_target_index"])
    audio = gather_at(batch["audio_targets"], batch["audio_target_index"]).transpose(1, 2)
    return text, audio


def logits_at_positions(
    full_text_logits: torch.Tensor, full_audio_logits: torch.Tensor, batch: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """What the model returns: per-position logits [B, L, V] / [B, L, K, C] gathered at the target indices.

    Sink entries (index L) gather a zero row, as the model does with its appended scratch row.
    """
    text_index = batch["text_target_index"]
    audio_index = batch["audio_target_index"]
    text = torch.cat([full_text_logits, full_text_logits.new_zeros(full_text_logits[:, :1].shape)], 1)
    audio = torch.cat([full_audio_logits, full_audio_logits.new_zeros(full_audio_logits[:, :1].shape)], 1)
    text = torch.gather(text, 1, text_index[:, :, None].expand(-1, -1, text.shape[-1]))
    audio = torch.gather(audio, 1, audio_index[:, :, None, None].expand(-1, -1, *audio.shape[2:]))
    return {"text_logits": text, "audio_logits": audio}


def boson_view(packed: PackedBatch, full_text_logits: torch.Tensor, full_audio_logits: torch.Tensor) -> dict:
    """The same data as Boson's model + collator would present it to the reference loss.

    Rows are the merged sequences (S' = L); audio-out columns of all rows are concatenated in row-major
    order into ``audio_logits`` [N_out, K, C] and ``label_audio_ids`` [K, N_out], with the first column
    of every audio-out segment in ``audio_out_ids_start``.
    """
    audio_out = packed.batch["audio_out_mask"]
    doc_ids = packed.batch["doc_ids"]
    rows, cols = torch.nonzero(audio_out, as_tuple=True)  # row-major order
    starts = []
    for i, (b, t) in enumerate(zip(rows.tolist(), cols.tolist())):
        if t == 0 or not audio_out[b, t - 1] or doc_ids[b, t - 1] != doc_ids[b, t]:
            starts.append(i)
    return {
        "logits": full_text_logits,
        "expanded_labels": packed.text_labels,
        "audio_logits": full_audio_logits[rows, cols],
        "label_audio_ids": packed.audio_labels[rows, :, cols].T.contiguous(),
        "audio_out_ids_start": torch.tensor(starts, dtype=torch.long),
    }
