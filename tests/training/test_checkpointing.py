"""Recipe checkpoints (torch.distributed.checkpoint, one process here; FSDP runs in tests/recipes):
exact round trip, atomic writes, keep-last-k, damaged files named, RNG round trip, trainable-only
checkpoints of partly frozen models (what they store, exact resume, another base refused)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from higgs_tune.training import checkpointing
from higgs_tune.training.checkpointing import (
    CheckpointError,
    checkpoint_dirs,
    fingerprint_frozen_base,
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


# ------------------------------------------------------------------ trainable-only checkpoints (LoRA, adapters)
def partly_frozen(base_seed: int, head_seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A frozen base (weights from ``base_seed``) with a trainable head (from ``head_seed``)."""
    torch.manual_seed(base_seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    model[0].requires_grad_(False)
    torch.manual_seed(head_seed)
    torch.nn.init.normal_(model[2].weight)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    return model, optimizer


def train_steps(model, optimizer, batches) -> list[float]:
    losses = []
    for batch in batches:
        loss = model(batch).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def stored_keys(path) -> set[str]:
    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def base_of(model) -> checkpointing.BaseFingerprint:
    return fingerprint_frozen_base(model, "test base", {"layers": 2})


def test_trainable_only_checkpoint_holds_the_trainable_parameters_and_resumes_exactly(tmp_path):
    batches = [torch.randn(4, 16) for _ in range(6)]
    model, optimizer = partly_frozen(base_seed=0, head_seed=1)
    expected = train_steps(model, optimizer, batches)

    model, optimizer = partly_frozen(base_seed=0, head_seed=1)
    train_steps(model, optimizer, batches[:3])
    path = save(tmp_path, 3, model, optimizer, frozen_base=base_of(model))
    keys = stored_keys(path)
    assert {k for k in keys if k.startswith("model.")} == {"model.2.weight", "model.2.bias"}
    assert {k for k in keys if k.startswith("optimizer.state.")} == {
        f"optimizer.state.2.{p}.{s}" for p in ("weight", "bias") for s in ("exp_avg", "exp_avg_sq", "step")
    }
    # A fresh run: the same frozen base, another (random) head and no optimizer state yet.
    fresh_model, fresh_optimizer = partly_frozen(base_seed=0, head_seed=7)
    load_checkpoint(path, model=fresh_model, optimizer=fresh_optimizer, frozen_base=base_of(fresh_model))
    assert train_steps(fresh_model, fresh_optimizer, batches[3:]) == expected[3:]  # exact


def test_trainable_only_checkpoint_refuses_another_base(tmp_path):
    model, optimizer = partly_frozen(base_seed=0, head_seed=1)
    train_steps(model, optimizer, [torch.randn(4, 16)])
    path = save(tmp_path, 1, model, optimizer, frozen_base=base_of(model))
    other_model, other_optimizer = partly_frozen(base_seed=5, head_seed=1)  # same shapes, other weights
    with pytest.raises(CheckpointError, match="was trained on the base test base") as error:
        load_checkpoint(path, model=other_model, optimizer=other_optimizer, frozen_base=base_of(other_model))
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="every parameter of this model trains"):
        load_checkpoint(path, model=other_model, optimizer=other_optimizer, frozen_base=None)


def test_trainable_only_checkpoint_refuses_other_trainable_parameters(tmp_path):
    model, optimizer = partly_frozen(base_seed=0, head_seed=1)
    train_steps(model, optimizer, [torch.randn(4, 16)])
    path = save(tmp_path, 1, model, optimizer, frozen_base=base_of(model))
    model[2].bias.requires_grad_(False)  # the same base weights, but the bias is now frozen
    base = fingerprint_frozen_base(model, "test base", {"layers": 2})
    saved = json.loads((path / "meta.json").read_text())
    saved["frozen_base"]["sha256"] = base.sha256  # only the parameter check can catch it now
    (path / "meta.json").write_text(json.dumps(saved))
    optimizer = torch.optim.AdamW([model[2].weight], lr=0.01)
    with pytest.raises(
        CheckpointError, match=r"other trainable parameters .* 1 unexpected, e.g. \['2.bias'\]"
    ):
        load_checkpoint(path, model=model, optimizer=optimizer, frozen_base=base)


def test_fingerprint_follows_the_frozen_weights_not_the_trainable_ones():
    model, _ = partly_frozen(base_seed=0, head_seed=1)
    same_base, _ = partly_frozen(base_seed=0, head_seed=2)
    assert base_of(model) == base_of(same_base)
    with torch.no_grad():
        same_base[0].weight[0, 0] += 1.0  # the first bytes of a frozen tensor
    assert base_of(model).sha256 != base_of(same_base).sha256
    assert fingerprint_frozen_base(model, "x", {"layers": 3}).sha256 != base_of(model).sha256
    everything_trains, _ = trained(seed=0)
    assert fingerprint_frozen_base(everything_trains, "x", {}) is None
