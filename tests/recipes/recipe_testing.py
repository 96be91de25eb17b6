"""Running recipes/higgs_finetune as a user types it (``tune run ...`` in a subprocess), for the recipe
tests: the command with the small test overrides, and readers of its metrics.jsonl."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TUNE = str(Path(sys.executable).parent / "tune")
# A user's shell: no PYTHONPATH (the `tune` command must not need one).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def make_synthetic(out: Path, num_samples: int = 240) -> Path:
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "make_synthetic.py"),
            "--out",
            str(out),
            "--num-samples",
            str(num_samples),
        ],
        check=True,
        capture_output=True,
    )
    return out


def recipe_command(
    output_dir: Path, synthetic: Path, *extra: str, nproc: int = 1, torchrun_args: tuple[str, ...] = ()
) -> list[str]:
    """``tune run [--nproc_per_node N] recipes/higgs_finetune --config configs/cpu_tiny.yaml`` with the
    smallest model, short rows, eager steps and every step logged; ``extra`` overrides come last."""
    launcher = ["run"] if nproc == 1 else ["run", "--nproc_per_node", str(nproc), *torchrun_args]
    return [
        TUNE,
        *launcher,
        "recipes/higgs_finetune",
        "--config",
        "configs/cpu_tiny.yaml",
        f"output_dir={output_dir}",
        f"dataset.path={synthetic / 'train.jsonl'}",
        f"dataset.val_path={synthetic / 'val.jsonl'}",
        "seq_len=256",
        "dataset.text_ffn_capacity=128",
        "dataset.audio_ffn_capacity=256",
        "dataset.text_target_capacity=64",
        "dataset.audio_target_capacity=256",
        "log_every_n_steps=1",
        "compile=false",  # eager here: each run would otherwise pay the compile warm-up
        # the smallest model (the demo's is bigger): these tests check the recipe, not the demo's quality
        "model.hidden_size=64",
        "model.num_layers=2",
        "model.head_dim=16",
        "model.num_heads=4",
        "model.num_kv_heads=2",
        "model.intermediate_size=128",
        "generation.num_prompts=0",
        "loss.codebook_reduction=mean",  # Boson's reference formula (the demo config sums the codebooks,
        "loss.codebook_weights=null",  # codebook 0 weighted 4)
        *extra,
    ]


def run_recipe(
    output_dir: Path,
    synthetic: Path,
    *extra: str,
    nproc: int = 1,
    torchrun_args: tuple[str, ...] = (),
    expect_success: bool = True,
    **popen,
) -> subprocess.CompletedProcess:
    """Run the recipe to its end; by default assert that it succeeded (stderr's tail in the message)."""
    args = recipe_command(output_dir, synthetic, *extra, nproc=nproc, torchrun_args=torchrun_args)
    popen = {"cwd": REPO, "env": ENV, **popen}
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False, **popen)
    if expect_success:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rendezvous_args() -> tuple[str, ...]:
    """torchrun's multi-node options (c10d rendezvous on this machine, one node)."""
    return (
        "--nnodes",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv_id",
        "t",
    )


def records_all(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def read_metrics(output_dir: Path) -> list[dict]:
    """The training-step records (validation, generation and fault records carry no "loss")."""
    return [record for record in records_all(output_dir) if "loss" in record]


def losses_by_step(output_dir: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run logs the steps after its checkpoint again)."""
    return {record["step"]: record["loss"] for record in read_metrics(output_dir)}
