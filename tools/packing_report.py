"""Report how well a manifest packs into rows of a given length and capacities, and what ``auto`` chooses.

    python tools/packing_report.py MANIFEST --seq-len 1024 [--batch-size 8] [--tokenizer DIR]
        [--text-ffn-capacity N|auto] [--audio-ffn-capacity N|auto] [--text-target-capacity N|auto]
        [--audio-target-capacity N|auto] [--num-codebooks 8] [--on-bad-sample error|skip] [--seed 0]

Scans the manifest exactly as training does (:func:`higgs_tune.data.manifest.scan_manifest`), plans the
rows as training does (:func:`higgs_tune.data.dataset.pack_entries`, too-long documents dropped; each
capacity ``auto`` by default, i.e. what training with ``dataset.<name>_capacity: auto`` would choose for
this manifest, ``seq_len`` and ``--seed`` = the config's ``seed``) and prints: samples, skipped and
dropped documents, rows, the padding fraction of the row positions and of each capacity, each capacity's
value and its mean and max use per row, and how many rows ``drop_last`` loses per epoch at the given
batch size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from higgs_tune.data.batch import PackingSpec
from higgs_tune.data.capacities import AUTO, CAPACITY_NAMES, auto_names, fixed_spec, padding_fractions
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
    auto: tuple[str, ...] = (),
) -> dict:
    """The figures printed by this tool, as a dict of plain numbers; the capacities named in ``auto``
    (:data:`~higgs_tune.data.capacities.CAPACITY_NAMES`) are planned as training plans them."""
    scan = scan_manifest(manifest, tokenizer, layout, on_bad_sample=on_bad_sample)
    ordered, rows, dropped, spec = pack_entries(scan.entries, spec, too_long="drop", seed=seed, auto=auto)
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
    for name, value in padding_fractions([e.stats for e in ordered], rows, spec).items():
        if name != "seq":
            report[f"{name}_capacity"] = spec.capacity(name)
            report[f"{name}_padding_fraction"] = value
            report[f"{name}_capacity_is"] = "auto" if name in auto else "explicit"
    return report


def capacity_value(text: str) -> int | str:
    """A ``--*-capacity`` argument: ``auto`` or a positive int."""
    if text == AUTO:
        return text
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a capacity must be positive or auto, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="tokenizer.json or its folder"
    )
    parser.add_argument("--num-codebooks", type=int, default=8)
    for name in CAPACITY_NAMES:
        parser.add_argument(
            f"--{name.replace('_', '-')}-capacity",
            type=capacity_value,
            default=AUTO,
            help="a number or auto (default: what training's auto chooses)",
        )
    parser.add_argument("--on-bad-sample", choices=("error", "skip"), default="error")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    requested = {name: getattr(args, f"{name}_capacity") for name in CAPACITY_NAMES}
    spec = fixed_spec(args.seq_len, args.batch_size, args.num_codebooks, requested)
    report = packing_report(
        args.manifest,
        HiggsTokenizer.from_path(args.tokenizer),
        spec,
        layout=AudioLayout(num_codebooks=args.num_codebooks),
        on_bad_sample=args.on_bad_sample,
        seed=args.seed,
        auto=auto_names(requested),
    )
    if args.json:
        print(json.dumps(report))
        return
    width = max(len(key) for key in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
