"""Hypothesis strategies for random ChatML samples with random audio codes (shared by the data tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from higgs_tune.data.chatml import tokenize_sample
from higgs_tune.data.document import AudioLayout, build_document
from higgs_tune.data.tokenizer import HiggsTokenizer

TINY_TOKENIZER = Path(__file__).resolve().parents[2] / "higgs_tune" / "assets" / "tiny_tokenizer"
ROLES = ("system", "user", "assistant")

# Plain text plus a few special-token strings that may appear inside text (they become single tokens,
# for Boson as for us). The audio placeholders <|AUDIO|> / <|AUDIO_OUT|> are not allowed inside text.
_PLAIN_TEXT = st.text(alphabet="abcdefghij klmnopqrstuvwxyzABC .,!?'\n\t0123456789éß中🙂", max_size=24)
_SPECIAL_IN_TEXT = st.sampled_from(
    [
        "<|eot_id|>",
        " said<|audio_eos|>",
        "<|recipient|>x",
        "a<|eom_id|>b",
        "<|audio_out_bos|>",
        "<|begin_of_text|>",
    ]
)
TEXT = st.one_of(_PLAIN_TEXT, _PLAIN_TEXT, _PLAIN_TEXT, _SPECIAL_IN_TEXT)


@st.composite
def chatml_samples(
    draw, num_codebooks: int = 8, max_messages: int = 6, max_frames: int = 6, max_items: int = 3
):
    """A random trainable ChatML sample dict and the codes of its audio items.

    Covers: all roles in any order (consecutive assistant turns included), text as plain strings, text
    items and lists, audio in system/user turns (audio-in) and assistant turns (audio-out), several audio
    items per turn, recipients, start_index, voice-cloning reference turns left untrained by start_index.
    The last message is made an assistant turn at or after start_index when needed so the sample has
    something to train on.

    Returns:
        ``(sample, codes_by_path)``: the dict, and for every ``audio_codes`` path an int64 array [K, T].
    """
    num_messages = draw(st.integers(1, max_messages))
    start_index = draw(st.none() | st.integers(0, num_messages - 1))
    codes_by_path: dict[str, np.ndarray] = {}
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    def audio_item() -> dict:
        path = f"codes/{len(codes_by_path):04d}.npy"
        frames = draw(st.integers(1, max_frames))
        codes_by_path[path] = rng.integers(0, 1024, size=(num_codebooks, frames), dtype=np.int64)
        return {"type": "audio", "audio_codes": path}

    messages = []
    for _ in range(num_messages):
        role = draw(st.sampled_from(ROLES))
        kinds = draw(
            st.lists(st.sampled_from(["text", "text_item", "audio"]), min_size=0, max_size=max_items)
        )
        items = []
        for kind in kinds:
            if kind == "audio":
                items.append(audio_item())
            elif kind == "text_item":
                items.append({"type": "text", "text": draw(TEXT)})
            else:
                items.append(draw(TEXT))
        if len(items) == 1 and draw(st.booleans()):
            content = items[0]
        elif not items and draw(st.booleans()):
            content = ""
        else:
            content = items
        messages.append({"role": role, "content": content})

    if draw(st.booleans()):
        # a voice-cloning prefix: a reference exchange (assistant audio) that start_index leaves untrained
        reference = [{"role": "user", "content": draw(TEXT)}, {"role": "assistant", "content": audio_item()}]
        messages = reference + messages
        start_index = len(reference) + (start_index or 0)
    first_trained = 0 if start_index is None else start_index
    if not any(m["role"] == "assistant" for m in messages[first_trained:]):
        messages[-1]["role"] = "assistant"
    for message in messages:
        if message["role"] == "assistant" and draw(st.integers(0, 4)) == 4:
            message["recipient"] = draw(st.sampled_from(["tool", "user_2", "speaker A"]))
    sample = {"messages": messages}
    if start_index is not None or draw(st.booleans()):
        sample["start_index"] = start_index
    return sample, codes_by_path


def codes_in_order(sample: dict, codes_by_path: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The codes of the sample's audio items in order of appearance."""
    paths = []
    for message in sample["messages"]:
        content = message["content"]
        for item in content if isinstance(content, list) else [content]:
            if isinstance(item, dict) and item.get("type") == "audio":
                paths.append(item["audio_codes"])
    return [codes_by_path[path] for path in paths]


def make_document(sample: dict, codes_by_path: dict, tokenizer: HiggsTokenizer, layout: AudioLayout):
    """tokenize_sample + build_document for a strategy sample."""
    return build_document(tokenize_sample(sample, tokenizer), codes_in_order(sample, codes_by_path), layout)
