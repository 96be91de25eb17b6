"""Manifest scan and bad-input policy; the dataset component (split, packing, too-long documents).

Every bad input is tested under both policies: ``on_bad_sample="error"`` stops with ONE short message
naming the manifest and line (and the codes file when that is the problem); ``"skip"`` leaves exactly
that sample out, logs it and counts it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from higgs_tune.data.batch import CapacityError
from higgs_tune.data.chatml import tokenize_sample
from higgs_tune.data.dataset import build_higgs_dataset
from higgs_tune.data.document import AudioLayout, build_document
from higgs_tune.data.manifest import BadSampleError, load_document, scan_manifest
from higgs_tune.data.tokenizer import HiggsTokenizer

TINY_TOKENIZER = Path(__file__).resolve().parents[2] / "higgs_tune" / "assets" / "tiny_tokenizer"
TOKENIZER = HiggsTokenizer.from_path(TINY_TOKENIZER)
LAYOUT = AudioLayout()


def tts_sample(text: str, codes_path: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Generate audio following instruction."},
            {"role": "user", "content": text},
            {"role": "assistant", "content": {"type": "audio", "audio_codes": codes_path}},
        ]
    }


def codes(num_frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1024, size=(8, num_frames)).astype(np.int16)


def write_manifest(directory: Path, lines: list[str]) -> Path:
    """A manifest whose samples refer to codes/good_*.npy (written here) or to files the caller writes."""
    (directory / "codes").mkdir(exist_ok=True)
    for i in range(3):
        np.save(directory / "codes" / f"good_{i}.npy", codes(5 + i, seed=i))
    manifest = directory / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


GOOD_0 = json.dumps(tts_sample("the red cat", "codes/good_0.npy"))
GOOD_2 = json.dumps(tts_sample("a big dog", "codes/good_2.npy"))


def bad_codes_line(directory: Path, name: str, array: np.ndarray | bytes | None) -> str:
    """A line whose codes file ``codes/<name>`` holds ``array`` (raw bytes: a corrupt file; None: absent)."""
    path = directory / "codes" / name
    path.parent.mkdir(exist_ok=True)
    if isinstance(array, bytes):
        path.write_bytes(array)
    elif array is not None:
        np.save(path, array)
    return json.dumps(tts_sample("blue sun", f"codes/{name}"))


# name -> (line-2 builder, expected reason (regex), names the codes file)
BAD_INPUTS = {
    "malformed_json": (lambda d: '{"messages": [{"role": "user", "content": "hi"}', r"malformed JSON", False),
    "not_an_object": (lambda d: "[1, 2]", r"a sample must be a JSON object", False),
    "unknown_role": (
        lambda d: json.dumps({"messages": [{"role": "narrator", "content": "hi"}]}),
        r"messages\[0\]: role must be one of \('system', 'user', 'assistant'\), got 'narrator'",
        False,
    ),
    "bad_structure": (
        lambda d: json.dumps({"messages": "hello"}),
        r"'messages' must be a non-empty list",
        False,
    ),
    "nothing_to_train": (
        lambda d: json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        r"nothing to train on",
        False,
    ),
    "missing_codes_file": (lambda d: bad_codes_line(d, "absent.npy", None), r"file not found", True),
    "unreadable_codes_file": (
        lambda d: bad_codes_line(d, "corrupt.npy", b"this is not a numpy file"),
        r"unreadable",
        True,
    ),
    "wrong_codebook_count": (
        lambda d: bad_codes_line(d, "four.npy", codes(6)[:4]),
        r"4 codebooks \(shape \(4, 6\)\), expected 8",
        True,
    ),
    "value_too_large": (
        lambda d: bad_codes_line(d, "large.npy", np.full((8, 3), 1024, dtype=np.int16)),
        r"values span 1024\.\.1024, outside 0\.\.1023",
        True,
    ),
    "negative_value": (
        lambda d: bad_codes_line(d, "negative.npy", np.full((8, 3), -1, dtype=np.int16)),
        r"outside 0\.\.1023",
        True,
    ),
    "empty_audio": (lambda d: bad_codes_line(d, "empty.npy", codes(0)), r"empty audio \(T == 0\)", True),
    "float_codes": (
        lambda d: bad_codes_line(d, "float.npy", codes(4).astype(np.float32)),
        r"dtype float32, expected integers",
        True,
    ),
    "one_dimensional_codes": (
        lambda d: bad_codes_line(d, "flat.npy", codes(4).ravel()),
        r"shape \(32,\), expected \[num_codebooks=8, T\]",
        True,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_sample_is_one_error_naming_file_and_line(tmp_path, case):
    build_line, reason, names_codes_file = BAD_INPUTS[case]
    manifest = write_manifest(tmp_path, [GOOD_0, build_line(tmp_path), GOOD_2])
    with pytest.raises(BadSampleError) as error:
        scan_manifest(manifest, TOKENIZER, LAYOUT)
    message = str(error.value)
    assert message.startswith(f"{manifest}:2: "), message
    assert re.search(reason, message), message
    assert "\n" not in message and len(message) < 400, message
    if names_codes_file:
        codes_file = json.loads(manifest.read_text().splitlines()[1])["messages"][2]["content"]["audio_codes"]
        assert f"codes file {tmp_path / codes_file}: " in message, message


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_sample_is_a_counted_logged_skip(tmp_path, case, caplog):
    build_line, reason, _ = BAD_INPUTS[case]
    manifest = write_manifest(tmp_path, [GOOD_0, build_line(tmp_path), GOOD_2])
    with caplog.at_level(logging.WARNING, logger="higgs_tune.data.manifest"):
        scan = scan_manifest(manifest, TOKENIZER, LAYOUT, on_bad_sample="skip")
    assert [e.line_number for e in scan.entries] == [1, 3]  # the bad one is gone, nothing replaces it
    assert scan.num_samples == 3 and scan.num_skipped == 1
    assert scan.skipped[0].startswith(f"{manifest}:2: ") and re.search(reason, scan.skipped[0])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{manifest}:2: " in w for w in warnings), warnings
    assert any("skipped 1 of 3 samples" in w for w in warnings), warnings


def test_skip_count_reaches_the_dataset_stats(tmp_path):
    manifest = write_manifest(tmp_path, [GOOD_0, "{oops", GOOD_2, bad_codes_line(tmp_path, "gone.npy", None)])
    train, val, stats = build_higgs_dataset(
        TOKENIZER, path=str(manifest), seq_len=128, batch_size=1, on_bad_sample="skip"
    )
    assert stats["skipped_samples"] == 2 and stats["train_samples"] == 2 and val is None
    assert sorted(e.line_number for e in train.entries) == [1, 3]
    with pytest.raises(BadSampleError, match=re.escape(f"{manifest}:2: malformed JSON")):
        build_higgs_dataset(TOKENIZER, path=str(manifest), seq_len=128, batch_size=1)


def test_scan_sizes_documents_exactly_and_entries_reload_their_own_line(tmp_path):
    lines = [GOOD_0, "", GOOD_2, json.dumps(tts_sample("one two three four", "codes/good_1.npy"))]
    manifest = write_manifest(tmp_path, lines)
    scan = scan_manifest(manifest, TOKENIZER, LAYOUT)
    assert [e.line_number for e in scan.entries] == [1, 3, 4] and scan.num_samples == 3  # blank line ignored
    for entry, line in zip(scan.entries, [GOOD_0, GOOD_2, lines[3]]):
        sample = json.loads(line)
        codes_path = tmp_path / sample["messages"][2]["content"]["audio_codes"]
        expected = build_document(tokenize_sample(sample, TOKENIZER), [np.load(codes_path)], LAYOUT)
        document = load_document(entry, TOKENIZER, LAYOUT)
        assert entry.stats == expected.stats  # the scan's sizes are the built document's
        assert torch.equal(document.tokens, expected.tokens)
        assert torch.equal(document.audio_codes, expected.audio_codes)
        assert torch.equal(document.audio_targets, expected.audio_targets)


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_npz_and_pt_codes_files(tmp_path, suffix):
    array = codes(7, seed=5)
    path = tmp_path / "codes" / f"item{suffix}"
    path.parent.mkdir()
    if suffix == ".npz":
        np.savez(path, codes=array)
    else:
        torch.save(torch.from_numpy(array.astype(np.int64)), path)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(tts_sample("the cat", f"codes/item{suffix}")) + "\n")
    (entry,) = scan_manifest(manifest, TOKENIZER, LAYOUT).entries
    document = load_document(entry, TOKENIZER, LAYOUT)
    segment = document.audio_codes[:, document.audio_out_mask]
    assert torch.equal(segment[0, 1:8], torch.from_numpy(array[0].astype(np.int64)))  # codebook 0, after BOS


def test_sample_changed_after_scan_is_an_error_not_a_substitute(tmp_path):
    manifest = write_manifest(tmp_path, [GOOD_0, GOOD_2])
    scan = scan_manifest(manifest, TOKENIZER, LAYOUT)
    np.save(tmp_path / "codes" / "good_2.npy", codes(30))  # longer audio than scanned
    assert load_document(scan.entries[0], TOKENIZER, LAYOUT).stats == scan.entries[0].stats
    with pytest.raises(BadSampleError, match=re.escape(f"{manifest}:2: the sample changed after the scan")):
        load_document(scan.entries[1], TOKENIZER, LAYOUT)
    (tmp_path / "codes" / "good_2.npy").unlink()
    with pytest.raises(
        BadSampleError, match=re.escape(f"{manifest}:2: codes file {tmp_path}/codes/good_2.npy")
    ):
        load_document(scan.entries[1], TOKENIZER, LAYOUT)


def many_samples(directory: Path, count: int) -> Path:
    """``count`` TTS samples with 3..12 frames each."""
    (directory / "codes").mkdir(exist_ok=True)
    lines = []
    for i in range(count):
        np.save(directory / "codes" / f"s{i}.npy", codes(3 + i % 10, seed=i))
        lines.append(json.dumps(tts_sample(f"sample {i}", f"codes/s{i}.npy")))
    manifest = directory / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_validation_fraction_splits_samples_deterministically(tmp_path):
    manifest = many_samples(tmp_path, 40)

    def split(seed):
        train, val, stats = build_higgs_dataset(
            TOKENIZER, path=str(manifest), seq_len=256, batch_size=2, val_fraction=0.25, seed=seed
        )
        train_lines = sorted(e.line_number for e in train.entries)
        val_lines = sorted(e.line_number for e in val.entries)
        return train_lines, val_lines, stats

    train_lines, val_lines, stats = split(seed=0)
    assert len(val_lines) == 10 and stats["val_samples"] == 10 and stats["train_samples"] == 30
    assert sorted(train_lines + val_lines) == list(range(1, 41))  # a partition of the samples
    assert split(seed=0)[:2] == (train_lines, val_lines)
    assert split(seed=1)[1] != val_lines
    with pytest.raises(ValueError, match="either val_fraction"):
        build_higgs_dataset(
            TOKENIZER, path=str(manifest), seq_len=256, batch_size=2, val_fraction=0.1, val_path=str(manifest)
        )


def test_separate_validation_file_and_packing_plan(tmp_path):
    manifest = many_samples(tmp_path, 30)
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    val_manifest = write_manifest(val_dir, [GOOD_0, GOOD_2])
    train, val, stats = build_higgs_dataset(
        TOKENIZER, path=str(manifest), seq_len=256, batch_size=2, val_path=str(val_manifest), seed=3
    )
    assert stats["val_samples"] == 2 and len(val) == 1 and val.entries[0].manifest == val_manifest
    # Every document sits in exactly one row; no row overflows; the plan is a function of the seed.
    assert sorted(i for row in train.rows for i in row) == list(range(30))
    assert all(sum(train.entries[i].stats.length for i in row) <= 256 for row in train.rows)
    used = sum(e.stats.length for e in train.entries)
    assert stats["train_padding_fraction"] == pytest.approx(1 - used / (256 * len(train)))
    again, _, _ = build_higgs_dataset(
        TOKENIZER, path=str(manifest), seq_len=256, batch_size=2, val_path=str(val_manifest), seed=3
    )
    assert again.rows == train.rows and [e.line_number for e in again.entries] == [
        e.line_number for e in train.entries
    ]
    row = train[0]
    assert [d.stats for d in row] == [train.entries[i].stats for i in train.rows[0]]


def test_too_long_documents_are_dropped_and_counted_or_an_error(tmp_path, caplog):
    (tmp_path / "codes").mkdir()
    np.save(tmp_path / "codes" / "long.npy", codes(200))
    lines = [GOOD_0, json.dumps(tts_sample("long one", "codes/long.npy")), GOOD_2]
    manifest = write_manifest(tmp_path, lines)
    with caplog.at_level(logging.WARNING, logger="higgs_tune.data.dataset"):
        train, _, stats = build_higgs_dataset(TOKENIZER, path=str(manifest), seq_len=128, batch_size=1)
    assert stats["dropped_too_long"] == 1 and sorted(
        e.line_number for row in train.rows for e in [train.entries[i] for i in row]
    ) == [1, 3]
    assert any(f"{manifest}:2" in r.getMessage() for r in caplog.records)
    with pytest.raises(
        CapacityError, match=re.escape(f"{manifest}:2: the document does not fit in one row (length=")
    ):
        build_higgs_dataset(TOKENIZER, path=str(manifest), seq_len=128, batch_size=1, too_long="error")
    # A capacity, not only seq_len, can make a document too long.
    _, _, stats = build_higgs_dataset(
        TOKENIZER, path=str(manifest), seq_len=512, batch_size=1, audio_ffn_capacity=100
    )
    assert stats["dropped_too_long"] == 1
