"""Print one packed row position by position: what the model sees and what each position is trained to predict.

    python tools/inspect_batch.py --manifest data/train.jsonl --tokenizer higgs_tune/assets/tiny_tokenizer \\
        [--row 0] [--seq-len 1024] [--model-config path/to/config.json] [--seed 0]

The manifest is scanned and packed exactly as training does (:func:`higgs_tune.data.manifest.scan_manifest`,
:func:`higgs_tune.data.dataset.pack_entries` with the same seed, ``auto`` capacities, too-long documents
dropped), row ``--row`` is built and collated (:func:`higgs_tune.data.packer.collate_rows`), and each
position prints as::

    pos  doc  in_pos  input                          text target        audio targets (k = 0..K-1)

``input`` is the decoded text token, or ``AUDIO_IN`` / ``AUDIO_OUT`` with the column's K codes (``B`` =
stream BOS 1024, ``E`` = stream EOS 1025); targets print ``.`` for -100. Reading down the table shows the
single shift: each text target is the next row's input token, each audio target the next column's code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from higgs_tune.data.batch import IGNORE_INDEX, PackingSpec
from higgs_tune.data.capacities import CAPACITY_NAMES
from higgs_tune.data.dataset import pack_entries
from higgs_tune.data.document import AudioLayout
from higgs_tune.data.manifest import load_document, scan_manifest
from higgs_tune.data.packer import collate_rows
from higgs_tune.data.tokenizer import HiggsTokenizer

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "higgs_tune" / "assets" / "tiny_tokenizer"


def _code(value: int, layout: AudioLayout) -> str:
    if value == IGNORE_INDEX:
        return "."
    if value == layout.stream_bos_id:
        return "B"
    if value == layout.stream_eos_id:
        return "E"
    return str(value)


def _token(tokenizer: HiggsTokenizer, token_id: int) -> str:
    return repr(tokenizer.decode([token_id]))


def format_row(batch: dict[str, torch.Tensor], b: int, tokenizer: HiggsTokenizer, layout: AudioLayout) -> str:
    """The table of row ``b`` of a collated batch (padding summarised in one line)."""
    tokens, codes = batch["tokens"][b], batch["audio_codes"][b]
    text_targets, audio_targets = batch["text_targets"][b], batch["audio_targets"][b]
    num_tokens = int(batch["num_tokens"][b])
    width = 6 * layout.num_codebooks
    lines = [
        f"{'pos':>5} {'doc':>3} {'in_pos':>6}  {'input':<{width}}  {'text target':<24} audio targets",
        "-" * (5 + 4 + 7 + 2 * width + 30),
    ]
    for t in range(num_tokens):
        if batch["audio_in_mask"][b, t] or batch["audio_out_mask"][b, t]:
            kind = "AUDIO_OUT" if batch["audio_out_mask"][b, t] else "AUDIO_IN"
            shown = f"{kind} " + " ".join(_code(int(c), layout) for c in codes[:, t])
        else:
            shown = _token(tokenizer, int(tokens[t]))
        target = int(text_targets[t])
        text = "." if target == IGNORE_INDEX else _token(tokenizer, target)
        audio = " ".join(_code(int(c), layout) for c in audio_targets[:, t])
        lines.append(
            f"{t:>5} {int(batch['doc_ids'][b, t]):>3} {int(batch['input_pos'][b, t]):>6}  "
            f"{shown:<{width}}  {text:<24} {audio}"
        )
    seq_len = tokens.numel()
    if num_tokens < seq_len:
        lines.append(f"  ... {seq_len - num_tokens} padding positions (doc {int(batch['doc_ids'][b, -1])})")
    lines.append(
        f"row: {num_tokens}/{seq_len} positions, {int(batch['num_text_targets'][b])} text targets, "
        f"audio targets per codebook {batch['num_audio_targets'][b].tolist()}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--row", type=int, default=0, help="index of the packed row to print")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument(
        "--model-config",
        type=Path,
        help="a Higgs Audio config.json: audio layout from it, tokenizer checked against it "
        "(default: 8 codebooks of 1024, delay pattern on)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the packing seed (as in training)")
    args = parser.parse_args(argv)

    tokenizer = HiggsTokenizer.from_path(args.tokenizer)
    layout = AudioLayout()
    if args.model_config is not None:
        hf_config = json.loads(args.model_config.read_text())
        tokenizer.check_against_model_config(hf_config)
        layout = AudioLayout.from_model_config(hf_config)
    spec = PackingSpec(seq_len=args.seq_len, batch_size=1, num_codebooks=layout.num_codebooks)
    scan = scan_manifest(args.manifest, tokenizer, layout)
    # the shipped configs' packing: every capacity auto
    ordered, rows, dropped, spec = pack_entries(
        scan.entries, spec, too_long="drop", seed=args.seed, auto=CAPACITY_NAMES
    )
    if not 0 <= args.row < len(rows):
        raise SystemExit(f"--row {args.row}: the manifest packs into {len(rows)} rows of {args.seq_len}")
    entries = [ordered[i] for i in rows[args.row]]
    docs = [load_document(entry, tokenizer, layout) for entry in entries]
    batch = collate_rows([docs], spec, pad_id=tokenizer.special.pad)
    print(
        f"{args.manifest}: {len(rows)} rows of {args.seq_len}, {len(dropped)} documents dropped as too long"
    )
    for doc_id, entry in enumerate(entries):
        print(f"doc {doc_id}: {entry.location} ({entry.stats.length} positions)")
    print(format_row(batch, 0, tokenizer, layout))


if __name__ == "__main__":
    main()
