"""``auto`` per-row capacities through ``tune run``: the same on 1 and 2 processes and across a resume
(saved with the checkpoint and in the resolved config.yaml); a resume whose data needs larger ones fails
naming the capacity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from recipe_testing import records_all, run_recipe

pytestmark = pytest.mark.slow

NAMES = ("text_ffn", "audio_ffn", "text_target", "audio_target")
AUTO = tuple(f"dataset.{name}_capacity=auto" for name in NAMES)


def resolved_capacities(output_dir: Path) -> dict[str, int]:
    dataset = yaml.safe_load((output_dir / "config.yaml").read_text())["dataset"]
    return {name: dataset[f"{name}_capacity"] for name in NAMES}


def setup_record(output_dir: Path) -> dict:
    (record,) = [r for r in records_all(output_dir) if "setup/train_rows" in r]
    return record


def test_auto_capacities_are_the_same_on_one_and_two_processes(tmp_path: Path, synthetic: Path):
    single = run_recipe(tmp_path / "single", synthetic, *AUTO, "max_steps=2", "batch_size=2")
    run_recipe(tmp_path / "sharded", synthetic, *AUTO, "max_steps=2", "batch_size=1", nproc=2)
    capacities = resolved_capacities(tmp_path / "single")
    assert all(isinstance(value, int) and 0 < value <= 256 for value in capacities.values())
    assert resolved_capacities(tmp_path / "sharded") == capacities
    for output_dir in (tmp_path / "single", tmp_path / "sharded"):
        record = setup_record(output_dir)
        assert record["step"] == 0
        assert {name: record[f"setup/train_{name}_capacity"] for name in NAMES} == capacities
        assert 0.0 <= record["setup/train_audio_ffn_padding_fraction"] < 1.0
    line = next(line for line in single.stderr.splitlines() if line.startswith("train packing:"))
    assert all(f"{name}={capacities[name]}" in line for name in NAMES) and "padding seq=" in line


def test_a_resume_keeps_the_capacities_and_refuses_data_that_needs_larger_ones(
    tmp_path: Path, synthetic: Path
):
    first = tmp_path / "first"
    common = (*AUTO, "max_steps=4", "save_every_n_steps=2", "keep_last_n_checkpoints=3", "batch_size=2")
    run_recipe(first, synthetic, *common)
    capacities = resolved_capacities(first)
    resumed = tmp_path / "resumed"
    shutil.copytree(first / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    result = run_recipe(resumed, synthetic, *common, "resume_from_checkpoint=true")
    assert "resumed from" in result.stderr
    assert resolved_capacities(resumed) == capacities

    # The same run on data with one sample of 200 audio columns: its rows would need more audio positions.
    grown = tmp_path / "grown"
    shutil.copytree(synthetic, grown)
    codes = np.random.default_rng(0).integers(0, 1024, size=(8, 200)).astype(np.int16)
    np.save(grown / "codes" / "long_sample.npy", codes)
    sample = {
        "messages": [
            {"role": "user", "content": "one two three"},
            {"role": "assistant", "content": {"type": "audio", "audio_codes": "codes/long_sample.npy"}},
        ]
    }
    with open(grown / "train.jsonl", "a") as manifest:
        manifest.write(json.dumps(sample) + "\n")
    again = tmp_path / "again"
    shutil.copytree(first / "checkpoints" / "step_00000002", again / "checkpoints" / "step_00000002")
    failed = run_recipe(again, grown, *common, "resume_from_checkpoint=true", expect_success=False)
    assert failed.returncode != 0
    assert "dataset.audio_ffn_capacity: the data now needs" in failed.stderr
    assert f"started with {capacities['audio_ffn']}" in failed.stderr
