"""Turn a speech data set (recordings + transcripts) into a higgs_tune manifest with pre-computed audio codes.

    python tools/prepare.py --input DATA --out DIR --audio-tokenizer TOKENIZER_DIR [--semantic-model HUBERT_DIR]

Input layouts (picked from what ``--input`` is):

- a folder of recordings (``.wav``, ``.flac``, ``.ogg``, ``.mp3``), each with ``NAME.txt`` beside it
  (searched recursively; the sub-folder is the speaker);
- an LJSpeech ``metadata.csv`` (``id|text|normalized text``, audio in ``wavs/ID.wav`` beside it; the
  normalized text is used when present; one speaker);
- a ``.jsonl`` file of ``{"audio": PATH, "text": ..., "id": optional, "speaker": optional}``;
- a ``metadata.json`` as JimmyMa99/train-higgs-audio reads it: ``{"samples": [{"id", "audio_file",
  "transcript_file", "speaker_id", "scene", "ref_audio_file", "ref_transcript"}]}``. ``scene`` becomes
  Boson's scene description in the system prompt (a bare name such as ``quiet_room`` reads "Audio is
  recorded from quiet room.", as that trainer writes it); ``ref_audio_file`` + ``ref_transcript`` make
  the sample a voice-cloning one: the reference as a user/assistant turn pair before ``start_index``
  (context, never trained), then the target turn.

Paths are relative to the input file (or folder). ``--clone-from-speaker`` adds, for every item whose
speaker has other clips, a voice-cloning sample whose reference is the speaker's next clip.

Output: ``DIR/codes/NAME.npy`` (int16 ``[8, T]``, 25 frames/s) and ``DIR/manifest.jsonl``, one Boson
ChatML sample per item in input order (``audio_codes`` relative to the manifest, ``audio_url`` kept for
provenance).

The audio tokenizer: ``--audio-tokenizer DIR`` is Boson's audio tokenizer folder (a local copy of
``bosonai/higgs-audio-v2-tokenizer``: ``config.json`` + ``model.pth``), encoded with
``higgs_tune.models.audio_encoder`` (Boson's ``encode`` in plain torch, batched); ``--semantic-model DIR``
is a local copy of ``bosonai/hubert_base`` (default ``DIR/hubert_base`` inside the tokenizer folder).
``--audio-tokenizer module:factory`` plugs in another encoder instead: ``factory()`` (called once per
worker) returns an object with ``encode(path)`` or a function of the path, giving an integer array
``[num_codebooks, T]``.

Bad items (an audio file missing, unreadable, empty or longer than ``--max-seconds``; a transcript
missing or empty): ``--on-bad-item error`` (default) lists every one, with its file, and stops before
encoding; ``--on-bad-item skip`` leaves them out, one log line each, counted in the summary.

Resumable: audio whose codes file exists and is valid is not encoded again; files are written
atomically (temporary file + rename), so an interrupted run is simply restarted. ``--workers N`` encodes
in N processes (CPU; torch threads split between them); ``--device cuda`` encodes on one GPU.
The last line printed is a JSON summary (counts, seconds of audio, clips per second of encoding).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

DEFAULT_SYSTEM_PROMPT = "Generate audio following instruction."
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
FRAME_RATE = 25  # codes per second of Boson's audio tokenizer
ON_BAD_ITEM = ("error", "skip")


class InputError(ValueError):
    """The input file itself is malformed (a line or entry that cannot be read); names file and line."""


@dataclass(frozen=True)
class Reference:
    """The reference clip of a voice-cloning sample: its audio file and its transcript."""

    audio_path: Path
    text: str | None


@dataclass(frozen=True)
class Item:
    """One utterance: a unique id, its audio file, its transcript (None when missing), the speaker,
    an optional scene description and an optional voice-cloning reference."""

    item_id: str
    audio_path: Path
    text: str | None
    speaker: str = ""
    scene: str | None = None
    reference: Reference | None = None
    problem: str | None = field(default=None, compare=False)  # found while reading the input


def _read_text(path: Path) -> tuple[str | None, str | None]:
    """(transcript, problem) of a transcript file."""
    if not path.is_file():
        return None, f"{path}: transcript not found"
    text = path.read_text(encoding="utf-8").strip()
    return (text, None) if text else (None, f"{path}: transcript is empty")


def items_from_folder(folder: Path) -> list[Item]:
    """Recordings under ``folder`` (recursively, sorted), each with ``NAME.txt`` beside it."""
    items = []
    for audio_path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES):
        text, problem = _read_text(audio_path.with_suffix(".txt"))
        relative = audio_path.relative_to(folder)
        item_id = str(relative.with_suffix("")).replace(os.sep, "__")
        speaker = str(relative.parent) if relative.parent != Path(".") else ""
        items.append(Item(item_id, audio_path, text, speaker=speaker, problem=problem))
    if not items:
        raise InputError(f"{folder}: no audio files ({', '.join(AUDIO_SUFFIXES)}) under it")
    return items


def items_from_ljspeech(metadata_csv: Path) -> list[Item]:
    """Rows ``id|text|normalized`` of an LJSpeech ``metadata.csv``; audio in ``wavs/ID.wav`` beside it."""
    items = []
    with open(metadata_csv, encoding="utf-8", newline="") as f:
        for line_number, row in enumerate(csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE), start=1):
            if not row:
                continue
            if len(row) < 2:
                raise InputError(
                    f"{metadata_csv}:{line_number}: expected 'id|text[|normalized]', got {row!r}"
                )
            text = (row[2] if len(row) > 2 and row[2].strip() else row[1]).strip()
            problem = None if text else f"{metadata_csv}:{line_number}: empty transcript"
            audio_path = metadata_csv.parent / "wavs" / f"{row[0]}.wav"
            items.append(Item(row[0], audio_path, text or None, problem=problem))
    return items


def items_from_jsonl(path: Path) -> list[Item]:
    """Lines ``{"audio": PATH, "text": ..., "id": optional, "speaker": optional}``."""
    items = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                audio, text = record["audio"], record.get("text")
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise InputError(
                    f"{path}:{line_number}: expected {{'audio': ..., 'text': ...}}: {error}"
                ) from None
            text = str(text).strip() if text is not None else ""
            problem = None if text else f"{path}:{line_number}: no transcript ('text' missing or empty)"
            item_id = str(record.get("id", f"item_{line_number:08d}"))
            speaker = str(record.get("speaker") or "")
            items.append(Item(item_id, path.parent / audio, text or None, speaker=speaker, problem=problem))
    return items


def scene_description(scene: str) -> str:
    """``metadata.json``'s ``scene`` as Boson's scene text: a bare name reads as train-higgs-audio writes it."""
    scene = scene.strip()
    if " " not in scene:
        return f"Audio is recorded from {scene.replace('_', ' ')}."
    return scene


def items_from_metadata_json(path: Path) -> list[Item]:
    """``{"samples": [{id, audio_file, transcript_file, speaker_id, scene, ref_audio_file, ref_transcript}]}``."""
    try:
        samples = json.loads(path.read_text(encoding="utf-8"))["samples"]
        if not isinstance(samples, list):
            raise TypeError("'samples' is not a list")
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise InputError(f"{path}: expected {{'samples': [...]}}: {error}") from None
    folder, items = path.parent, []
    for index, sample in enumerate(samples):
        where = f"{path}: samples[{index}]"
        if not isinstance(sample, dict) or "audio_file" not in sample:
            raise InputError(f"{where}: expected an object with 'audio_file'")
        if "transcript_file" in sample:
            text, problem = _read_text(folder / sample["transcript_file"])
        else:
            text = str(sample.get("transcript") or "").strip() or None
            problem = None if text else f"{where}: no 'transcript_file'"
        reference = None
        if sample.get("ref_audio_file"):
            ref_text = str(sample.get("ref_transcript") or "").strip() or None
            if ref_text is None and problem is None:
                problem = f"{where}: 'ref_audio_file' without 'ref_transcript'"
            reference = Reference(folder / sample["ref_audio_file"], ref_text)
        items.append(
            Item(
                str(sample.get("id") or Path(sample["audio_file"]).stem),
                folder / sample["audio_file"],
                text,
                speaker=str(sample.get("speaker_id") or ""),
                scene=scene_description(sample["scene"]) if sample.get("scene") else None,
                reference=reference,
                problem=problem,
            )
        )
    return items


def read_items(input_path: Path) -> list[Item]:
    """Dispatch on the input layout; ids must be unique and usable as file names."""
    if input_path.is_dir():
        items = items_from_folder(input_path)
    elif input_path.name.endswith(".json"):
        items = items_from_metadata_json(input_path)
    elif input_path.suffix == ".csv":
        items = items_from_ljspeech(input_path)
    elif input_path.suffix == ".jsonl":
        items = items_from_jsonl(input_path)
    elif not input_path.exists():
        raise InputError(f"--input {input_path}: not found")
    else:
        raise InputError(
            f"--input {input_path}: expected a folder, an LJSpeech metadata.csv, a .jsonl or a metadata.json"
        )
    seen: set[str] = set()
    for item in items:
        if item.item_id in seen:
            raise InputError(f"{input_path}: duplicate item id {item.item_id!r}")
        if "/" in item.item_id or item.item_id in ("", ".", ".."):
            raise InputError(f"{input_path}: item id {item.item_id!r} cannot name a codes file")
        seen.add(item.item_id)
    return items


def add_speaker_clones(items: list[Item]) -> list[Item]:
    """After each item of a speaker with other clips: a voice-cloning item whose reference is the
    speaker's next clip (in input order, wrapping around)."""
    by_speaker: dict[str, list[Item]] = {}
    for item in items:
        by_speaker.setdefault(item.speaker, []).append(item)
    out = []
    for item in items:
        out.append(item)
        clips = by_speaker[item.speaker]
        if len(clips) > 1 and item.reference is None:
            other = clips[(clips.index(item) + 1) % len(clips)]
            reference = Reference(other.audio_path, other.text)
            problem = item.problem or other.problem
            out.append(replace(item, item_id=f"{item.item_id}__clone", reference=reference, problem=problem))
    return out


# ------------------------------------------------------------------------------------------ encoders
class FolderEncoder:
    """Boson's audio tokenizer folder through ``higgs_tune.models.audio_encoder``: batches of files."""

    def __init__(self, codec_dir: str, semantic_model_dir: str | None, device: str) -> None:
        from higgs_tune.models.audio_encoder import AudioCodecEncoder

        self.model = AudioCodecEncoder.from_pretrained(codec_dir, semantic_model_dir, device=device)
        self.sample_rate = self.model.sample_rate

    def encode_batch(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        return [codes.numpy() for codes in self.model.encode(clips)]


class PluginEncoder:
    """``module:factory``: one file at a time."""

    def __init__(self, spec: str) -> None:
        module_name, _, attribute = spec.partition(":")
        module = importlib.import_module(module_name)
        try:
            factory = getattr(module, attribute)
        except AttributeError:
            raise ValueError(
                f"--audio-tokenizer {spec!r}: module {module_name} has no attribute {attribute!r}"
            ) from None
        encoder = factory()
        self.encode_path: Callable[[str], object] = getattr(encoder, "encode", encoder)
        if not callable(self.encode_path):
            raise TypeError(
                f"--audio-tokenizer {spec!r}: {attribute}() returned {type(encoder).__name__}, not an encoder"
            )


def load_encoder(
    spec: str, semantic_model_dir: str | None = None, device: str = "cpu"
) -> FolderEncoder | PluginEncoder:
    """The encoder named by ``spec``: a tokenizer folder, or ``module:factory``."""
    if Path(spec).is_dir():
        return FolderEncoder(spec, semantic_model_dir, device)
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"--audio-tokenizer {spec!r}: expected Boson's audio tokenizer folder (config.json + model.pth) "
            "or 'module:factory'"
        )
    return PluginEncoder(spec)


def check_codes(codes: np.ndarray, num_codebooks: int, codebook_size: int, what: str) -> None:
    """Raise ValueError naming ``what`` unless ``codes`` is an integer array [num_codebooks, T>0] in range."""
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{what}: codes have dtype {codes.dtype}, expected integers")
    if codes.ndim != 2 or codes.shape[0] != num_codebooks or codes.shape[1] == 0:
        raise ValueError(f"{what}: codes have shape {tuple(codes.shape)}, expected [{num_codebooks}, T>0]")
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= codebook_size:
        raise ValueError(f"{what}: code values span {low}..{high}, expected 0..{codebook_size - 1}")


def existing_codes_frames(path: Path, num_codebooks: int, codebook_size: int) -> int | None:
    """The frame count of a complete, valid codes file at ``path`` (then it is not encoded again)."""
    try:
        codes = np.load(path, mmap_mode="r")
        check_codes(codes, num_codebooks, codebook_size, str(path))
    except (OSError, ValueError, EOFError):
        return None
    return int(codes.shape[1])


@dataclass(frozen=True)
class AudioJob:
    """One audio file to encode into ``codes_path``."""

    audio_path: Path
    codes_path: Path


_worker_encoder: FolderEncoder | PluginEncoder | None = None


def _init_worker(spec: str, semantic_model_dir: str | None, device: str, threads: int | None) -> None:
    global _worker_encoder
    if threads:
        import torch

        torch.set_num_threads(threads)
    _worker_encoder = load_encoder(spec, semantic_model_dir, device)


def _save_codes(codes: object, job: AudioJob, num_codebooks: int, codebook_size: int) -> int:
    codes = codes.cpu().numpy() if hasattr(codes, "cpu") else np.asarray(codes)
    check_codes(codes, num_codebooks, codebook_size, f"{job.audio_path}")
    temporary = job.codes_path.with_name(job.codes_path.name + ".partial.npy")
    np.save(temporary, codes.astype(np.int16))
    os.replace(temporary, job.codes_path)
    return int(codes.shape[1])


def encode_jobs(
    jobs: list[AudioJob], num_codebooks: int, codebook_size: int
) -> list[tuple[AudioJob, float, str | None]]:
    """Encode one batch with this process's encoder, write the codes; ``(job, seconds, problem)`` each."""
    from higgs_tune.audio_io import AudioFileError, read_audio, resample_to

    assert _worker_encoder is not None, "encode_jobs runs after _init_worker"
    results: list[tuple[AudioJob, float, str | None]] = []
    clips, readable = [], []
    for job in jobs:
        try:
            samples, rate = read_audio(job.audio_path)
        except AudioFileError as error:
            results.append((job, 0.0, str(error)))
            continue
        seconds = samples.shape[0] / rate
        if isinstance(_worker_encoder, PluginEncoder):
            _save_codes(_worker_encoder.encode_path(str(job.audio_path)), job, num_codebooks, codebook_size)
            results.append((job, seconds, None))
        else:
            clips.append(resample_to(samples, rate, _worker_encoder.sample_rate))
            readable.append((job, seconds))
    if readable:
        for (job, seconds), codes in zip(readable, _worker_encoder.encode_batch(clips)):
            _save_codes(codes, job, num_codebooks, codebook_size)
            results.append((job, seconds, None))
    return results


# ------------------------------------------------------------------------------------------ prepare
def probe_audio(path: Path, max_seconds: float) -> tuple[float, str | None]:
    """(duration in seconds, problem) from the file's header, before any decoding."""
    import soundfile

    if not path.is_file():
        return 0.0, f"{path}: audio file not found"
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        return 0.0, f"{path}: cannot read audio ({error})"
    if info.frames <= 0:
        return 0.0, f"{path}: the audio is empty (0 samples)"
    seconds = info.frames / info.samplerate
    if seconds > max_seconds:
        return seconds, f"{path}: {seconds:.1f} s is longer than --max-seconds {max_seconds:g}"
    return seconds, None


def batches(jobs: list[tuple[AudioJob, float]], batch_seconds: float) -> Iterator[list[AudioJob]]:
    """Jobs longest first, grouped so that a batch pads to at most ``batch_seconds`` of audio."""
    batch: list[AudioJob] = []
    longest = 0.0
    for job, seconds in sorted(jobs, key=lambda pair: -pair[1]):
        longest = longest or seconds
        if batch and (len(batch) + 1) * longest > batch_seconds:
            yield batch
            batch, longest = [], seconds
        batch.append(job)
    if batch:
        yield batch


def codes_name(audio_path: Path, items_by_audio: dict[Path, Item], root: Path) -> str:
    """The codes file stem of an audio file: its item's id, or (a reference only) its path under ``root``."""
    if audio_path in items_by_audio:
        return items_by_audio[audio_path].item_id
    try:
        relative = audio_path.relative_to(root)
    except ValueError:
        relative = Path(audio_path.name)
    return "ref__" + str(relative.with_suffix("")).replace(os.sep, "__")


def manifest_record(item: Item, codes: dict[Path, str], system_prompt: str) -> dict:
    """The ChatML sample of one item: TTS, or voice cloning with the reference turns before start_index."""
    system = system_prompt
    if item.scene:
        system += f"\n\n<|scene_desc_start|>\n{item.scene}\n<|scene_desc_end|>"

    def audio(path: Path) -> dict:
        return {"type": "audio", "audio_url": str(path), "audio_codes": codes[path]}

    messages = [{"role": "system", "content": system}]
    record: dict = {}
    if item.reference is not None:
        messages += [
            {"role": "user", "content": item.reference.text},
            {"role": "assistant", "content": audio(item.reference.audio_path)},
        ]
        record["start_index"] = len(messages)
    messages += [
        {"role": "user", "content": item.text},
        {"role": "assistant", "content": audio(item.audio_path)},
    ]
    record = {"messages": messages, **record}
    if item.speaker:
        record["speaker"] = item.speaker
    return record


def prepare(
    input_path: Path,
    out_dir: Path,
    tokenizer_spec: str,
    *,
    semantic_model: str | None = None,
    device: str = "cpu",
    workers: int = 1,
    batch_seconds: float = 20.0,
    max_seconds: float = 30.0,
    on_bad_item: str = "error",
    clone_from_speaker: bool = False,
    manifest_name: str = "manifest.jsonl",
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    num_codebooks: int = 8,
    codebook_size: int = 1024,
) -> dict:
    """Encode every audio file not encoded yet and write the manifest; returns the summary."""
    if on_bad_item not in ON_BAD_ITEM:
        raise ValueError(f"--on-bad-item must be one of {ON_BAD_ITEM}, got {on_bad_item!r}")
    input_path, out_dir = Path(input_path), Path(out_dir)
    items = read_items(input_path)
    if clone_from_speaker:
        items = add_speaker_clones(items)
    root = input_path if input_path.is_dir() else input_path.parent
    items_by_audio = {item.audio_path: item for item in items if not item.item_id.endswith("__clone")}
    codes_dir = out_dir / "codes"
    codes_dir.mkdir(parents=True, exist_ok=True)

    # Every audio file once (an item's and the references'), with its codes file and any problem.
    audio_paths = list(dict.fromkeys(p for item in items for p in (item.audio_path, *_reference_audio(item))))
    codes_paths = {p: codes_dir / f"{codes_name(p, items_by_audio, root)}.npy" for p in audio_paths}
    problems: dict[Path, str] = {}
    todo: list[tuple[AudioJob, float]] = []
    reused = 0
    for path in audio_paths:
        frames = existing_codes_frames(codes_paths[path], num_codebooks, codebook_size)
        if frames is not None:
            if frames > max_seconds * FRAME_RATE + 1:
                problems[path] = (
                    f"{path}: {frames / FRAME_RATE:.1f} s is longer than --max-seconds {max_seconds:g}"
                )
            reused += 1
            continue
        seconds, problem = probe_audio(path, max_seconds)
        if problem:
            problems[path] = problem
        else:
            todo.append((AudioJob(path, codes_paths[path]), seconds))

    def item_problem(item: Item) -> str | None:
        return item.problem or next(
            (problems[p] for p in (item.audio_path, *_reference_audio(item)) if p in problems), None
        )

    bad = [(item, item_problem(item)) for item in items if item_problem(item)]
    if bad and on_bad_item == "error":
        for item, problem in bad:
            print(f"prepare: item {item.item_id}: {problem}", file=sys.stderr)
        raise InputError(
            f"{len(bad)} bad item(s) of {len(items)} in {input_path} (listed above); fix them or pass "
            "--on-bad-item skip"
        )
    bad_ids = {item.item_id for item, _ in bad}
    needed = {
        p for item in items if item.item_id not in bad_ids for p in (item.audio_path, *_reference_audio(item))
    }
    todo = [(job, seconds) for job, seconds in todo if job.audio_path in needed]
    print(
        f"{len(items)} items ({len(bad)} bad), {len(audio_paths)} audio files: {reused} already encoded, "
        f"{len(todo)} to encode",
        file=sys.stderr,
    )

    start = time.perf_counter()
    encoded, audio_seconds = 0, 0.0
    for job, seconds, problem in _run_encoding(
        todo, tokenizer_spec, semantic_model, device, workers, batch_seconds, num_codebooks, codebook_size
    ):
        if problem is not None:  # unreadable past its header
            if on_bad_item == "error":
                raise InputError(f"{problem} (--on-bad-item skip leaves such items out)")
            problems[job.audio_path] = problem
            continue
        encoded += 1
        audio_seconds += seconds
    encode_seconds = time.perf_counter() - start

    skipped: dict[str, str] = {}
    manifest_path = out_dir / manifest_name
    temporary = manifest_path.with_name(manifest_path.name + ".partial")
    codes = {p: str(codes_paths[p].relative_to(out_dir)) for p in audio_paths}
    with open(temporary, "w", encoding="utf-8") as f:
        for item in items:
            problem = item_problem(item)
            if problem:
                print(f"prepare: skipping item {item.item_id}: {problem}", file=sys.stderr)
                skipped[item.item_id] = problem
                continue
            f.write(json.dumps(manifest_record(item, codes, system_prompt), ensure_ascii=False) + "\n")
    os.replace(temporary, manifest_path)
    summary = {
        "encoded": encoded,
        "reused": reused,
        "total": len(audio_paths),
        "samples": len(items) - len(skipped),
        "skipped": len(skipped),
        "audio_seconds": round(audio_seconds, 3),
        "encode_seconds": round(encode_seconds, 3),
        "clips_per_second": round(encoded / encode_seconds, 3) if encoded else None,
    }
    print(
        f"wrote {manifest_path}: {summary['samples']} samples, {len(skipped)} skipped; encoded {encoded} clips "
        f"({audio_seconds:.1f} s of audio) in {encode_seconds:.1f} s",
        file=sys.stderr,
    )
    return summary


def _reference_audio(item: Item) -> tuple[Path, ...]:
    return (item.reference.audio_path,) if item.reference is not None else ()


def _run_encoding(
    todo: list[tuple[AudioJob, float]],
    spec: str,
    semantic_model: str | None,
    device: str,
    workers: int,
    batch_seconds: float,
    num_codebooks: int,
    codebook_size: int,
) -> Iterator[tuple[AudioJob, float, str | None]]:
    """Encode ``todo`` in batches, in this process or in ``workers`` processes; results as they finish."""
    if not todo:
        return
    work = list(batches(todo, batch_seconds))
    progress = tqdm(total=len(todo), desc="encoding", unit="clip")
    if workers <= 1:
        _init_worker(spec, semantic_model, device, None)
        for batch in work:
            results = encode_jobs(batch, num_codebooks, codebook_size)
            progress.update(len(results))
            yield from results
    else:
        if device != "cpu":
            raise ValueError(
                "--workers > 1 is for CPU encoding; one GPU encodes in one process (--workers 1)"
            )
        threads = max(1, (os.cpu_count() or 1) // workers)
        # spawn, not fork: the encoder holds torch state that does not survive a fork.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(spec, semantic_model, device, threads),
        ) as pool:
            futures = [pool.submit(encode_jobs, batch, num_codebooks, codebook_size) for batch in work]
            for future in as_completed(futures):
                results = future.result()
                progress.update(len(results))
                yield from results
    progress.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input", type=Path, required=True, help="folder, metadata.csv, .jsonl or metadata.json"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (manifest + codes/)")
    parser.add_argument(
        "--audio-tokenizer", required=True, help="Boson's audio tokenizer folder, or 'module:factory'"
    )
    parser.add_argument(
        "--semantic-model",
        help="local bosonai/hubert_base folder (default: hubert_base inside the tokenizer's)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes on CPU (default 1)")
    parser.add_argument(
        "--batch-seconds", type=float, default=20.0, help="padded audio per forward (default 20)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=30.0, help="longer clips are bad items (default 30)"
    )
    parser.add_argument("--on-bad-item", choices=ON_BAD_ITEM, default="error")
    parser.add_argument(
        "--clone-from-speaker",
        action="store_true",
        help="also write a voice-cloning sample per item, referenced by the speaker's next clip",
    )
    parser.add_argument("--manifest-name", default="manifest.jsonl")
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT)
    parser.add_argument("--num-codebooks", type=int, default=8)
    parser.add_argument("--codebook-size", type=int, default=1024)
    args = parser.parse_args(argv)
    try:
        summary = prepare(
            args.input,
            args.out,
            args.audio_tokenizer,
            semantic_model=args.semantic_model,
            device=args.device,
            workers=args.workers,
            batch_seconds=args.batch_seconds,
            max_seconds=args.max_seconds,
            on_bad_item=args.on_bad_item,
            clone_from_speaker=args.clone_from_speaker,
            manifest_name=args.manifest_name,
            system_prompt=args.system_prompt,
            num_codebooks=args.num_codebooks,
            codebook_size=args.codebook_size,
        )
    except (InputError, FileNotFoundError) as error:
        print(f"prepare: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
