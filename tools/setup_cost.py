"""Measure the data set-up of a run: manifest scan and packing plan (``auto`` capacities), time and peak RSS.

    python tools/setup_cost.py MANIFEST --seq-len 1024 [--tokenizer DIR] [--seed 0]

Prints one JSON object: samples, rows, the chosen capacities, the wall-clock and CPU seconds (this
process's user + system time, which other work on a shared machine does not inflate) of the scan
(:func:`higgs_tune.data.manifest.scan_manifest`, its cache next to the manifest used when valid) and of
the plan (:func:`higgs_tune.data.dataset.pack_entries` with every capacity ``auto``), and this process's
peak resident set size (GiB, from ``getrusage``; run one manifest per process). Synthetic manifests of any size:
``python tools/make_synthetic.py --out DIR --num-samples N``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from higgs_tune.data.capacities import CAPACITY_NAMES, fixed_spec
from higgs_tune.data.dataset import pack_entries
from higgs_tune.data.document import AudioLayout
from higgs_tune.data.manifest import scan_manifest
from higgs_tune.data.tokenizer import HiggsTokenizer

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "higgs_tune" / "assets" / "tiny_tokenizer"


def setup_cost(manifest: Path, tokenizer: HiggsTokenizer, seq_len: int, seed: int = 0) -> dict:
    """Scan ``manifest`` and plan its rows with ``auto`` capacities; the figures this tool prints."""
    layout = AudioLayout()
    start, start_cpu = time.perf_counter(), time.process_time()
    scan = scan_manifest(manifest, tokenizer, layout)
    scanned, scanned_cpu = time.perf_counter(), time.process_time()
    requested = dict.fromkeys(CAPACITY_NAMES, "auto")
    spec = fixed_spec(seq_len, 1, layout.num_codebooks, requested)
    _, rows, _, spec = pack_entries(scan.entries, spec, too_long="drop", seed=seed, auto=CAPACITY_NAMES)
    planned, planned_cpu = time.perf_counter(), time.process_time()
    return {
        "manifest": str(manifest),
        "samples": scan.num_samples,
        "seq_len": seq_len,
        "rows": len(rows),
        "capacities": {name: spec.capacity(name) for name in CAPACITY_NAMES},
        "scan_s": scanned - start,
        "plan_s": planned - scanned,
        "scan_cpu_s": scanned_cpu - start_cpu,
        "plan_cpu_s": planned_cpu - scanned_cpu,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument(
        "--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="tokenizer.json or its folder"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = HiggsTokenizer.from_path(args.tokenizer)
    print(json.dumps(setup_cost(args.manifest, tokenizer, args.seq_len, args.seed)))


if __name__ == "__main__":
    main()
