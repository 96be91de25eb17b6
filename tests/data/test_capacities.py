"""``auto`` per-row capacities: planned from the data, never exceeded, deterministic, explicit numbers win,
a resumed run keeps the capacities it started with."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_packer import doc_stats

from higgs_tune.data.batch import CapacityError, PackingSpec
from higgs_tune.data.capacities import (
    CAPACITY_NAMES,
    packing_summary,
    padding_fractions,
    padding_warnings,
    round_capacity,
    shrink_to_rows,
)
from higgs_tune.data.dataset import build_higgs_dataset, resume_capacities
from higgs_tune.data.document import AudioLayout
from higgs_tune.data.packer import plan_balanced_rows, row_limits
from higgs_tune.data.tokenizer import HiggsTokenizer

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
from make_synthetic import make_synthetic  # noqa: E402

TOKENIZER = HiggsTokenizer.from_path(REPO / "higgs_tune" / "assets" / "tiny_tokenizer" / "tokenizer.json")
AUTO = dict.fromkeys((f"{name}_capacity" for name in CAPACITY_NAMES), "auto")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(out, num_samples=600, num_val=20, seed=0)
    return out


def build(data: Path, seq_len: int = 512, **kwargs):
    capacities = {**AUTO, **{k: v for k, v in kwargs.items() if k.endswith("_capacity")}}
    rest = {k: v for k, v in kwargs.items() if not k.endswith("_capacity")}
    return build_higgs_dataset(
        TOKENIZER,
        path=str(data / "train.jsonl"),
        val_path=str(data / "val.jsonl"),
        seq_len=seq_len,
        batch_size=2,
        audio_layout=AudioLayout(),
        **capacities,
        **rest,
    )


@settings(max_examples=150, deadline=None)
@given(
    stats=st.lists(doc_stats(), max_size=60),
    seq_len=st.integers(8, 96),
    explicit=st.dictionaries(st.sampled_from(CAPACITY_NAMES), st.integers(1, 96)),
)
def test_balanced_rows_never_exceed_a_capacity_and_place_each_fitting_document_once(stats, seq_len, explicit):
    explicit = {name: min(value, seq_len) for name, value in explicit.items()}
    spec = PackingSpec(seq_len=seq_len, batch_size=1, **{f"{n}_capacity": v for n, v in explicit.items()})
    rows, dropped = plan_balanced_rows(stats, spec, too_long="drop")
    limits = row_limits(spec)
    fits = [all(getattr(s, f) <= limit for f, limit in limits.items()) for s in stats]
    assert sorted(i for row in rows for i in row) == [i for i, ok in enumerate(fits) if ok]
    assert dropped == [i for i, ok in enumerate(fits) if not ok]
    assert all(row for row in rows)  # no empty row
    auto = [name for name in CAPACITY_NAMES if name not in explicit]
    planned = shrink_to_rows(spec, stats, rows, auto)
    for row in rows:
        for field, limit in row_limits(planned).items():
            assert sum(getattr(stats[i], field) for i in row) <= limit
    for name in CAPACITY_NAMES:
        assert planned.capacity(name) <= spec.capacity(name)
        if name in explicit:
            assert planned.capacity(name) == explicit[name]  # an explicit capacity is never planned
    assert plan_balanced_rows(stats, spec, too_long="drop") == (rows, dropped)  # a pure function
    padding = padding_fractions(stats, rows, planned)
    assert all(0.0 <= value <= 1.0 for value in padding.values())  # 1.0: a dimension no document uses


@pytest.mark.parametrize("value", [1, 31, 32, 33, 63, 64, 65, 100, 500, 1000, 2047, 2048, 5000])
def test_rounding_is_monotone_adds_at_most_a_32nd_and_reaches_64_row_tiles(value):
    rounded = round_capacity(value, seq_len=8192)
    assert value <= rounded <= value + value / 32
    assert round_capacity(value + 1, 8192) >= rounded
    if value >= 2048:
        assert rounded % 64 == 0
    assert round_capacity(value, seq_len=value - 1 if value > 1 else 1) <= max(value - 1, 1)


def test_auto_capacities_fit_the_data_and_pad_less_than_the_hand_picked_ones(synthetic):
    train, val, stats = build(synthetic)
    capacities = train.capacities()
    assert stats["train_text_ffn_capacity"] == capacities["text_ffn"]
    assert set(capacities.values()) <= set(range(1, 513)) and capacities["text_target"] < 128
    for name in ("seq", *CAPACITY_NAMES):
        key = "train_padding_fraction" if name == "seq" else f"train_{name}_padding_fraction"
        assert 0.0 <= stats[key] < 0.5, (name, stats[key])
    # the old hand-picked demo capacities: the same documents, far more padding in the capacities
    hand, _, hand_stats = build(
        synthetic,
        text_ffn_capacity=352,
        audio_ffn_capacity=256,
        text_target_capacity=96,
        audio_target_capacity=256,
    )
    assert hand.capacities() == {"text_ffn": 352, "audio_ffn": 256, "text_target": 96, "audio_target": 256}
    worst = max(stats[f"train_{n}_padding_fraction"] for n in CAPACITY_NAMES)
    assert worst < max(hand_stats[f"train_{n}_padding_fraction"] for n in CAPACITY_NAMES)
    # validation: the training capacities when its documents fit them
    assert val.spec == train.spec
    assert "train packing:" in packing_summary(stats) and "text_target=" in packing_summary(stats, "val")


def test_auto_is_deterministic_from_the_seed_and_an_explicit_capacity_wins(synthetic):
    first, _, _ = build(synthetic, seed=3)
    again, _, _ = build(synthetic, seed=3)
    assert again.capacities() == first.capacities() and again.rows == first.rows
    mixed, _, _ = build(synthetic, seed=3, audio_ffn_capacity=300)
    assert mixed.capacities()["audio_ffn"] == 300
    assert all(sum(mixed.entries[i].stats.num_audio_positions for i in row) <= 300 for row in mixed.rows)


def test_a_resumed_run_keeps_its_capacities_and_refuses_data_that_needs_larger_ones(synthetic):
    train, _, _ = build(synthetic)
    saved = train.capacities()
    resumed, _, _ = build(synthetic, resumed_capacities=saved)
    assert resumed.capacities() == saved and resumed.rows == train.rows
    larger = {name: value + 8 for name, value in saved.items()}  # data that now needs less: kept as saved
    assert build(synthetic, resumed_capacities=larger)[0].capacities() == larger
    smaller = dict(saved, audio_ffn=saved["audio_ffn"] - 40)
    with pytest.raises(CapacityError, match=r"dataset\.audio_ffn_capacity: the data now needs \d+ per row"):
        build(synthetic, resumed_capacities=smaller)
    with pytest.raises(ValueError, match=r"dataset\.text_ffn_capacity=300 but the run being resumed"):
        build(synthetic, text_ffn_capacity=300, resumed_capacities=saved)


def test_resume_capacities_with_an_old_checkpoint_field_missing():
    spec = PackingSpec(seq_len=64, batch_size=1, text_ffn_capacity=32)
    requested = {"text_ffn": "auto", "audio_ffn": "auto", "text_target": "auto", "audio_target": "auto"}
    with pytest.raises(ValueError, match="saved no audio_ffn_capacity"):
        resume_capacities(spec, requested, {"text_ffn": 32})
    full = dict.fromkeys(CAPACITY_NAMES, 64)
    assert dataclasses.asdict(resume_capacities(spec, requested, full))["text_ffn_capacity"] == 64


def test_padding_warning_names_the_knob():
    stats = {
        "train_padding_fraction": 0.3,
        **{f"train_{n}_padding_fraction": 0.05 for n in CAPACITY_NAMES},
        "train_text_target_padding_fraction": 0.5,
    }
    warnings = padding_warnings(stats, {"text_target": 96, "audio_ffn": "auto"})
    assert len(warnings) == 2
    assert "padding of seq is 30%" in warnings[0] and "lower seq_len" in warnings[0]
    assert "dataset.text_target_capacity=auto or lower it" in warnings[1]
    stats["train_text_target_padding_fraction"] = 0.05
    stats["train_audio_ffn_padding_fraction"] = 0.4
    (warning,) = padding_warnings(dict(stats, train_padding_fraction=0.1), {"audio_ffn": "auto"})
    assert "raise seq_len" in warning and "dataset.audio_ffn_capacity" in warning


def test_config_validation_accepts_auto_and_numbers_and_names_a_bad_capacity():
    from higgs_tune.config import ConfigError, load_config, validate_config

    validate_config(load_config(REPO / "configs" / "cpu_tiny.yaml"))
    validate_config(load_config(REPO / "configs" / "cpu_tiny.yaml", ["dataset.text_ffn_capacity=128"]))
    for bad in ("autox", "0", "-3"):
        with pytest.raises(
            ConfigError, match="dataset.text_ffn_capacity must be a positive int, 'auto' or null"
        ):
            validate_config(
                load_config(REPO / "configs" / "cpu_tiny.yaml", [f"dataset.text_ffn_capacity={bad}"])
            )
