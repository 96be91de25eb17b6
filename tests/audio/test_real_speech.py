"""Real speech end to end, in this project's one environment: recordings -> ``tools/prepare.py`` (each input
layout, our audio encoder at Boson's released sizes) -> ``tune run`` trains a few steps on the manifest ->
``tools/generate.py --audio-decoder`` writes a wav.

The speech is made by Debian's ``espeak-ng`` (``.ci/run`` installs it) at 22.05 kHz and converted to
16 and 44.1 kHz, so every layout has a sample rate that needs resampling; the codec and HuBERT weights
are random (``boson_codec.py``), the pipeline is the real one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest
import soundfile
from boson_codec import write_boson_codec, write_hubert_folder
from recipe_testing import ENV, REPO, losses_by_step, recipe_command

from higgs_tune.audio_io import resample_to
from higgs_tune.data.document import AudioLayout
from higgs_tune.data.manifest import scan_manifest
from higgs_tune.data.tokenizer import HiggsTokenizer

SENTENCES = {"hello": "Hello there.", "speech": "This is real speech.", "cat": "The cat sat down."}
TINY_TOKENIZER = REPO / "higgs_tune" / "assets" / "tiny_tokenizer"
# The user's shell with this checkout first on the path (the same package CI installs editable).
RUN_ENV = {**ENV, "PYTHONPATH": str(REPO)}


def espeak(text: str, rate: int, path) -> None:
    """``text`` spoken by espeak-ng (22.05 kHz), written at ``rate`` Hz in ``path``'s format."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed (apt-get install espeak-ng; .ci/run installs it)")
    raw = subprocess.run(["espeak-ng", "--stdout", text], capture_output=True, check=True).stdout
    native = path.with_suffix(".native.wav")
    native.write_bytes(raw)
    samples, native_rate = soundfile.read(native, dtype="float32")
    native.unlink()
    soundfile.write(path, resample_to(samples, native_rate, rate), rate)


def make_layouts(root):
    """The same three sentences in the four input layouts; returns {layout: --input path}."""
    inputs = {}
    folder = root / "folder" / "speaker_a"  # a folder of recordings + transcripts, 16 kHz
    folder.mkdir(parents=True)
    for name, text in SENTENCES.items():
        espeak(text, 16000, folder / f"{name}.wav")
        (folder / f"{name}.txt").write_text(text)
    inputs["folder"] = root / "folder"
    (root / "lj" / "wavs").mkdir(parents=True)  # LJSpeech, 22.05 kHz
    for name, text in SENTENCES.items():
        espeak(text, 22050, root / "lj" / "wavs" / f"{name}.wav")
    (root / "lj" / "metadata.csv").write_text("".join(f"{n}|{t}|{t}\n" for n, t in SENTENCES.items()))
    inputs["ljspeech"] = root / "lj" / "metadata.csv"
    (root / "js").mkdir()  # JSONL, 44.1 kHz FLAC
    for name, text in SENTENCES.items():
        espeak(text, 44100, root / "js" / f"{name}.flac")
    lines = [json.dumps({"audio": f"{n}.flac", "text": t, "speaker": "a"}) for n, t in SENTENCES.items()]
    (root / "js" / "items.jsonl").write_text("\n".join(lines) + "\n")
    inputs["jsonl"] = root / "js" / "items.jsonl"
    (root / "mj").mkdir()  # train-higgs-audio's metadata.json: a scene and a reference clip, 44.1 kHz
    samples = []
    for name, text in SENTENCES.items():
        espeak(text, 44100, root / "mj" / f"{name}.wav")
        (root / "mj" / f"{name}.txt").write_text(text)
        samples.append(
            {"id": name, "audio_file": f"{name}.wav", "transcript_file": f"{name}.txt", "scene": "quiet_room"}
        )
    espeak("A voice to copy.", 22050, root / "mj" / "reference.wav")
    samples[1].update(ref_audio_file="reference.wav", ref_transcript="A voice to copy.")
    (root / "mj" / "metadata.json").write_text(json.dumps({"samples": samples}))
    inputs["metadata_json"] = root / "mj" / "metadata.json"
    return inputs


def prepare(input_path, out, codec, *extra):
    command = [
        sys.executable,
        str(REPO / "tools" / "prepare.py"),
        "--input",
        str(input_path),
        "--out",
        str(out),
    ]
    command += ["--audio-tokenizer", str(codec), *extra]
    done = subprocess.run(command, capture_output=True, text=True, env=RUN_ENV, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_recordings_to_trained_export_to_wav(tmp_path):
    codec = tmp_path / "higgs-audio-v2-tokenizer"
    write_boson_codec(codec)  # released sizes, random weights, Boson's files
    write_hubert_folder(codec / "hubert_base")  # the folder prepare.py finds by default
    tokenizer, layout = HiggsTokenizer.from_path(TINY_TOKENIZER), AudioLayout()

    manifests = {}
    for name, input_path in make_layouts(tmp_path / "recordings").items():
        out = tmp_path / "prepared" / name
        summary = prepare(input_path, out, codec, *(["--workers", "2"] if name == "jsonl" else []))
        expected_clips = 4 if name == "metadata_json" else 3
        assert summary["encoded"] == summary["total"] == expected_clips and summary["skipped"] == 0, summary
        assert summary["clips_per_second"] > 0
        scan = scan_manifest(out / "manifest.jsonl", tokenizer, layout)
        assert scan.num_samples == 3 and scan.num_skipped == 0
        records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert sorted(r["messages"][-2]["content"] for r in records) == sorted(SENTENCES.values())
        for record in records:
            codes = np.load(out / record["messages"][-1]["content"]["audio_codes"])
            assert codes.shape[0] == 8 and 15 <= codes.shape[1] <= 75  # 0.6-3 s of speech at 25 frames/s
        manifests[name] = out / "manifest.jsonl"
        # resumable: a second run encodes nothing
        assert prepare(input_path, out, codec)["encoded"] == 0

    clone = json.loads(manifests["metadata_json"].read_text().splitlines()[1])  # input order kept
    assert clone["start_index"] == 3 and clone["messages"][1]["content"] == "A voice to copy."
    assert (
        "<|scene_desc_start|>\nAudio is recorded from quiet room.\n<|scene_desc_end|>"
        in clone["messages"][0]["content"]
    )

    output_dir = tmp_path / "run"
    command = recipe_command(output_dir, manifests["metadata_json"].parent, "max_steps=3", "batch_size=1")
    command = [a for a in command if not a.startswith(("dataset.path=", "dataset.val_path="))]
    command += [f"dataset.path={manifests['metadata_json']}", "dataset.val_path=null"]
    done = subprocess.run(command, capture_output=True, text=True, env=RUN_ENV, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(losses_by_step(output_dir)) == [1, 2, 3]

    wav_codes = tmp_path / "hello.npy"
    command = [sys.executable, str(REPO / "tools" / "generate.py"), "--checkpoint", str(output_dir / "hf")]
    command += ["--text", "Hello there.", "--audio-decoder", str(codec), "--out", str(wav_codes)]
    command += ["--max-new-columns", "20", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, env=RUN_ENV, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with wave.open(str(tmp_path / "hello.wav")) as f:
        assert f.getframerate() == 24000
        assert f.getnframes() == np.load(wav_codes).shape[1] * 960 > 0
