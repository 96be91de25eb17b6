"""Benchmark ``auto`` capacities end to end: ``tune run`` with the shipped demo config on a user's TTS set,
against Boson's eager reference step on the same samples.

    python tools/make_tts_benchmark.py --out /tmp/tts64          # 3B-proportioned checkpoint + 64 TTS samples
    python tools/bench_packing.py --data /tmp/tts64 --seq-lens 512 1024 2048 4096 [--max-steps 30]

For each ``seq_len``, in one run: Boson's reference step is timed (``tools/bench.py``'s reference side:
Boson's ``HiggsAudioModel`` forward, eager, SDPA, Boson's reference loss, ``torch.optim.AdamW``) on
batches of ``--reference-batch`` whole samples of the manifest, right-padded as Boson's collator does;
then ``tune run recipes/higgs_finetune --config configs/cpu_tiny.yaml`` trains on the same manifest with
only the checkpoint, tokenizer, manifest and ``seq_len`` changed, plus what keeps the run short and
quiet (``output_dir``, ``max_steps``, ``log_every_n_steps``, ``save_every_n_steps``,
``generation.num_prompts=0``); then the reference is timed again. Reported: the capacities and padding
fractions the run's set-up chose (its ``setup/*`` record in ``metrics.jsonl``), its tokens/s (median of
the logged windows after the first, which holds the compilation), the reference tokens/s (non-padding
positions per step over the median step time, mean of the two timings around the run) and the ratio.
The data set ``data/synthetic`` (``python tools/make_synthetic.py --out data/synthetic``) must exist: the
demo config validates and speaks from its held-out split.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "higgs_tune" / "assets" / "tiny_tokenizer" / "tokenizer.json"
NAMES = ("text_ffn", "audio_ffn", "text_target", "audio_target")


def _bench():
    sys.path.insert(0, str(REPO / "tools"))
    import bench

    return bench


def reference_tokens_per_s(data: Path, batch: int, steps: int, warmup: int) -> float:
    """Boson's eager reference step on batches of ``batch`` consecutive samples of ``data/train.jsonl``."""
    from higgs_tune.data.document import AudioLayout
    from higgs_tune.data.manifest import scan_manifest
    from higgs_tune.data.tokenizer import HiggsTokenizer

    bench = _bench()
    args = bench.model_args(bench.CONFIGS["cpu3b"])
    layout = AudioLayout.from_model_config(args.to_hf_config())
    tokenizer = HiggsTokenizer.from_path(TOKENIZER)
    entries = scan_manifest(data / "train.jsonl", tokenizer, layout).entries
    groups = [list(range(i, i + batch)) for i in range(0, len(entries) - batch + 1, batch)]
    if len(groups) < warmup + steps:
        raise ValueError(
            f"{len(entries)} samples give {len(groups)} batches of {batch}, need {warmup + steps}"
        )
    samples = SimpleNamespace(entries=entries, rows=groups, tokenizer=tokenizer)
    step_groups = [[g] for g in range(warmup + steps)]
    batches = bench.reference_batches(samples, step_groups, layout)
    tokens = bench.reference_tokens(batches, tokenizer.special)
    run = bench.make_reference_step(args, torch.device("cpu"), torch.float32)
    times = []
    for i, batch_inputs in enumerate(batches):
        start = time.perf_counter()
        float(run(batch_inputs))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    del run, batches
    gc.collect()
    return statistics.median(tokens[warmup:]) / statistics.median(times)


def tune_run(data: Path, seq_len: int, max_steps: int, output_dir: Path) -> dict:
    """Train with the shipped cpu_tiny.yaml on the benchmark data; its set-up record and tokens/s."""
    command = [
        str(Path(sys.executable).parent / "tune"),
        "run",
        "recipes/higgs_finetune",
        "--config",
        "configs/cpu_tiny.yaml",
        f"checkpointer.checkpoint_dir={data / 'checkpoint'}",
        f"tokenizer.path={TOKENIZER}",
        f"dataset.path={data / 'train.jsonl'}",
        f"seq_len={seq_len}",
        f"output_dir={output_dir}",
        f"max_steps={max_steps}",
        "log_every_n_steps=5",
        f"save_every_n_steps={max_steps}",
        "generation.num_prompts=0",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tune run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    setup = next(r for r in records if "setup/train_rows" in r)
    windows = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    return {
        "rows": setup["setup/train_rows"],
        "capacities": {name: setup[f"setup/train_{name}_capacity"] for name in NAMES},
        "padding": {
            "seq": setup["setup/train_padding_fraction"],
            **{name: setup[f"setup/train_{name}_padding_fraction"] for name in NAMES},
        },
        "tokens_per_s_windows": windows,
        "tokens_per_s": statistics.median(windows[1:]) if len(windows) > 1 else windows[0],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder written by make_tts_benchmark.py")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--reference-batch", type=int, default=8, help="samples per reference step")
    parser.add_argument("--reference-steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_packing"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    cli = parser.parse_args(argv)
    results = []
    for seq_len in cli.seq_lens:
        before = reference_tokens_per_s(cli.data, cli.reference_batch, cli.reference_steps, warmup=1)
        print(f"seq_len {seq_len}: reference {before:.1f} tokens/s (before)", file=sys.stderr, flush=True)
        ours = tune_run(cli.data, seq_len, cli.max_steps, cli.out / f"seq_{seq_len}")
        print(f"seq_len {seq_len}: ours {ours}", file=sys.stderr, flush=True)
        after = reference_tokens_per_s(cli.data, cli.reference_batch, cli.reference_steps, warmup=1)
        reference = (before + after) / 2
        result = {"seq_len": seq_len, **ours, "reference_tokens_per_s": [before, after]}
        result["ratio"] = ours["tokens_per_s"] / reference
        results.append(result)
        padding = " ".join(f"{k}={v:.3f}" for k, v in ours["padding"].items())
        capacities = " ".join(f"{k}={v}" for k, v in ours["capacities"].items())
        print(
            f"| {seq_len} | {ours['rows']} | {capacities} | {padding} | {ours['tokens_per_s']:.0f} | "
            f"{reference:.0f} | {result['ratio']:.2f}x |",
            flush=True,
        )
    if cli.json:
        cli.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
