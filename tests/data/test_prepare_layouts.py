"""tools/prepare.py's input layouts beyond the three of test_tools.py (train-higgs-audio's metadata.json with
scenes and reference clips, voice cloning from a speaker's other clips), its bad-item policy and the
audio formats it reads; with the fast stand-in encoder of test_tools.py (the real encoder end to end:
tests/audio/test_real_speech.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
from test_tools import HOP, SAMPLE_RATE, TINY_TOKENIZER, FakeAudioTokenizer, load_tool, write_wav

from higgs_tune.data.chatml import parse_sample, tokenize_sample
from higgs_tune.data.document import AudioLayout
from higgs_tune.data.manifest import scan_manifest
from higgs_tune.data.tokenizer import HiggsTokenizer

FAKE = "test_tools:FakeAudioTokenizer"


@pytest.fixture(scope="module")
def prepare():
    return load_tool("prepare")


def metadata_json(root, samples):
    (root / "metadata.json").write_text(json.dumps({"dataset_info": {}, "samples": samples}))
    return root / "metadata.json"


def test_metadata_json_with_scene_and_reference(prepare, tmp_path):
    for name, frames in (("a", 3), ("b", 4), ("ref", 2)):
        write_wav(tmp_path / f"{name}.wav", frames, 1000 * frames)
    (tmp_path / "a.txt").write_text("the red cat\n")
    (tmp_path / "b.txt").write_text("a big dog")
    path = metadata_json(
        tmp_path,
        [
            {
                "id": "a",
                "audio_file": "a.wav",
                "transcript_file": "a.txt",
                "speaker_id": "s1",
                "scene": "quiet_room",
            },
            {
                "id": "b",
                "audio_file": "b.wav",
                "transcript_file": "b.txt",
                "scene": "Audio is recorded outdoors.",
                "ref_audio_file": "ref.wav",
                "ref_transcript": "blue sun",
            },
        ],
    )
    summary = prepare.prepare(path, tmp_path / "out", FAKE)
    assert (summary["encoded"], summary["total"], summary["samples"], summary["skipped"]) == (3, 3, 2, 0)
    plain, clone = [
        json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    ]
    assert plain["messages"][0]["content"] == (
        "Generate audio following instruction.\n\n<|scene_desc_start|>\nAudio is recorded from quiet room."
        "\n<|scene_desc_end|>"
    )
    assert plain["speaker"] == "s1" and "start_index" not in plain
    assert [m["role"] for m in clone["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert clone["start_index"] == 3 and clone["messages"][1]["content"] == "blue sun"
    assert "Audio is recorded outdoors." in clone["messages"][0]["content"]
    ref_codes = tmp_path / "out" / clone["messages"][2]["content"]["audio_codes"]
    np.testing.assert_array_equal(np.load(ref_codes), FakeAudioTokenizer().encode(str(tmp_path / "ref.wav")))
    # The reference turns are context: only the target audio is trained.
    tokenizer = HiggsTokenizer.from_path(TINY_TOKENIZER)
    tokenized = tokenize_sample(parse_sample(clone), tokenizer)
    assert [ref.trained for ref in tokenized.audio] == [False, True]
    scan = scan_manifest(tmp_path / "out" / "manifest.jsonl", tokenizer, AudioLayout())
    assert scan.num_samples == 2 and scan.num_skipped == 0


def test_clone_from_speaker_uses_the_speakers_next_clip(prepare, tmp_path):
    records = []
    for name, speaker, frames in (("a1", "a", 2), ("a2", "a", 3), ("a3", "a", 4), ("b1", "b", 5)):
        write_wav(tmp_path / f"{name}.wav", frames, 500 * frames)
        records.append(
            json.dumps({"audio": f"{name}.wav", "text": f"text {name}", "id": name, "speaker": speaker})
        )
    (tmp_path / "items.jsonl").write_text("\n".join(records) + "\n")
    summary = prepare.prepare(tmp_path / "items.jsonl", tmp_path / "out", FAKE, clone_from_speaker=True)
    assert (summary["total"], summary["samples"]) == (4, 7)  # 4 clips, 4 plain + 3 clones (b has one clip)
    lines = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    clones = [r for r in lines if "start_index" in r]
    assert [(c["messages"][1]["content"], c["messages"][3]["content"]) for c in clones] == [
        ("text a2", "text a1"),
        ("text a3", "text a2"),
        ("text a1", "text a3"),
    ]
    assert clones[0]["messages"][2]["content"]["audio_codes"] == "codes/a2.npy"


def bad_folder(root):
    """Five recordings: one good, one without a transcript, one empty, one not audio, one too long."""
    write_wav(root / "good.wav", 3, 1000)
    (root / "good.txt").write_text("the red cat")
    write_wav(root / "untranscribed.wav", 3, 1000)
    write_wav(root / "empty.wav", 0, 1000)
    (root / "empty.txt").write_text("nothing")
    (root / "noise.wav").write_bytes(b"RIFF not really a wav")
    (root / "noise.txt").write_text("noise")
    write_wav(root / "long.wav", 2 * 25 + 1, 1000)  # 2.04 s
    (root / "long.txt").write_text("a long one")
    return root


def test_bad_items_are_named_and_stop_the_run(prepare, tmp_path, capsys):
    folder = bad_folder(tmp_path / "speech")
    with pytest.raises(prepare.InputError, match=r"4 bad item\(s\) of 5 .*--on-bad-item skip"):
        prepare.prepare(folder, tmp_path / "out", FAKE, max_seconds=2.0)
    err = capsys.readouterr().err
    assert "untranscribed.txt: transcript not found" in err
    assert "empty.wav: the audio is empty (0 samples)" in err
    assert "noise.wav: cannot read audio" in err
    assert "long.wav: 2.0 s is longer than --max-seconds 2" in err
    assert not list((tmp_path / "out" / "codes").iterdir())  # nothing was encoded


def test_bad_items_skipped_and_counted(prepare, tmp_path, capsys):
    folder = bad_folder(tmp_path / "speech")
    summary = prepare.prepare(folder, tmp_path / "out", FAKE, max_seconds=2.0, on_bad_item="skip")
    assert (summary["samples"], summary["skipped"], summary["encoded"]) == (1, 4, 1)
    assert capsys.readouterr().err.count("prepare: skipping item") == 4
    (line,) = (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    assert json.loads(line)["messages"][1]["content"] == "the red cat"


def test_cli_reports_bad_items_in_one_line_each(prepare, tmp_path, capsys):
    folder = bad_folder(tmp_path / "speech")
    assert (
        prepare.main(["--input", str(folder), "--out", str(tmp_path / "o"), "--audio-tokenizer", FAKE]) == 2
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err and "prepare: error: 3 bad item(s) of 5" in err


@pytest.mark.parametrize("suffix", [".flac", ".ogg", ".mp3"])
def test_compressed_formats_are_read(prepare, tmp_path, suffix):
    """The encoder reads every format libsndfile decodes; the folder layout finds them."""
    from higgs_tune.audio_io import read_audio

    samples = (0.3 * np.sin(np.arange(4 * HOP) / 7)).astype(np.float32)
    soundfile.write(tmp_path / f"clip{suffix}", samples, SAMPLE_RATE)
    (tmp_path / "clip.txt").write_text("the red cat")
    (item,) = prepare.read_items(tmp_path)
    assert item.audio_path.suffix == suffix and item.text == "the red cat"
    read, rate = read_audio(item.audio_path)
    assert rate == SAMPLE_RATE and abs(read.shape[0] - samples.shape[0]) <= 2000  # mp3 pads its frames
    assert prepare.probe_audio(item.audio_path, 30.0)[1] is None
