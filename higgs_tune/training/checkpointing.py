"""Recipe checkpoints: everything needed to continue a run exactly where it stopped, on the same or
on another number of ranks.

One checkpoint is a folder ``<output_dir>/checkpoints/step_<N>`` holding::

    .metadata, __<rank>_0.distcp   model + optimizer state, written by torch.distributed.checkpoint
                                   (DCP): every rank writes its own shards; any number of ranks reads
                                   them back (DCP re-slices FSDP shards for the new world size)
    training_state.pt              rank 0's picklable recipe state: LR scheduler, data position,
                                   every rank's RNG states
    meta.json                      step, epoch, world size, format version, and for a trainable-only
                                   checkpoint the fingerprint of its frozen base

The same format serves one process (plain tensors) and FSDP runs (DTensor shards): the state dicts come
from ``torch.distributed.checkpoint.state_dict.get_state_dict``, whose keys are the model's clean
parameter names (no FSDP / compile / activation-checkpoint wrapper prefixes).

Runs that freeze part of the model (LoRA, audio adapter) save only what trains: the trainable
parameters and their optimizer state (``StateDictOptions(ignore_frozen_params=True)``), plus a
:class:`BaseFingerprint` of the frozen weights. At resume the run loads its base as usual (from its
config), :func:`load_checkpoint` refuses a base whose fingerprint differs and a different set of
trainable parameters, and loads the trainable state over the base. Full fine-tuning checkpoints hold
every parameter and carry no fingerprint.

Writes are atomic: all ranks write into a hidden temporary folder that rank 0 renames into place once
every file is complete, so a crash or a kill during a save never leaves a half-written ``step_<N>``:
the previous checkpoint stays the latest complete one. The newest ``keep_last`` are kept. Every
failure (unwritable folder, disk full, a missing, truncated or corrupt file) is a
:class:`CheckpointError` naming the path, raised on every rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

FORMAT_VERSION = 2
_STEP_DIR = re.compile(r"^step_(\d+)$")
META_FILE, TRAINING_STATE_FILE, DCP_METADATA_FILE = "meta.json", "training_state.pt", ".metadata"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns besides the model and optimizer state it loads in place."""

    path: Path
    step: int
    epoch: int
    world_size: int
    training_state: dict[str, Any]


@dataclass(frozen=True)
class BaseFingerprint:
    """The frozen weights a trainable-only checkpoint was trained on.

    ``source``: where they came from (the base checkpoint directory, or a random initialisation), for
    messages; ``sha256``: what identifies them, compared at resume (see :func:`fingerprint_frozen_base`).
    """

    source: str
    sha256: str


def fingerprint_frozen_base(
    model: nn.Module, source: str, model_config: dict[str, Any], sample_bytes: int = 64
) -> BaseFingerprint | None:
    """Fingerprint the frozen parameters of ``model`` as loaded (before FSDP sharding: plain tensors);
    None when every parameter trains.

    The hash covers ``model_config`` (the architecture, JSON), then for every frozen parameter in name
    order its name, dtype, shape and its first ``sample_bytes`` bytes (two bases of one architecture
    differ there): milliseconds even at 3B, where hashing all weights would read gigabytes.
    """
    frozen = sorted((name, p) for name, p in model.named_parameters() if not p.requires_grad)
    if not frozen:
        return None
    digest = hashlib.sha256(json.dumps(model_config, sort_keys=True).encode())
    for name, param in frozen:
        digest.update(f"{name}|{param.dtype}|{tuple(param.shape)}|".encode())
        flat = param.detach().reshape(-1)
        head = flat[: max(1, sample_bytes // flat.element_size())] if flat.numel() else flat
        digest.update(head.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return BaseFingerprint(source=source, sha256=digest.hexdigest())


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


def save_checkpoint(
    root: str | Path,
    *,
    step: int,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    training_state: dict[str, Any],
    keep_last: int = 2,
    frozen_base: BaseFingerprint | None = None,
) -> Path:
    """Write ``root/step_<N>`` atomically, then delete all but the newest ``keep_last`` checkpoints.

    Collective when a process group is initialised: every rank calls it; ``training_state`` is taken
    from rank 0 (gather per-rank values into it first). With ``frozen_base`` (the fingerprint of the
    frozen parameters) only the trainable parameters and their optimizer state are written.

    Raises:
        CheckpointError: on every rank, when any rank cannot write (disk full, permissions); the
            previous checkpoints are untouched.
    """
    root = Path(root)
    final = root / f"step_{step:08d}"
    rank, world_size = _rank_and_world_size()

    tmp: Path | None = None
    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        except OSError as exc:
            error = f"cannot write checkpoint under {root}: {exc}"
    tmp, error = _from_rank_zero((tmp, error))
    if error is not None:
        raise CheckpointError(error)
    assert tmp is not None

    error = None
    try:
        options = StateDictOptions(ignore_frozen_params=frozen_base is not None)
        model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
        with _single_process_is_intended():
            dcp.save(
                {"model": model_state, "optimizer": optimizer_state},
                checkpoint_id=tmp,
                no_dist=world_size == 1,
            )
    except (Exception, CheckpointException) as exc:  # DCP raises the same exception on every rank
        error = f"cannot write checkpoint {final}: {_describe(exc)}{_free_space_hint(root)}"
    if error is None and rank == 0:
        try:
            torch.save(training_state, tmp / TRAINING_STATE_FILE)
            meta = {"format_version": FORMAT_VERSION, "step": step, "epoch": epoch, "world_size": world_size}
            if frozen_base is not None:
                meta["frozen_base"] = {"source": frozen_base.source, "sha256": frozen_base.sha256}
            (tmp / META_FILE).write_text(json.dumps(meta))
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as exc:
            error = f"cannot write checkpoint {final}: {_describe(exc)}{_free_space_hint(root)}"
    error = _first_error(error)
    if error is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        raise CheckpointError(error)
    if rank == 0:
        for old in checkpoint_dirs(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in root.glob(".step_*"):  # temporary folders of saves killed midway
            shutil.rmtree(leftover, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    frozen_base: BaseFingerprint | None = None,
) -> Checkpoint:
    """Load the model and optimizer state of the checkpoint folder ``path`` in place (collective), and
    return the rest.

    A trainable-only checkpoint loads over the frozen base the model already holds: ``frozen_base``
    (this run's fingerprint of it) must equal the one it was saved with, and the model's trainable
    parameters must be the ones it holds. A full checkpoint loads every parameter.

    Raises:
        CheckpointError: a missing, truncated or corrupt file, named; another base; other trainable
            parameters.
    """
    path = Path(path)
    meta = verify_checkpoint(path)
    trainable_only = "frozen_base" in meta
    if trainable_only:
        _check_frozen_base(path, meta["frozen_base"], frozen_base)
    training_state = read_training_state(path)
    model_state, optimizer_state = get_state_dict(
        model, optimizer, options=StateDictOptions(ignore_frozen_params=trainable_only)
    )
    if trainable_only:
        _check_stored_parameters(path, set(model_state))
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=path, no_dist=_rank_and_world_size()[1] == 1)
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"cannot load model/optimizer state from {path}: {_describe(exc)}") from exc
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        # trainable-only: the frozen base stays as loaded (the stored names were checked above)
        options=StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only),
    )
    return Checkpoint(
        path=path,
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        world_size=int(meta["world_size"]),
        training_state=training_state,
    )


def read_training_state(path: str | Path) -> dict[str, Any]:
    """The recipe state saved in ``path``'s ``training_state.pt``; a truncated or corrupt file is a
    :class:`CheckpointError` naming it."""
    file = Path(path) / TRAINING_STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read {file} (truncated or corrupt?): {exc}") from exc


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check that every file of the checkpoint is present and as long as its index says, before any
    loading starts; returns meta.json's content.

    Raises:
        CheckpointError: naming the first missing, truncated or unreadable file.
    """
    path = Path(path)
    for name in (META_FILE, TRAINING_STATE_FILE, DCP_METADATA_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path / META_FILE}: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path / META_FILE}: format_version {meta.get('format_version')}, expected {FORMAT_VERSION}"
        )
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read {path / DCP_METADATA_FILE} (truncated or corrupt?): {exc}"
        ) from exc
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if file.stat().st_size < size:
            raise CheckpointError(f"{file} is truncated: {file.stat().st_size} bytes, its index needs {size}")
    return meta


# ---------------------------------------------------------------------------------------------- helpers
def _check_frozen_base(path: Path, saved: dict[str, str], current: BaseFingerprint | None) -> None:
    if current is None:
        raise CheckpointError(
            f"{path} holds only the trainable parameters of a run on the frozen base {saved['source']}, "
            "but every parameter of this model trains: resume with the run's finetune settings"
        )
    if saved["sha256"] != current.sha256:
        raise CheckpointError(
            f"{path} was trained on the base {saved['source']} (fingerprint {saved['sha256'][:12]}), "
            f"this run's base {current.source} has fingerprint {current.sha256[:12]}: resume with the "
            "base it was trained on (checkpointer.checkpoint_dir, model, seed and dtype as then)"
        )


def _check_stored_parameters(path: Path, expected: set[str]) -> None:
    """The model parameters a trainable-only checkpoint stores must be the ones that train now."""
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    stored = {key.removeprefix("model.") for key in keys if key.startswith("model.")}
    missing, unexpected = sorted(expected - stored), sorted(stored - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} stores other trainable parameters than this run trains (LoRA targets, rank or "
            f"finetune mode changed?): {len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}"
        )


def _describe(exc: BaseException) -> str:
    """One line: the exception, or for DCP's CheckpointException the first failing rank's exception."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (cause, _) = next(iter(sorted(exc.failures.items(), key=lambda item: item[0])))
        return f"rank {rank}: {type(cause).__name__}: {cause}".replace("\n", " ")
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def _free_space_hint(root: Path) -> str:
    try:
        free = shutil.disk_usage(root).free / 2**30
    except OSError:
        return ""
    return f" (disk full or folder not writable? {free:.1f} GiB free under {root})"


def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """Silence DCP's warning that it saves/loads in one process (it is what a 1-process run wants)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _first_error(error: str | None) -> str | None:
    """The first rank's error message, on every rank (None when no rank failed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
