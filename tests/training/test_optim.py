"""build_optimizer: tensor LR for compiled steps, kernel choice, fp32 master weights for bf16 params, AdamW
with bf16 moments (stochastic rounding, compiled update, exact resume)."""

from __future__ import annotations

import pytest
import torch
from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

from higgs_tune.training.optim import (
    AdamWBF16Moments,
    MasterWeightsOptimizer,
    build_optimizer,
    round_to_bf16_stochastically,
)
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


# ------------------------------------------------------------------ AdamW with bf16 moments
def adamw_run(make_optimizer, start, target, steps, lr=1e-2):
    """``steps`` AdamW steps on sum((p - target)^2) from ``start``; returns (param, optimizer)."""
    param = torch.nn.Parameter(start.clone())
    optimizer = make_optimizer([param], lr)
    for _ in range(steps):
        (param - target).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return param.detach(), optimizer


def test_bf16_moments_follow_fp32_adamw():
    torch.manual_seed(0)
    start, target = torch.randn(4096), torch.randn(4096)
    steps, lr = 20, 1e-2
    fp32, _ = adamw_run(
        lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.01), start, target, steps, lr
    )
    bf16, optimizer = adamw_run(
        lambda p, lr: build_optimizer(p, lr=lr, weight_decay=0.01, moment_dtype="bf16"),
        start,
        target,
        steps,
        lr,
    )
    assert isinstance(optimizer, AdamWBF16Moments)
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert float(state["step"]) == steps
    # A stochastically rounded moment is within one bf16 step of its fp32 value: 2^-7 relative for m, 2^-7
    # for v, i.e. 2^-8 after the square root. Each update (at most ~lr per element) is then off by at most
    # ~(2^-7 + 2^-8) of itself and the errors are unbiased: steps * lr * (2^-7 + 2^-8) = 2.3e-3 bounds the
    # drift (deterministic noise: measured 1.8e-3), while the parameters moved ~0.19 and an error in the
    # formula (bias correction, weight decay, a frozen moment) costs ~lr per step.
    assert (bf16 - fp32).abs().max() <= steps * lr * (2**-7 + 2**-8)
    assert (fp32 - start).abs().mean() > 0.1


def test_stochastic_rounding_is_unbiased_over_its_noise():
    low_bits = torch.tensor([0, 1, 12345, 32768, 65535], dtype=torch.int32)
    for sign in (1, -1):
        x = ((torch.tensor(0x3F80_0000, dtype=torch.int32) + low_bits).view(torch.float32) * sign)[:, None]
        noise = torch.arange(2**16, dtype=torch.int32)[None, :]  # every noise value once
        rounded = round_to_bf16_stochastically(x.expand(-1, 2**16).contiguous(), noise)
        assert rounded.dtype == torch.bfloat16
        # Only the two bf16 neighbours of x, in the proportion that makes the mean exactly x.
        torch.testing.assert_close(rounded.double().mean(dim=1, keepdim=True), x.double(), rtol=0, atol=1e-12)
        assert set(rounded[2].float().unique().tolist()) == {sign * 1.0, sign * (1.0 + 2**-7)}


def test_stochastic_rounding_keeps_special_values():
    inf = torch.tensor(float("inf"))
    arithmetic_nan = inf * 0.0  # the NaN arithmetic produces (0xFFC00000 on x86)
    x = torch.stack(
        [inf, -inf, torch.tensor(float("nan")), arithmetic_nan, torch.tensor(0.0), torch.tensor(-0.0)]
    )
    for noise in (0, 2**15, 2**16 - 1):
        rounded = round_to_bf16_stochastically(x, torch.full_like(x, noise, dtype=torch.int32))
        assert rounded[0] == float("inf") and rounded[1] == float("-inf")
        assert rounded[2].isnan() and rounded[3].isnan()
        assert rounded[4] == 0 and not rounded[4].signbit() and rounded[5] == 0 and rounded[5].signbit()
    largest = torch.tensor(torch.finfo(torch.float32).max)
    assert round_to_bf16_stochastically(largest, torch.tensor(2**16 - 1, dtype=torch.int32)) == float("inf")


def test_stochastic_rounding_keeps_a_slowly_decaying_second_moment():
    """beta2 = 0.999: v shrinks by 0.1% per step without gradient, below bf16's resolution (2^-9 relative
    half-step): rounded to nearest it never moves; stochastically rounded its mean follows fp32."""
    steps, beta2 = 700, 0.999
    param = torch.nn.Parameter(torch.zeros(4096))
    optimizer = AdamWBF16Moments([param], lr=1e-3, betas=(0.9, beta2), weight_decay=0.0, compile_update=False)
    for step in range(steps + 1):
        param.grad = torch.ones_like(param) if step == 0 else torch.zeros_like(param)
        optimizer.step()
    fp32_v = (1 - beta2) * beta2**steps  # 4.96e-4
    v = optimizer.state[param]["exp_avg_sq"].double()
    assert abs(v.mean().item() / fp32_v - 1) < 0.02
    nearest = torch.tensor(1 - beta2).bfloat16()
    for _ in range(steps):
        nearest = (nearest.float() * beta2).bfloat16()
    assert nearest.item() == torch.tensor(1 - beta2).bfloat16().item()  # stuck at the first value


def test_compiled_update_matches_the_eager_one():
    torch.manual_seed(1)
    start, target = torch.randn(3000), torch.randn(3000)

    def make(compile_update):
        return lambda p, lr: AdamWBF16Moments(p, lr=lr, weight_decay=0.1, compile_update=compile_update)

    eager, eager_opt = adamw_run(make(False), start, target, steps=3)
    compiled, compiled_opt = adamw_run(make(True), start, target, steps=3)
    # Same formula and the same rounding noise; inductor may fuse a multiply-add (1 ulp on parameters).
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        [(_, a)], [(_, b)] = eager_opt.state.items(), compiled_opt.state.items()
        torch.testing.assert_close(b[key].float(), a[key].float(), rtol=2**-7, atol=0)


def test_bf16_moment_state_dict_resumes_exactly_and_stays_bf16():
    import io

    torch.manual_seed(2)
    start, target = torch.randn(512), torch.randn(512)

    def make(p, lr):
        return AdamWBF16Moments(p, lr=lr, compile_update=False)

    full, _ = adamw_run(make, start, target, steps=5)
    half, optimizer = adamw_run(make, start, target, steps=3)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    param = torch.nn.Parameter(half.clone())
    resumed = make([param], 1e-2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.state[param]["exp_avg"].dtype == torch.bfloat16  # torch's loading would cast to fp32
    for _ in range(2):
        (param - target).square().sum().backward()
        resumed.step()
        resumed.zero_grad()
    assert torch.equal(param.detach(), full)  # the rounding noise depends on (parameter, step) only
    # A torch AdamW checkpoint (fp32 moments) loads too, rounded to bf16.
    _, fp32_optimizer = adamw_run(lambda p, lr: torch.optim.AdamW(p, lr=lr), start, target, steps=2)
    other = make([torch.nn.Parameter(start.clone())], 1e-2)
    other.load_state_dict(fp32_optimizer.state_dict())
    [(_, state)], [(_, fp32_state)] = other.state.items(), fp32_optimizer.state.items()
    assert state["exp_avg_sq"].dtype == torch.bfloat16
    assert torch.equal(state["exp_avg_sq"], fp32_state["exp_avg_sq"].bfloat16())


def test_moment_dtype_options_are_checked():
    params = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="moment_dtype"):
        build_optimizer(params, moment_dtype="fp8")
    with pytest.raises(ValueError, match="implementation"):
        build_optimizer(params, moment_dtype="bf16", implementation="fused")
    with pytest.raises(ValueError, match="moment_dtype"):
        build_optimizer(params, name="adamw8bit", moment_dtype="bf16")
