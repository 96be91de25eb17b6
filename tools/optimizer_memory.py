"""Measure the peak memory of full fine-tuning with each optimizer option (relative figures).

    python tools/optimizer_memory.py                 # CPU: peak RSS of each variant in its own process
    python tools/optimizer_memory.py --device cuda   # CUDA: torch.cuda.max_memory_allocated

Variants (parameter dtype / optimizer / step): fp32 AdamW, fp32 AdamW8bit (torchao), fp32 AdamW with bf16
moments (``moment_dtype: bf16``), fp32 AdamW (fp32 or bf16 moments) in backward (step mode
``optimizer_in_backward``, each gradient freed after its parameter's update; no clipping), bf16 AdamW
(bf16 moments), bf16 + fp32 master weights + AdamW (fp32 moments and update), bf16 AdamW8bit. Each runs
``--steps`` training steps (eager model: no compilation) of the model of ``tools/bench.py --config
<config>`` on one packed batch, in a fresh interpreter (so one variant's memory never counts for
another), and reports its peak memory, the memory right after building the model (the baseline) and the
difference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
IN_BACKWARD = dict(in_backward=True)
VARIANTS = {  # name: (parameter dtype, build_optimizer options)
    "fp32_adamw": ("fp32", dict(name="adamw")),
    "fp32_adamw8bit": ("fp32", dict(name="adamw8bit")),
    "fp32_adamw_bf16_moments": ("fp32", dict(name="adamw", moment_dtype="bf16")),
    "fp32_adamw_in_backward": ("fp32", dict(name="adamw", **IN_BACKWARD)),
    "fp32_adamw_bf16_moments_in_backward": ("fp32", dict(name="adamw", moment_dtype="bf16", **IN_BACKWARD)),
    "bf16_adamw": ("bf16", dict(name="adamw")),
    "bf16_master_adamw": ("bf16", dict(name="adamw", master_weights=True)),
    "bf16_adamw8bit": ("bf16", dict(name="adamw8bit")),
}


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(variant: str, config: str, steps: int, device: torch.device, data_dir: Path) -> dict[str, float]:
    sys.path.insert(0, str(REPO / "tools"))
    import bench

    from higgs_tune.loss import AlignedLoss
    from higgs_tune.models.higgs_audio.builders import build_model
    from higgs_tune.training.optim import build_optimizer
    from higgs_tune.training.step import build_train_step

    dtype_name, optimizer_options = VARIANTS[variant]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    cfg = bench.CONFIGS[config]
    args = bench.model_args(cfg)
    dataset, _ = bench.build_rows(cfg, data_dir, args)
    batch = bench.our_batches(dataset, bench.step_rows(dataset, 1, cfg.batch_size))[0]
    batch = {k: v.to(device) for k, v in batch.items()}
    torch.manual_seed(0)
    from torchtune.training import set_default_dtype

    with set_default_dtype(dtype):  # built in ``dtype`` directly: no fp32 copy raises the peak first
        model = build_model(args, device=device, dtype=dtype)
    num_params = sum(p.numel() for p in model.parameters())
    after_model = peak_gib(device)
    optimizer = build_optimizer(model.parameters(), lr=1e-5, **optimizer_options)
    # Eager blocks and loss in every variant; an optimizer in backward cannot clip the global norm.
    max_grad_norm = None if optimizer_options.get("in_backward") else 1.0
    step = build_train_step("eager", model, AlignedLoss(), optimizer, None, max_grad_norm)
    losses = [float(step([batch])["loss"]) for _ in range(steps)]
    peak = peak_gib(device)
    return {
        "params_millions": num_params / 1e6,
        "after_model_gib": after_model,
        "peak_gib": peak,
        "training_gib": peak - after_model,
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cpu3b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # one variant, in this process
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=None)
    cli = parser.parse_args(argv)
    if cli.threads:
        torch.set_num_threads(cli.threads)
    device = torch.device(cli.device)
    if cli.variant is not None:
        print(json.dumps(measure(cli.variant, cli.config, cli.steps, device, Path(cli.data_dir))))
        return
    variants = cli.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = cli.data_dir or tmp
        for variant in variants:
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--variant",
                variant,
                "--config",
                cli.config,
                "--device",
                cli.device,
                "--steps",
                str(cli.steps),
                "--data-dir",
                data_dir,
            ]
            if cli.threads:
                command += ["--threads", str(cli.threads)]
            env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                results[variant] = {
                    "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"
                }
                print(f"{variant} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    memory = "peak CUDA memory" if device.type == "cuda" else "peak RSS"
    print(
        f"config `{cli.config}`, device {cli.device}, {cli.steps} eager steps, {torch.get_num_threads()} threads\n"
    )
    print(f"| variant | params (M) | after model build (GiB) | {memory} (GiB) | training - build (GiB) |")
    print("|---|---|---|---|---|")
    for variant, r in results.items():
        if "error" in r:
            print(f"| {variant} | FAILED: {r['error'][:120]} | | | |")
            continue
        print(
            f"| {variant} | {r['params_millions']:.1f} | {r['after_model_gib']:.2f} | {r['peak_gib']:.2f} | "
            f"{r['training_gib']:.2f} |"
        )


if __name__ == "__main__":
    main()
