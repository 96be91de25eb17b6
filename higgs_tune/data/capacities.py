"""Per-row capacities planned from the data: the ``auto`` value of the four ``dataset.*_capacity`` keys.

A packed row has ``seq_len`` positions and four fixed-size index tensors (:mod:`higgs_tune.data.batch`):
text-FFN positions, audio-FFN positions, text-target positions and audio-target positions. The step's
cost follows those capacities, not the data, so they must fit the data: too small and documents are
dropped or rows stay half empty, too large and every row computes padding. ``auto`` chooses them at
set-up, after the manifest scan:

1. the documents are packed under ``seq_len`` (and the explicit capacities) by
   :func:`~higgs_tune.data.packer.plan_balanced_rows`, which balances the rows in all five dimensions;
2. each ``auto`` capacity becomes the largest use over the planned rows, rounded up with
   :func:`round_capacity` (:func:`shrink_to_rows`).

Everything is a pure function of the documents' statistics in their seeded order: every rank of a
torchrun job plans the same capacities, and so does a rerun with the same data and seed (a resumed run
checks that, :func:`~higgs_tune.data.dataset.resume_capacities`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from higgs_tune.data.batch import PackingSpec
from higgs_tune.data.document import DocStats
from higgs_tune.data.packer import row_limits

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
    :func:`round_capacity` (and at most its value in ``spec``, which the rows respect)."""
    if not names or not rows:
        return spec
    use = _row_use(_needs(stats), rows).max(axis=0)
    column = {name: index for index, name in enumerate(DIMENSIONS)}
    shrunk = {
        f"{name}_capacity": min(spec.capacity(name), round_capacity(int(use[column[name]]), spec.seq_len))
        for name in names
    }
    return dataclasses.replace(spec, **shrunk)


def packing_summary(stats: Mapping[str, int | float], split: str = "train") -> str:
    """One line: the capacities of ``split`` and the padding fraction of each dimension, from the stats of
    :func:`~higgs_tune.data.dataset.build_higgs_dataset`."""
    capacities = " ".join(f"{name}={stats[f'{split}_{name}_capacity']}" for name in CAPACITY_NAMES)
    padding = " ".join(f"{name}={stats[_padding_key(split, name)]:.3f}" for name in DIMENSIONS)
    return f"{split} packing: {stats[f'{split}_rows']} rows; capacities {capacities}; padding {padding}"


def padding_warnings(
    stats: Mapping[str, int | float], requested: Mapping[str, Capacity], split: str = "train"
) -> list[str]:
    """One message per dimension of ``split`` whose padding exceeds :data:`PADDING_WARNING`, naming the knob
    to turn (``requested``: the capacities as configured, numbers or ``"auto"``)."""
    messages = []
    for name in DIMENSIONS:
        padding = stats[_padding_key(split, name)]
        if padding <= PADDING_WARNING:
            continue
        if name == "seq":
            advice = (
                "the documents do not fill the rows: lower seq_len (or, with explicit capacities, raise "
                "the one that binds or set it to auto)"
            )
        elif requested.get(name) == AUTO:
            advice = (
                f"rows differ too much in {name} use for one static capacity: raise seq_len (more "
                f"documents per row average out) or set dataset.{name}_capacity by hand"
            )
        else:
            advice = f"set dataset.{name}_capacity=auto or lower it"
        messages.append(f"{split} padding of {name} is {padding:.0%} (> {PADDING_WARNING:.0%}): {advice}")
    return messages


def _padding_key(split: str, name: str) -> str:
    return f"{split}_padding_fraction" if name == "seq" else f"{split}_{name}_padding_fraction"
