"""Optimizer-in-backward (an ``OptimizerInBackward`` optimizer in the training step) against the eager step with one AdamW over
all parameters, on real packed batches of the tiny model: 5 optimizer steps (one micro-batch each),
warm-up + cosine LR, weight decay, no clipping.

Tolerances:
- eager blocks: BITWISE equal. Per parameter, the same AdamW kernel runs on the same gradient with the
  same hyperparameters (torch's single-tensor AdamW also loops over parameters one by one); updating a
  parameter during the backward cannot change another's gradient (autograd would raise on a modified
  saved tensor), and the total gradient norm is computed the same way (norm of the per-parameter norms).
- compiled blocks: inductor reorders float32 reductions, so gradients differ by round-off (~1e-7
  relative; losses to 1e-5 relative). AdamW divides each update by sqrt(v): for an element whose
  gradient is ~0 (a codebook row seen once) round-off can change its update by a good part of lr = 1e-3.
  So: every element within lr / 10 and, per tensor, 99.9% of the elements within 1e-6 (a missed, doubled
  or stale update moves whole tensors by ~lr).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup
from training_testing import make_manifest, real_batches, tiny_model

from higgs_tune.loss import AlignedLoss
from higgs_tune.training.optim import AdamWBF16Moments, build_optimizer
from higgs_tune.training.optimizer_in_backward import OptimizerInBackward
from higgs_tune.training.parallelize import compile_decoder_blocks
from higgs_tune.training.step import TrainStep, build_train_step

NUM_STEPS = 5
LR = 1e-3


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    manifest = make_manifest(tmp_path_factory.mktemp("synthetic"), num_samples=64)
    return real_batches(manifest, tiny_model(), NUM_STEPS)


def build(in_backward: bool, seed: int = 1, **optimizer_options):
    """(model, optimizer, scheduler, step): the eager step with one optimizer, or the in-backward step."""
    model = tiny_model(seed=seed)
    optimizer = build_optimizer(
        model.parameters(),
        lr=LR,
        betas=(0.9, 0.95),
        weight_decay=0.01,
        in_backward=in_backward,
        **optimizer_options,
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=NUM_STEPS)
    return model, optimizer, scheduler


def train(in_backward: bool, batches, compiled: bool = False, **optimizer_options):
    """Returns (losses [steps], grad norms [steps], model, optimizer, scheduler). ``compiled``: the
    decoder blocks compiled by the model transform, the loss by the step (the recipe's compile=true)."""
    model, optimizer, scheduler = build(in_backward, **optimizer_options)
    if compiled:
        compile_decoder_blocks(model)
    mode = "compile" if compiled else "eager"
    step = build_train_step(
        mode, model, AlignedLoss(), optimizer, scheduler, max_grad_norm=None, compile_model=False
    )
    losses, norms = [], []
    for batch in batches:
        metrics = step([batch])
        losses.append(metrics["loss"].item())
        norms.append(metrics["grad_norm"].item())
    return torch.tensor(losses), torch.tensor(norms), model, optimizer, scheduler


def assert_bitwise_same_parameters(reference, candidate):
    for (name, ref), param in zip(reference.named_parameters(), candidate.parameters()):
        assert torch.equal(param, ref), f"{name}: max diff {(param - ref).abs().max().item():.3g}"


def continue_training(model, optimizer, scheduler, batches) -> None:
    """One eager in-backward step per batch, on a resumed model, optimizer and scheduler."""
    step = build_train_step("eager", model, AlignedLoss(), optimizer, scheduler, None)
    for batch in batches:
        step([batch])


def test_in_backward_steps_equal_eager_adamw_bitwise(batches):
    losses, norms, model, _, _ = train(False, batches)
    ib_losses, ib_norms, ib_model, optimizer, _ = train(True, batches)
    assert losses[-1] < losses[0]
    assert torch.equal(ib_losses, losses) and torch.equal(ib_norms, norms)
    assert_bitwise_same_parameters(model, ib_model)
    assert all(p.grad is None for p in ib_model.parameters()), "gradients must be freed in backward"
    assert all(len(optimizer.state[p]) == 3 for p in ib_model.parameters())  # step, exp_avg, exp_avg_sq


def test_in_backward_bf16_moments_equal_one_bf16_optimizer_bitwise(batches):
    """The per-parameter AdamWBF16Moments use the rounding stream of their position: identical to one
    AdamWBF16Moments over all parameters, stochastic rounding included."""
    _, _, model, flat, _ = train(False, batches[:3], moment_dtype="bf16")
    _, _, ib_model, optimizer, _ = train(True, batches[:3], moment_dtype="bf16")
    assert isinstance(optimizer.optimizers[next(ib_model.parameters())], AdamWBF16Moments)
    assert_bitwise_same_parameters(model, ib_model)
    for param, ib_param in zip(model.parameters(), ib_model.parameters()):
        assert optimizer.state[ib_param]["exp_avg_sq"].dtype == torch.bfloat16
        assert torch.equal(optimizer.state[ib_param]["exp_avg_sq"], flat.state[param]["exp_avg_sq"])


@pytest.mark.slow
def test_in_backward_with_compiled_blocks_matches_eager_adamw(batches):
    torch._dynamo.reset()
    losses, norms, model, _, _ = train(False, batches)
    ib_losses, ib_norms, ib_model, _, _ = train(True, batches, compiled=True)
    torch.testing.assert_close(ib_losses, losses, rtol=1e-5, atol=0)
    torch.testing.assert_close(ib_norms, norms, rtol=1e-4, atol=0)
    for (name, ref), param in zip(model.named_parameters(), ib_model.parameters()):
        diff = (param - ref).abs()
        assert diff.max() <= LR / 10, f"{name}: max diff {diff.max().item():.3g}"
        assert (diff <= 1e-6).float().mean() >= 0.999, f"{name}: {(diff > 1e-6).sum().item()} elements off"


@pytest.mark.parametrize("lr_as_tensor", [False, True])
def test_the_scheduler_drives_every_parameter_optimizer(batches, lr_as_tensor):
    # Warm-up over 2 steps: step 1 runs at lr 0, step 2 at lr / 2, step 3 at lr.
    _, _, _, optimizer, scheduler = train(True, batches[:2], lr_as_tensor=lr_as_tensor)
    group_lr = optimizer.param_groups[0]["lr"]
    assert float(group_lr) == pytest.approx(LR) == scheduler.get_last_lr()[0]  # the next step's LR
    inner = [
        parameter_optimizer.param_groups[0]["lr"] for parameter_optimizer in optimizer.optimizers.values()
    ]
    if lr_as_tensor:
        assert all(value is group_lr for value in inner), "a tensor LR is shared, not copied"
    else:
        assert all(value == pytest.approx(LR / 2) for value in inner)  # copied when step 2 ran


def test_state_dict_resumes_exactly_and_is_torch_adamws_format(batches):
    # Uninterrupted: 5 steps.
    _, _, full_model, _, _ = train(True, batches)
    # Interrupted after 3: save model, optimizer, scheduler; restore into fresh objects (other init).
    model, optimizer, scheduler = build(True)
    step = build_train_step("eager", model, AlignedLoss(), optimizer, scheduler, None)
    for batch in batches[:3]:
        step([batch])
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        buffer,
    )
    # The same dict one torch AdamW over the same parameters has after the same 3 steps.
    _, _, _, flat, _ = train(False, batches[:3])
    flat_state, state = flat.state_dict(), optimizer.state_dict()
    assert state["param_groups"] == flat_state["param_groups"]
    assert state["state"].keys() == flat_state["state"].keys()
    for index, param_state in flat_state["state"].items():
        for key, value in param_state.items():
            assert torch.equal(state["state"][index][key], value), (index, key)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model, resumed_optimizer, resumed_scheduler = build(True, seed=7)
    resumed_model.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed_scheduler.load_state_dict(saved["scheduler"])
    continue_training(resumed_model, resumed_optimizer, resumed_scheduler, batches[3:])
    assert_bitwise_same_parameters(full_model, resumed_model)


def test_distributed_checkpoint_state_dict_round_trip_resumes_exactly(batches):
    """The recipe's checkpoints go through torch.distributed.checkpoint's get/set_state_dict (FQN keys;
    it initialises an empty optimizer by stepping it once with zero gradients and LR 0)."""
    _, _, full_model, _, _ = train(True, batches, moment_dtype="bf16")
    model, optimizer, scheduler = build(True, moment_dtype="bf16")
    step = build_train_step("eager", model, AlignedLoss(), optimizer, scheduler, None)
    for batch in batches[:3]:
        step([batch])
    model_state, optimizer_state = get_state_dict(model, optimizer)
    assert "audio_decoder_proj.text_lm_head.weight" in optimizer_state["state"]
    saved = copy.deepcopy(
        {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict()}
    )

    resumed_model, resumed_optimizer, resumed_scheduler = build(True, seed=7, moment_dtype="bf16")
    set_state_dict(
        resumed_model, resumed_optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"]
    )
    resumed_scheduler.load_state_dict(saved["scheduler"])
    param = resumed_model.audio_decoder_proj.text_lm_head.weight
    assert resumed_optimizer.state[param]["exp_avg"].dtype == torch.bfloat16
    assert float(resumed_optimizer.state[param]["step"]) == 3.0
    continue_training(resumed_model, resumed_optimizer, resumed_scheduler, batches[3:])
    assert_bitwise_same_parameters(full_model, resumed_model)


def test_step_after_an_ordinary_backward_equals_one_adamw_step(batches):
    """Outside the in-backward step the container is an ordinary optimizer (backward, then step)."""
    models = []
    for in_backward in (False, True):
        model, optimizer, _ = build(in_backward)
        AlignedLoss()(model(batches[0]), batches[0]).loss.backward()
        optimizer.step()
        models.append(model)
    assert_bitwise_same_parameters(*models)


def test_a_torch_adamw_checkpoint_loads_into_the_in_backward_optimizer(batches):
    """Switching a run to optimizer-in-backward at resume: the single optimizer's state dict loads."""
    _, _, model, flat, flat_scheduler = train(False, batches[:3])
    ib_model, optimizer, scheduler = build(True, seed=7)
    ib_model.load_state_dict(model.state_dict())
    optimizer.load_state_dict(copy.deepcopy(flat.state_dict()))
    scheduler.load_state_dict(flat_scheduler.state_dict())
    for param, ib_param in zip(model.parameters(), ib_model.parameters()):
        assert torch.equal(optimizer.state[ib_param]["exp_avg"], flat.state[param]["exp_avg"])
        assert float(optimizer.state[ib_param]["step"]) == 3.0


def test_refuses_accumulation_clipping_data_parallelism_and_cuda_graphs(batches):
    model, optimizer, _ = build(True)
    with pytest.raises(ValueError, match="max_grad_norm"):
        build_train_step("eager", model, AlignedLoss(), optimizer, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="data parallelism"):
        TrainStep(model, AlignedLoss(), optimizer, max_grad_norm=None, process_group=object())
    with pytest.raises(ValueError, match="in backward"):
        build_train_step("cudagraph", model, AlignedLoss(), optimizer, max_grad_norm=None)
    step = build_train_step("eager", model, AlignedLoss(), optimizer, max_grad_norm=None)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="gradient_accumulation_steps: 1"):
        step(batches[:2])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "nothing may change"


def test_a_non_finite_loss_updates_nothing(batches):
    model, optimizer, scheduler = build(True)
    step = build_train_step("eager", model, AlignedLoss(), optimizer, scheduler, None, skip_nonfinite=True)
    step([batches[0]])
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(optimizer.state_dict()["state"])
    with torch.no_grad():
        model.norm.weight[0] = float("nan")  # every logit, hence the loss, becomes NaN
    before[list(dict(model.named_parameters())).index("norm.weight")][0] = float("nan")
    metrics = step([batches[1]])
    assert metrics["update_skipped"].item() == 1.0
    assert metrics["skipped_parameters"].item() == len(before)
    for param, old in zip(model.parameters(), before):
        torch.testing.assert_close(param, old, rtol=0, atol=0, equal_nan=True)
    for index, param_state in state_before.items():
        for key, value in param_state.items():
            assert torch.equal(optimizer.state_dict()["state"][index][key], value)


def test_hooks_only_act_inside_the_step(batches):
    model, optimizer, _ = build(True)
    step = build_train_step("eager", model, AlignedLoss(), optimizer, None, None)
    before = [p.detach().clone() for p in model.parameters()]
    AlignedLoss()(model(batches[0]), batches[0]).loss.backward()  # a backward outside the step
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is not None for p in model.parameters())
    optimizer.remove_hooks()
    with pytest.raises(RuntimeError, match="remove_hooks"):
        step([batches[0]])
    assert isinstance(optimizer, OptimizerInBackward)
