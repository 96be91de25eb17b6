"""The data tools: make_synthetic.py (deterministic, learnable by construction), prepare.py (three input
formats, pluggable audio tokenizer, parallel, resumable) and packing_report.py.

``FakeAudioTokenizer`` below is the pluggable audio tokenizer prepare.py loads in its worker processes
(``--audio-tokenizer test_tools:FakeAudioTokenizer`` with this folder on PYTHONPATH); this module's
top-level imports stay light so those workers start fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
TINY_TOKENIZER = REPO / "higgs_tune" / "assets" / "tiny_tokenizer"
SAMPLE_RATE = 24000
HOP = 960  # samples per frame, as Boson's audio tokenizer (25 frames/s at 24 kHz)


def load_tool(name: str):
    """Import tools/<name>.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


class FakeAudioTokenizer:
    """A deterministic stand-in for an audio tokenizer: wav -> codes [8, T] from per-frame sample statistics."""

    def encode(self, wav_path: str) -> np.ndarray:
        with wave.open(wav_path, "rb") as f:
            samples = np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16).astype(np.int64)
        num_frames = len(samples) // HOP
        frames = samples[: num_frames * HOP].reshape(num_frames, HOP)
        energy = np.abs(frames).mean(axis=1).astype(np.int64)  # [T]
        return np.stack([(energy * (k + 1) + 7 * k) % 1024 for k in range(8)])  # [8, T]


def write_wav(path: Path, num_frames: int, amplitude: int) -> None:
    """A mono int16 sine of ``num_frames`` * HOP samples."""
    t = np.arange(num_frames * HOP)
    signal = (amplitude * np.sin(2 * np.pi * 220 * t / SAMPLE_RATE)).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes(signal.tobytes())


UTTERANCES = [
    ("utt_a", "the red cat", 3, 1000),
    ("utt_b", "a big dog runs", 5, 3000),
    ("utt_c", "blue sun", 4, 9000),
]


def make_input(kind: str, root: Path) -> Path:
    """Write the three utterances in one of prepare.py's input formats; return the --input path."""
    if kind == "folder":
        for name, text, frames, amplitude in UTTERANCES:
            write_wav(root / "speech" / f"{name}.wav", frames, amplitude)
            (root / "speech" / f"{name}.txt").write_text(text + "\n")
        return root / "speech"
    if kind == "ljspeech":
        for name, _, frames, amplitude in UTTERANCES:
            write_wav(root / "lj" / "wavs" / f"{name}.wav", frames, amplitude)
        lines = [f"{name}|{text.upper()}|{text}" for name, text, _, _ in UTTERANCES]
        (root / "lj" / "metadata.csv").write_text("\n".join(lines) + "\n")
        return root / "lj" / "metadata.csv"
    assert kind == "jsonl"
    records = []
    for name, text, frames, amplitude in UTTERANCES:
        write_wav(root / "js" / "audio" / f"{name}.wav", frames, amplitude)
        records.append(json.dumps({"audio": f"audio/{name}.wav", "text": text, "id": name}))
    (root / "js" / "items.jsonl").write_text("\n".join(records) + "\n")
    return root / "js" / "items.jsonl"


def run_prepare(input_path: Path, out_dir: Path, workers: int) -> dict:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    )
    command = [
        sys.executable,
        str(TOOLS / "prepare.py"),
        "--input",
        str(input_path),
        "--out",
        str(out_dir),
        "--audio-tokenizer",
        "test_tools:FakeAudioTokenizer",
        "--workers",
        str(workers),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return {key: summary[key] for key in ("encoded", "reused", "total")}


@pytest.mark.parametrize(("kind", "workers"), [("folder", 1), ("ljspeech", 2), ("jsonl", 1)])
def test_prepare_writes_manifest_and_codes_and_resumes(tmp_path, kind, workers):
    from higgs_tune.data.document import AudioLayout
    from higgs_tune.data.manifest import load_document, scan_manifest
    from higgs_tune.data.tokenizer import HiggsTokenizer

    input_path = make_input(kind, tmp_path)
    out = tmp_path / "prepared"
    assert run_prepare(input_path, out, workers) == {"encoded": 3, "reused": 0, "total": 3}

    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["messages"][1]["content"] for m in lines] == [text for _, text, _, _ in UTTERANCES]
    fake = FakeAudioTokenizer()
    for record, (name, _, frames, _) in zip(lines, UTTERANCES):
        audio = record["messages"][2]["content"]
        assert audio["audio_codes"] == f"codes/{name}.npy"
        assert Path(audio["audio_url"]).name == f"{name}.wav"
        codes = np.load(out / audio["audio_codes"])
        assert codes.shape == (8, frames)
        np.testing.assert_array_equal(codes, fake.encode(audio["audio_url"]))

    # The manifest is valid training input.
    tokenizer, layout = HiggsTokenizer.from_path(TINY_TOKENIZER), AudioLayout()
    scan = scan_manifest(out / "manifest.jsonl", tokenizer, layout)
    assert scan.num_samples == 3 and scan.num_skipped == 0
    assert load_document(scan.entries[1], tokenizer, layout).audio_out_mask.sum() == layout.segment_length(5)

    # Resume: nothing to do when every codes file is valid ...
    assert run_prepare(input_path, out, workers) == {"encoded": 0, "reused": 3, "total": 3}
    # ... only the missing and the broken (truncated, wrong shape) ones are encoded again.
    (out / "codes" / "utt_a.npy").unlink()
    (out / "codes" / "utt_b.npy").write_bytes(b"\x93NUMPY truncated")
    np.save(out / "codes" / "utt_c.npy", np.zeros((4, 2), dtype=np.int16))
    assert run_prepare(input_path, out, workers) == {"encoded": 3, "reused": 0, "total": 3}
    np.save(out / "codes" / "utt_c.npy", np.full((8, 2), 1024, dtype=np.int16))  # value out of range
    assert run_prepare(input_path, out, workers) == {"encoded": 1, "reused": 2, "total": 3}
    assert np.load(out / "codes" / "utt_c.npy").shape == (8, 4)


def test_prepare_names_the_bad_item(tmp_path, capsys):
    prepare = load_tool("prepare")
    input_path = make_input("jsonl", tmp_path)
    (tmp_path / "js" / "audio" / "utt_b.wav").unlink()
    with pytest.raises(prepare.InputError, match=r"1 bad item\(s\) of 3"):
        prepare.prepare(input_path, tmp_path / "out", "test_tools:FakeAudioTokenizer")
    assert re.search(r"item utt_b: .*utt_b\.wav: audio file not found", capsys.readouterr().err)
    (tmp_path / "speech").mkdir()
    write_wav(tmp_path / "speech" / "lonely.wav", 2, 100)
    (item,) = prepare.read_items(tmp_path / "speech")
    assert item.text is None and re.search(r"lonely\.txt: transcript not found", item.problem)
    with pytest.raises(ValueError, match="expected Boson's audio tokenizer folder .* or 'module:factory'"):
        prepare.load_encoder("no_colon_here")


def test_make_synthetic_is_deterministic_and_learnable(tmp_path):
    from higgs_tune.data.chatml import parse_sample, tokenize_sample
    from higgs_tune.data.document import AudioLayout
    from higgs_tune.data.manifest import load_document, scan_manifest
    from higgs_tune.data.tokenizer import HiggsTokenizer

    make_synthetic = load_tool("make_synthetic")
    counts = make_synthetic.make_synthetic(tmp_path / "a", num_samples=60, num_val=10, seed=3)
    make_synthetic.make_synthetic(tmp_path / "b", num_samples=60, num_val=10, seed=3)
    assert all(n > 0 for n in counts.values()), counts  # every sample kind is present
    for name in ["train.jsonl", "val.jsonl", *sorted(os.listdir(tmp_path / "a" / "codes"))]:
        sub = "" if name.endswith(".jsonl") else "codes"
        assert (tmp_path / "a" / sub / name).read_bytes() == (tmp_path / "b" / sub / name).read_bytes(), name

    voice = make_synthetic.SyntheticVoice(3)
    tokenizer, layout = HiggsTokenizer.from_path(TINY_TOKENIZER), AudioLayout()
    train_sentences, val_sentences = set(), set()
    for split, sentences in (("train", train_sentences), ("val", val_sentences)):
        manifest = tmp_path / "a" / f"{split}.jsonl"
        scan = scan_manifest(manifest, tokenizer, layout)
        assert scan.num_skipped == 0 and len(scan.entries) == scan.num_samples
        for entry, line in zip(scan.entries, manifest.read_text().splitlines()):
            raw = json.loads(line)
            kind = raw["misc"]["kind"]
            speaker = int(raw["speaker"].removeprefix("speaker")) if "speaker" in raw else 0
            previous_text = None
            for message in raw["messages"]:
                content = message["content"]
                items = content if isinstance(content, list) else [content]
                for item in items:
                    if isinstance(item, str):
                        previous_text = item
                    elif item["type"] == "audio":
                        codes = np.load(manifest.parent / item["audio_codes"])
                        # The codes are a function of the spoken text and the speaker, nothing else.
                        spoken = item["audio_url"].split("/", 3)[-1]
                        np.testing.assert_array_equal(codes, voice.codes(spoken, speaker))
                        if message["role"] == "assistant":
                            assert spoken == previous_text  # the assistant speaks the user's text
                        elif kind == "transcribe":
                            assert spoken == raw["messages"][2]["content"]  # ... or transcribes the audio
                        sentences.add(spoken)
            tokenized = tokenize_sample(parse_sample(raw), tokenizer)
            document = load_document(entry, tokenizer, layout)
            if kind == "voice_clone":
                # The reference turn (before start_index) is fed but never trained.
                assert raw["start_index"] == 3
                assert [ref.trained for ref in tokenized.audio] == [False, True]
                first_segment = layout.segment_length(
                    np.load(manifest.parent / items[0]["audio_codes"]).shape[1]
                )
                assert document.audio_out_mask.sum() > first_segment
            if kind in ("audio_in", "transcribe"):
                assert not tokenized.audio[0].is_output and document.audio_in_mask.any()
    assert not train_sentences & val_sentences  # validation sentences are held out

    # Same words -> same frames: the table is shared, so a word's frames recur wherever it is spoken.
    np.testing.assert_array_equal(
        voice.codes("rain up", 0)[:, : voice.word_frames["rain"].shape[1]], voice.word_frames["rain"]
    )
    assert not np.array_equal(voice.codes("rain up", 1), voice.codes("rain up", 2))  # voices differ
    np.testing.assert_array_equal(
        voice.codes("rain up", 1)[:4], voice.codes("rain up", 2)[:4]
    )  # words do not


def test_make_synthetic_text_and_codes_can_be_aligned(tmp_path):
    """The properties that make the demo's held-out sentences learnable (make_synthetic's docstring): one
    token per word wherever it stands, no word twice in a sentence, one (word, frame) per code."""
    from higgs_tune.data.tokenizer import HiggsTokenizer

    make_synthetic = load_tool("make_synthetic")
    tokenizer = HiggsTokenizer.from_path(TINY_TOKENIZER)
    for word in make_synthetic.WORDS:
        assert len(tokenizer.encode(word)) == 1 and len(tokenizer.encode(" " + word)) == 1, word
    make_synthetic.make_synthetic(tmp_path, num_samples=60, num_val=10, seed=5)
    sentences = []
    for split in ("train", "val"):
        for line in (tmp_path / f"{split}.jsonl").read_text().splitlines():
            for message in json.loads(line)["messages"]:
                content = message["content"]
                for item in content if isinstance(content, list) else [content]:
                    if isinstance(item, dict) and item["type"] == "audio":
                        sentences.append(item["audio_url"].split("/", 3)[-1].split())
    assert sentences
    for words in sentences:
        assert make_synthetic.MIN_WORDS <= len(words) <= make_synthetic.MAX_WORDS
        assert len(set(words)) == len(words), words
        assert len(tokenizer.encode(" ".join(words))) == len(words), words  # one text token per word

    voice = make_synthetic.SyntheticVoice(5)
    table = np.concatenate(list(voice.word_frames.values()), axis=1)  # [8, all (word, frame) entries]
    lengths = {frames.shape[1] for frames in voice.word_frames.values()}
    assert (
        lengths <= set(range(make_synthetic.MIN_FRAMES, make_synthetic.MAX_FRAMES + 1)) and len(lengths) > 1
    )
    for codebook in table:
        assert len(set(codebook.tolist())) == table.shape[1]  # every code names one word and frame


def test_packing_report_figures(tmp_path, capsys):
    from higgs_tune.data.document import AudioLayout
    from higgs_tune.data.manifest import scan_manifest
    from higgs_tune.data.tokenizer import HiggsTokenizer

    load_tool("make_synthetic").make_synthetic(tmp_path, num_samples=40, num_val=2, seed=0)
    report_tool = load_tool("packing_report")
    report_tool.main([str(tmp_path / "train.jsonl"), "--seq-len", "256", "--batch-size", "4", "--json"])
    report = json.loads(capsys.readouterr().out)

    lengths = [
        e.stats.length
        for e in scan_manifest(
            tmp_path / "train.jsonl", HiggsTokenizer.from_path(TINY_TOKENIZER), AudioLayout()
        ).entries
    ]
    fitting = [n for n in lengths if n <= 256]
    assert report["samples"] == 40 and report["skipped_samples"] == 0
    assert report["documents_dropped_too_long"] == len(lengths) - len(fitting)
    assert report["documents_packed"] == len(fitting)
    assert report["padding_fraction"] == pytest.approx(1 - sum(fitting) / (report["rows"] * 256))
    assert report["length_per_row_max"] <= 256
    assert report["rows"] >= -(-sum(fitting) // 256)  # at least the ideal number of rows
    assert report["batches_per_epoch"] == report["rows"] // 4
