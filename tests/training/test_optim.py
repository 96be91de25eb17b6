"""build_optimizer: tensor LR for compiled steps, kernel choice, fp32 master weights for bf16 params."""

from __future__ import annotations

import pytest
import torch
from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

from higgs_tune.training.optim import MasterWeightsOptimizer, build_optimizer
from higgs_tune.training.step import MIN_TENSOR_LR, clamp_tensor_lr


def quadratic_steps(optimizer, params, steps=3):
    for _ in range(steps):
        loss = sum((p.float() - 1.0).square().sum() for p in params)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_tensor_lr_follows_the_scheduler_in_place():
    params = [torch.nn.Parameter(torch.zeros(4))]
    optimizer = build_optimizer(params, lr=1e-2, lr_as_tensor=True)
    lr = optimizer.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and lr.device.type == "cpu"
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=4)
    seen = []
    for _ in range(3):
        quadratic_steps(optimizer, params, steps=1)
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] is lr  # the same tensor: a compiled step keeps reading it
        seen.append(float(lr))
    assert seen[0] == pytest.approx(5e-3) and seen[1] == pytest.approx(1e-2) and seen[2] < 1e-2


def test_zero_tensor_lr_is_clamped_not_nan():
    params = [torch.nn.Parameter(torch.zeros(4))]
    optimizer = build_optimizer(params, lr=0.0, lr_as_tensor=True)
    clamp_tensor_lr(optimizer)
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(MIN_TENSOR_LR)


def test_unknown_names_are_refused():
    params = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer(params, name="sgd")
    with pytest.raises(ValueError, match="implementation"):
        build_optimizer(params, implementation="cuda_magic")
    with pytest.raises(ValueError, match="no parameters"):
        build_optimizer([])


def test_master_weights_keep_fp32_state_and_match_fp32_training():
    torch.manual_seed(0)
    start = torch.randn(64).bfloat16().float()  # representable in bf16: both runs start equal
    fp32_params = [torch.nn.Parameter(start.clone())]
    bf16_params = [torch.nn.Parameter(start.clone().bfloat16())]
    quadratic_steps(build_optimizer(fp32_params, lr=1e-3), fp32_params, steps=5)
    optimizer = build_optimizer(bf16_params, lr=1e-3, master_weights=True)
    assert isinstance(optimizer, MasterWeightsOptimizer)
    quadratic_steps(optimizer, bf16_params, steps=5)
    master = optimizer.masters[0]
    state = optimizer.state[master]
    assert master.dtype == torch.float32 and state["exp_avg"].dtype == torch.float32
    # The bf16 parameter is the fp32 master rounded, and the master followed the fp32 run
    # (gradients computed from bf16 values: agreement to bf16 resolution of the inputs, ~4e-3 relative).
    assert torch.equal(bf16_params[0].detach(), master.detach().bfloat16())
    torch.testing.assert_close(master.detach(), fp32_params[0].detach(), rtol=0, atol=1e-4)
    # 5 updates of ~lr = 1e-3 each would be rounded away in plain bf16 for |x| > 0.25; the master keeps them.
    moved = (master.detach() - start).abs()
    assert (moved > 4e-3).all()


def test_master_weights_work_with_an_lr_scheduler():
    params = [torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))]
    optimizer = build_optimizer(params, lr=1e-2, master_weights=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=1, num_training_steps=3)
    quadratic_steps(optimizer, params, steps=1)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
