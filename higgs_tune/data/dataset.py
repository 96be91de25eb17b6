"""The packed data set and its resumable loader.

Set-up happens once, before training (:func:`build_higgs_dataset`):

1. scan the manifest (:func:`~higgs_tune.data.manifest.scan_manifest`: every line validated, bad samples
   an error or a counted skip, each good sample sized as :class:`~higgs_tune.data.document.DocStats`);
2. split off validation samples (a seeded fraction of the SAMPLES, before packing, or a separate file);
3. plan the packed rows (:func:`~higgs_tune.data.packer.plan_rows`, first-fit decreasing over the
   stats, deterministic given the scan and the seed; too-long documents dropped and counted, or an error).

:class:`HiggsPackedDataset` is a map-style data set over those ROWS: item ``i`` is the list of
:class:`~higgs_tune.data.document.Document` of row ``i``, built on access from the manifest line and its
codes files. :func:`build_dataloader` batches rows into the static-shape batch of
:mod:`higgs_tune.data.batch` with a ``StatefulDataLoader`` whose ``state_dict`` resumes exactly (see its
docstring for the epoch protocol).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from higgs_tune.data.batch import CapacityError, PackingSpec
from higgs_tune.data.capacities import (
    AUTO,
    CAPACITY_NAMES,
    Capacity,
    auto_names,
    fixed_spec,
    padding_fractions,
    shrink_to_rows,
)
from higgs_tune.data.document import AudioLayout, Document
from higgs_tune.data.manifest import ManifestEntry, OnBadSample, load_document, scan_manifest
from higgs_tune.data.packer import TooLongPolicy, collate_rows, plan_balanced_rows, plan_rows, row_limits
from higgs_tune.data.tokenizer import HiggsTokenizer

logger = logging.getLogger(__name__)

# Sampler index of an all-padding row: fills the last batch (and evens out ranks) when drop_last=False.
EMPTY_ROW = -1


class HiggsPackedDataset(Dataset):
    """Map-style data set over packed rows.

    Args:
        entries: the scanned samples (documents) the rows refer to.
        rows: the packing plan, each row a list of indices into ``entries``.
        tokenizer: text tokenizer (its pad id pads the rows).
        layout: the model's audio settings.
        spec: the static shapes the rows were planned for.

    ``dataset[i]`` is the list of Documents of row ``i``; ``dataset[EMPTY_ROW]`` is ``[]`` (all padding).
    """

    def __init__(
        self,
        entries: Sequence[ManifestEntry],
        rows: Sequence[Sequence[int]],
        tokenizer: HiggsTokenizer,
        layout: AudioLayout,
        spec: PackingSpec,
    ) -> None:
        if layout.num_codebooks != spec.num_codebooks:
            raise ValueError(
                f"audio layout has {layout.num_codebooks} codebooks, packing spec {spec.num_codebooks}"
            )
        self.entries = list(entries)
        self.rows = [list(row) for row in rows]
        self.tokenizer = tokenizer
        self.layout = layout
        self.spec = spec

    @property
    def pad_id(self) -> int:
        return self.tokenizer.special.pad

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[Document]:
        if index == EMPTY_ROW:
            return []
        if not 0 <= index < len(self.rows):
            raise IndexError(f"row {index} out of range 0..{len(self.rows) - 1}")
        return [load_document(self.entries[i], self.tokenizer, self.layout) for i in self.rows[index]]

    def num_documents(self) -> int:
        return sum(len(row) for row in self.rows)

    def padding_fraction(self) -> float:
        """Fraction of the rows' positions that are padding (0.0 for an empty data set)."""
        return self.padding_fractions()["seq"]

    def padding_fractions(self) -> dict[str, float]:
        """Padding share of the row positions (``seq``) and of each per-row capacity (``text_ffn``,
        ``audio_ffn``, ``text_target``, ``audio_target``), see
        :func:`~higgs_tune.data.capacities.padding_fractions`."""
        return padding_fractions([entry.stats for entry in self.entries], self.rows, self.spec)

    def capacities(self) -> dict[str, int]:
        """The four per-row capacities the rows were packed for, as numbers."""
        return {name: self.spec.capacity(name) for name in CAPACITY_NAMES}


def pack_entries(
    entries: Sequence[ManifestEntry],
    spec: PackingSpec,
    *,
    too_long: TooLongPolicy,
    seed: int,
    auto: Sequence[str] = (),
) -> tuple[list[ManifestEntry], list[list[int]], list[ManifestEntry], PackingSpec]:
    """Plan the packed rows of ``entries`` (deterministic given the entries, ``spec``, ``auto`` and ``seed``).

    The entries are put in a seeded order first (the planners break length ties by position). With
    explicit capacities only, :func:`~higgs_tune.data.packer.plan_rows` (first-fit decreasing) assigns
    them to rows; with ``auto`` capacities (their values in ``spec`` are ignored),
    :func:`~higgs_tune.data.packer.plan_balanced_rows` does, and each of them becomes the largest use
    over the rows (:func:`~higgs_tune.data.capacities.shrink_to_rows`).

    Returns:
        ``(ordered_entries, rows, dropped, spec)``: rows index into ``ordered_entries``; ``dropped`` are the
        entries that alone exceed ``seq_len`` or an explicit capacity (``too_long="drop"``); ``spec`` has
        every capacity as a number.

    Raises:
        CapacityError: a too-long document under ``too_long="error"`` (message names its manifest line).
    """
    order = np.random.default_rng(seed).permutation(len(entries))
    ordered = [entries[i] for i in order]
    stats = [e.stats for e in ordered]
    if auto:
        spec = dataclasses.replace(spec, **{f"{name}_capacity": None for name in auto})
    if too_long == "error":
        # Checked here (the planners would name the document by index): name its manifest line.
        limits = row_limits(spec)
        for entry in ordered:
            over = [
                f"{name}={getattr(entry.stats, name)} > {limit}"
                for name, limit in limits.items()
                if getattr(entry.stats, name) > limit
            ]
            if over:
                raise CapacityError(
                    f"{entry.location}: the document does not fit in one row ({', '.join(over)}); raise "
                    "seq_len / the capacities or set too_long='drop'"
                )
    planner = plan_balanced_rows if auto else plan_rows
    rows, dropped = planner(stats, spec, too_long)
    spec = shrink_to_rows(spec, stats, rows, auto)
    return ordered, rows, [ordered[i] for i in dropped], spec


def resume_capacities(
    spec: PackingSpec, requested: Mapping[str, Capacity], resumed: Mapping[str, int]
) -> PackingSpec:
    """The spec of a resumed run: its rows as planned now, with the capacities it STARTED with (``resumed``,
    saved in its checkpoint) instead of the ones planned now.

    Same data, same seed: the plan is the same, so are the capacities. Data that now needs a larger
    ``auto`` capacity than the run started with is an error naming it (a resumed run never re-plans its
    shapes); one that needs less keeps the saved one. An explicit capacity must equal its saved value.

    Raises:
        CapacityError: the data needs a larger capacity than the run started with.
        ValueError: an explicit capacity that differs from the saved one, or a capacity missing from the save.
    """
    saved_caps = {}
    for name in CAPACITY_NAMES:
        value, saved = requested.get(name), resumed.get(name)
        if saved is None:
            raise ValueError(f"the checkpoint saved no {name}_capacity (saved: {dict(resumed)})")
        needed = spec.capacity(name)
        if value == AUTO and needed > saved:
            raise CapacityError(
                f"dataset.{name}_capacity: the data now needs {needed} per row, but the run being resumed "
                f"started with {saved}; a resumed run keeps the capacities it started with: resume with the "
                "data it started with, or start a new run (another output_dir) to plan capacities for this data"
            )
        if value != AUTO and needed != saved:
            raise ValueError(
                f"dataset.{name}_capacity={needed} but the run being resumed started with {saved}; a resumed "
                f"run keeps its capacities (set it to {saved} or auto)"
            )
        saved_caps[f"{name}_capacity"] = saved
    return dataclasses.replace(spec, **saved_caps)


def _log_dropped(dropped: Sequence[ManifestEntry], total: int, spec: PackingSpec, what: str) -> None:
    if dropped:
        shown = ", ".join(e.location for e in dropped[:5]) + (", ..." if len(dropped) > 5 else "")
        logger.warning(
            "%s: dropped %d of %d documents longer than seq_len=%d or over a row capacity (too_long='drop'): %s",
            what,
            len(dropped),
            total,
            spec.seq_len,
            shown,
        )


def build_higgs_dataset(
    tokenizer: HiggsTokenizer,
    *,
    path: str,
    seq_len: int,
    batch_size: int,
    audio_layout: AudioLayout | None = None,
    text_ffn_capacity: int | str | None = None,
    audio_ffn_capacity: int | str | None = None,
    text_target_capacity: int | str | None = None,
    audio_target_capacity: int | str | None = None,
    val_fraction: float = 0.0,
    val_path: str | None = None,
    on_bad_sample: OnBadSample = "error",
    too_long: TooLongPolicy = "drop",
    seed: int = 0,
    resumed_capacities: Mapping[str, int] | None = None,
) -> tuple[HiggsPackedDataset, HiggsPackedDataset | None, dict[str, int | float]]:
    """Scan, split and pack a manifest: the YAML-facing data set component.

    Args:
        tokenizer: the text tokenizer (special tokens by name).
        path: the training manifest (JSONL, one Boson ChatML sample per line, see
            :mod:`higgs_tune.data.manifest`).
        seq_len, batch_size: the static shapes (``PackingSpec``).
        audio_layout: the model's audio settings (``AudioLayout.from_model_config(config)``); default:
            8 codebooks of 1024, stream BOS 1024 / EOS 1025, delay pattern on (Higgs Audio v2 3B).
        text_ffn_capacity, audio_ffn_capacity, text_target_capacity, audio_target_capacity: per-row
            capacities, see :class:`~higgs_tune.data.batch.PackingSpec`: a number, ``"auto"`` (planned
            from the training data, :mod:`higgs_tune.data.capacities`) or ``None`` (= ``seq_len``).
        val_fraction: share of the training manifest's samples held out for validation (seeded, by
            sample, before packing). Exclusive with ``val_path``.
        val_path: a separate validation manifest.
        on_bad_sample: ``"error"`` or ``"skip"`` (counted), see :mod:`higgs_tune.data.manifest`.
        too_long: ``"drop"`` (counted) or ``"error"`` for documents that do not fit one row.
        seed: seeds the split and the packing order.
        resumed_capacities: a resumed run's capacities as it started (``name -> int`` for the four
            names of :data:`~higgs_tune.data.capacities.CAPACITY_NAMES`): kept instead of the planned ones, and
            the data must not need larger ones (:func:`resume_capacities`).

    The validation split is packed with the training capacities when each of its documents fits them
    (the same static shapes: evaluation reuses what the training compiled), otherwise its ``auto``
    capacities are planned from the validation documents.

    Returns:
        ``(train_dataset, val_dataset or None, stats)``; ``stats`` holds plain numbers for the metrics:
        ``train_samples``, ``val_samples``, ``skipped_samples``, ``dropped_too_long``, ``train_rows``,
        ``val_rows``, ``train_padding_fraction`` / ``val_padding_fraction`` (row positions), and for each
        capacity ``<name>`` of :data:`~higgs_tune.data.capacities.CAPACITY_NAMES`: ``train_<name>_capacity``,
        ``train_<name>_padding_fraction`` (and the ``val_`` ones when there is a validation split).
    """
    if val_path is not None and val_fraction:
        raise ValueError(f"give either val_fraction ({val_fraction}) or val_path ({val_path}), not both")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    layout = audio_layout if audio_layout is not None else AudioLayout()
    requested: dict[str, Capacity] = {
        "text_ffn": text_ffn_capacity,
        "audio_ffn": audio_ffn_capacity,
        "text_target": text_target_capacity,
        "audio_target": audio_target_capacity,
    }
    base_spec = fixed_spec(seq_len, batch_size, layout.num_codebooks, requested)

    scan = scan_manifest(path, tokenizer, layout, on_bad_sample=on_bad_sample)
    skipped = scan.num_skipped
    train_entries = scan.entries
    val_entries: list[ManifestEntry] = []
    if val_path is not None:
        val_scan = scan_manifest(val_path, tokenizer, layout, on_bad_sample=on_bad_sample)
        val_entries, skipped = val_scan.entries, skipped + val_scan.num_skipped
    elif val_fraction:
        num_val = max(1, round(val_fraction * len(train_entries)))
        if num_val >= len(train_entries):
            raise ValueError(
                f"val_fraction={val_fraction} of {len(train_entries)} samples leaves no training sample"
            )
        held_out = set(np.random.default_rng([seed, 1]).permutation(len(train_entries))[:num_val].tolist())
        val_entries = [e for i, e in enumerate(train_entries) if i in held_out]
        train_entries = [e for i, e in enumerate(train_entries) if i not in held_out]
    if not train_entries:
        raise ValueError(f"{path}: no training sample left (skipped {skipped})")

    auto = auto_names(requested)
    ordered, rows, dropped, spec = pack_entries(
        train_entries, base_spec, too_long=too_long, seed=seed, auto=auto
    )
    if resumed_capacities is not None:
        spec = resume_capacities(spec, requested, resumed_capacities)
    _log_dropped(dropped, len(train_entries), spec, str(path))
    if not rows:
        raise ValueError(f"{path}: every training document was dropped as too long for seq_len={seq_len}")
    train = HiggsPackedDataset(ordered, rows, tokenizer, layout, spec)
    val = None
    num_dropped = len(dropped)
    if val_entries:
        fits_training = all(
            entry.stats.length > seq_len
            or all(getattr(entry.stats, field) <= limit for field, limit in row_limits(spec).items())
            for entry in val_entries
        )
        val_spec, val_auto = (spec, ()) if fits_training or not auto else (base_spec, auto)
        ordered, rows, dropped, val_spec = pack_entries(
            val_entries, val_spec, too_long=too_long, seed=seed, auto=val_auto
        )
        _log_dropped(dropped, len(val_entries), val_spec, str(val_path or f"{path} (validation split)"))
        val = HiggsPackedDataset(ordered, rows, tokenizer, layout, val_spec)
        num_dropped += len(dropped)

    stats: dict[str, int | float] = {
        "train_samples": len(train_entries),
        "val_samples": len(val_entries),
        "skipped_samples": skipped,
        "dropped_too_long": num_dropped,
        "train_rows": len(train),
        "val_rows": len(val) if val is not None else 0,
        "train_padding_fraction": train.padding_fraction(),
        "val_padding_fraction": val.padding_fraction() if val is not None else 0.0,
    }
    for split, dataset in (("train", train), ("val", val)):
        if dataset is not None:
            padding = dataset.padding_fractions()
            for name, value in dataset.capacities().items():
                stats[f"{split}_{name}_capacity"] = value
                stats[f"{split}_{name}_padding_fraction"] = padding[name]
    return train, val, stats


class ResumableDistributedSampler(DistributedSampler):
    """A seeded ``DistributedSampler`` over rows whose ``state_dict`` holds the epoch AND the position.

    ``torch.utils.data.DistributedSampler`` is not ``Stateful``: a ``StatefulDataLoader`` then only
    records how many indices were drawn and re-draws them on resume with whatever epoch the sampler has
    at that moment, so the shuffle of a resumed run silently depends on the caller. This sampler puts
    ``epoch`` and ``position`` (indices handed out this epoch) into the loader's state, checks on load
    that the data set size, world size, rank, seed and shuffle match, and continues exactly.

    The order of epoch ``e`` is ``randperm(num_rows)`` seeded with ``seed + e`` (as DistributedSampler),
    then split across ranks by striding. ``drop_last=True`` drops the tail rows that do not divide evenly
    among the ranks, and each rank's rows that do not fill a last batch of ``batch_size`` (so the sampler
    hands out only rows that are trained on); ``drop_last=False`` visits every row exactly once and pads
    the short ranks with :data:`EMPTY_ROW` (an all-padding row) instead of repeating rows.
    """

    def __init__(
        self,
        num_rows: int,
        *,
        num_replicas: int,
        rank: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        batch_size: int = 1,
    ) -> None:
        super().__init__(
            range(num_rows),
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.num_rows = num_rows
        self.batch_size = batch_size
        self._position = 0  # indices handed out by the current iterator
        self._resume_position: int | None = None  # set by load_state_dict until the next __iter__
        self._epoch_was_set = False

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._epoch_was_set = True

    @property
    def rows_per_epoch(self) -> int:
        """How many indices this rank hands out per epoch."""
        if self.drop_last:
            return self.num_samples - self.num_samples % self.batch_size
        return self.num_samples

    def __len__(self) -> int:
        return self.rows_per_epoch

    def epoch_indices(self) -> list[int]:
        """This rank's row indices for the current epoch (``rows_per_epoch`` of them)."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_rows, generator=generator).tolist()
        else:
            order = list(range(self.num_rows))
        if self.drop_last:
            order = order[: self.total_size]
        else:
            order += [EMPTY_ROW] * (self.total_size - self.num_rows)
        return order[self.rank : self.total_size : self.num_replicas][: self.rows_per_epoch]

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()
        start = self._resume_position or 0
        self._resume_position = None
        self._position = start
        return self._hand_out(indices[start:])

    def _hand_out(self, indices: list[int]) -> Iterator[int]:
        for index in indices:
            self._position += 1
            yield index

    def _identity(self) -> dict[str, Any]:
        return {
            "num_rows": self.num_rows,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "batch_size": self.batch_size,
        }

    def state_dict(self) -> dict[str, Any]:
        position = self._position if self._resume_position is None else self._resume_position
        return {"epoch": self.epoch, "position": position, **self._identity()}

    def resume_at(self, epoch: int, global_rows_consumed: int) -> None:
        """Continue epoch ``epoch`` after the first ``global_rows_consumed`` rows of its order, counted
        over ALL ranks together, at the next ``iter()`` (call it after ``set_epoch``).

        The order of an epoch does not depend on the world size (rank r takes rows r, r + W, r + 2W, ...
        of it), so W ranks that consumed ``n`` rows each leave the same global position ``n * W`` on
        any other number of ranks W': each continues after ``n * W / W'`` rows of its own share. This is
        how a checkpoint resumes on another number of processes (same global batch: ``batch_size`` x
        ranks kept constant by the user).

        Raises:
            ValueError: ``global_rows_consumed`` is not a multiple of this world size, or lies past the end
                of the epoch.
        """
        if global_rows_consumed % self.num_replicas:
            raise ValueError(
                f"cannot resume after {global_rows_consumed} rows of epoch {epoch} on {self.num_replicas} "
                "ranks: the position must be a multiple of the number of ranks (keep the global batch, "
                "batch_size x ranks, of the run that wrote the checkpoint)"
            )
        position = global_rows_consumed // self.num_replicas
        if position > self.rows_per_epoch:
            raise ValueError(
                f"cannot resume after {global_rows_consumed} rows of epoch {epoch}: this set-up has only "
                f"{self.rows_per_epoch * self.num_replicas} rows per epoch"
            )
        self.set_epoch(epoch)
        self._resume_position = position

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from ``state_dict`` at the next ``iter()``.

        A state saved at the very end of epoch e also resumes correctly after ``set_epoch(e + 1)`` (it
        is the start of epoch e + 1).

        Raises:
            ValueError: the state belongs to another set-up (rows, world size, rank, seed, shuffle,
                drop_last, batch size), or ``set_epoch`` was called with an epoch the state cannot continue.
        """
        mismatched = {
            key: (state_dict.get(key), value)
            for key, value in self._identity().items()
            if state_dict.get(key) != value
        }
        if mismatched:
            details = ", ".join(
                f"{key}: saved {saved!r}, now {now!r}" for key, (saved, now) in mismatched.items()
            )
            raise ValueError(
                f"data loader state does not match this set-up ({details}); cannot resume exactly"
            )
        epoch, position = int(state_dict["epoch"]), int(state_dict["position"])
        if self._epoch_was_set and self.epoch != epoch:
            if self.epoch == epoch + 1 and position >= self.rows_per_epoch:
                return  # the end of epoch e is the start of epoch e + 1, set_epoch already set it
            raise ValueError(
                f"data loader state is at epoch {epoch} (position {position}/{self.rows_per_epoch}) but "
                f"set_epoch({self.epoch}) was called; call set_epoch with the epoch the checkpoint was saved in"
            )
        self.epoch = epoch
        self._resume_position = position


class RowCollator:
    """``collate_fn`` of the loader: rows of Documents -> the batch dict of :mod:`higgs_tune.data.batch`.

    A short final batch (``drop_last=False``) is filled up with empty rows (all padding, no targets), so
    every batch has exactly ``spec.batch_size`` rows.
    """

    def __init__(self, spec: PackingSpec, pad_id: int) -> None:
        self.spec = spec
        self.pad_id = pad_id

    def __call__(self, rows: list[list[Document]]) -> dict[str, torch.Tensor]:
        rows = list(rows) + [[] for _ in range(self.spec.batch_size - len(rows))]
        return collate_rows(rows, self.spec, self.pad_id)


def build_dataloader(
    dataset: HiggsPackedDataset,
    spec: PackingSpec,
    *,
    seed: int,
    shuffle: bool,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
    pin_memory: bool = False,
) -> StatefulDataLoader:
    """A ``StatefulDataLoader`` of static-shape batches of ``spec.batch_size`` rows.

    Rows are drawn by a :class:`ResumableDistributedSampler` (seeded, per-epoch order, this ``rank``'s
    share of ``world_size``); ``drop_last=True`` (training) drops the last partial batch, ``drop_last=False``
    (evaluation) fills it with empty rows so that every row is seen exactly once.

    Epoch protocol (exact resume, mid-epoch and across epochs, with any ``num_workers``)::

        sampler = loader.sampler
        for epoch in range(start_epoch, epochs):
            sampler.set_epoch(epoch)          # before iter(loader), every epoch
            for batch in loader:
                ...                           # checkpoint: save loader.state_dict() and epoch
        # resume, in a new process: rebuild the loader the same way, then
        loader.load_state_dict(saved_state)   # before iter(loader)
        start_epoch = saved_epoch             # the loop above then continues with the next batch

    The saved state holds the sampler's epoch and position, so a resumed loader yields exactly the
    batches the original run would have yielded next; a state saved after the last batch of epoch e
    may be resumed with ``start_epoch`` e or e + 1.

    Args:
        dataset: packed rows from :func:`build_higgs_dataset`.
        spec: batch shapes; its row shapes (seq_len, codebooks, capacities) must be the dataset's.
        seed: seeds the row order (epoch e uses ``seed + e``).
        shuffle: shuffle the rows every epoch (training) or keep their order (evaluation).
        num_workers: loader worker processes building the documents (0 = in the main process).
        rank, world_size: data-parallel position.
        drop_last: see above.
        pin_memory: pin batches for faster host-to-device copies.
    """
    row_shape = dataclasses.replace(spec, batch_size=dataset.spec.batch_size)
    if row_shape != dataset.spec:
        raise ValueError(f"spec {spec} does not match the rows the dataset was packed for ({dataset.spec})")
    sampler = ResumableDistributedSampler(
        len(dataset),
        num_replicas=world_size,
        rank=rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        batch_size=spec.batch_size,
    )
    if len(sampler) == 0:
        raise ValueError(
            f"{len(dataset)} packed rows over world_size={world_size} give rank {rank} no full batch of "
            f"batch_size={spec.batch_size} (drop_last={drop_last}); use more data or a smaller batch"
        )
    return StatefulDataLoader(
        dataset,
        batch_size=spec.batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=RowCollator(spec, dataset.pad_id),
        pin_memory=pin_memory,
    )
