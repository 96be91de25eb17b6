"""Build the tiny test tokenizer: a byte-level BPE shaped like Llama-3's, with Higgs Audio's special tokens.

The real Higgs Audio v2 tokenizer is Llama-3's (128000 BPE ids followed by 256 special tokens, some of the
reserved slots renamed for audio, docs/higgs_audio_v2.md §1.2). Tests and the CPU config need a tokenizer with the same
structure but a vocabulary small enough for a tiny model, so this tool trains one reproducibly:

- byte-level BPE with Llama-3's pre-tokenizer regex, trained to exactly ``--bpe-vocab-size`` (768) ids on
  the fixed English corpus below (the run is deterministic: same corpus, same merges, same file);
- the 256 Llama-3 special tokens appended by name at ids ``bpe_vocab_size .. bpe_vocab_size + 255``
  in Llama-3's order (Llama-3 id 128000 + i -> bpe_vocab_size + i);
- a Llama-3-like ``tokenizer_config.json`` (bos ``<|begin_of_text|>``, eos ``<|end_of_text|>``).

Usage::

    python tools/make_tokenizer.py                   # writes higgs_tune/assets/tiny_tokenizer/
    python tools/make_tokenizer.py --out-dir /tmp/tok
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEFAULT_OUT_DIR = Path(__file__).resolve().parents[1] / "higgs_tune" / "assets" / "tiny_tokenizer"
BPE_VOCAB_SIZE = 768
NUM_SPECIAL_TOKENS = 256

# Llama-3's pre-tokenizer split pattern (tokenizer.json of Meta-Llama-3 / Llama-3.2).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Special tokens that Llama-3 / Higgs Audio v2 name explicitly, by offset from the first special id
# (Llama-3 id 128000 + offset). Every other offset is a reserved slot, see `special_token_names`.
NAMED_SPECIAL_TOKENS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    4: "<|finetune_right_pad_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
    11: "<|audio_bos|>",
    12: "<|audio_eos|>",
    13: "<|audio_out_bos|>",
    15: "<|AUDIO|>",
    16: "<|AUDIO_OUT|>",
    17: "<|recipient|>",
    18: "<|scene_desc_start|>",
    19: "<|scene_desc_end|>",
    20: "<|generation_instruction_start|>",
    21: "<|generation_instruction_end|>",
    22: "<SE>",
    23: "</SE>",
    24: "<SE_s>",
    25: "</SE_s>",
    26: "<SE_e>",
    27: "</SE_e>",
}

# The fixed training corpus. Plain English about speech and audio, with numbers and punctuation, so the
# merges cover ordinary words, digits and the "\n\n" that follows every ChatML header.
CORPUS = """\
The quick brown fox jumps over the lazy dog while the radio plays a quiet song in the kitchen.
A speech model listens to the voice of a speaker and learns how the words should sound when spoken aloud.
Every sentence in this little corpus is plain text, written for a tokenizer that only needs a few hundred merges.

Generate audio following instruction. The speaker talks slowly, with a warm and calm voice, in a small room.
Please read the following text in a clear voice: the weather today is sunny with a light breeze from the west.
What words do you hear from the provided audio? Write them down for me, one sentence at a time.

She said that the meeting would start at 9:30 in the morning and end before 12 o'clock.
He counted the numbers out loud: one, two, three, four, five, six, seven, eight, nine and ten.
There were 24 people in the hall, 16 of them singing and 8 of them playing the piano and the drums.
The train leaves at 7:45 from platform 3, and the next one arrives 25 minutes later.

A good recording has little noise, a steady level and no clipping; a bad one hisses, hums or crackles.
The microphone was placed close to the mouth of the reader, and the room was treated to reduce echo.
Each frame of audio lasts forty milliseconds, so one second of speech becomes twenty five frames of codes.
The codec turns sound into eight streams of numbers, and the model predicts those numbers one step at a time.

Once upon a time there was a small village by the sea, where the fishermen sang while they mended their nets.
In the evening the children listened to stories about ships, storms, islands and the stars above the water.
The old teacher spoke softly, but everyone in the room could hear every word she said.
When the wind was strong, the waves were loud, and the boats stayed safely in the harbour until morning.

"Could you say that again, please?" asked the student. "Of course," answered the teacher, "listen carefully."
I'm sure we'll find the answer; they've tried before, and it's not as hard as you'd think.
Don't stop now: keep reading, keep speaking, and keep listening to the sound of your own voice.
Questions, answers, greetings and thanks are the most common things people say to each other every day.

The assistant replied with a short answer, then paused, and then explained the idea in more detail.
The user asked for a story about a dragon who was afraid of the dark and a knight who liked to sing.
The system prompt describes the scene: a quiet library, late at night, with rain falling outside.
Training a model means showing it many examples, measuring its mistakes, and changing its weights a little.

Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the seven days of the week.
January, February, March, April, May, June, July, August, September, October, November, December.
Red, orange, yellow, green, blue and violet are the colours of the rainbow after a summer storm.
The price was 3.50 for a cup of tea, 4.25 for coffee, and 1.99 for a small piece of cake.

Music and speech share many features: pitch, rhythm, loudness and timbre all change from moment to moment.
A sentence can be read happily, sadly, angrily or calmly, and each reading sounds different to the listener.
Whisper the secret, shout the warning, and sing the chorus together when the music starts again.
The end of a sentence is often marked by a falling tone, while a question usually rises at the end.

Hello world! The user speaks first, the assistant answers, and the system sets the scene for both of them.
The user said hello, the assistant said hello back, and the system stayed silent.
"""


def special_token_names(count: int = NUM_SPECIAL_TOKENS) -> list[str]:
    """Names of the special tokens in Llama-3's order, with Higgs Audio's renamed reserved slots.

    Llama-3 names the unnamed slots ``<|reserved_special_token_N|>`` with N counting only unnamed slots
    (offsets 2, 3, 5 are N = 0, 1, 2; offset i >= 11 is N = i - 8, so offset 14 keeps its Llama-3 name
    ``<|reserved_special_token_6|>``).
    """
    names = []
    for offset in range(count):
        if offset in NAMED_SPECIAL_TOKENS:
            names.append(NAMED_SPECIAL_TOKENS[offset])
        elif offset < 11:
            names.append(f"<|reserved_special_token_{(2, 3, 5).index(offset)}|>")
        else:
            names.append(f"<|reserved_special_token_{offset - 8}|>")
    return names


def build_tokenizer(bpe_vocab_size: int = BPE_VOCAB_SIZE) -> Tokenizer:
    """Train the byte-level BPE on :data:`CORPUS` and append the special tokens.

    Returns:
        a ``tokenizers.Tokenizer`` with ``bpe_vocab_size + 256`` ids.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        min_frequency=0,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator([CORPUS], trainer=trainer)
    trained = tokenizer.get_vocab_size(with_added_tokens=True)
    if trained != bpe_vocab_size:
        raise RuntimeError(f"BPE training produced {trained} ids, expected {bpe_vocab_size}: enlarge CORPUS")

    names = special_token_names()
    tokenizer.add_special_tokens(
        [
            AddedToken(name, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
            for name in names
        ]
    )
    for offset, name in enumerate(names):
        if tokenizer.token_to_id(name) != bpe_vocab_size + offset:
            raise RuntimeError(f"special token {name} got id {tokenizer.token_to_id(name)}")
    bos = names[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bpe_vocab_size)]
    )
    return tokenizer


def tokenizer_config() -> dict:
    """A minimal Llama-3-like ``tokenizer_config.json`` (no pad token, like Llama-3)."""
    return {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_tokenizer(out_dir: Path, bpe_vocab_size: int = BPE_VOCAB_SIZE) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``; returns the tokenizer.json path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = out_dir / "tokenizer.json"
    tokenizer_path.write_text(build_tokenizer(bpe_vocab_size).to_str(pretty=True) + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(), indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return tokenizer_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--bpe-vocab-size", type=int, default=BPE_VOCAB_SIZE)
    args = parser.parse_args(argv)
    path = write_tokenizer(args.out_dir, args.bpe_vocab_size)
    print(f"wrote {path} ({args.bpe_vocab_size + NUM_SPECIAL_TOKENS} ids)")


if __name__ == "__main__":
    main()
