"""Recipe checkpoints (torch.distributed.checkpoint, one process here; FSDP runs in tests/recipes):
exact round trip, atomic writes, keep-last-k, damaged files named, RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from higgs_tune.training import checkpointing
from higgs_tune.training.checkpointing import (
    CheckpointError,
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)


def trained(seed: int, lr_as_tensor: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small model and AdamW after two steps (so the optimizer has state)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    lr = torch.tensor(0.01) if lr_as_tensor else 0.01
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(2):
        model(torch.randn(4, 16)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def save(root, step: int, model, optimizer, **kwargs):
    state = {"lr_scheduler": {"last_epoch": step}, "global_rows_consumed": 2 * step, "rng": [rng_state()]}
    return save_checkpoint(
        root, step=step, epoch=step // 10, model=model, optimizer=optimizer, training_state=state, **kwargs
    )


@pytest.mark.parametrize("lr_as_tensor", [False, True])
def test_round_trip_continues_training_exactly(tmp_path, lr_as_tensor):
    model, optimizer = trained(seed=0, lr_as_tensor=lr_as_tensor)
    path = save(tmp_path, 12, model, optimizer)
    fresh_model, fresh_optimizer = trained(seed=1, lr_as_tensor=lr_as_tensor)  # other weights and state
    loaded = load_checkpoint(path, model=fresh_model, optimizer=fresh_optimizer)
    assert (loaded.step, loaded.epoch, loaded.world_size) == (12, 1, 1)
    assert loaded.training_state["global_rows_consumed"] == 24
    batch = torch.randn(4, 16)
    for m, o in ((model, optimizer), (fresh_model, fresh_optimizer)):
        m(batch).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)


def test_keep_last(tmp_path):
    model, optimizer = trained(seed=0)
    for step in (4, 8, 12):
        save(tmp_path, step, model, optimizer, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000008", "step_00000012"]
    assert latest_checkpoint(tmp_path).name == "step_00000012"


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = trained(seed=0)
    save(tmp_path, 4, model, optimizer)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save(tmp_path, 8, model, optimizer)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000004"]  # no half-written folder left
    verify_checkpoint(latest_checkpoint(tmp_path))


def test_leftover_temporary_folder_of_a_killed_save_is_ignored(tmp_path):
    model, optimizer = trained(seed=0)
    save(tmp_path, 4, model, optimizer)
    partial = tmp_path / ".step_00000008.abc123"  # what a SIGKILL in the middle of a save leaves
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\x00\x01")
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    save(tmp_path, 8, model, optimizer)  # the next complete save clears it away
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000008"]


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata", "training_state.pt", "meta.json"])
def test_truncated_file_is_an_error_naming_it(tmp_path, name):
    model, optimizer = trained(seed=0)
    path = save(tmp_path, 4, model, optimizer)
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(path, model=model, optimizer=optimizer)


@pytest.mark.parametrize("name", ["__0_0.distcp", "training_state.pt"])
def test_missing_file_is_an_error(tmp_path, name):
    model, optimizer = trained(seed=0)
    path = save(tmp_path, 4, model, optimizer)
    (path / name).unlink()
    with pytest.raises(CheckpointError, match=f"{name} is missing"):
        load_checkpoint(path, model=model, optimizer=optimizer)


def test_unwritable_output_dir_is_a_clear_error(tmp_path):
    model, optimizer = trained(seed=0)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the checkpoint folder should be")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        save(blocker / "checkpoints", 4, model, optimizer)


def test_rng_state_round_trip():
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]
