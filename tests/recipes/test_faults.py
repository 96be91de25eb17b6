"""Faults and bad input, end to end through the recipe (`tune run` in a subprocess): each test asserts
the message a user sees and that no data or checkpoint is lost."""

from __future__ import annotations

import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from recipe_testing import ENV, REPO, losses_by_step, read_metrics, records_all, run_recipe
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from higgs_tune.models.higgs_audio.builders import higgs_audio_tiny
from higgs_tune.models.higgs_audio.checkpoint import save_hf_checkpoint
from higgs_tune.training.checkpointing import checkpoint_dirs, verify_checkpoint

pytestmark = pytest.mark.slow

# The fault-injecting components (faulty_components.py) are importable by the recipe's process.
FAULT_ENV = {**ENV, "PYTHONPATH": str(Path(__file__).parent)}
FAULTY_LOSS = "loss._component_=faulty_components.FaultInjectingLoss"
SAVE_EVERY_STEP = ("save_every_n_steps=1", "keep_last_n_checkpoints=10")


def error_line(stderr: str) -> str:
    """The last exception line (``SomeError: message``, or ``tune: error: message`` for an error in the
    user's files, higgs_tune.errors) of a failed run's stderr (tqdm may print after it)."""
    lines = [
        line for line in stderr.splitlines() if re.match(r"^([\w.]+(Error|Exception)|tune: error): ", line)
    ]
    assert lines, stderr[-3000:]
    return lines[-1]


def checkpoint_tensors(path: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (model and optimizer state), flattened to name -> tensor."""
    target = tmp_path / f"{path.name}.pt"
    dcp_to_torch_save(path, target)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(target, weights_only=False))
    return flat


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic: Path) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 and its export."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_recipe(
        out, synthetic, "max_steps=4", "batch_size=2", "save_every_n_steps=2", "keep_last_n_checkpoints=5"
    )
    return out


def copy_run(run: Path, dest: Path, keep_step: int) -> Path:
    """A new output folder holding only ``run``'s checkpoint of ``keep_step`` (to resume from)."""
    (dest / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        run / "checkpoints" / f"step_{keep_step:08d}", dest / "checkpoints" / f"step_{keep_step:08d}"
    )
    return dest


# --------------------------------------------------------------------------------------- non-finite steps
def test_a_nan_step_is_skipped_reported_and_training_goes_on(tmp_path: Path, synthetic: Path):
    out = tmp_path / "run"
    result = run_recipe(
        out, synthetic, "max_steps=5", "batch_size=2", FAULTY_LOSS, "loss.nan_at_calls=[3]", *SAVE_EVERY_STEP,
        env=FAULT_ENV,
    )  # fmt: skip
    assert "step 3: non-finite loss or gradient" in result.stderr and "update was skipped" in result.stderr
    records = records_all(out)
    fault = [r for r in records if r.get("nonfinite_step")]
    assert [r["step"] for r in fault] == [3] and fault[0]["skipped_updates"] == 1
    metrics = read_metrics(out)
    assert [r["skipped_updates"] for r in metrics] == [0, 0, 1, 1, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics if r["step"] != 3)

    # The skipped step changed nothing: model and optimizer state after step 3 == after step 2 ...
    steps = {int(p.name.split("_")[1]): p for p in checkpoint_dirs(out / "checkpoints")}
    after_2, after_3, after_4 = (checkpoint_tensors(steps[s], tmp_path) for s in (2, 3, 4))
    assert_same_tensors(after_2, after_3)
    # ... and training went on from there, finite.
    assert not all(torch.equal(after_3[k], after_4[k]) for k in after_3)
    assert all(torch.isfinite(t.float()).all() for t in after_4.values())


def test_a_nan_step_with_on_nonfinite_stop_ends_the_run_and_keeps_the_checkpoints(
    tmp_path: Path, synthetic: Path
):
    out = tmp_path / "run"
    common = ("max_steps=5", "batch_size=2", "save_every_n_steps=2")
    result = run_recipe(
        out, synthetic, *common, FAULTY_LOSS, "loss.nan_at_calls=[3]", "on_nonfinite=stop",
        env=FAULT_ENV, expect_success=False,
    )  # fmt: skip
    assert result.returncode != 0
    last_line = error_line(result.stderr)
    assert "FloatingPointError: step 3: non-finite loss or gradient" in last_line
    assert "on_nonfinite=stop" in last_line
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == ["step_00000002"]
    # Nothing lost: the run resumes from its step-2 checkpoint (without the fault) and finishes.
    run_recipe(out, synthetic, *common, "resume_from_checkpoint=true")
    assert sorted(losses_by_step(out)) == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------------------- a dead rank
def test_a_killed_rank_ends_the_job_with_an_error_instead_of_hanging(tmp_path: Path, synthetic: Path):
    out = tmp_path / "run"
    common = ("max_steps=8", "batch_size=1", "save_every_n_steps=2", "collective_timeout_s=60")
    start = time.monotonic()
    result = run_recipe(
        out, synthetic, *common, FAULTY_LOSS, "loss.kill_at_call=5", "loss.kill_rank=1",
        nproc=2, env=FAULT_ENV, expect_success=False,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "rank      : 1" in result.stderr and "Signal 9 (SIGKILL)" in result.stderr, result.stderr[-3000:]
    assert elapsed < 120, f"the job took {elapsed:.0f} s to fail"
    # The checkpoint written before the kill is complete and resumes on 2 processes.
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == ["step_00000002", "step_00000004"]
    run_recipe(out, synthetic, *common, "resume_from_checkpoint=true", nproc=2)
    assert sorted(losses_by_step(out)) == list(range(1, 9))


# --------------------------------------------------------------------------------------- disk and folders
def _limit_file_size_to_1_mib() -> None:
    """A full disk, reproducibly: writing past 1 MiB into any file fails with EFBIG (SIGXFSZ ignored)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))


def test_a_full_disk_at_save_time_is_a_clear_error_and_the_previous_checkpoint_survives(
    tmp_path: Path, synthetic: Path, finished_run: Path
):
    out = copy_run(finished_run, tmp_path / "run", keep_step=2)
    before = checkpoint_tensors(out / "checkpoints" / "step_00000002", tmp_path)
    result = run_recipe(
        out, synthetic, "max_steps=4", "batch_size=2", "save_every_n_steps=2", "resume_from_checkpoint=true",
        expect_success=False, preexec_fn=_limit_file_size_to_1_mib,
    )  # fmt: skip
    assert result.returncode != 0
    last_line = error_line(result.stderr)
    assert "CheckpointError: cannot write checkpoint" in last_line and "step_00000004" in last_line
    assert "disk full or folder not writable?" in last_line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]  # no partial folder
    verify_checkpoint(out / "checkpoints" / "step_00000002")
    assert_same_tensors(before, checkpoint_tensors(out / "checkpoints" / "step_00000002", tmp_path))


def test_an_unwritable_output_dir_fails_at_setup(tmp_path: Path, synthetic: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    start = time.monotonic()
    result = run_recipe(blocker / "run", synthetic, "max_steps=2", expect_success=False)
    assert result.returncode != 0
    last_line = error_line(result.stderr)
    assert f"output_dir {blocker / 'run'} is not writable" in last_line
    assert "model:" not in result.stderr  # before the model was built or any data read
    assert time.monotonic() - start < 60


def test_an_unwritable_checkpoint_folder_is_a_clear_error_at_save(tmp_path: Path, synthetic: Path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the checkpoint folder should be")
    result = run_recipe(out, synthetic, "max_steps=2", "batch_size=2", expect_success=False)
    assert result.returncode != 0
    last_line = error_line(result.stderr)
    assert f"CheckpointError: cannot write checkpoint under {out / 'checkpoints'}" in last_line
    assert [r["step"] for r in read_metrics(out)] == [1, 2]  # the metrics written so far are kept


# --------------------------------------------------------------------------------------- damaged checkpoints
@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata", "training_state.pt", "meta.json"])
def test_a_truncated_checkpoint_file_at_resume_is_an_error_naming_it(
    tmp_path: Path, synthetic: Path, finished_run: Path, name: str
):
    out = copy_run(finished_run, tmp_path / "run", keep_step=4)
    damaged = out / "checkpoints" / "step_00000004" / name
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    result = run_recipe(
        out, synthetic, "max_steps=6", "batch_size=2", "resume_from_checkpoint=true", expect_success=False
    )
    assert result.returncode != 0
    last_line = error_line(result.stderr)
    assert "CheckpointError" in last_line and name in last_line, last_line


# --------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize(
    "override, message",
    [
        (
            "optimizer._component_=torch.optim.NoSuchOptimizer",
            "unknown component path 'torch.optim.NoSuchOptimizer'",
        ),
        ("seq_len=abc", "seq_len: expected int"),
        ("~tokenizer.path", "missing required key 'tokenizer.path'"),
    ],
)
def test_config_errors_are_one_line_before_any_work(
    tmp_path: Path, synthetic: Path, override, message, nproc
):
    out = tmp_path / "run"
    result = run_recipe(out, synthetic, override, nproc=nproc, expect_success=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tune: error:") and message in lines[0], result.stderr
    assert not out.exists()  # no process started, nothing written


# --------------------------------------------------------------------------------------- mismatches
def edited_checkpoint(finished_run: Path, dest: Path, edit) -> Path:
    shutil.copytree(finished_run / "hf", dest)
    config = json.loads((dest / "config.json").read_text())
    edit(config)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c.update(audio_out_token_idx=c["audio_out_token_idx"] - 1),
            "does not match the model config: audio_out_token_idx=",
        ),
        (lambda c: c["text_config"].update(vocab_size=512), "exceeds the model's text_config.vocab_size=512"),
        (
            lambda c: c.update(audio_num_codebooks=4),
            "shape mismatches ['audio_codebook_embeddings.weight: checkpoint (8208, 64) vs model (4104, 64)'",
        ),
    ],
    ids=["special_token_id", "vocab_size", "config_vs_weights"],
)
def test_checkpoint_and_tokenizer_mismatches_are_caught_at_setup(
    tmp_path: Path, synthetic: Path, finished_run: Path, edit, message
):
    checkpoint = edited_checkpoint(finished_run, tmp_path / "checkpoint", edit)
    out = tmp_path / "run"
    result = run_recipe(
        out, synthetic, f"checkpointer.checkpoint_dir={checkpoint}", "max_steps=2", expect_success=False
    )
    assert result.returncode != 0
    assert message in error_line(result.stderr)
    assert not read_metrics(out) if (out / "metrics.jsonl").exists() else True  # no step ran


def test_data_with_another_number_of_codebooks_than_the_checkpoint_is_caught_at_setup(
    tmp_path: Path, synthetic: Path
):
    model = higgs_audio_tiny(num_codebooks=4)  # a consistent 4-codebook checkpoint; the data has 8
    checkpoint = save_hf_checkpoint(model.state_dict(), model.args, tmp_path / "checkpoint")
    out = tmp_path / "run"
    result = run_recipe(
        out, synthetic, f"checkpointer.checkpoint_dir={checkpoint}", "max_steps=2", expect_success=False
    )
    assert result.returncode != 0
    line = error_line(result.stderr)
    assert "train.jsonl:1" in line and "8 codebooks (shape (8, " in line and "expected 4" in line, line


# --------------------------------------------------------------------------------------- the soak tool
def test_soak_tool_kills_resumes_and_matches_the_uninterrupted_curve(tmp_path: Path):
    """tools/soak.py on a short run (it is a benchmark; this checks that it works and what it reports)."""
    result = subprocess.run(
        [sys.executable, "tools/soak.py", "--out", str(tmp_path), "--steps", "12", "--save-every", "3", "--kills", "2"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900, check=True,
    )  # fmt: skip
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["kills"] == 2 and report["launches"] == 3
    assert report["steps_completed"] == 12 and report["curve_matches"], report
