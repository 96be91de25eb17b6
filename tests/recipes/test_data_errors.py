"""A user's file error at ``tune run`` set-up is one line (``tune: error: <file>[:<line>]: ...``, exit 2),
like a config error, not a traceback; ``tune run --verbose`` shows the traceback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from recipe_testing import ENV, REPO, recipe_command

from higgs_tune.models.higgs_audio.builders import higgs_audio_tiny
from higgs_tune.models.higgs_audio.checkpoint import save_hf_checkpoint

# The user's shell with this checkout first on the path (the same package CI installs editable).
RUN_ENV = {**ENV, "PYTHONPATH": str(REPO)}


def edited_manifest(synthetic: Path, folder: Path, line_number: int, edit) -> Path:
    """A copy of the synthetic training manifest with line ``line_number`` edited (codes shared)."""
    folder.mkdir()
    (folder / "codes").symlink_to(synthetic / "codes")
    lines = (synthetic / "train.jsonl").read_text().splitlines()
    lines[line_number - 1] = edit(lines[line_number - 1])
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def missing_codes(line: str) -> str:
    record = json.loads(line)
    record["messages"][-1]["content"]["audio_codes"] = "codes/missing.npy"
    return json.dumps(record)


def tiny_checkpoint(folder: Path, edit_config=None, drop_weights: bool = False) -> Path:
    model = higgs_audio_tiny()
    save_hf_checkpoint(model.state_dict(), model.args, folder)
    if edit_config is not None:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    if drop_weights:
        for weights in folder.glob("*.safetensors"):
            weights.unlink()
    return folder


def run_setup(tmp_path: Path, synthetic: Path, *overrides: str, verbose: bool = False):
    command = recipe_command(tmp_path / "run", synthetic, "max_steps=1", "dataset.val_path=null", *overrides)
    if verbose:
        command.insert(command.index("run") + 1, "--verbose")
    return subprocess.run(command, capture_output=True, text=True, env=RUN_ENV, cwd=REPO, timeout=600)


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("tune: error: ")]
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.mark.slow
def test_malformed_manifest_line(tmp_path, synthetic):
    manifest = edited_manifest(synthetic, tmp_path / "data", 3, lambda line: line[: len(line) // 2])
    result = run_setup(tmp_path, synthetic, f"dataset.path={manifest}")
    assert_one_line_error(result, f"{manifest}:3: malformed JSON")
    verbose = run_setup(tmp_path, synthetic, f"dataset.path={manifest}", verbose=True)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr and "BadSampleError" in verbose.stderr


@pytest.mark.slow
def test_missing_codes_file(tmp_path, synthetic):
    manifest = edited_manifest(synthetic, tmp_path / "data", 2, missing_codes)
    result = run_setup(tmp_path, synthetic, f"dataset.path={manifest}")
    assert_one_line_error(result, f"{manifest}:2: codes file", "missing.npy", "file not found")


@pytest.mark.slow
def test_missing_manifest(tmp_path, synthetic):
    result = run_setup(tmp_path, synthetic, f"dataset.path={tmp_path / 'nowhere.jsonl'}")
    assert_one_line_error(result, f"manifest {tmp_path / 'nowhere.jsonl'} not found")


@pytest.mark.slow
def test_checkpoint_directory_without_weights(tmp_path, synthetic):
    checkpoint = tiny_checkpoint(tmp_path / "checkpoint", drop_weights=True)
    result = run_setup(tmp_path, synthetic, f"checkpointer.checkpoint_dir={checkpoint}")
    assert_one_line_error(result, f"in {checkpoint}", "model.safetensors")


@pytest.mark.slow
def test_tokenizer_does_not_match_the_checkpoint(tmp_path, synthetic):
    def shift_token(config):
        config["audio_out_token_idx"] -= 1

    checkpoint = tiny_checkpoint(tmp_path / "checkpoint", edit_config=shift_token)
    result = run_setup(tmp_path, synthetic, f"checkpointer.checkpoint_dir={checkpoint}")
    assert_one_line_error(
        result, "tiny_tokenizer/tokenizer.json does not match the model config: audio_out_token_idx="
    )
