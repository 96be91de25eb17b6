"""The recipe's transformers-layout export (export.formats) and a transformers-layout checkpoint_dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from recipe_testing import run_recipe
from safetensors.torch import load_file

from higgs_tune.models.higgs_audio.checkpoint import checkpoint_layout, read_hf_state_dict

pytestmark = pytest.mark.slow


def test_exports_transformers_layout_and_fine_tunes_from_it(tmp_path: Path, synthetic: Path):
    first = tmp_path / "first"
    run_recipe(first, synthetic, "max_steps=2", "batch_size=2", "export.formats=[boson,transformers]")
    assert checkpoint_layout(first / "hf") == "boson"
    assert checkpoint_layout(first / "hf_transformers") == "transformers"
    boson = load_file(first / "hf" / "model.safetensors")
    ours_from_transformers = read_hf_state_dict(first / "hf_transformers")
    assert sorted(ours_from_transformers) == sorted(boson)
    for key, tensor in boson.items():
        assert torch.equal(ours_from_transformers[key], tensor), key
    for name in ("processor_config.json", "chat_template.jinja", "tokenizer.json", "generation_config.json"):
        assert (first / "hf_transformers" / name).is_file(), name

    # checkpointer.checkpoint_dir takes the transformers-layout directory; lr 0 keeps the weights
    second = tmp_path / "second"
    run_recipe(
        second,
        synthetic,
        "max_steps=1",
        "batch_size=2",
        "optimizer.lr=0.0",
        f"checkpointer.checkpoint_dir={first / 'hf_transformers'}",
    )
    again = load_file(second / "hf" / "model.safetensors")
    for key, tensor in boson.items():
        assert torch.equal(again[key], tensor), key


def test_bad_export_format_is_one_line(tmp_path: Path, synthetic: Path):
    result = run_recipe(tmp_path, synthetic, "export.formats=[onnx]", expect_success=False)
    assert result.returncode != 0
    assert "export.formats must be a list of ('boson', 'transformers') including 'boson'" in result.stderr
