"""Per-row capacities planned from the data: the ``auto`` value of the four ``dataset.*_capacity`` keys.

A packed row has ``seq_len`` positions and four fixed-size index tensors (:mod:`higgs_tune.data.batch`):
text-FFN positions, audio-FFN positions, text-target positions and audio-target positions. The step's
cost follows those capacities, not the data, so they must fit the data: too small and documents are
dropped or rows stay half empty, too large and every row computes padding. ``auto`` chooses them from
the scanned documents' statistics at set-up (:func:`plan_capacities`), in three steps:

1. candidates: for a margin ``m``, the capacity of kind ``d`` is ``share_d * seq_len * (1 + m)`` (its share
   of all positions in the data, i.e. what a full row of average composition holds, plus a margin), at
   least the largest single document's count, rounded with :func:`round_capacity`; the margins of
   :data:`MARGINS` and one candidate with no limit but ``seq_len``;
2. each candidate is packed (first-fit decreasing under ALL the limits, :func:`~higgs_tune.data.packer.
   plan_rows`: a row that is full of one kind takes documents of the other kinds, so the rows come out
   balanced in every dimension that binds), on at most :data:`SEARCH_DOCUMENTS` documents of the seeded
   order, and scored by its largest padding fraction (sequence and every planned capacity; ties: fewer
   rows, then smaller capacities);
3. the winner packs all documents; each planned capacity then shrinks to the largest use over the rows,
   rounded (:func:`shrink_to_rows`). Packing again with the shrunk capacities gives the very same rows (a
   document that fitted a row under the larger limit fits it under the shrunk one, and one that did not,
   does not), which is why a resumed run can pass them as explicit numbers and continue exactly.

Everything is a pure function of the documents' statistics in their seeded order: every rank of a
torchrun job plans the same capacities, and so does a rerun with the same data and seed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from higgs_tune.data.batch import PackingSpec
from higgs_tune.data.document import DocStats
from higgs_tune.data.packer import plan_rows, row_limits

AUTO = "auto"
# The four per-row capacities, by PackingSpec name (dataset.<name>_capacity), and the DocStats field each
# bounds; "seq" (the row length, seq_len) is the fifth dimension of a row.
CAPACITY_FIELDS = {
    "text_ffn": "num_text_positions",
    "audio_ffn": "num_audio_positions",
    "text_target": "num_text_targets",
    "audio_target": "num_audio_target_positions",
}
CAPACITY_NAMES = tuple(CAPACITY_FIELDS)
DIMENSIONS = {"seq": "length", **CAPACITY_FIELDS}
MARGINS = (0.0, 0.03, 0.07, 0.15, 0.3, 0.6)
SEARCH_DOCUMENTS = 8192
# Padding above this share of a capacity (or of the row positions) gets a warning at set-up.
PADDING_WARNING = 0.25

Capacity = int | str | None  # a number, "auto", or None (= seq_len)


def round_capacity(value: int, seq_len: int) -> int:
    """Round a capacity up to a multiple of the largest power of two <= ``value / 32`` (at most 64), capped
    at ``seq_len``.

    Large capacities land on multiples of 64, the row tile of GPU matmul and Triton kernels, so a gathered
    [B * capacity, hidden] operand has no ragged tile; the rounding never adds more than 1/32 (3%) of the
    capacity, so small ones (tens of text targets) stay nearly exact. Monotone: ``a <= b`` implies
    ``round_capacity(a) <= round_capacity(b)`` (the coarser grids are subsets of the finer ones).
    """
    value = max(int(value), 1)
    multiple = min(64, 1 << max(0, (value // 32).bit_length() - 1))
    return min(seq_len, -(-value // multiple) * multiple)


def check_capacity_values(requested: Mapping[str, Capacity]) -> None:
    """Raise ValueError unless every value is a positive int, ``"auto"`` or None."""
    for name, value in requested.items():
        if value is None or value == AUTO:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"dataset.{name}_capacity must be a positive int, 'auto' or null, got {value!r}")


def auto_names(requested: Mapping[str, Capacity]) -> tuple[str, ...]:
    """The capacities requested as ``"auto"``, in :data:`CAPACITY_NAMES` order."""
    return tuple(name for name in CAPACITY_NAMES if requested.get(name) == AUTO)


def fixed_spec(
    seq_len: int, batch_size: int, num_codebooks: int, requested: Mapping[str, Capacity]
) -> PackingSpec:
    """The spec of the explicit capacities; ``"auto"`` ones are left at ``seq_len`` (to be planned)."""
    check_capacity_values(requested)
    explicit = {
        f"{name}_capacity": requested.get(name) for name in CAPACITY_NAMES if requested.get(name) != AUTO
    }
    return PackingSpec(seq_len=seq_len, batch_size=batch_size, num_codebooks=num_codebooks, **explicit)


def _needs(stats: Sequence[DocStats]) -> np.ndarray:
    """[N, 5] int64: each document's count per dimension, in :data:`DIMENSIONS` order."""
    fields = list(DIMENSIONS.values())
    return np.array([[getattr(s, f) for f in fields] for s in stats], dtype=np.int64).reshape(-1, len(fields))


def _row_use(needs: np.ndarray, rows: Sequence[Sequence[int]]) -> np.ndarray:
    """[rows, 5] int64: each row's summed counts."""
    use = np.zeros((len(rows), needs.shape[1]), dtype=np.int64)
    for r, row in enumerate(rows):
        use[r] = needs[row].sum(axis=0)
    return use


def padding_fractions(
    stats: Sequence[DocStats], rows: Sequence[Sequence[int]], spec: PackingSpec
) -> dict[str, float]:
    """Share of each dimension's slots that hold no document: ``seq`` (row positions) and the four
    capacities, ``1 - used / (rows * capacity)`` (0.0 for no rows)."""
    if not rows:
        return dict.fromkeys(DIMENSIONS, 0.0)
    limits = row_limits(spec)
    totals = _row_use(_needs(stats), rows).sum(axis=0)
    return {
        name: 1.0 - float(total) / (len(rows) * limits[field])
        for (name, field), total in zip(DIMENSIONS.items(), totals)
    }


def shrink_to_rows(
    spec: PackingSpec, stats: Sequence[DocStats], rows: Sequence[Sequence[int]], names: Sequence[str]
) -> PackingSpec:
    """``spec`` with each capacity in ``names`` lowered to the largest use over ``rows``, rounded up with
    :func:`round_capacity` (never above its value in ``spec`` when that is itself rounded)."""
    if not names or not rows:
        return spec
    use = _row_use(_needs(stats), rows).max(axis=0)
    column = {name: index for index, name in enumerate(DIMENSIONS)}
    shrunk = {
        f"{name}_capacity": min(spec.capacity(name), round_capacity(int(use[column[name]]), spec.seq_len))
        for name in names
    }
    return dataclasses.replace(spec, **shrunk)


def _candidates(needs: np.ndarray, spec: PackingSpec, names: Sequence[str]) -> list[PackingSpec]:
    """The specs tried by :func:`plan_capacities` (see the module docstring, step 1)."""
    column = {name: index for index, name in enumerate(DIMENSIONS)}
    total_length = max(int(needs[:, 0].sum()), 1)
    candidates = []
    for margin in (*MARGINS, None):
        caps = {}
        for name in names:
            counts = needs[:, column[name]]
            largest = int(counts.max()) if len(counts) else 1
            if margin is None:
                value = spec.seq_len
            else:
                share = float(counts.sum()) / total_length
                value = max(largest, math.ceil(share * spec.seq_len * (1.0 + margin)))
            caps[f"{name}_capacity"] = round_capacity(value, spec.seq_len)
        candidate = dataclasses.replace(spec, **caps)
        if candidate not in candidates:
            candidates.append(candidate)
    return candidates


def plan_capacities(stats: Sequence[DocStats], spec: PackingSpec, names: Sequence[str]) -> PackingSpec:
    """Choose the capacities ``names`` (the ``auto`` ones) for documents in their packing order.

    Args:
        stats: the documents' statistics in the (seeded) order they will be packed in.
        spec: row length and the explicit capacities; the values of ``names`` in it are ignored.
        names: the capacities to plan (:data:`CAPACITY_NAMES` entries).

    Returns:
        The spec to pack with (step 2 of the module docstring's procedure: candidate capacities that
        every document fits alone); pack with it, then :func:`shrink_to_rows` gives the final spec.
        Documents over ``seq_len`` or an explicit capacity take no part in the choice (the packer drops
        them or refuses them, per its ``too_long`` policy).
    """
    names = [name for name in CAPACITY_NAMES if name in names]
    if not names:
        return spec
    base = dataclasses.replace(spec, **{f"{name}_capacity": None for name in names})
    needs = _needs(stats)
    limits = np.array([row_limits(base)[field] for field in DIMENSIONS.values()], dtype=np.int64)
    fitting = np.flatnonzero((needs <= limits).all(axis=1))
    candidates = _candidates(needs[fitting], base, names)
    if len(candidates) == 1 or not len(fitting):
        return candidates[0]
    sample = [stats[i] for i in fitting[:SEARCH_DOCUMENTS]]
    scored = []
    for index, candidate in enumerate(candidates):
        rows, _ = plan_rows(sample, candidate, too_long="drop")
        final = shrink_to_rows(candidate, sample, rows, names)
        padding = padding_fractions(sample, rows, final)
        worst = max(padding[name] for name in ("seq", *names))
        scored.append((round(worst, 6), len(rows), sum(final.capacity(n) for n in names), index))
    return candidates[min(scored)[-1]]
