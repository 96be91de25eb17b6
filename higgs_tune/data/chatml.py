"""ChatML samples: parse and validate one sample, then lay it out as tokens and labels exactly like Boson.

A sample is Boson's ChatML dict (README "Your data"; docs/higgs_audio_v2.md §5.1)::

    {"messages": [{"role": "system" | "user" | "assistant",
                   "content": str | {"type": "text", "text": ...}
                              | {"type": "audio", "audio_codes": "codes/0001.npy", "audio_url": ...}
                              | [ ...a list of these (strings are text) ],
                   "recipient": optional str (assistant only)}, ...],
     "start_index": optional int, "speaker": optional str, "misc": optional dict}

:func:`tokenize_sample` reproduces ``boson_multimodal.dataset.chatml_dataset.prepare_chatml_sample``
token for token and label for label (docs/higgs_audio_v2.md §5.2): each piece is encoded separately, assistant text, audio
placeholders and end-of-turn tokens of turns ``>= start_index`` are labelled, everything else is -100.
The audio placeholders stay single tokens here; :mod:`higgs_tune.data.document` expands them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from higgs_tune.data.batch import IGNORE_INDEX
from higgs_tune.data.tokenizer import HiggsTokenizer
from higgs_tune.errors import InvalidInputError

ROLES = ("system", "user", "assistant")
SAMPLE_KEYS = {"messages", "start_index", "speaker", "misc"}
MESSAGE_KEYS = {"role", "content", "recipient"}
TEXT_ITEM_KEYS = {"type", "text"}
# Provenance keys allowed next to the codes (Boson's AudioContent fields). The codes are the audio.
AUDIO_ITEM_KEYS = {"type", "audio_codes", "audio_url", "offset", "duration", "row_id"}


class SampleError(InvalidInputError):
    """A sample that cannot be trained on, with the reason (the dataset adds the file and line)."""


@dataclass(frozen=True)
class TextItem:
    text: str


@dataclass(frozen=True)
class AudioItem:
    """One audio content item: its pre-computed codes file ([K, T] ints, path as written in the sample)."""

    codes_path: str
    audio_url: str | None = None


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    items: tuple[TextItem | AudioItem, ...]
    recipient: str | None = None


@dataclass(frozen=True)
class ChatSample:
    """A validated ChatML sample. Turns with index < ``start_index`` get no labels."""

    messages: tuple[ChatMessage, ...]
    start_index: int | None = None
    speaker: str | None = None

    @property
    def audio_items(self) -> list[AudioItem]:
        """Audio items in order of appearance (the order of the placeholders in the token sequence)."""
        return [item for message in self.messages for item in message.items if isinstance(item, AudioItem)]


@dataclass(frozen=True)
class AudioRef:
    """Where an audio item sits in a :class:`TokenizedSample`.

    Attributes:
        is_output: True for assistant audio (``<|AUDIO_OUT|>``, generated), False for system/user audio
            (``<|AUDIO|>``, fed as codes).
        codes_path: the item's ``audio_codes`` path as written in the sample.
        placeholder_position: index of its ``<|AUDIO|>`` / ``<|AUDIO_OUT|>`` token in ``input_ids``.
        trained: audio-out whose placeholder carries a label (turn >= start_index); always False for
            audio-in. Boson's collator derives the same flag from the same label.
        message_index: the turn the item belongs to.
    """

    is_output: bool
    codes_path: str
    placeholder_position: int
    trained: bool
    message_index: int


@dataclass(frozen=True)
class TokenizedSample:
    """Boson's per-sample layout before the audio merge (docs/higgs_audio_v2.md §5.2).

    Attributes:
        input_ids: [S] int64, one ``<|AUDIO|>`` / ``<|AUDIO_OUT|>`` placeholder per audio item.
        label_ids: [S] int64, UNSHIFTED (label i is the token at i, or -100).
        audio: the audio items in order of appearance, one per placeholder.
    """

    input_ids: torch.Tensor
    label_ids: torch.Tensor
    audio: tuple[AudioRef, ...]


def _parse_item(raw: object, where: str) -> TextItem | AudioItem:
    if isinstance(raw, str):
        return TextItem(raw)
    if not isinstance(raw, Mapping):
        raise SampleError(f"{where}: a content item must be a string or an object, got {type(raw).__name__}")
    kind = raw.get("type")
    if kind == "text":
        unknown = set(raw) - TEXT_ITEM_KEYS
        if unknown:
            raise SampleError(f"{where}: unknown key(s) {sorted(unknown)} in a text item")
        if not isinstance(raw.get("text"), str):
            raise SampleError(f"{where}: a text item needs 'text' as a string")
        return TextItem(raw["text"])
    if kind == "audio":
        unknown = set(raw) - AUDIO_ITEM_KEYS
        if unknown:
            raise SampleError(
                f"{where}: unknown key(s) {sorted(unknown)} in an audio item (allowed: {sorted(AUDIO_ITEM_KEYS)})"
            )
        codes_path = raw.get("audio_codes")
        if not isinstance(codes_path, str) or not codes_path:
            raise SampleError(
                f"{where}: an audio item needs 'audio_codes', the path of its pre-computed codes ([K, T] ints)"
            )
        audio_url = raw.get("audio_url")
        if audio_url is not None and not isinstance(audio_url, str):
            raise SampleError(f"{where}: 'audio_url' must be a string")
        return AudioItem(codes_path=codes_path, audio_url=audio_url)
    raise SampleError(f"{where}: content item type must be 'text' or 'audio', got {kind!r}")


def _parse_message(raw: object, where: str) -> ChatMessage:
    if not isinstance(raw, Mapping):
        raise SampleError(f"{where}: a message must be an object, got {type(raw).__name__}")
    unknown = set(raw) - MESSAGE_KEYS
    if unknown:
        raise SampleError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(MESSAGE_KEYS)})")
    role = raw.get("role")
    if role not in ROLES:
        raise SampleError(f"{where}: role must be one of {ROLES}, got {role!r}")
    if "content" not in raw:
        raise SampleError(f"{where}: no 'content'")
    content = raw["content"]
    raw_items = content if isinstance(content, list) else [content]
    items = tuple(_parse_item(item, f"{where}.content[{i}]") for i, item in enumerate(raw_items))
    recipient = raw.get("recipient")
    if recipient is not None:
        if not isinstance(recipient, str) or not recipient:
            raise SampleError(f"{where}: 'recipient' must be a non-empty string or null")
        if role != "assistant":
            raise SampleError(f"{where}: 'recipient' is only allowed on assistant messages, this is {role}")
    return ChatMessage(role=role, items=items, recipient=recipient)


def parse_sample(raw: object) -> ChatSample:
    """Validate a ChatML sample dict (one manifest line) into a :class:`ChatSample`.

    Raises:
        SampleError: naming the offending field (``messages[2].content[0]: ...``).
    """
    if not isinstance(raw, Mapping):
        raise SampleError(f"a sample must be a JSON object, got {type(raw).__name__}")
    unknown = set(raw) - SAMPLE_KEYS
    if unknown:
        raise SampleError(
            f"unknown key(s) {sorted(unknown)} (allowed: {sorted(SAMPLE_KEYS)}; put metadata under 'misc')"
        )
    raw_messages = raw.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise SampleError("'messages' must be a non-empty list")
    messages = tuple(_parse_message(m, f"messages[{i}]") for i, m in enumerate(raw_messages))
    start_index = raw.get("start_index")
    if start_index is not None:
        if isinstance(start_index, bool) or not isinstance(start_index, int):
            raise SampleError(f"'start_index' must be an integer or null, got {start_index!r}")
        if not 0 <= start_index < len(messages):
            raise SampleError(f"'start_index'={start_index} is outside the {len(messages)} messages")
    speaker = raw.get("speaker")
    if speaker is not None and not isinstance(speaker, str):
        raise SampleError(f"'speaker' must be a string or null, got {speaker!r}")
    misc = raw.get("misc")
    if misc is not None and not isinstance(misc, Mapping):
        raise SampleError(f"'misc' must be an object or null, got {type(misc).__name__}")
    return ChatSample(messages=messages, start_index=start_index, speaker=speaker)


def tokenize_sample(sample: ChatSample | Mapping, tokenizer: HiggsTokenizer) -> TokenizedSample:
    """Tokens and unshifted labels of one sample, exactly as Boson's ``prepare_chatml_sample`` (docs/higgs_audio_v2.md §5.2).

    Per turn t: the header prefix (``<|begin_of_text|>`` on turn 0) unlabelled; ``{recipient}<|recipient|>``
    labelled (even before start_index, as upstream); each content item encoded on its own, text labelled
    iff assistant and t >= start_index; user/system audio as ``<|audio_bos|><|AUDIO|><|audio_eos|>``
    unlabelled; assistant audio as ``<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>`` labelled iff
    t >= start_index; then ``<|eom_id|>`` if the next turn is also assistant, else ``<|eot_id|>``, labelled
    iff assistant and t >= start_index.

    Raises:
        SampleError: text that contains an audio placeholder token, or nothing to train on (no label).
    """
    if not isinstance(sample, ChatSample):
        sample = parse_sample(sample)
    special = tokenizer.special
    placeholders = {special.audio_in, special.audio_out}
    input_ids: list[int] = []
    label_ids: list[int] = []
    audio: list[AudioRef] = []

    def add(ids: list[int], labelled: bool) -> None:
        input_ids.extend(ids)
        label_ids.extend(ids if labelled else [IGNORE_INDEX] * len(ids))

    def text_ids(text: str, where: str) -> list[int]:
        ids = tokenizer.encode(text)
        if placeholders.intersection(ids):
            raise SampleError(
                f"{where}: text contains an audio placeholder token (<|AUDIO|> or <|AUDIO_OUT|>)"
            )
        return ids

    num_messages = len(sample.messages)
    for turn, message in enumerate(sample.messages):
        role = message.role
        trained_turn = sample.start_index is None or turn >= sample.start_index
        begin = "<|begin_of_text|>" if turn == 0 else ""
        add(tokenizer.encode(f"{begin}<|start_header_id|>{role}<|end_header_id|>\n\n"), labelled=False)
        if message.recipient is not None:
            add(text_ids(f"{message.recipient}<|recipient|>", f"messages[{turn}].recipient"), labelled=True)
        for item_index, item in enumerate(message.items):
            if isinstance(item, TextItem):
                add(
                    text_ids(item.text, f"messages[{turn}].content[{item_index}]"),
                    role == "assistant" and trained_turn,
                )
                continue
            is_output = role == "assistant"
            if is_output:
                ids = tokenizer.encode("<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|>")
            else:
                ids = tokenizer.encode("<|audio_bos|><|AUDIO|><|audio_eos|>")
            placeholder = special.audio_out if is_output else special.audio_in
            position = len(input_ids) + ids.index(placeholder)
            add(ids, labelled=is_output and trained_turn)
            audio.append(
                AudioRef(
                    is_output=is_output,
                    codes_path=item.codes_path,
                    placeholder_position=position,
                    trained=label_ids[position] != IGNORE_INDEX,
                    message_index=turn,
                )
            )
        next_is_assistant = turn + 1 < num_messages and sample.messages[turn + 1].role == "assistant"
        postfix = "<|eom_id|>" if role == "assistant" and next_is_assistant else "<|eot_id|>"
        add(tokenizer.encode(postfix), labelled=role == "assistant" and trained_turn)

    if all(label == IGNORE_INDEX for label in label_ids):
        raise SampleError(
            "nothing to train on: no labelled token (labels come from assistant turns at or after "
            f"start_index={sample.start_index}; roles are {[m.role for m in sample.messages]})"
        )
    return TokenizedSample(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        label_ids=torch.tensor(label_ids, dtype=torch.long),
        audio=tuple(audio),
    )
