"""Exact resume of the data loader: iterate k batches, save the loader state, restore it in a NEW process,
and the remaining batches are identical, mid-epoch and across an epoch boundary, with 0 and 2 workers.
Plus the sampler's sharding over ranks, the empty-row fill of drop_last=False, and the checks on load.

Run as a script (``python test_loader_resume.py DATA_DIR NUM_WORKERS STATE_FILE OUT_FILE``) this file is
the resuming process: it rebuilds the loader, loads the saved state and writes the batches it yields.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from higgs_tune.data.batch import BATCH_FIELDS
from higgs_tune.data.dataset import EMPTY_ROW, build_dataloader, build_higgs_dataset
from higgs_tune.data.tokenizer import HiggsTokenizer

REPO = Path(__file__).resolve().parents[2]
TINY_TOKENIZER = REPO / "higgs_tune" / "assets" / "tiny_tokenizer"
EPOCHS = 2
SEQ_LEN = 512
BATCH_SIZE = 2
SEED = 7


def build_train_set(data_dir: Path):
    train, _, _ = build_higgs_dataset(
        HiggsTokenizer.from_path(TINY_TOKENIZER),
        path=str(data_dir / "train.jsonl"),
        seq_len=SEQ_LEN,
        batch_size=BATCH_SIZE,
        seed=SEED,
    )
    return train


def make_loader(data_dir: Path, num_workers: int):
    train = build_train_set(data_dir)
    return build_dataloader(train, train.spec, seed=SEED, shuffle=True, num_workers=num_workers)


def run(loader, start_epoch: int, stop_after: int | None = None):
    """Follow the documented epoch protocol; returns ([(epoch, batch)], state saved after ``stop_after``)."""
    batches = []
    for epoch in range(start_epoch, EPOCHS):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            batches.append((epoch, batch))
            if len(batches) == stop_after:
                return batches, {"loader": loader.state_dict(), "epoch": epoch}
    return batches, None


def resume_in_new_process(data_dir: Path, num_workers: int, state: dict, tmp_path: Path):
    state_file, out_file = tmp_path / "state.pt", tmp_path / "resumed.pt"
    torch.save(state, state_file)
    command = [sys.executable, __file__, str(data_dir), str(num_workers), str(state_file), str(out_file)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return torch.load(out_file, weights_only=True)


def assert_same_batches(got, expected):
    assert [epoch for epoch, _ in got] == [epoch for epoch, _ in expected]
    for i, ((_, a), (_, b)) in enumerate(zip(got, expected)):
        assert set(a) == set(BATCH_FIELDS)
        for name in BATCH_FIELDS:
            assert torch.equal(a[name], b[name]), f"batch {i}, field {name}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_synthetic_tool", REPO / "tools" / "make_synthetic.py")
    make_synthetic = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = make_synthetic
    spec.loader.exec_module(make_synthetic)
    directory = tmp_path_factory.mktemp("synthetic")
    make_synthetic.make_synthetic(directory, num_samples=60, num_val=2, seed=0)
    return directory


@pytest.fixture(scope="module")
def reference(data_dir):
    """All batches of EPOCHS epochs, uninterrupted."""
    batches, _ = run(make_loader(data_dir, num_workers=0), start_epoch=0)
    return batches


def batches_per_epoch(reference) -> int:
    return sum(1 for epoch, _ in reference if epoch == 0)


def test_reference_is_deterministic_and_reshuffled_per_epoch(data_dir, reference):
    per_epoch = batches_per_epoch(reference)
    assert per_epoch >= 4 and len(reference) == EPOCHS * per_epoch
    with_workers, _ = run(make_loader(data_dir, num_workers=2), start_epoch=0)
    assert_same_batches(with_workers, reference)  # workers change nothing
    first = torch.stack([b["tokens"] for e, b in reference if e == 0])
    second = torch.stack([b["tokens"] for e, b in reference if e == 1])
    assert not torch.equal(first, second)  # epoch 1 visits the rows in another order


@pytest.mark.parametrize(
    ("num_workers", "where"),
    [(0, "mid_epoch"), (2, "mid_epoch"), (0, "end_of_epoch"), (2, "next_epoch")],
)
def test_resume_in_a_new_process_is_exact(data_dir, reference, tmp_path, num_workers, where):
    per_epoch = batches_per_epoch(reference)
    k = {"mid_epoch": 3, "end_of_epoch": per_epoch, "next_epoch": per_epoch + 2}[where]
    seen, state = run(make_loader(data_dir, num_workers), start_epoch=0, stop_after=k)
    assert_same_batches(seen, reference[:k])
    resumed = resume_in_new_process(data_dir, num_workers, state, tmp_path)
    assert len(resumed) == len(reference) - k
    assert_same_batches(resumed, reference[k:])


def test_state_at_end_of_epoch_also_resumes_as_start_of_next(data_dir, reference):
    per_epoch = batches_per_epoch(reference)
    _, state = run(make_loader(data_dir, 0), start_epoch=0, stop_after=per_epoch)
    loader = make_loader(data_dir, 0)
    loader.load_state_dict(state["loader"])
    resumed, _ = run(loader, start_epoch=state["epoch"] + 1)
    assert_same_batches(resumed, reference[per_epoch:])


def test_saved_state_carries_the_epoch(data_dir, reference):
    per_epoch = batches_per_epoch(reference)
    _, state = run(make_loader(data_dir, 0), start_epoch=0, stop_after=per_epoch + 1)
    loader = make_loader(data_dir, 0)
    loader.load_state_dict(state["loader"])
    resumed = [(1, batch) for batch in loader]  # no set_epoch call: the state says epoch 1
    assert loader.sampler.epoch == 1
    assert_same_batches(resumed, reference[per_epoch + 1 :])


def test_resume_refuses_a_wrong_epoch_or_another_setup(data_dir, reference):
    _, state = run(make_loader(data_dir, 0), start_epoch=0, stop_after=2)
    loader = make_loader(data_dir, 0)
    loader.load_state_dict(state["loader"])
    loader.sampler.set_epoch(1)
    with pytest.raises(
        ValueError, match=r"state is at epoch 0 \(position 4/\d+\) but set_epoch\(1\) was called"
    ):
        iter(loader)
    train = build_train_set(data_dir)
    other = build_dataloader(train, train.spec, seed=SEED, shuffle=True, num_workers=0, rank=1, world_size=2)
    other.load_state_dict(state["loader"])
    with pytest.raises(ValueError, match="num_replicas: saved 1, now 2, rank: saved 0, now 1"):
        iter(other)


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_share_the_rows(data_dir, drop_last):
    train = build_train_set(data_dir)
    world_size = 3
    per_rank = []
    for rank in range(world_size):
        loader = build_dataloader(
            train,
            train.spec,
            seed=SEED,
            shuffle=True,
            num_workers=0,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )
        loader.sampler.set_epoch(0)
        per_rank.append(list(loader.sampler))
        batches = list(loader)
        assert all(b["tokens"].shape == (BATCH_SIZE, SEQ_LEN) for b in batches)  # always full static batches
        rows_seen = len(per_rank[-1])
        assert len(batches) == (rows_seen // BATCH_SIZE if drop_last else -(-rows_seen // BATCH_SIZE))
    real = [i for indices in per_rank for i in indices if i != EMPTY_ROW]
    assert len(real) == len(set(real))  # no row twice
    if drop_last:
        per_rank_trained = len(train) // world_size // BATCH_SIZE * BATCH_SIZE  # whole batches per rank
        assert len(real) == world_size * per_rank_trained and EMPTY_ROW not in sum(per_rank, [])
    else:
        assert sorted(real) == list(range(len(train)))  # every row exactly once, short ranks padded


def test_short_last_batch_is_filled_with_empty_rows(data_dir):
    train = build_train_set(data_dir)
    loader = build_dataloader(train, train.spec, seed=SEED, shuffle=False, num_workers=0, drop_last=False)
    batches = list(loader)
    assert len(batches) == -(-len(train) // BATCH_SIZE)
    rows_in_last = len(train) - (len(batches) - 1) * BATCH_SIZE
    last = batches[-1]
    assert (last["num_tokens"][:rows_in_last] > 0).all() and (last["num_tokens"][rows_in_last:] == 0).all()
    assert (last["num_text_targets"][rows_in_last:] == 0).all() and (
        last["num_audio_targets"][rows_in_last:] == 0
    ).all()
    expected_tokens = [sum(train.entries[i].stats.length for i in row) for row in train.rows]
    assert torch.cat([b["num_tokens"] for b in batches])[: len(train)].tolist() == expected_tokens


if __name__ == "__main__":
    data_dir_arg, workers_arg, state_file_arg, out_file_arg = sys.argv[1:]
    saved = torch.load(state_file_arg, weights_only=True)
    resumed_loader = make_loader(Path(data_dir_arg), int(workers_arg))
    resumed_loader.load_state_dict(saved["loader"])
    resumed_batches, _ = run(resumed_loader, start_epoch=saved["epoch"])
    torch.save(resumed_batches, out_file_arg)
