"""LoRA and audio-adapter runs checkpoint only what trains (the trainable parameters, their AdamW state,
the training state and the fingerprint of the frozen base), resume exactly on the base their config
loads, and refuse another base with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from recipe_testing import losses_by_step, run_recipe
from safetensors.torch import load_file

from higgs_tune.models.higgs_audio.builders import from_checkpoint_dir, higgs_audio_tiny
from higgs_tune.models.higgs_audio.checkpoint import save_model
from higgs_tune.models.higgs_audio.lora import apply_lora, set_trainable

pytestmark = pytest.mark.slow

LORA_TARGETS = ["q_proj", "v_proj", "audio_mlp"]
MODES = {
    "lora": (
        "finetune.mode=lora",
        f"finetune.lora={{targets: [{', '.join(LORA_TARGETS)}], rank: 4, alpha: 8}}",
    ),
    "audio_adapter": ("finetune.mode=audio_adapter", "finetune.lora=null"),
}


def trainable_numels(export: Path, mode: str) -> dict[str, int]:
    """What trains in ``mode`` on the architecture of an export (the library's own selection): name ->
    number of elements."""
    model = from_checkpoint_dir(export, dtype=None)
    if mode == "lora":
        apply_lora(model, LORA_TARGETS, rank=4, alpha=8)
    names = set(set_trainable(model, mode))
    return {name: p.numel() for name, p in model.named_parameters() if name in names}


def stored(checkpoint: Path) -> tuple[set[str], set[str]]:
    """(model parameter names, parameter names with optimizer state) stored in a DCP checkpoint."""
    keys = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    params = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    moments = {
        k.removeprefix("optimizer.state.").rsplit(".", 1)[0] for k in keys if k.startswith("optimizer.state.")
    }
    return params, moments


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("mode", list(MODES))
def test_checkpoint_holds_only_what_trains_and_resumes_exactly(tmp_path: Path, synthetic: Path, mode: str):
    common = ("max_steps=6", "batch_size=2", "save_every_n_steps=3", *MODES[mode])
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_recipe(reference, synthetic, *common, "keep_last_n_checkpoints=3")
    expected = losses_by_step(reference)
    step_3 = reference / "checkpoints" / "step_00000003"

    params, moments = stored(step_3)
    trainable = trainable_numels(reference / "hf", mode)
    assert params == moments == set(trainable)
    if mode == "lora":
        assert all(".lora_a." in name or ".lora_b." in name for name in params)
    assert "embed_tokens.weight" not in params and "layers.0.self_attn.q_proj.weight" not in params
    meta = json.loads((step_3 / "meta.json").read_text())
    assert (
        meta["frozen_base"]["source"] == "random init, seed 1234" and len(meta["frozen_base"]["sha256"]) == 64
    )
    # The size of the trainable parameters and their two fp32 AdamW moments, plus the training state
    # and the DCP index (well under 1 MiB).
    weights_and_moments = 3 * 4 * sum(trainable.values())
    assert weights_and_moments < folder_bytes(step_3) < weights_and_moments + 2**20

    shutil.copytree(step_3, resumed / "checkpoints" / step_3.name)
    result = run_recipe(resumed, synthetic, *common, "resume_from_checkpoint=true")
    assert "at step 3" in result.stderr
    assert losses_by_step(resumed) == {s: expected[s] for s in (4, 5, 6)}  # exact
    ours, theirs = (
        load_file(resumed / "hf" / "model.safetensors"),
        load_file(reference / "hf" / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)


def test_resume_refuses_another_base_and_accepts_a_copy_of_the_same(tmp_path: Path, synthetic: Path):
    bases = {}
    for seed in (0, 1):  # one architecture, two sets of weights
        torch.manual_seed(seed)
        bases[seed] = save_model(higgs_audio_tiny(), tmp_path / f"base_{seed}")
    common = ("batch_size=2", "save_every_n_steps=2", *MODES["lora"])
    run = tmp_path / "run"
    run_recipe(run, synthetic, *common, "max_steps=2", f"checkpointer.checkpoint_dir={bases[0]}")

    result = run_recipe(
        run,
        synthetic,
        *common,
        "max_steps=4",
        "resume_from_checkpoint=true",
        f"checkpointer.checkpoint_dir={bases[1]}",
        expect_success=False,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "CheckpointError: " in line]
    assert errors, result.stderr[-3000:]
    last = errors[-1]
    assert (
        f"was trained on the base {bases[0].resolve()}" in last and f"base {bases[1].resolve()} has" in last
    )

    moved = shutil.copytree(bases[0], tmp_path / "moved_base")  # the same weights elsewhere: accepted
    result = run_recipe(
        run,
        synthetic,
        *common,
        "max_steps=4",
        "resume_from_checkpoint=true",
        f"checkpointer.checkpoint_dir={moved}",
    )
    assert "at step 2" in result.stderr
    assert sorted(losses_by_step(run)) == [1, 2, 3, 4]
