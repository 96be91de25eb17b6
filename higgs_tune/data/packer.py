"""Pack documents into fixed rows and collate rows into the static-shape batch of :mod:`higgs_tune.data.batch`.

Planning works on :class:`DocStats` alone (plain ints a manifest scan can cache), so the whole epoch can be
planned before a single codes file is loaded. Documents are never truncated: a document that alone exceeds
``seq_len`` or one of the per-row capacities is dropped and counted, or is an error (policy argument).

Collation copies each document's tokens, codes, masks and TARGETS into its row unchanged: the targets were
shifted once, per document, by :func:`higgs_tune.data.document.build_document`; the collator never shifts.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from higgs_tune.data.batch import BATCH_FIELDS, IGNORE_INDEX, CapacityError, PackingSpec, positions_to_index
from higgs_tune.data.document import DocStats, Document

__all__ = [
    "DocStats",
    "CapacityError",
    "TooLongPolicy",
    "plan_rows",
    "plan_balanced_rows",
    "collate_rows",
    "row_limits",
]

TooLongPolicy = Literal["error", "drop"]

# (PackingSpec capacity name, DocStats field it bounds); "seq" is the row length itself.
_LIMITS = (
    ("seq", "length"),
    ("text_ffn", "num_text_positions"),
    ("audio_ffn", "num_audio_positions"),
    ("text_target", "num_text_targets"),
    ("audio_target", "num_audio_target_positions"),
)


def row_limits(spec: PackingSpec) -> dict[str, int]:
    """Per-row limit of every DocStats field: ``seq_len`` for ``length``, the capacities for the counts."""
    return {field: spec.seq_len if name == "seq" else spec.capacity(name) for name, field in _LIMITS}


class _FirstFitSlots:
    """Row slots with remaining capacities; finds the leftmost slot that can take a document.

    A max-segment tree over the slots, one maximum per limit. Slots not opened yet still hold the full
    limits, so the leftmost fitting slot is an open row or else the next new row. The search descends
    into the left child first and backtracks when a subtree's per-limit maxima cover the need but no
    single slot in it does; with one binding limit that never happens and a query is O(log slots).
    """

    def __init__(self, num_slots: int, limits: list[int]):
        self.size = 1
        while self.size < max(num_slots, 1):
            self.size *= 2
        self.maxima = [[limit] * (2 * self.size) for limit in limits]

    def _covers(self, node: int, need: list[int]) -> bool:
        for maxima, amount in zip(self.maxima, need):
            if maxima[node] < amount:
                return False
        return True

    def leftmost_fit(self, need: list[int]) -> int:
        stack = [1]
        while stack:
            node = stack.pop()
            if not self._covers(node, need):
                continue
            if node >= self.size:
                return node - self.size
            stack.append(2 * node + 1)
            stack.append(2 * node)
        raise AssertionError("no slot fits a document that fits an empty row")

    def consume(self, slot: int, need: list[int]) -> None:
        for maxima, amount in zip(self.maxima, need):
            node = slot + self.size
            maxima[node] -= amount
            node //= 2
            while node:
                maxima[node] = max(maxima[2 * node], maxima[2 * node + 1])
                node //= 2


def _needs_and_drops(
    docs_stats: Sequence[DocStats], spec: PackingSpec, too_long: TooLongPolicy
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """``(needs [N, 5], limits [5], kept indices, dropped indices)``; raises under ``too_long="error"``."""
    if too_long not in ("error", "drop"):
        raise ValueError(f"too_long must be 'error' or 'drop', got {too_long!r}")
    limits_by_field = row_limits(spec)
    fields = [field for _, field in _LIMITS]
    limits = np.array([limits_by_field[f] for f in fields], dtype=np.int64)
    needs = np.array([[getattr(s, f) for f in fields] for s in docs_stats], dtype=np.int64).reshape(
        -1, len(fields)
    )

    over = needs > limits
    dropped = [int(i) for i in np.flatnonzero(over.any(axis=1))]
    if dropped and too_long == "error":
        first = dropped[0]
        what = ", ".join(f"{fields[j]}={needs[first, j]} > {limits[j]}" for j in np.flatnonzero(over[first]))
        raise CapacityError(
            f"document {first} does not fit in one row ({what}); {len(dropped)} document(s) too long in all. "
            "Raise seq_len / the capacities or pack with too_long='drop'"
        )
    return needs, limits, np.flatnonzero(~over.any(axis=1)), dropped


def plan_rows(
    docs_stats: Sequence[DocStats], spec: PackingSpec, too_long: TooLongPolicy = "error"
) -> tuple[list[list[int]], list[int]]:
    """Assign document indices to rows of ``spec.seq_len`` positions, respecting every per-row capacity.

    Algorithm: first-fit decreasing. Documents are taken longest first (ties by index, so the plan is a
    pure function of the stats) and each goes into the first open row where all five sums (length, text
    positions, audio positions, text targets, audio-target positions) stay within their limits, else a
    new row. FFD fills rows far better than sequential first-fit on mixed lengths; the price is that rows
    group documents of similar length, so shuffle the ROWS (not the documents) between epochs. The
    first open row that fits is found with a segment tree over the rows (:class:`_FirstFitSlots`), so
    planning 100k documents takes seconds, not the minutes of a scan over all open rows.

    Args:
        docs_stats: one entry per document.
        spec: row length and capacities.
        too_long: what to do with a document that alone exceeds a limit: ``"error"`` raises
            :class:`CapacityError` naming it, ``"drop"`` leaves it out and lists it in ``dropped``.

    Returns:
        ``(rows, dropped)``: rows as lists of document indices (ascending within a row; the rows in the
        order they were opened), and the indices of dropped documents (ascending).
    """
    needs, limits, keep, dropped = _needs_and_drops(docs_stats, spec, too_long)
    order = keep[np.lexsort((keep, -needs[keep, 0]))]  # longest first, ties by index

    slots = _FirstFitSlots(num_slots=len(order), limits=[int(x) for x in limits])
    rows: list[list[int]] = []
    for index in order:
        need = [int(x) for x in needs[index]]
        row = slots.leftmost_fit(need)
        if row == len(rows):
            rows.append([])
        rows[row].append(int(index))
        slots.consume(row, need)
    return [sorted(row) for row in rows], dropped


# Rows the balanced planner compares for each document: the emptiest ones by length.
BALANCE_CANDIDATES = 4


def plan_balanced_rows(
    docs_stats: Sequence[DocStats], spec: PackingSpec, too_long: TooLongPolicy = "error"
) -> tuple[list[list[int]], list[int]]:
    """Assign documents to rows so that every row holds about the same amount of EVERY kind of position.

    The planner of ``auto`` capacities (:mod:`higgs_tune.data.capacities`): the capacities are set
    afterwards from the largest row, so the rows must be alike in all five dimensions (length, text
    positions, audio positions, text targets, audio-target positions), not just full.

    Algorithm: worst-fit decreasing over a fixed number of rows R. Documents are taken longest first
    (ties by index); each goes, among the :data:`BALANCE_CANDIDATES` emptiest rows by length (ties by
    row index) that can take it within the limits of ``spec``, to the one whose largest load relative to
    a full row of the data's average composition (``share_d * seq_len``) stays smallest; when none can
    take it, to a new row. Consecutive documents of the sorted order (similar length, often the same
    kind) thus go to different rows, and each row ends with a slice of every length class. R starts at
    the fewest rows the total length allows; a plan that had to open rows is redone with the rows it used
    (from the third round on, plus the rows the last round opened, times the round), so that leftovers
    never collect in rows of their own (two to four rounds).

    Args and returns: as :func:`plan_rows` (rows in row order, documents ascending within a row).
    """
    needs, limits, keep, dropped = _needs_and_drops(docs_stats, spec, too_long)
    order = [int(i) for i in keep[np.lexsort((keep, -needs[keep, 0]))]]
    if not order:
        return [], dropped
    total = needs[keep].sum(axis=0)
    scale = [1.0 / max(float(t) / float(total[0]) * spec.seq_len, 1.0) for t in total]
    limits_list = [int(x) for x in limits]
    needs_list = needs.tolist()
    num_rows = -(-int(total[0]) // spec.seq_len)
    for attempt in itertools.count():
        rows = _worst_fit(order, needs_list, limits_list, scale, num_rows)
        if len(rows) == num_rows:  # a round that started with more rows than it needed leaves some empty
            return [sorted(row) for row in rows if row], dropped
        # the rows it used, and from the second round on as many more as it had to open per round so far
        num_rows = len(rows) + attempt * (len(rows) - num_rows)


def _worst_fit(
    order: list[int], needs: list[list[int]], limits: list[int], scale: list[float], num_rows: int
) -> list[list[int]]:
    """One round of :func:`plan_balanced_rows` with ``num_rows`` rows to start with."""
    loads = [[0] * len(limits) for _ in range(num_rows)]
    rows: list[list[int]] = [[] for _ in range(num_rows)]
    heap = [(0, r) for r in range(num_rows)]  # (length load, row): the emptiest rows first
    for index in order:
        need = needs[index]
        popped = [heapq.heappop(heap) for _ in range(min(BALANCE_CANDIDATES, len(heap)))]
        best, best_score = None, 0.0
        for _, row in popped:
            load = loads[row]
            if all(used + n <= limit for used, n, limit in zip(load, need, limits)):
                score = max((used + n) * f for used, n, f in zip(load, need, scale))
                if best is None or score < best_score:
                    best, best_score = row, score
        if best is None:
            best = len(rows)
            loads.append([0] * len(limits))
            rows.append([])
            popped.append((0, best))
        loads[best] = [used + n for used, n in zip(loads[best], need)]
        rows[best].append(index)
        for _, row in popped:
            heapq.heappush(heap, (loads[row][0], row))
    return rows


def collate_rows(
    rows: Sequence[Sequence[Document]], spec: PackingSpec, pad_id: int
) -> dict[str, torch.Tensor]:
    """Lay rows of documents out as one batch with the fields and shapes of :mod:`higgs_tune.data.batch`.

    Documents sit back to back from position 0; ``input_pos`` restarts at 0 for every document;
    ``doc_ids`` numbers them 0, 1, ... and the padding after them gets max id + 1 (its positions also
    count from 0). Padding: tokens ``pad_id``, audio codes 0, masks false, targets -100, and it belongs to
    neither FFN index. An empty row is all padding.

    Args:
        rows: ``spec.batch_size`` rows, each a list of documents (e.g. planned by :func:`plan_rows`).
        spec: static shapes.
        pad_id: the pad token id (``tokenizer.special.pad``).

    Returns:
        dict with exactly the keys :data:`higgs_tune.data.batch.BATCH_FIELDS`.

    Raises:
        ValueError: wrong number of rows, or a document with another number of codebooks.
        CapacityError: a row longer than ``seq_len`` or over a capacity.
    """
    if len(rows) != spec.batch_size:
        raise ValueError(f"got {len(rows)} rows for a batch of batch_size={spec.batch_size}")
    batch_size, seq_len, num_codebooks = spec.batch_size, spec.seq_len, spec.num_codebooks
    batch = {
        "tokens": torch.full((batch_size, seq_len), pad_id, dtype=torch.long),
        "audio_codes": torch.zeros(batch_size, num_codebooks, seq_len, dtype=torch.long),
        "audio_in_mask": torch.zeros(batch_size, seq_len, dtype=torch.bool),
        "audio_out_mask": torch.zeros(batch_size, seq_len, dtype=torch.bool),
        "input_pos": torch.zeros(batch_size, seq_len, dtype=torch.long),
        "doc_ids": torch.zeros(batch_size, seq_len, dtype=torch.int32),
        "text_targets": torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long),
        "audio_targets": torch.full((batch_size, num_codebooks, seq_len), IGNORE_INDEX, dtype=torch.long),
    }
    index_fields = {
        "text_ffn_index": ("text_ffn", "text positions"),
        "audio_ffn_index": ("audio_ffn", "audio positions"),
        "text_target_index": ("text_target", "text targets"),
        "audio_target_index": ("audio_target", "audio-target positions"),
    }
    indices = {name: [] for name in index_fields}
    num_tokens = torch.zeros(batch_size, dtype=torch.long)
    positions = torch.arange(seq_len)

    for b, row in enumerate(rows):
        length = sum(len(doc) for doc in row)
        if length > seq_len:
            raise CapacityError(
                f"row {b} holds {length} positions in {len(row)} documents, seq_len is {seq_len}"
            )
        start = 0
        for doc_id, doc in enumerate(row):
            if doc.audio_codes.shape[0] != num_codebooks:
                raise ValueError(
                    f"row {b} document {doc_id} has {doc.audio_codes.shape[0]} codebooks, spec has {num_codebooks}"
                )
            end = start + len(doc)
            batch["tokens"][b, start:end] = doc.tokens
            batch["audio_codes"][b, :, start:end] = doc.audio_codes
            batch["audio_in_mask"][b, start:end] = doc.audio_in_mask
            batch["audio_out_mask"][b, start:end] = doc.audio_out_mask
            batch["input_pos"][b, start:end] = positions[: len(doc)]
            batch["doc_ids"][b, start:end] = doc_id
            batch["text_targets"][b, start:end] = doc.text_targets
            batch["audio_targets"][b, :, start:end] = doc.audio_targets
            start = end
        batch["input_pos"][b, start:] = positions[: seq_len - start]
        batch["doc_ids"][b, start:] = len(row)
        num_tokens[b] = start

        audio = batch["audio_in_mask"][b] | batch["audio_out_mask"][b]
        masks = {
            "text_ffn_index": ~audio & (positions < start),
            "audio_ffn_index": audio,
            "text_target_index": batch["text_targets"][b] != IGNORE_INDEX,
            "audio_target_index": (batch["audio_targets"][b] != IGNORE_INDEX).any(0),
        }
        for name, (capacity_name, what) in index_fields.items():
            indices[name].append(
                positions_to_index(masks[name], spec.capacity(capacity_name), f"{what} (row {b})")
            )

    for name in index_fields:
        batch[name] = torch.stack(indices[name])
    batch["num_text_targets"] = (batch["text_targets"] != IGNORE_INDEX).sum(-1)
    batch["num_audio_targets"] = (batch["audio_targets"] != IGNORE_INDEX).sum(-1)
    batch["num_tokens"] = num_tokens
    return {name: batch[name] for name in BATCH_FIELDS}
