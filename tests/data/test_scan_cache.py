"""The manifest scan cache: a second scan of an unchanged manifest reads the cache (same result), a changed
manifest, another tokenizer or layout scans again, bad samples keep their policy, an unwritable folder
costs only the cache."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from test_manifest import GOOD_0, GOOD_2, LAYOUT, TOKENIZER, write_manifest

from higgs_tune.data import manifest as manifest_module
from higgs_tune.data.document import AudioLayout
from higgs_tune.data.manifest import BadSampleError, cache_path, scan_manifest


def count_line_scans(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = manifest_module._scan_line

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(manifest_module, "_scan_line", counting)
    return calls


def test_an_unchanged_manifest_is_read_from_the_cache(tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path, [GOOD_0, "", GOOD_2])
    first = scan_manifest(manifest, TOKENIZER, LAYOUT)
    assert cache_path(manifest).is_file()
    calls = count_line_scans(monkeypatch)
    again = scan_manifest(manifest, TOKENIZER, LAYOUT)
    assert calls == [] and again.entries == first.entries and again.num_samples == first.num_samples == 2
    scan_manifest(manifest, TOKENIZER, AudioLayout(use_delay_pattern=False))  # another layout: scanned
    assert len(calls) == 2
    scan_manifest(manifest, TOKENIZER, LAYOUT, cache=False)
    assert len(calls) == 4


def test_a_changed_manifest_is_scanned_again(tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path, [GOOD_0, GOOD_2])
    scan_manifest(manifest, TOKENIZER, LAYOUT)
    manifest.write_text(manifest.read_text() + GOOD_0 + "\n")
    stat = manifest.stat()
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    calls = count_line_scans(monkeypatch)
    assert [e.line_number for e in scan_manifest(manifest, TOKENIZER, LAYOUT).entries] == [1, 2, 3]
    assert len(calls) == 3


def test_cached_bad_samples_follow_the_policy_of_each_run(tmp_path, caplog):
    manifest = write_manifest(tmp_path, [GOOD_0, "{oops", GOOD_2])
    scan_manifest(manifest, TOKENIZER, LAYOUT, on_bad_sample="skip")
    with caplog.at_level(logging.WARNING, logger="higgs_tune.data.manifest"):
        cached = scan_manifest(manifest, TOKENIZER, LAYOUT, on_bad_sample="skip")
    assert cached.num_skipped == 1 and any(f"{manifest}:2: " in r.getMessage() for r in caplog.records)
    with pytest.raises(BadSampleError, match=f"{manifest}:2: malformed JSON"):
        scan_manifest(manifest, TOKENIZER, LAYOUT)


def test_an_unwritable_folder_only_costs_the_cache(tmp_path, monkeypatch, caplog):
    manifest = write_manifest(tmp_path, [GOOD_0, GOOD_2])

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(np, "savez", refuse)
    with caplog.at_level(logging.WARNING, logger="higgs_tune.data.manifest"):
        scan = scan_manifest(manifest, TOKENIZER, LAYOUT)
    assert len(scan.entries) == 2 and not cache_path(manifest).exists()
    assert any("cannot write the scan cache" in r.getMessage() for r in caplog.records)
