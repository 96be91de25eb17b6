"""Recipe checkpoints: atomic writes, keep-last-k, damaged files named, RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from higgs_tune.training import checkpointing
from higgs_tune.training.checkpointing import (
    CheckpointError,
    TrainingState,
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def make_state(step: int) -> TrainingState:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return TrainingState(
        step=step,
        epoch=step // 10,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        lr_scheduler={"last_epoch": step},
        data_loader=[{"position": step}],
        rng=[rng_state()],
    )


def test_round_trip_and_keep_last(tmp_path):
    states = {step: make_state(step) for step in (4, 8, 12)}
    for state in states.values():
        save_checkpoint(tmp_path, state, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000008", "step_00000012"]
    loaded = load_checkpoint(latest_checkpoint(tmp_path))
    assert (loaded.step, loaded.epoch) == (12, 1)
    for name, tensor in states[12].model.items():
        assert torch.equal(loaded.model[name], tensor)
    assert loaded.data_loader == [{"position": 12}]
    assert torch.equal(loaded.optimizer["state"][0]["exp_avg"], states[12].optimizer["state"][0]["exp_avg"])


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, make_state(4))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(tmp_path, make_state(8))
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000004"]  # no half-written folder left
    assert load_checkpoint(latest_checkpoint(tmp_path)).step == 4


def test_leftover_temporary_folder_of_a_killed_save_is_ignored(tmp_path):
    save_checkpoint(tmp_path, make_state(4))
    partial = tmp_path / ".step_00000008.abc123"  # what a SIGKILL in the middle of a save leaves
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00\x01")
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert load_checkpoint(latest_checkpoint(tmp_path)).step == 4


@pytest.mark.parametrize("name", ["model.safetensors", "training_state.pt", "meta.json"])
def test_truncated_file_is_an_error_naming_it(tmp_path, name):
    path = save_checkpoint(tmp_path, make_state(4))
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(path)


def test_missing_file_is_an_error(tmp_path):
    path = save_checkpoint(tmp_path, make_state(4))
    (path / "training_state.pt").unlink()
    with pytest.raises(CheckpointError, match="training_state.pt is missing"):
        load_checkpoint(path)


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the checkpoint folder should be")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        save_checkpoint(blocker / "checkpoints", make_state(4))


def test_rng_state_round_trip():
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]
