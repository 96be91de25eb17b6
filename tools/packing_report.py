"""Report how well a manifest packs into rows of a given length and capacities.

    python tools/packing_report.py MANIFEST --seq-len 1024 [--batch-size 8] [--tokenizer DIR]
        [--text-ffn-capacity N] [--audio-ffn-capacity N] [--text-target-capacity N]
        [--audio-target-capacity N] [--num-codebooks 8] [--on-bad-sample error|skip] [--seed 0]

Scans the manifest exactly as training does (:func:`higgs_tune.data.manifest.scan_manifest`), plans the
rows (:func:`higgs_tune.data.packer.plan_rows`, too-long documents dropped) and prints: samples,
skipped and dropped documents, rows, the padding fraction (share of row positions that hold no
document), the mean and max use of each per-row capacity, and how many rows ``drop_last`` loses per epoch
at the given batch size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from higgs_tune.data.batch import PackingSpec
from higgs_tune.data.dataset import pack_entries
from higgs_tune.data.document import AudioLayout
from higgs_tune.data.manifest import scan_manifest
from higgs_tune.data.packer import row_limits
from higgs_tune.data.tokenizer import HiggsTokenizer

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "higgs_tune" / "assets" / "tiny_tokenizer"


def packing_report(
    manifest: Path,
    tokenizer: HiggsTokenizer,
    spec: PackingSpec,
    *,
    layout: AudioLayout,
    on_bad_sample: str = "error",
    seed: int = 0,
) -> dict:
    """The figures printed by this tool, as a dict of plain numbers."""
    scan = scan_manifest(manifest, tokenizer, layout, on_bad_sample=on_bad_sample)
    ordered, rows, dropped = pack_entries(scan.entries, spec, too_long="drop", seed=seed)
    limits = row_limits(spec)
    use = np.array(
        [[sum(getattr(ordered[i].stats, name) for i in row) for name in limits] for row in rows],
        dtype=np.int64,
    ).reshape(-1, len(limits))
    positions = len(rows) * spec.seq_len
    used = int(use[:, 0].sum()) if rows else 0
    report = {
        "manifest": str(manifest),
        "seq_len": spec.seq_len,
        "samples": scan.num_samples,
        "skipped_samples": scan.num_skipped,
        "documents_packed": len(ordered) - len(dropped),
        "documents_dropped_too_long": len(dropped),
        "rows": len(rows),
        "documents_per_row": (len(ordered) - len(dropped)) / len(rows) if rows else 0.0,
        "padding_fraction": 1.0 - used / positions if positions else 0.0,
        "rows_lost_to_drop_last": len(rows) % spec.batch_size,
        "batches_per_epoch": len(rows) // spec.batch_size,
    }
    for column, (name, limit) in enumerate(limits.items()):
        if rows:
            report[f"{name}_per_row_mean"] = float(use[:, column].mean())
            report[f"{name}_per_row_max"] = int(use[:, column].max())
        report[f"{name}_limit"] = limit
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="tokenizer.json or its folder"
    )
    parser.add_argument("--num-codebooks", type=int, default=8)
    parser.add_argument("--text-ffn-capacity", type=int)
    parser.add_argument("--audio-ffn-capacity", type=int)
    parser.add_argument("--text-target-capacity", type=int)
    parser.add_argument("--audio-target-capacity", type=int)
    parser.add_argument("--on-bad-sample", choices=("error", "skip"), default="error")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    spec = PackingSpec(
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        num_codebooks=args.num_codebooks,
        text_ffn_capacity=args.text_ffn_capacity,
        audio_ffn_capacity=args.audio_ffn_capacity,
        text_target_capacity=args.text_target_capacity,
        audio_target_capacity=args.audio_target_capacity,
    )
    report = packing_report(
        args.manifest,
        HiggsTokenizer.from_path(args.tokenizer),
        spec,
        layout=AudioLayout(num_codebooks=args.num_codebooks),
        on_bad_sample=args.on_bad_sample,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(report))
        return
    width = max(len(key) for key in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
