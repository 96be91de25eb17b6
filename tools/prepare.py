"""Turn a speech data set (audio + transcripts) into a higgs_tune manifest with pre-computed audio codes.

    python tools/prepare.py --input DATA --out DIR --audio-tokenizer SPEC [--workers N]

Input formats (picked from what ``--input`` is):

- a folder of ``NAME.wav`` + ``NAME.txt`` pairs (searched recursively);
- an LJSpeech-style ``metadata.csv`` (``id|text|normalized text``, audio in ``wavs/ID.wav`` beside it;
  the normalized text is used when present);
- a ``.jsonl`` file of ``{"audio": PATH, "text": ..., "id": optional}`` (paths relative to the file).

Output: ``DIR/codes/ID.npy`` (int16 [num_codebooks, T]) and ``DIR/manifest.jsonl``, one Boson ChatML TTS
sample per item (system prompt, user text, assistant audio with ``audio_codes`` relative to the
manifest and ``audio_url`` kept for provenance), in input order.

The audio tokenizer is pluggable. ``--audio-tokenizer module:factory`` imports ``factory`` from
``module`` and calls it with no arguments once per worker; it returns either an object with an
``encode(wav_path)`` method or a plain function of the wav path, giving an integer array (numpy or
torch) [num_codebooks, T]. ``--audio-tokenizer boson:/path/to/higgs-audio-v2-tokenizer`` uses Boson's
``HiggsAudioTokenizer`` (``boson_multimodal`` and the tokenizer weights must be installed locally).

Resumable: items whose codes file already exists and is valid (right shape, values in range) are not
encoded again, so an interrupted run is simply restarted. Files are written atomically (temporary file
+ rename). ``--workers N`` encodes in N processes.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

DEFAULT_SYSTEM_PROMPT = "Generate audio following instruction."


@dataclass(frozen=True)
class Item:
    """One utterance: a unique id (names the codes file), its wav file and its transcript."""

    item_id: str
    wav_path: Path
    text: str


def items_from_folder(folder: Path) -> list[Item]:
    """``NAME.wav`` + ``NAME.txt`` pairs under ``folder`` (recursively), sorted by path."""
    items = []
    for wav_path in sorted(folder.rglob("*.wav")):
        text_path = wav_path.with_suffix(".txt")
        if not text_path.is_file():
            raise FileNotFoundError(f"{wav_path} has no transcript {text_path.name} beside it")
        item_id = str(wav_path.relative_to(folder).with_suffix("")).replace(os.sep, "__")
        items.append(Item(item_id, wav_path, text_path.read_text(encoding="utf-8").strip()))
    if not items:
        raise FileNotFoundError(f"no .wav files under {folder}")
    return items


def items_from_ljspeech(metadata_csv: Path) -> list[Item]:
    """Rows ``id|text|normalized`` of an LJSpeech ``metadata.csv``; audio in ``wavs/ID.wav`` beside it."""
    items = []
    with open(metadata_csv, encoding="utf-8", newline="") as f:
        for line_number, row in enumerate(csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE), start=1):
            if not row:
                continue
            if len(row) < 2:
                raise ValueError(
                    f"{metadata_csv}:{line_number}: expected 'id|text[|normalized]', got {row!r}"
                )
            text = row[2] if len(row) > 2 and row[2].strip() else row[1]
            items.append(Item(row[0], metadata_csv.parent / "wavs" / f"{row[0]}.wav", text.strip()))
    return items


def items_from_jsonl(path: Path) -> list[Item]:
    """Lines ``{"audio": PATH, "text": ..., "id": optional}``; PATH relative to the JSONL file."""
    items = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                audio, text = record["audio"], record["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(
                    f"{path}:{line_number}: expected {{'audio': ..., 'text': ...}}: {error}"
                ) from None
            item_id = str(record.get("id", f"item_{line_number:08d}"))
            items.append(Item(item_id, path.parent / audio, str(text).strip()))
    return items


def read_items(input_path: Path) -> list[Item]:
    """Dispatch on the input kind (folder, ``*.csv``, ``*.jsonl``); ids must be unique."""
    if input_path.is_dir():
        items = items_from_folder(input_path)
    elif input_path.suffix == ".csv":
        items = items_from_ljspeech(input_path)
    elif input_path.suffix == ".jsonl":
        items = items_from_jsonl(input_path)
    else:
        raise ValueError(
            f"--input {input_path}: expected a folder, an LJSpeech metadata.csv or a .jsonl file"
        )
    seen: set[str] = set()
    for item in items:
        if item.item_id in seen:
            raise ValueError(f"{input_path}: duplicate item id {item.item_id!r}")
        if "/" in item.item_id or item.item_id in ("", ".", ".."):
            raise ValueError(f"{input_path}: item id {item.item_id!r} cannot name a codes file")
        seen.add(item.item_id)
    return items


class BosonAudioTokenizer:
    """Thin adapter over Boson's ``HiggsAudioTokenizer``: wav path -> codes [8, T] (numpy int64)."""

    def __init__(self, weights_dir: str, device: str | None = None) -> None:
        import torch
        from boson_multimodal.audio_processing.higgs_audio_tokenizer import load_higgs_audio_tokenizer

        if not Path(weights_dir).is_dir():
            raise FileNotFoundError(f"Boson audio tokenizer directory {weights_dir} does not exist")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_higgs_audio_tokenizer(weights_dir, device=device)

    def encode(self, wav_path: str) -> np.ndarray:
        return self.model.encode(str(wav_path)).cpu().numpy()


def load_audio_tokenizer(spec: str) -> Callable[[str], object]:
    """Build the encoder named by ``spec`` (``module:factory`` or ``boson:/weights/dir``)."""
    kind, sep, target = spec.partition(":")
    if not sep or not target:
        raise ValueError(f"--audio-tokenizer {spec!r}: expected 'module:factory' or 'boson:/path/to/weights'")
    if kind == "boson":
        return BosonAudioTokenizer(target).encode
    module = importlib.import_module(kind)
    try:
        factory = getattr(module, target)
    except AttributeError:
        raise ValueError(f"--audio-tokenizer {spec!r}: module {kind} has no attribute {target!r}") from None
    tokenizer = factory()
    if hasattr(tokenizer, "encode"):
        return tokenizer.encode
    if callable(tokenizer):
        return tokenizer
    raise TypeError(
        f"--audio-tokenizer {spec!r}: {target}() returned {type(tokenizer).__name__}, not an encoder"
    )


def check_codes(codes: np.ndarray, num_codebooks: int, codebook_size: int, what: str) -> None:
    """Raise ValueError naming ``what`` unless ``codes`` is an integer array [num_codebooks, T>0] in range."""
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{what}: codes have dtype {codes.dtype}, expected integers")
    if codes.ndim != 2 or codes.shape[0] != num_codebooks or codes.shape[1] == 0:
        raise ValueError(f"{what}: codes have shape {tuple(codes.shape)}, expected [{num_codebooks}, T>0]")
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= codebook_size:
        raise ValueError(f"{what}: code values span {low}..{high}, expected 0..{codebook_size - 1}")


def existing_codes_valid(path: Path, num_codebooks: int, codebook_size: int) -> bool:
    """True when ``path`` holds a complete, valid codes array (then it is not encoded again)."""
    try:
        check_codes(np.load(path, mmap_mode="r"), num_codebooks, codebook_size, str(path))
    except (OSError, ValueError, EOFError):
        return False
    return True


_worker_encoder: Callable[[str], object] | None = None


def _init_worker(tokenizer_spec: str) -> None:
    global _worker_encoder
    _worker_encoder = load_audio_tokenizer(tokenizer_spec)


def encode_item(item: Item, codes_path: Path, num_codebooks: int, codebook_size: int) -> str:
    """Encode one item with this process's encoder and write its codes atomically; returns the item id."""
    assert _worker_encoder is not None, "encode_item runs after _init_worker"
    if not item.wav_path.is_file():
        raise FileNotFoundError(f"item {item.item_id}: audio file {item.wav_path} not found")
    codes = _worker_encoder(str(item.wav_path))
    codes = codes.cpu().numpy() if hasattr(codes, "cpu") else np.asarray(codes)
    check_codes(codes, num_codebooks, codebook_size, f"item {item.item_id} ({item.wav_path})")
    temporary = codes_path.with_name(codes_path.name + ".partial.npy")
    np.save(temporary, codes.astype(np.int16))
    os.replace(temporary, codes_path)
    return item.item_id


def manifest_record(item: Item, codes_relative: str, system_prompt: str) -> dict:
    """The ChatML TTS sample of one item."""
    return {
        "messages": [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": item.text},
            {
                "role": "assistant",
                "content": {"type": "audio", "audio_url": str(item.wav_path), "audio_codes": codes_relative},
            },
        ]
    }


def prepare(
    input_path: Path,
    out_dir: Path,
    tokenizer_spec: str,
    *,
    workers: int = 1,
    manifest_name: str = "manifest.jsonl",
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    num_codebooks: int = 8,
    codebook_size: int = 1024,
) -> dict[str, int]:
    """Encode every item not encoded yet and write the manifest. Returns {"encoded", "reused", "total"}."""
    items = read_items(Path(input_path))
    codes_dir = Path(out_dir) / "codes"
    codes_dir.mkdir(parents=True, exist_ok=True)
    todo = [
        item
        for item in items
        if not existing_codes_valid(codes_dir / f"{item.item_id}.npy", num_codebooks, codebook_size)
    ]
    print(
        f"{len(items)} items, {len(items) - len(todo)} already encoded, {len(todo)} to encode",
        file=sys.stderr,
    )

    if todo and workers <= 1:
        _init_worker(tokenizer_spec)
        for item in tqdm(todo, desc="encoding", unit="file"):
            encode_item(item, codes_dir / f"{item.item_id}.npy", num_codebooks, codebook_size)
    elif todo:
        # spawn, not fork: audio tokenizers hold torch/CUDA state that does not survive a fork.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer_spec,)
        ) as pool:
            futures = [
                pool.submit(
                    encode_item, item, codes_dir / f"{item.item_id}.npy", num_codebooks, codebook_size
                )
                for item in todo
            ]
            for future in tqdm(as_completed(futures), total=len(futures), desc="encoding", unit="file"):
                future.result()

    manifest_path = Path(out_dir) / manifest_name
    temporary = manifest_path.with_name(manifest_path.name + ".partial")
    with open(temporary, "w", encoding="utf-8") as f:
        for item in items:
            record = manifest_record(item, f"codes/{item.item_id}.npy", system_prompt)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(temporary, manifest_path)
    print(f"wrote {manifest_path}", file=sys.stderr)
    return {"encoded": len(todo), "reused": len(items) - len(todo), "total": len(items)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input", type=Path, required=True, help="folder of wav+txt, metadata.csv, or .jsonl"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (manifest + codes/)")
    parser.add_argument(
        "--audio-tokenizer",
        required=True,
        help="'module:factory' or 'boson:/path/to/higgs-audio-v2-tokenizer'",
    )
    parser.add_argument("--workers", type=int, default=1, help="encoding processes (default 1)")
    parser.add_argument("--manifest-name", default="manifest.jsonl")
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT)
    parser.add_argument("--num-codebooks", type=int, default=8)
    parser.add_argument("--codebook-size", type=int, default=1024)
    args = parser.parse_args(argv)
    counts = prepare(
        args.input,
        args.out,
        args.audio_tokenizer,
        workers=args.workers,
        manifest_name=args.manifest_name,
        system_prompt=args.system_prompt,
        num_codebooks=args.num_codebooks,
        codebook_size=args.codebook_size,
    )
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
