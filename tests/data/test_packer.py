"""Packing plan (capacities, too-long policy, determinism) and row collation (padding, positions, indices)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sample_strategies import TINY_TOKENIZER, chatml_samples, make_document

from higgs_tune.data.batch import BATCH_FIELDS, IGNORE_INDEX, CapacityError, PackingSpec
from higgs_tune.data.document import AudioLayout, DocStats
from higgs_tune.data.packer import collate_rows, plan_rows, row_limits
from higgs_tune.data.tokenizer import HiggsTokenizer

TOKENIZER = HiggsTokenizer.from_path(TINY_TOKENIZER)
PAD = TOKENIZER.special.pad
LAYOUT = AudioLayout(num_codebooks=4)
REPO = Path(__file__).resolve().parents[2]


@st.composite
def doc_stats(draw, max_length: int = 60):
    length = draw(st.integers(1, max_length))
    audio = draw(st.integers(0, length - 1))
    return DocStats(
        length=length,
        num_text_positions=length - audio,
        num_audio_positions=audio,
        num_text_targets=draw(st.integers(0, length - audio)),
        num_audio_target_positions=draw(st.integers(0, audio)),
    )


@st.composite
def packing_specs(draw):
    seq_len = draw(st.integers(8, 64))
    capacity = st.none() | st.integers(1, seq_len)
    return PackingSpec(
        seq_len=seq_len,
        batch_size=1,
        text_ffn_capacity=draw(capacity),
        audio_ffn_capacity=draw(capacity),
        text_target_capacity=draw(capacity),
        audio_target_capacity=draw(capacity),
    )


@settings(max_examples=200, deadline=None)
@given(stats=st.lists(doc_stats(), max_size=40), spec=packing_specs())
def test_plan_respects_every_capacity_and_places_each_document_once(stats, spec):
    rows, dropped = plan_rows(stats, spec, too_long="drop")
    limits = row_limits(spec)
    too_long = [i for i, s in enumerate(stats) if any(getattr(s, f) > limit for f, limit in limits.items())]
    assert dropped == too_long
    placed = sorted(i for row in rows for i in row)
    assert placed == sorted(set(range(len(stats))) - set(dropped))
    for row in rows:
        assert row and row == sorted(row)
        for field, limit in limits.items():
            assert sum(getattr(stats[i], field) for i in row) <= limit, field
    # deterministic: the plan is a function of the stats
    assert plan_rows(stats, spec, too_long="drop") == (rows, dropped)
    # no two rows could have been merged on length alone when every capacity is unbounded
    if all(
        getattr(spec, f"{n}_capacity") is None
        for n in ("text_ffn", "audio_ffn", "text_target", "audio_target")
    ):
        lengths = sorted(sum(stats[i].length for i in row) for row in rows)
        assert len(lengths) < 2 or lengths[0] + lengths[1] > spec.seq_len


def naive_first_fit_decreasing(stats: list[DocStats], spec: PackingSpec) -> list[list[int]]:
    """The textbook algorithm, O(documents x rows): the plan must be exactly this."""
    limits = row_limits(spec)
    fitting = [i for i, s in enumerate(stats) if all(getattr(s, f) <= limit for f, limit in limits.items())]
    rows, loads = [], []
    for i in sorted(fitting, key=lambda i: (-stats[i].length, i)):
        fits = [
            r
            for r, load in enumerate(loads)
            if all(load[f] + getattr(stats[i], f) <= limit for f, limit in limits.items())
        ]
        if not fits:
            rows.append([])
            loads.append(dict.fromkeys(limits, 0))
        r = fits[0] if fits else len(rows) - 1
        rows[r].append(i)
        for f in limits:
            loads[r][f] += getattr(stats[i], f)
    return [sorted(row) for row in rows]


@settings(max_examples=200, deadline=None)
@given(stats=st.lists(doc_stats(), max_size=60), spec=packing_specs())
def test_plan_is_first_fit_decreasing(stats, spec):
    rows, _ = plan_rows(stats, spec, too_long="drop")
    assert rows == naive_first_fit_decreasing(stats, spec)


def lengths_only(*lengths: int) -> list[DocStats]:
    return [DocStats(n, n, 0, 0, 0) for n in lengths]


def test_first_fit_decreasing_plan():
    rows, dropped = plan_rows(lengths_only(2, 6, 4, 5, 3), PackingSpec(seq_len=10, batch_size=1))
    # longest first: 6 -> row 0, 5 -> row 1, 4 -> row 0 (full), 3 -> row 1, 2 -> row 1
    assert rows == [[1, 2], [0, 3, 4]] and dropped == []


def test_a_capacity_opens_a_new_row():
    stats = [DocStats(4, 1, 3, 0, 3), DocStats(4, 1, 3, 0, 3)]
    spec = PackingSpec(seq_len=16, batch_size=1, audio_ffn_capacity=5)
    assert plan_rows(stats, spec) == ([[0], [1]], [])


def test_too_long_policy():
    stats = lengths_only(3, 11, 4, 12)
    spec = PackingSpec(seq_len=10, batch_size=1)
    rows, dropped = plan_rows(stats, spec, too_long="drop")
    assert dropped == [1, 3] and rows == [[0, 2]]
    with pytest.raises(CapacityError, match=r"document 1 does not fit.*length=11 > 10.*2 document\(s\)"):
        plan_rows(stats, spec, too_long="error")
    over_capacity = [DocStats(5, 1, 4, 0, 4)]
    with pytest.raises(CapacityError, match="num_audio_positions=4 > 3"):
        plan_rows(over_capacity, PackingSpec(seq_len=10, batch_size=1, audio_ffn_capacity=3))
    with pytest.raises(ValueError, match="too_long"):
        plan_rows(stats, spec, too_long="truncate")


def test_empty_plan():
    assert plan_rows([], PackingSpec(seq_len=8, batch_size=1)) == ([], [])


def documents(samples):
    return [make_document(sample, codes, TOKENIZER, LAYOUT) for sample, codes in samples]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(samples=st.lists(chatml_samples(num_codebooks=4, max_messages=3), min_size=1, max_size=5))
def test_collate_rows_lays_out_documents_and_padding(samples):
    docs = documents(samples)
    seq_len = max(sum(len(d) for d in docs[:2]), sum(len(d) for d in docs[2:])) + 3
    spec = PackingSpec(seq_len=seq_len, batch_size=3, num_codebooks=4)
    rows = [docs[:2], docs[2:], []]
    batch = collate_rows(rows, spec, pad_id=PAD)
    assert tuple(batch) == BATCH_FIELDS
    assert batch["tokens"].shape == (3, seq_len) and batch["audio_codes"].shape == (3, 4, seq_len)
    assert batch["doc_ids"].dtype == torch.int32

    for b, row in enumerate(rows):
        start = 0
        for doc_id, doc in enumerate(row):
            end = start + len(doc)
            assert torch.equal(batch["tokens"][b, start:end], doc.tokens)
            assert torch.equal(batch["audio_codes"][b, :, start:end], doc.audio_codes)
            assert torch.equal(batch["audio_in_mask"][b, start:end], doc.audio_in_mask)
            assert torch.equal(batch["audio_out_mask"][b, start:end], doc.audio_out_mask)
            assert torch.equal(batch["text_targets"][b, start:end], doc.text_targets)
            assert torch.equal(batch["audio_targets"][b, :, start:end], doc.audio_targets)
            assert torch.equal(batch["input_pos"][b, start:end], torch.arange(len(doc)))
            assert (batch["doc_ids"][b, start:end] == doc_id).all()
            start = end
        # padding: its own document id, pad tokens, nothing on any path, no targets
        assert (batch["doc_ids"][b, start:] == len(row)).all()
        assert (batch["tokens"][b, start:] == PAD).all()
        assert (batch["audio_codes"][b, :, start:] == 0).all()
        assert not batch["audio_in_mask"][b, start:].any() and not batch["audio_out_mask"][b, start:].any()
        assert (batch["text_targets"][b, start:] == IGNORE_INDEX).all()
        assert (batch["audio_targets"][b, :, start:] == IGNORE_INDEX).all()
        assert torch.equal(batch["input_pos"][b, start:], torch.arange(seq_len - start))
        assert batch["num_tokens"][b] == start

        # index tensors: ascending positions then the sink (seq_len); padding on neither FFN path
        audio = batch["audio_in_mask"][b] | batch["audio_out_mask"][b]
        expected = {
            "text_ffn_index": ~audio & (torch.arange(seq_len) < start),
            "audio_ffn_index": audio,
            "text_target_index": batch["text_targets"][b] != IGNORE_INDEX,
            "audio_target_index": (batch["audio_targets"][b] != IGNORE_INDEX).any(0),
        }
        for name, mask in expected.items():
            index = batch[name][b]
            real = index[index < seq_len]
            assert torch.equal(real, torch.nonzero(mask).flatten()), name
            assert (index[len(real) :] == seq_len).all()
        assert (
            batch["text_ffn_index"][b].lt(seq_len).sum() + batch["audio_ffn_index"][b].lt(seq_len).sum()
            == start
        )
        assert batch["num_text_targets"][b] == sum(d.num_text_targets for d in row)
        assert torch.equal(batch["num_audio_targets"][b], (batch["audio_targets"][b] != IGNORE_INDEX).sum(-1))


def test_collate_rows_with_capacities_from_the_plan():
    sample = {
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": ["ok", {"type": "audio", "audio_codes": "a"}]},
        ]
    }
    codes = {"a": torch.randint(0, 1024, (4, 5)).numpy()}
    docs = documents([(sample, codes)] * 5)
    one = docs[0].stats
    spec = PackingSpec(
        seq_len=3 * one.length,
        batch_size=2,
        num_codebooks=4,
        text_ffn_capacity=3 * one.num_text_positions,
        audio_ffn_capacity=2 * one.num_audio_positions,  # the binding limit: 2 documents per row
        text_target_capacity=3 * one.num_text_targets,
        audio_target_capacity=3 * one.num_audio_target_positions,
    )
    rows, dropped = plan_rows([d.stats for d in docs], spec)
    assert [len(r) for r in rows] == [2, 2, 1] and dropped == []
    batch = collate_rows([[docs[i] for i in rows[0]], [docs[i] for i in rows[2]]], spec, pad_id=PAD)
    assert batch["audio_ffn_index"].shape == (2, 2 * one.num_audio_positions)
    assert batch["audio_ffn_index"][0].lt(spec.seq_len).all()  # exactly full
    assert batch["text_target_index"].shape == (2, 3 * one.num_text_targets)
    # a row the plan would not have built is refused, naming the capacity
    with pytest.raises(CapacityError, match=r"audio positions \(row 0\)"):
        collate_rows([docs[:3], []], spec, pad_id=PAD)


def test_collate_rows_errors():
    sample = {"messages": [{"role": "assistant", "content": "hello there"}]}
    doc = documents([(sample, {})])[0]
    spec = PackingSpec(seq_len=len(doc) + 1, batch_size=2, num_codebooks=4)
    with pytest.raises(ValueError, match="got 1 rows for a batch of batch_size=2"):
        collate_rows([[doc]], spec, pad_id=PAD)
    with pytest.raises(CapacityError, match=f"row 1 holds {2 * len(doc)} positions"):
        collate_rows([[doc], [doc, doc]], spec, pad_id=PAD)
    with pytest.raises(ValueError, match="4 codebooks, spec has 8"):
        collate_rows([[doc], []], PackingSpec(seq_len=len(doc), batch_size=2, num_codebooks=8), pad_id=PAD)
    empty = collate_rows([[], []], spec, pad_id=PAD)
    assert (empty["doc_ids"] == 0).all() and (empty["num_tokens"] == 0).all()
    assert (empty["text_ffn_index"] == spec.seq_len).all()


def test_inspect_batch_tool_prints_the_row(tmp_path):
    """tools/inspect_batch.py on a two-sample manifest: one row, both documents, the shift visible."""
    rng = np.random.default_rng(0)
    (tmp_path / "codes").mkdir()
    np.save(tmp_path / "codes" / "a.npy", rng.integers(0, 1024, (8, 3)).astype(np.int16))
    samples = [
        {
            "messages": [
                {"role": "user", "content": "say hi"},
                {"role": "assistant", "content": {"type": "audio", "audio_codes": "codes/a.npy"}},
            ]
        },
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]},
    ]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(s) + "\n" for s in samples))
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "inspect_batch.py"), "--manifest", str(manifest)]
        + ["--tokenizer", str(TINY_TOKENIZER), "--seq-len", "128"],
        check=True,
        capture_output=True,
        text=True,
    )
    out = result.stdout
    assert "1 rows of 128" in out and "doc 1:" in out
    assert out.count("AUDIO_OUT") == 3 + 8 + 1
    assert "AUDIO_OUT B B B B B B B B" in out and "AUDIO_OUT E E E E E E E E" in out
    assert "'<|audio_out_bos|>'" in out and "'<|audio_eos|>'" in out
    assert "audio targets per codebook [4, 4, 4, 4, 4, 4, 4, 4]" in out
