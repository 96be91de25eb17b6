"""Soak test of checkpoint/resume: train a few hundred steps while killing the job (SIGKILL to the whole
process group, torchrun and its ranks included) at random moments, some of them during a checkpoint
write, resume each time, and compare the final per-step loss curve with an uninterrupted run.

    python tools/soak.py --out /tmp/soak [--steps 300] [--nproc 1] [--kills 8] [--seed 0] [override ...]

Both runs use ``recipes/higgs_finetune`` with ``configs/cpu_tiny.yaml`` and the small-model overrides
below (eager steps, a 1.3 M-parameter model, 256-position rows), then the given ``key=value`` overrides.
The synthetic data set is made under ``--out`` if it is not there. Prints one JSON object: steps
completed, kills (and how many hit a checkpoint write), resumes, steps whose loss equals the
uninterrupted run's exactly, the largest difference, and wall times. Not a test: a benchmark of
robustness (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = (
    "seq_len=256",
    "dataset.text_ffn_capacity=128",
    "dataset.audio_ffn_capacity=256",
    "dataset.text_target_capacity=64",
    "dataset.audio_target_capacity=256",
    "compile=false",
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.head_dim=16",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "generation.num_prompts=0",
    "eval_every_n_steps=null",
    "log_every_n_steps=1",
)


def recipe_command(output_dir: Path, data: Path, args: argparse.Namespace, resume: bool) -> list[str]:
    tune = str(Path(sys.executable).parent / "tune")
    launcher = ["run"] if args.nproc == 1 else ["run", "--nproc_per_node", str(args.nproc)]
    return [
        tune,
        *launcher,
        "recipes/higgs_finetune",
        "--config",
        "configs/cpu_tiny.yaml",
        f"output_dir={output_dir}",
        f"dataset.path={data / 'train.jsonl'}",
        f"dataset.val_path={data / 'val.jsonl'}",
        *SMALL_MODEL,
        f"max_steps={args.steps}",
        f"batch_size={args.batch_size}",
        f"save_every_n_steps={args.save_every}",
        f"resume_from_checkpoint={'true' if resume else 'false'}",
        *args.overrides,
    ]


def losses_by_step(output_dir: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run logs the steps after its checkpoint again)."""
    losses: dict[int, float] = {}
    metrics = output_dir / "metrics.jsonl"
    if not metrics.is_file():
        return losses
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def logged_steps(output_dir: Path) -> int:
    return max(losses_by_step(output_dir), default=0)


def saving_now(output_dir: Path) -> bool:
    """A checkpoint is being written: its hidden temporary folder exists."""
    root = output_dir / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".step_") for p in root.iterdir())


def run_to_completion(command: list[str], log: Path) -> float:
    start = time.monotonic()
    with open(log, "a") as handle:
        subprocess.run(command, cwd=REPO, stdout=handle, stderr=handle, check=True)
    return time.monotonic() - start


def soak(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    out = Path(args.out)
    data = out / "data"
    if not (data / "train.jsonl").is_file():
        subprocess.run(
            [
                sys.executable,
                str(REPO / "tools" / "make_synthetic.py"),
                "--out",
                str(data),
                "--num-samples",
                "480",
            ],
            check=True,
            capture_output=True,
        )
    reference, interrupted = out / "uninterrupted", out / "interrupted"
    for folder in (reference, interrupted):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)

    reference_s = run_to_completion(
        recipe_command(reference, data, args, resume=False), reference / "log.txt"
    )

    kills, kills_during_save, resumes, launches = 0, 0, 0, 0
    start = time.monotonic()
    while True:
        resume = (interrupted / "checkpoints").is_dir() and any((interrupted / "checkpoints").glob("step_*"))
        resumes += resume
        launches += 1
        with open(interrupted / "log.txt", "a") as log:
            process = subprocess.Popen(
                recipe_command(interrupted, data, args, resume),
                cwd=REPO,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own process group: the kill reaches torchrun's ranks
            )
        # Kill somewhere in the next 1..2 checkpoint intervals, or while the next checkpoint is written.
        target = logged_steps(interrupted) + rng.randint(1, 2 * args.save_every)
        during_save = rng.random() < args.kill_during_save
        killed = False
        while process.poll() is None:
            if kills < args.kills and (
                (during_save and saving_now(interrupted))
                or (not during_save and logged_steps(interrupted) >= target)
            ):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                kills += 1
                kills_during_save += during_save
                killed = True
                break
            time.sleep(0.005)
        if not killed:
            if process.returncode != 0:
                raise RuntimeError(
                    f"the run failed (exit {process.returncode}); see {interrupted / 'log.txt'}"
                )
            break
    interrupted_s = time.monotonic() - start

    expected, observed = losses_by_step(reference), losses_by_step(interrupted)
    common = sorted(set(expected) & set(observed))
    exact = sum(expected[s] == observed[s] for s in common)
    max_diff = max((abs(expected[s] - observed[s]) for s in common), default=float("nan"))
    return {
        "steps": args.steps,
        "nproc": args.nproc,
        "steps_completed": len(observed),
        "kills": kills,
        "kills_during_checkpoint_write": kills_during_save,
        "resumes": resumes,
        "launches": launches,
        "steps_equal_to_uninterrupted": exact,
        "max_abs_loss_difference": max_diff,
        "curve_matches": len(observed) == args.steps and exact == args.steps,
        "uninterrupted_s": round(reference_s, 1),
        "interrupted_s": round(interrupted_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="working folder (data, both runs, logs)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (2: FSDP over gloo)")
    parser.add_argument("--batch-size", type=int, default=2, help="rows per micro-batch per process")
    parser.add_argument("--save-every", type=int, default=20, help="save_every_n_steps")
    parser.add_argument("--kills", type=int, default=8, help="how many times the job is killed")
    parser.add_argument("--kill-during-save", type=float, default=0.3, help="share of kills aimed at a save")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("overrides", nargs="*", help="more key=value config overrides")
    args = parser.parse_args(argv)
    print(json.dumps(soak(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
