"""Recipe checkpoints: everything needed to continue a run exactly where it stopped.

One checkpoint is a folder ``<output_dir>/checkpoints/step_<N>`` holding::

    model.safetensors      the model's trainable AND frozen tensors (state-dict names)
    training_state.pt      optimizer, LR scheduler, data loader position, RNG states
    meta.json              step, epoch, format version

It is written to a hidden temporary folder first and renamed into place, so a crash or a kill during
a save never leaves a half-written ``step_<N>``: the previous checkpoint stays the latest complete one.
The newest ``keep_last`` checkpoints are kept. Loading a damaged file is an error naming the file.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path."""


@dataclass
class TrainingState:
    step: int
    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any] | None
    data_loader: dict[str, Any]
    rng: dict[str, Any]


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(root: str | Path, state: TrainingState, keep_last: int = 2) -> Path:
    """Write ``root/step_<N>`` atomically, then delete all but the newest ``keep_last`` checkpoints.

    Raises:
        CheckpointError: the folder cannot be written (disk full, permissions); the previous
            checkpoints are untouched.
    """
    root = Path(root)
    final = root / f"step_{state.step:08d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint under {root}: {exc}") from exc
    try:
        model = {k: v.detach().contiguous().cpu() for k, v in state.model.items()}
        save_file(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(
            {
                "optimizer": state.optimizer,
                "lr_scheduler": state.lr_scheduler,
                "data_loader": state.data_loader,
                "rng": state.rng,
            },
            tmp / "training_state.pt",
        )
        meta = {"format_version": FORMAT_VERSION, "step": state.step, "epoch": state.epoch}
        (tmp / "meta.json").write_text(json.dumps(meta))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise CheckpointError(f"cannot write checkpoint {final}: {exc}") from exc
        raise
    for old in checkpoint_dirs(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> TrainingState:
    """Read a checkpoint folder written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: a missing or damaged file, named.
    """
    path = Path(path)
    meta_file, model_file, state_file = (
        path / "meta.json",
        path / "model.safetensors",
        path / "training_state.pt",
    )
    for file in (meta_file, model_file, state_file):
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {file.name} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {meta_file}: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_file}: format_version {meta.get('format_version')}, expected {FORMAT_VERSION}"
        )
    try:
        model = load_file(str(model_file))
    except Exception as exc:  # safetensors raises its own error types for truncated headers/data
        raise CheckpointError(f"cannot read {model_file} (truncated or corrupt?): {exc}") from exc
    try:
        training = torch.load(state_file, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read {state_file} (truncated or corrupt?): {exc}") from exc
    return TrainingState(
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        model=model,
        optimizer=training["optimizer"],
        lr_scheduler=training["lr_scheduler"],
        data_loader=training["data_loader"],
        rng=training["rng"],
    )


def _fsync_dir(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
