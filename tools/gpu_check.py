"""The GPU checks in one go: step-mode numerics on CUDA, then the 3B benchmark; prints a markdown block
for docs/benchmarks.md.

    python tools/gpu_check.py                      # numerics + 3B benchmark (compile and cudagraph)
    python tools/gpu_check.py --skip-bench         # numerics only (about a minute)
    python tools/gpu_check.py --device cpu --skip-bench   # the eager/compile part, to test the script

1. Numerics: the tiny model, 5 optimizer steps with gradient accumulation 2 on the same synthetic packed
   batches, in every mode (eager, compile, functional, cudagraph with eager fused AdamW, cudagraph with
   the optimizer captured), fp32. Reports the largest loss and parameter difference to eager.
2. Benchmark: ``tools/bench.py --config 3b --device cuda`` for our ``compile`` and ``cudagraph`` modes
   against the reference step (bf16), tokens/s, step time, peak memory, MFU.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

NUM_STEPS, ACCUMULATION = 5, 2


def numerics(device: torch.device, data_dir: Path) -> list[str]:
    """Markdown table rows: mode, max |loss - eager| relative, max |param - eager|."""
    import bench

    from higgs_tune.loss import AlignedLoss
    from higgs_tune.loss import aligned_loss as aligned_loss_module
    from higgs_tune.training.optim import build_optimizer
    from higgs_tune.training.step import build_train_step

    cfg = bench.CONFIGS["small"]
    args = bench.model_args(cfg)
    dataset, _ = bench.build_rows(cfg, data_dir, args)
    steps = bench.step_rows(dataset, NUM_STEPS * ACCUMULATION, cfg.batch_size)
    batches = [{k: v.to(device) for k, v in b.items()} for b in bench.our_batches(dataset, steps)]

    def transform_safe_loss():
        try:
            return AlignedLoss(checkpoint_text_chunks=False)
        except TypeError:
            aligned_loss_module.checkpoint = lambda fn, *a, use_reentrant: fn(*a)  # this script only
            return AlignedLoss()

    def train(mode: str, **options):
        from higgs_tune.models.higgs_audio.builders import build_model

        torch.manual_seed(0)
        model = build_model(args, device=device, dtype=torch.float32)
        optimizer = build_optimizer(
            model.parameters(),
            lr=1e-3,
            betas=(0.9, 0.95),
            weight_decay=0.01,
            **bench.optimizer_kind(mode, device, options),
        )
        from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

        scheduler = get_cosine_schedule_with_warmup(optimizer, 2, NUM_STEPS)
        loss_fn = transform_safe_loss() if mode == "functional" else AlignedLoss()
        step = build_train_step(mode, model, loss_fn, optimizer, scheduler, 1.0, **options)
        losses = []
        for i in range(NUM_STEPS):
            losses.append(step(batches[i * ACCUMULATION : (i + 1) * ACCUMULATION])["loss"].item())
        return torch.tensor(losses), [p.detach().float().cpu() for p in model.parameters()]

    reference_losses, reference_params = train("eager")
    rows = [f"| eager | {', '.join(f'{x:.4f}' for x in reference_losses.tolist())} | 0 | 0 |"]
    variants = [("compile", {}), ("functional", {})]
    if device.type == "cuda":
        variants += [
            ("cudagraph", {"capture_optimizer": False}),
            ("cudagraph", {"capture_optimizer": True}),
            ("cudagraph", {"capture": False}),
        ]
    for mode, options in variants:
        name = mode + (f" {options}" if options else "")
        try:
            losses, params = train(mode, **options)
            loss_diff = ((losses - reference_losses).abs() / reference_losses.abs()).max().item()
            param_diff = max((p - q).abs().max().item() for p, q in zip(params, reference_params))
            rows.append(
                f"| {name} | {', '.join(f'{x:.4f}' for x in losses.tolist())} | {loss_diff:.2e} | {param_diff:.2e} |"
            )
        except Exception as error:  # report and go on: the other modes' numbers are still wanted
            traceback.print_exc()
            rows.append(f"| {name} | FAILED: {type(error).__name__}: {str(error)[:200]} | | |")
        torch._dynamo.reset()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--bench-config", default="3b")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    cli = parser.parse_args(argv)
    device = torch.device(cli.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check.py: CUDA is not available on this machine (use --device cpu to test the script)"
        )

    import bench

    out = ["## GPU results", ""]
    if device.type == "cuda":
        out.append(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    out += [
        "",
        f"### Step-mode numerics (tiny model, fp32, {NUM_STEPS} steps x accumulation {ACCUMULATION}, `python tools/gpu_check.py`)",
        "",
        "| mode | losses | max rel. loss diff to eager | max abs. param diff to eager |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out += numerics(device, Path(tmp) / "numerics")
        print(f"numerics took {time.perf_counter() - start:.0f} s", file=sys.stderr)
        if not cli.skip_bench:
            for mode in ("compile", "cudagraph"):
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                out += ["", f"### Benchmark `{cli.bench_config}`, our mode `{mode}`", ""]
                command = [
                    "--config",
                    cli.bench_config,
                    "--device",
                    cli.device,
                    "--mode",
                    mode,
                    "--steps",
                    str(cli.steps),
                    "--warmup",
                    str(cli.warmup),
                    "--data-dir",
                    str(Path(tmp) / "bench"),
                ]
                out.append(f"`python tools/bench.py {' '.join(command[:-2])}`")
                out.append("")
                try:
                    out.append(bench.markdown(bench.main(command)))
                except Exception as error:
                    traceback.print_exc()
                    out.append(f"FAILED: {type(error).__name__}: {str(error)[:300]}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
