"""Read a JSONL manifest (README "Your data") and scan it before training.

A manifest has one Boson ChatML sample per line (:mod:`higgs_tune.data.chatml`); each audio item names its
pre-computed codes (``"audio_codes": "codes/0001.npy"``, an integer array [K, T] with values
0..codebook_size-1, path relative to the manifest; ``.npy``, ``.npz`` or ``.pt``).

:func:`scan_manifest` checks every line once, cheaply, at set-up: JSON syntax, sample structure and
roles, that there is something to train on, and every codes file (exists, readable, K codebooks, T > 0,
values in range). It returns the good samples with their :class:`~higgs_tune.data.document.DocStats`
(the lengths and counts the packer needs) and where each line starts in the file, so a sample is re-read
and built on access (:func:`load_document`) without holding the data set in memory.

The result is cached next to the manifest (``.<manifest name>.scan.npz``), keyed by the manifest's size
and modification time, the tokenizer (:meth:`~higgs_tune.data.tokenizer.HiggsTokenizer.fingerprint`) and
the audio layout: a second run on the same manifest reads its statistics instead of re-reading every
line and codes file. Codes files are not part of the key: one changed after the scan is caught when its
document is built (:func:`load_document` compares the statistics and names the line). A folder that
cannot be written to only costs the cache (logged once); ``cache=False`` neither reads nor writes it.

Bad samples (``on_bad_sample``):

- ``"error"`` (default): stop at the first one with ONE short :class:`BadSampleError`,
  ``"<manifest>:<line>: <reason>"`` (naming the codes file when that is the problem);
- ``"skip"``: leave it out, log one warning per sample and a summary, and count it
  (:attr:`ManifestScan.num_skipped`, for the run's metrics).

A bad sample is never replaced by another one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np

from higgs_tune.data.chatml import SampleError, TokenizedSample, parse_sample, tokenize_sample
from higgs_tune.data.document import AudioLayout, DocStats, Document, build_document, document_stats
from higgs_tune.data.tokenizer import HiggsTokenizer
from higgs_tune.errors import InvalidInputError, MissingInputError

logger = logging.getLogger(__name__)

OnBadSample = Literal["error", "skip"]
ON_BAD_SAMPLE_POLICIES = ("error", "skip")


class BadSampleError(InvalidInputError):
    """A manifest line that cannot be trained on. The message starts with ``<manifest>:<line>:``."""


CODES_SUFFIXES = (".npy", ".npz", ".pt")
NPY_MAGIC = b"\x93NUMPY"


class CodesFileError(InvalidInputError):
    """A codes file that cannot be used: missing, unreadable, wrong shape or values out of range."""


def read_codes(path: Path, *, mmap: bool = False) -> np.ndarray:
    """Read one audio item's codes file (.npy, .npz with one array or a ``codes`` entry, or .pt).

    Args:
        path: the codes file.
        mmap: memory-map a .npy file instead of reading it (the scan only looks at shape and range).

    Returns:
        [K, T] integer array (not yet checked: see :func:`check_codes`).

    Raises:
        CodesFileError: missing file, unsupported suffix or unreadable content.
    """
    if path.suffix not in CODES_SUFFIXES:
        raise CodesFileError(
            f"unsupported codes file suffix {path.suffix!r} (expected one of {CODES_SUFFIXES})"
        )
    if not path.is_file():
        raise CodesFileError("file not found")
    try:
        if path.suffix == ".npy":
            with open(path, "rb") as f:
                if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
                    raise CodesFileError("unreadable (not a .npy file)")
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                if "codes" in archive.files:
                    return archive["codes"]
                if len(archive.files) == 1:
                    return archive[archive.files[0]]
                raise CodesFileError(f"holds arrays {archive.files}; expected one array or one named 'codes'")
        import torch

        tensor = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if not isinstance(tensor, torch.Tensor):
            raise CodesFileError(f"holds a {type(tensor).__name__}, expected a tensor")
        return tensor.numpy()
    except CodesFileError:
        raise
    except Exception as error:  # any reader failure is reported as "unreadable"
        raise CodesFileError(f"unreadable ({type(error).__name__}: {error})") from None


def check_codes(codes: np.ndarray, num_codebooks: int, codebook_size: int) -> None:
    """Raise :class:`CodesFileError` unless ``codes`` is an integer [num_codebooks, T > 0] array in range."""
    if not np.issubdtype(codes.dtype, np.integer):
        raise CodesFileError(f"dtype {codes.dtype}, expected integers")
    if codes.ndim != 2:
        raise CodesFileError(f"shape {tuple(codes.shape)}, expected [num_codebooks={num_codebooks}, T]")
    if codes.shape[0] != num_codebooks:
        raise CodesFileError(
            f"{codes.shape[0]} codebooks (shape {tuple(codes.shape)}), expected {num_codebooks}"
        )
    if codes.shape[1] == 0:
        raise CodesFileError("empty audio (T == 0)")
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= codebook_size:
        raise CodesFileError(f"values span {low}..{high}, outside 0..{codebook_size - 1}")


def resolve_codes_path(manifest: Path, codes_path: str) -> Path:
    """A sample's ``audio_codes`` path: absolute as is, else relative to the manifest's directory."""
    path = Path(codes_path)
    return path if path.is_absolute() else manifest.parent / path


@dataclass(frozen=True)
class ManifestEntry:
    """One good sample of a manifest.

    Attributes:
        manifest: the manifest file.
        line_number: 1-based line number in it.
        byte_offset: where the line starts (the sample is re-read from there on access).
        stats: the document's lengths and counts, for packing.
    """

    manifest: Path
    line_number: int
    byte_offset: int
    stats: DocStats

    @property
    def location(self) -> str:
        """``<manifest>:<line>``, the prefix of every message about this sample."""
        return f"{self.manifest}:{self.line_number}"


@dataclass
class ManifestScan:
    """Result of :func:`scan_manifest`.

    Attributes:
        manifest: the manifest file.
        entries: the good samples, in file order.
        num_samples: non-blank lines read (good + skipped).
        skipped: one message per skipped sample (``"<manifest>:<line>: <reason>"``), in file order.
    """

    manifest: Path
    entries: list[ManifestEntry]
    num_samples: int
    skipped: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


def _tokenize_line(line: bytes, tokenizer: HiggsTokenizer) -> TokenizedSample:
    """Decode, parse and tokenize one manifest line. Raises SampleError with the reason."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SampleError(f"not UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise SampleError(f"malformed JSON: {error.msg} at column {error.colno}") from None
    return tokenize_sample(parse_sample(raw), tokenizer)


def _scan_line(line: bytes, manifest: Path, tokenizer: HiggsTokenizer, layout: AudioLayout) -> DocStats:
    """Validate one line and its codes files; return its DocStats. Raises SampleError with the reason."""
    tokenized = _tokenize_line(line, tokenizer)
    num_frames = []
    for ref in tokenized.audio:
        codes_path = resolve_codes_path(manifest, ref.codes_path)
        try:
            codes = read_codes(codes_path)  # read, not memory-mapped: every value is checked anyway
            check_codes(codes, layout.num_codebooks, layout.codebook_size)
        except CodesFileError as error:
            raise SampleError(f"codes file {codes_path}: {error}") from None
        num_frames.append(int(codes.shape[1]))
    stats = document_stats(tokenized, num_frames, layout)
    if stats.num_text_targets == 0 and stats.num_audio_target_positions == 0:
        raise SampleError("nothing to train on: no text or audio target")
    return stats


def scan_manifest(
    path: str | Path,
    tokenizer: HiggsTokenizer,
    layout: AudioLayout,
    *,
    on_bad_sample: OnBadSample = "error",
    cache: bool = True,
) -> ManifestScan:
    """Validate every line of a JSONL manifest and size its documents (see the module docstring).

    Blank lines are ignored. Line numbers are 1-based and count blank lines. ``cache``: read and write
    the scan cache next to the manifest (module docstring).

    Raises:
        BadSampleError: the first bad sample under ``on_bad_sample="error"``.
        FileNotFoundError: no manifest at ``path``.
        ValueError: unknown ``on_bad_sample``.
    """
    if on_bad_sample not in ON_BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
    manifest = Path(path)
    if not manifest.is_file():
        raise MissingInputError(f"manifest {manifest} not found")
    key = _cache_key(manifest, tokenizer, layout) if cache else None
    cached = _read_cache(manifest, key) if key is not None else None
    if cached is not None:
        _report_skipped(manifest, cached, on_bad_sample)
        return cached
    entries: list[ManifestEntry] = []
    skipped: list[str] = []
    num_samples = 0
    offset = 0
    with open(manifest, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            line_offset, offset = offset, offset + len(line)
            if not line.strip():
                continue
            num_samples += 1
            try:
                stats = _scan_line(line, manifest, tokenizer, layout)
            except SampleError as error:
                message = f"{manifest}:{line_number}: {error}"
                if on_bad_sample == "error":
                    raise BadSampleError(message + " (on_bad_sample='skip' skips such samples)") from None
                logger.warning("skipping sample %s", message)
                skipped.append(message)
                continue
            entries.append(ManifestEntry(manifest, line_number, line_offset, stats))
    if skipped:
        logger.warning(
            "%s: skipped %d of %d samples (on_bad_sample='skip')", manifest, len(skipped), num_samples
        )
    scan = ManifestScan(manifest=manifest, entries=entries, num_samples=num_samples, skipped=skipped)
    if key is not None:
        _write_cache(scan, key)
    return scan


_STATS_FIELDS = tuple(f.name for f in fields(DocStats))


def cache_path(manifest: Path) -> Path:
    """Where :func:`scan_manifest` caches the scan of ``manifest``."""
    return manifest.with_name(f".{manifest.name}.scan.npz")


def _cache_key(manifest: Path, tokenizer: HiggsTokenizer, layout: AudioLayout) -> str:
    stat = manifest.stat()
    return json.dumps(
        {
            "format": 1,
            "manifest_size": stat.st_size,
            "manifest_mtime_ns": stat.st_mtime_ns,
            "tokenizer": tokenizer.fingerprint(),
            "layout": asdict(layout),
        },
        sort_keys=True,
    )


def _read_cache(manifest: Path, key: str) -> ManifestScan | None:
    """The cached scan of ``manifest`` if its key matches, else None."""
    path = cache_path(manifest)
    try:
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["key"]) != key:
                return None
            lines, offsets, stats = cached["line_numbers"], cached["byte_offsets"], cached["stats"]
            skipped, num_samples = [str(m) for m in cached["skipped"]], int(cached["num_samples"])
    except (OSError, KeyError, ValueError):  # no cache yet, or an unreadable one: scan again
        return None
    entries = [
        ManifestEntry(manifest, int(line), int(offset), DocStats(*(int(x) for x in row)))
        for line, offset, row in zip(lines.tolist(), offsets.tolist(), stats.tolist())
    ]
    return ManifestScan(manifest=manifest, entries=entries, num_samples=num_samples, skipped=skipped)


def _write_cache(scan: ManifestScan, key: str) -> None:
    path = cache_path(scan.manifest)
    stats = np.array(
        [[getattr(e.stats, f) for f in _STATS_FIELDS] for e in scan.entries], dtype=np.int64
    ).reshape(-1, len(_STATS_FIELDS))
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    try:
        np.savez(
            tmp,
            key=np.array(key),
            line_numbers=np.array([e.line_number for e in scan.entries], dtype=np.int64),
            byte_offsets=np.array([e.byte_offset for e in scan.entries], dtype=np.int64),
            stats=stats,
            skipped=np.array(scan.skipped, dtype=str),
            num_samples=np.array(scan.num_samples),
        )
        os.replace(tmp, path)  # atomic: ranks writing at once leave one whole cache
    except OSError as error:
        logger.warning(
            "%s: cannot write the scan cache %s (%s); the next run scans again", scan.manifest, path, error
        )
        tmp.unlink(missing_ok=True)


def _report_skipped(manifest: Path, scan: ManifestScan, on_bad_sample: OnBadSample) -> None:
    """A cached scan's bad samples, under this run's policy: the first one is an error, or each is logged."""
    if not scan.skipped:
        return
    if on_bad_sample == "error":
        raise BadSampleError(scan.skipped[0] + " (on_bad_sample='skip' skips such samples)")
    for message in scan.skipped:
        logger.warning("skipping sample %s", message)
    logger.warning(
        "%s: skipped %d of %d samples (on_bad_sample='skip')", manifest, len(scan.skipped), scan.num_samples
    )


def read_line(entry: ManifestEntry) -> bytes:
    """The raw manifest line of ``entry``."""
    with open(entry.manifest, "rb") as f:
        f.seek(entry.byte_offset)
        return f.readline()


def load_document(entry: ManifestEntry, tokenizer: HiggsTokenizer, layout: AudioLayout) -> Document:
    """Re-read a scanned sample, load its codes and build its :class:`Document` (merged audio + targets).

    Raises:
        BadSampleError: naming ``<manifest>:<line>`` when the line or a codes file no longer gives the
            document that was scanned (files changed after the scan). Never falls back to another sample.
    """
    try:
        tokenized = _tokenize_line(read_line(entry), tokenizer)
        codes = []
        for ref in tokenized.audio:
            codes_path = resolve_codes_path(entry.manifest, ref.codes_path)
            try:
                codes.append(read_codes(codes_path))
            except CodesFileError as error:
                raise SampleError(f"codes file {codes_path}: {error}") from None
        document = build_document(tokenized, codes, layout)
    except SampleError as error:
        raise BadSampleError(f"{entry.location}: {error} (the file changed after the scan?)") from None
    if document.stats != entry.stats:
        raise BadSampleError(
            f"{entry.location}: the sample changed after the scan (scanned {entry.stats}, now {document.stats})"
        )
    return document
