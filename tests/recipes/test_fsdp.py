"""FSDP2 through torchrun (gloo on CPU): the same training as one process, sharded checkpoints that
resume on any number of processes, and the full HF export gathered from the shards."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from recipe_testing import losses_by_step, read_metrics, run_recipe
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

LORA = ("finetune.mode=lora", "finetune.lora={targets: [q_proj, v_proj, audio_mlp], rank: 4, alpha: 8}")


def exported_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted((output_dir / "hf").glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def assert_close_exports(a: Path, b: Path) -> None:
    left, right = exported_tensors(a), exported_tensors(b)
    assert left.keys() == right.keys() and left
    for name in left:
        # fp32; the ranks sum gradients in another order than one process (~1e-7 relative), and AdamW
        # carries that into the weights over 4 steps: 1e-5 absolute is ~100x what was observed.
        torch.testing.assert_close(left[name], right[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "finetune",
    [pytest.param((), id="full"), pytest.param(LORA, id="lora")],
)
def test_two_fsdp_processes_train_like_one_process_and_export_the_same_model(
    tmp_path: Path, synthetic: Path, finetune: tuple[str, ...]
):
    """torchrun with 2 ranks x 1 row == 1 process x 2 rows: the same rows form each global batch (the
    sampler deals rows round-robin), the loss is a global token mean, FSDP sums the gradient shards.
    The 2-process run also checkpoints activations and compiles each decoder layer (torchtitan's order:
    AC, compile, FSDP) and generates on rank 0 at the end."""
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    run_recipe(single, synthetic, "max_steps=4", "batch_size=2", *finetune)
    generation = ("generation.num_prompts=1", "generation.max_new_columns=8")
    result = run_recipe(
        sharded,
        synthetic,
        "max_steps=4",
        "batch_size=1",
        "compile=true",
        "activation_checkpointing=true",
        *generation,
        *finetune,
        nproc=2,
    )
    assert "model:" in result.stderr  # rank 0 logs; metrics come from rank 0 with global values
    # Rank 0 generated with an unsharded copy (the other ranks only helped gather it).
    assert "greedy generation of 1 held-out prompts" in result.stderr
    assert (sharded / "generations" / "step_00000004" / "sample_000.npy").is_file()
    losses_single = [r["loss"] for r in read_metrics(single)]
    losses_sharded = [r["loss"] for r in read_metrics(sharded)]
    assert len(losses_single) == len(losses_sharded) == 4
    # fp32, another summation order across ranks: equal to ~1e-7 relative (seen); 1e-5 leaves headroom.
    assert losses_sharded == pytest.approx(losses_single, rel=1e-5)
    assert [r["num_audio_targets"] for r in read_metrics(sharded)] == [
        r["num_audio_targets"] for r in read_metrics(single)
    ]
    assert_close_exports(single, sharded)
    if finetune:
        assert (sharded / "adapter" / "adapter.safetensors").is_file()
        adapter_single = load_file(single / "adapter" / "adapter.safetensors")
        adapter_sharded = load_file(sharded / "adapter" / "adapter.safetensors")
        assert adapter_single.keys() == adapter_sharded.keys()
        for name in adapter_single:
            torch.testing.assert_close(adapter_single[name], adapter_sharded[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "finetune",
    [pytest.param((), id="full"), pytest.param(LORA, id="lora")],
)
def test_a_sharded_checkpoint_resumes_on_one_and_on_two_processes(
    tmp_path: Path, synthetic: Path, finetune: tuple[str, ...]
):
    """A 2-process run writes DCP checkpoints at steps 4 and 8; resuming its step-4 checkpoint on 2
    processes, and on 1 process with the same global batch (2 rows), continues the loss curve. LoRA:
    the shards hold only the adapters and their optimizer state."""
    reference = tmp_path / "reference"
    common = ("max_steps=8", "save_every_n_steps=4", "keep_last_n_checkpoints=3", *finetune)
    run_recipe(reference, synthetic, *common, "batch_size=1", nproc=2)
    expected = losses_by_step(reference)
    assert sorted(expected) == list(range(1, 9))
    step_4 = reference / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in step_4.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank
    stored = dcp.FileSystemReader(str(step_4)).read_metadata().state_dict_metadata
    params = [k for k in stored if k.startswith("model.")]
    assert params and all((".lora_" in k) == bool(finetune) for k in params)

    for nproc, batch_size in ((2, 1), (1, 2)):
        resumed = tmp_path / f"resumed_on_{nproc}"
        shutil.copytree(step_4, resumed / "checkpoints" / step_4.name)
        result = run_recipe(
            resumed,
            synthetic,
            *common,
            f"batch_size={batch_size}",
            "resume_from_checkpoint=true",
            nproc=nproc,
        )
        assert "resumed from" in result.stderr and "at step 4" in result.stderr
        losses = losses_by_step(resumed)
        assert sorted(losses) == [5, 6, 7, 8]
        # Same ranks: the same computation (exact on CPU); 1 process: another summation order.
        tolerance = 0 if nproc == 2 else 1e-5
        assert losses == pytest.approx({s: expected[s] for s in losses}, rel=tolerance, abs=0)
        assert_close_exports(reference, resumed)


def test_resuming_on_a_number_of_ranks_that_cannot_continue_the_position_is_refused(
    tmp_path: Path, synthetic: Path
):
    """1 process x 3 rows consumed 3 rows of the epoch; 2 ranks cannot split the rest evenly from there."""
    run = tmp_path / "run"
    run_recipe(run, synthetic, "save_every_n_steps=1", "max_steps=1", "batch_size=3")
    result = run_recipe(
        run,
        synthetic,
        "max_steps=4",
        "batch_size=1",
        "resume_from_checkpoint=true",
        nproc=2,
        expect_success=False,
    )
    assert result.returncode != 0
    assert "cannot resume after 3 rows of epoch 0 on 2 ranks" in result.stderr


def test_fsdp_mixed_precision_computes_in_bf16_with_fp32_master_weights(tmp_path: Path, synthetic: Path):
    """fsdp.param_dtype=bf16 with an fp32 model: sharded fp32 weights and optimizer state, bf16 compute
    (all-gathered parameters cast), fp32 gradient reduction. The losses follow the fp32 run to bf16
    round-off (~1e-4 relative seen over 4 steps; 2e-3 allowed), and are not bitwise equal to it."""
    fp32, mixed = tmp_path / "fp32", tmp_path / "mixed"
    run_recipe(fp32, synthetic, "max_steps=4", "batch_size=2")
    run_recipe(
        mixed,
        synthetic,
        "max_steps=4",
        "batch_size=1",
        "fsdp.param_dtype=bf16",
        "fsdp.reduce_dtype=fp32",
        nproc=2,
    )
    losses_fp32 = [r["loss"] for r in read_metrics(fp32)]
    losses_mixed = [r["loss"] for r in read_metrics(mixed)]
    assert losses_mixed == pytest.approx(losses_fp32, rel=2e-3)
    assert losses_mixed != losses_fp32  # the compute really ran in bf16
    exported = exported_tensors(mixed)
    assert all(t.dtype == torch.float32 for t in exported.values())  # fp32 master weights exported
