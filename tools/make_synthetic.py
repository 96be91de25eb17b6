"""Write a synthetic text-to-speech data set that a tiny Higgs Audio model can really learn.

    python tools/make_synthetic.py --out DIR [--num-samples N] [--num-val N] [--seed S]

Writes ``DIR/train.jsonl``, ``DIR/val.jsonl`` (held-out sentences: no validation sentence occurs in
the training set) and ``DIR/codes/*.npy`` (int16 arrays [8, T]), in the manifest format of README "Your data".

The audio is a deterministic function of the text and the speaker, so a model has to read the text to
"speak" it and has to look at the reference audio to clone a voice:

- a sentence is 3..8 DIFFERENT words of a fixed 20-word vocabulary (:data:`WORDS`);
- every word owns a fixed sequence of 2..4 frames of 8 codebook ids (a seeded table); a sentence's codes
  are its words' frames, concatenated, so words last different times, as in speech;
- codebooks 0..3 depend on the words only; codebooks 4..7 are shifted by a per-speaker offset, so the
  voice lives in the fine codebooks. Same text + same speaker -> the same codes, always.

Why this shape (the demo, configs/cpu_tiny.yaml, trains a 4-layer model for a few CPU minutes and then
greedy generation must reproduce held-out sentences):

- every word is ONE token of the project's tiny tokenizer, at the start of a sentence and after a space
  (``a`` -> ``a``, `` a`` -> ``Ġa``), so text position and word are the same thing;
- no word occurs twice in a sentence, so "the word after the one I am speaking" names one text token: at
  the end of a word the next word can be found by content (an induction-style lookup: the token that
  follows the current word's token); with repeated words that lookup is ambiguous;
- within each codebook every (word, frame) entry of the table has its own code (drawn without
  replacement), so one code tells which word and which of its frames is being spoken. With codes drawn
  independently, some words share a code (60 entries among 1024 ids collide with probability ~0.8) and
  the model cannot tell which of them it is speaking.

Held-out sentences are new combinations (and orders) of the same words: generalising means reading the
text, not remembering sentences. Hence the default of 8000 training samples (about 3 epochs in the demo's
1000 steps): with 2000 the tiny model reaches training accuracy 1.0 on codebook 0 while the held-out
accuracy stays at 0.995, and one wrong word at a boundary derails the rest of a generated sentence.

Sample kinds (mixed deterministically by the seed):

- ``tts``: system prompt, user text, assistant audio (speaker 0).
- ``multi_turn``: two user-text / assistant-audio exchanges, both trained.
- ``voice_clone``: a reference exchange (user text, assistant audio of speaker s) that is NOT trained
  (``start_index`` points past it), then user text -> assistant audio of speaker s.
- ``audio_in``: the system message carries reference audio of speaker s as audio-IN
  ("SPEAKER0: " + audio), user text -> assistant audio of speaker s.
- ``transcribe``: user audio-IN (speaker 0) -> assistant text (the transcript).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

NUM_CODEBOOKS = 8
CODEBOOK_SIZE = 1024
NUM_SPEAKERS = 4
VOICE_CODEBOOKS = range(4, 8)
SYSTEM_PROMPT = "Generate audio following instruction."
SAMPLE_KINDS = ("tts", "multi_turn", "voice_clone", "audio_in", "transcribe")
# Relative frequency of each kind, same order as SAMPLE_KINDS.
SAMPLE_KIND_WEIGHTS = (0.4, 0.15, 0.2, 0.15, 0.1)

# One token each of higgs_tune/assets/tiny_tokenizer, alone and after a space (tests/data/test_tools.py).
WORDS = "a all and are as at for he in is it listen loud one or rain ten to up us".split()
MIN_WORDS, MAX_WORDS = 3, 8  # words per sentence (all different)
MIN_FRAMES, MAX_FRAMES = 2, 4  # frames per word


class SyntheticVoice:
    """The text -> codes function: a seeded frame table per word plus a per-speaker offset.

    Args:
        seed: seeds the word table and the speaker offsets (the same seed -> the same function).
    """

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 1])
        num_frames = rng.integers(MIN_FRAMES, MAX_FRAMES + 1, size=len(WORDS))
        # [8, sum(num_frames)]: in each codebook, a different code for every (word, frame) entry
        table = np.stack(
            [
                rng.choice(CODEBOOK_SIZE, size=int(num_frames.sum()), replace=False)
                for _ in range(NUM_CODEBOOKS)
            ]
        )
        ends = np.cumsum(num_frames)
        self.word_frames: dict[str, np.ndarray] = {
            word: table[:, end - count : end] for word, count, end in zip(WORDS, num_frames, ends)
        }
        self.speaker_offsets = rng.integers(1, CODEBOOK_SIZE, size=(NUM_SPEAKERS, NUM_CODEBOOKS))
        self.speaker_offsets[0] = 0  # speaker 0 is the plain table
        self.speaker_offsets[:, : VOICE_CODEBOOKS.start] = 0  # coarse codebooks carry the words only

    def codes(self, text: str, speaker: int) -> np.ndarray:
        """Codes [8, T] (int16) of ``text`` spoken by ``speaker``; T = sum of the words' frame counts.

        Raises:
            ValueError: for a word outside the fixed vocabulary or an unknown speaker.
        """
        if not 0 <= speaker < NUM_SPEAKERS:
            raise ValueError(f"speaker must be in 0..{NUM_SPEAKERS - 1}, got {speaker}")
        unknown = [w for w in text.split() if w not in self.word_frames]
        if unknown:
            raise ValueError(f"words outside the synthetic vocabulary: {unknown}")
        frames = np.concatenate([self.word_frames[w] for w in text.split()], axis=1)
        voiced = (frames + self.speaker_offsets[speaker][:, None]) % CODEBOOK_SIZE
        return voiced.astype(np.int16)


def random_sentence(rng: np.random.Generator) -> str:
    """MIN_WORDS..MAX_WORDS different words of the fixed vocabulary, in random order."""
    num_words = int(rng.integers(MIN_WORDS, MAX_WORDS + 1))
    return " ".join(rng.choice(WORDS, size=num_words, replace=False))


class SampleWriter:
    """Writes the codes files of one split and builds its ChatML samples."""

    def __init__(self, out_dir: Path, split: str, voice: SyntheticVoice) -> None:
        self.out_dir = out_dir
        self.split = split
        self.voice = voice
        (out_dir / "codes").mkdir(parents=True, exist_ok=True)

    def audio(self, sample_index: int, item_index: int, text: str, speaker: int) -> dict:
        """Save the codes of ``text`` by ``speaker``; return the audio content item pointing at them."""
        relative = f"codes/{self.split}_{sample_index:06d}_{item_index}.npy"
        np.save(self.out_dir / relative, self.voice.codes(text, speaker))
        return {"type": "audio", "audio_url": f"synthetic://speaker{speaker}/{text}", "audio_codes": relative}

    def sample(self, kind: str, index: int, sentences: list[str], speaker: int) -> dict:
        """One ChatML sample of ``kind`` using ``sentences`` (as many as the kind needs, see below)."""
        system = {"role": "system", "content": SYSTEM_PROMPT}
        if kind == "tts":
            (text,) = sentences[:1]
            messages = [
                system,
                {"role": "user", "content": text},
                {"role": "assistant", "content": self.audio(index, 0, text, 0)},
            ]
            return {"messages": messages, "misc": {"kind": kind}}
        if kind == "multi_turn":
            first, second = sentences[:2]
            messages = [
                system,
                {"role": "user", "content": first},
                {"role": "assistant", "content": self.audio(index, 0, first, 0)},
                {"role": "user", "content": second},
                {"role": "assistant", "content": self.audio(index, 1, second, 0)},
            ]
            return {"messages": messages, "misc": {"kind": kind}}
        if kind == "voice_clone":
            reference, target = sentences[:2]
            messages = [
                system,
                {"role": "user", "content": reference},
                {"role": "assistant", "content": self.audio(index, 0, reference, speaker)},
                {"role": "user", "content": target},
                {"role": "assistant", "content": self.audio(index, 1, target, speaker)},
            ]
            # Turns 0..2 (the reference exchange) get no labels: only the cloned turn is trained.
            return {
                "messages": messages,
                "start_index": 3,
                "speaker": f"speaker{speaker}",
                "misc": {"kind": kind},
            }
        if kind == "audio_in":
            reference, target = sentences[:2]
            messages = [
                {
                    "role": "system",
                    "content": [
                        {"type": "text", "text": SYSTEM_PROMPT + "\n\nSPEAKER0: "},
                        self.audio(index, 0, reference, speaker),
                    ],
                },
                {"role": "user", "content": target},
                {"role": "assistant", "content": self.audio(index, 1, target, speaker)},
            ]
            return {"messages": messages, "speaker": f"speaker{speaker}", "misc": {"kind": kind}}
        if kind == "transcribe":
            (text,) = sentences[:1]
            messages = [
                {"role": "system", "content": "Transcribe the audio."},
                {"role": "user", "content": [self.audio(index, 0, text, 0)]},
                {"role": "assistant", "content": text},
            ]
            return {"messages": messages, "misc": {"kind": kind}}
        raise ValueError(f"unknown sample kind {kind!r}; expected one of {SAMPLE_KINDS}")


def make_synthetic(out_dir: Path, num_samples: int, num_val: int, seed: int) -> dict[str, int]:
    """Write the data set; return how many samples of each kind went into train.jsonl."""
    out_dir = Path(out_dir)
    voice = SyntheticVoice(seed)
    rng = np.random.default_rng([seed, 2])
    val_rng = np.random.default_rng([seed, 3])

    # Held-out sentences first, so the training sentences can avoid them.
    val_sentences: list[str] = []
    while len(val_sentences) < 2 * num_val:
        sentence = random_sentence(val_rng)
        if sentence not in val_sentences:
            val_sentences.append(sentence)
    held_out = set(val_sentences)

    def train_sentence() -> str:
        while True:
            sentence = random_sentence(rng)
            if sentence not in held_out:
                return sentence

    kind_counts = dict.fromkeys(SAMPLE_KINDS, 0)
    train = SampleWriter(out_dir, "train", voice)
    with open(out_dir / "train.jsonl", "w") as f:
        for index in range(num_samples):
            kind = str(rng.choice(SAMPLE_KINDS, p=SAMPLE_KIND_WEIGHTS))
            speaker = int(rng.integers(1, NUM_SPEAKERS))
            sentences = [train_sentence(), train_sentence()]
            f.write(json.dumps(train.sample(kind, index, sentences, speaker)) + "\n")
            kind_counts[kind] += 1

    val = SampleWriter(out_dir, "val", voice)
    with open(out_dir / "val.jsonl", "w") as f:
        for index in range(num_val):
            kind = SAMPLE_KINDS[index % len(SAMPLE_KINDS)]
            speaker = 1 + index % (NUM_SPEAKERS - 1)
            sentences = val_sentences[2 * index : 2 * index + 2]
            f.write(json.dumps(val.sample(kind, index, sentences, speaker)) + "\n")
    return kind_counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--num-samples", type=int, default=8000, help="training samples (default 8000)")
    parser.add_argument("--num-val", type=int, default=50, help="held-out validation samples (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = make_synthetic(args.out, args.num_samples, args.num_val, args.seed)
    summary = ", ".join(f"{kind} {n}" for kind, n in counts.items())
    print(
        f"wrote {args.num_samples} training samples ({summary}) and {args.num_val} validation samples to {args.out}"
    )


if __name__ == "__main__":
    main()
