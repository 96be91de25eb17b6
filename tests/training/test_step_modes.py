"""Every CPU step mode (eager, compile) against eager: 5 optimizer steps with gradient
accumulation 2 on real packed batches give the same losses and parameters; the compiled step has no
graph break and does not recompile across steps with different data or LR. The CUDA-graph mode is
checked against eager when a GPU is present. A non-finite step is skipped without any host read in the
step (every ``.item()`` / ``bool()`` / ``tolist()`` / ``float()`` on a tensor is counted). The functional
gradient (``tools/score_samples.py``) equals autograd's.

Tolerances: fp32 everywhere. Inductor fuses and reorders reductions (matmul tiling, RMSNorm and CE
sums), so losses agree to float32 round-off (~1e-6 relative), not bitwise; AdamW divides by
sqrt(v) + eps, so after 5 steps parameter differences stay within a few ulps of the lr-sized updates.
rtol 1e-4 / atol 1e-5 on parameters and 1e-5 relative on losses cover that with margin, while a wrong
accumulation (e.g. a missed micro-batch, a double-counted one, mean instead of global count) moves
losses by > 1e-2 and parameters by ~lr = 1e-3.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup
from training_testing import make_manifest, real_batches, tiny_model, transform_safe_loss

from higgs_tune.loss import AlignedLoss
from higgs_tune.training.functional import make_functional_grad_fn
from higgs_tune.training.optim import build_optimizer
from higgs_tune.training.parallelize import compile_decoder_blocks
from higgs_tune.training.step import build_train_step

NUM_STEPS = 5
ACCUMULATION = 2
LR = 1e-3


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("synthetic"), num_samples=64)


@pytest.fixture(scope="module")
def batches(manifest):
    return real_batches(manifest, tiny_model(), NUM_STEPS * ACCUMULATION)


def run_steps(mode: str, batches, loss_fn, device="cpu", eager_steps_first: int = 0, **mode_options):
    """len(batches) / 2 optimizer steps with accumulation 2, warm-up + cosine LR; the first
    ``eager_steps_first`` steps in eager mode, on the same model and optimizer (as a resumed run).

    Returns (losses [steps], grad_norms [steps], trained model)."""
    num_steps = len(batches) // ACCUMULATION
    model = tiny_model(seed=1).to(device)
    if mode_options.pop("blocks_compiled", False):  # the model transform's per-block compile
        compile_decoder_blocks(model)
    # A captured optimizer (cudagraph + capture_optimizer) reads a tensor LR on the device with
    # capturable AdamW; otherwise a float LR and fused AdamW.
    captured = mode_options.get("capture_optimizer", False)
    optimizer = build_optimizer(
        model.parameters(),
        lr=LR,
        betas=(0.9, 0.95),
        weight_decay=0.01,
        lr_as_tensor=captured,
        capturable=captured,
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=num_steps)
    losses, grad_norms = [], []
    for i in range(num_steps):
        if i == 0:
            step = build_train_step("eager", model, loss_fn, optimizer, scheduler, max_grad_norm=1.0)
        if i == eager_steps_first:
            step = build_train_step(
                mode, model, loss_fn, optimizer, scheduler, max_grad_norm=1.0, **mode_options
            )
        micro = [
            {k: v.to(device) for k, v in b.items()}
            for b in batches[i * ACCUMULATION : (i + 1) * ACCUMULATION]
        ]
        metrics = step(micro)
        losses.append(metrics["loss"].item())
        grad_norms.append(metrics["grad_norm"].item())
    return torch.tensor(losses), torch.tensor(grad_norms), model


def assert_same_training(reference, candidate):
    ref_losses, ref_norms, ref_model = reference
    losses, norms, model = candidate
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=0)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-6)
    for (name, ref), (_, param) in zip(ref_model.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(param.detach().cpu(), ref.detach().cpu(), rtol=1e-4, atol=1e-5, msg=name)


def test_eager_step_trains_and_is_deterministic(batches):
    first = run_steps("eager", batches, AlignedLoss())
    second = run_steps("eager", batches, AlignedLoss())
    assert torch.equal(first[0], second[0])
    assert first[0][-1] < first[0][0], f"loss did not fall: {first[0].tolist()}"
    # The tolerance of the other tests is far below the change one step makes.
    untrained = tiny_model(seed=1)
    moved = max((p - q).abs().max() for p, q in zip(first[2].parameters(), untrained.parameters()))
    assert moved > 1e-3


@pytest.mark.slow
def test_compile_matches_eager_without_graph_breaks_or_recompiles(batches):
    reference = run_steps("eager", batches, AlignedLoss())
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("inductor")
    frames_after: list[int] = []
    candidate = run_steps_counting("compile", batches, AlignedLoss(), backend, frames_after)
    assert_same_training(reference, candidate)
    # One graph for forward+loss, the optimizer's graphs: all made in step 1, none after (new data,
    # new LR every step), and no graph break anywhere.
    assert frames_after[0] > 0
    assert frames_after == [frames_after[0]] * NUM_STEPS, f"recompiled: frames after each step {frames_after}"
    # The only graph breaks: the two torch's Optimizer.step inserts on purpose around the update
    # (torch/optim/optimizer.py, pytorch#104053), and the LR scheduler's step-counting wrapper around
    # optimizer.step (torch/optim/lr_scheduler.py, a file dynamo never traces): it runs eagerly and calls
    # the optimizer's own step, which is compiled as a frame of its own. Forward+loss is one fullgraph.
    breaks = dict(counters["graph_break"])
    for reason in breaks:
        scheduler_wrapper = "marked as skipped" in reason and "lr_scheduler.py" in reason
        assert "torch._dynamo.graph_break()" in reason or scheduler_wrapper, f"graph breaks: {breaks}"
    assert frames_after[0] >= 2, f"the optimizer step was not compiled: {frames_after[0]} frame(s)"


def run_steps_counting(mode, batches, loss_fn, backend, frames_after):
    """run_steps, recording the backend's compiled-frame count after every step."""
    model = tiny_model(seed=1)
    # The compiled optimizer step (torch's foreach AdamW with a tensor LR) is part of what must not recompile.
    optimizer = build_optimizer(
        model.parameters(),
        lr=LR,
        betas=(0.9, 0.95),
        weight_decay=0.01,
        lr_as_tensor=True,
        implementation="for_loop",
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=NUM_STEPS)
    step = build_train_step(
        mode, model, loss_fn, optimizer, scheduler, max_grad_norm=1.0, backend=backend, compile_optimizer=True
    )
    losses, norms, lrs = [], [], []
    for i in range(NUM_STEPS):
        metrics = step(batches[i * ACCUMULATION : (i + 1) * ACCUMULATION])
        losses.append(metrics["loss"].item())
        norms.append(metrics["grad_norm"].item())
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        frames_after.append(backend.frame_count)
    assert len(set(lrs)) == NUM_STEPS, f"the LR schedule should change the LR every step: {lrs}"
    return torch.tensor(losses), torch.tensor(norms), model


@pytest.mark.parametrize("backend", [None, "inductor"])
def test_functional_gradients_equal_autograds(batches, backend):
    torch._dynamo.reset()
    counters.clear()
    model, loss_fn, batch = tiny_model(seed=1), transform_safe_loss(), batches[0]
    loss_fn(model(batch), batch).loss.backward()
    params = {name: p.detach() for name, p in model.named_parameters()}
    grads, output = make_functional_grad_fn(model, loss_fn, backend=backend)(
        params, batch, batch["num_text_targets"].sum(), batch["num_audio_targets"].sum(0)
    )
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.isfinite(output.loss)
    assert dict(counters["graph_break"]) == {}
    with pytest.raises(ValueError, match="checkpoint_text_chunks=False"):
        make_functional_grad_fn(model, AlignedLoss())


def test_compile_refuses_a_float_lr():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        build_train_step("compile", model, AlignedLoss(), optimizer, compile_optimizer=True)


def test_unknown_mode_and_cudagraph_on_cpu_are_refused():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="reduce-overhead"):
        build_train_step("reduce-overhead", model, AlignedLoss(), optimizer)
    with pytest.raises(RuntimeError, match="CUDA"):
        build_train_step("cudagraph", model, AlignedLoss(), optimizer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "options",
    [
        {"capture_optimizer": False},
        {"capture_optimizer": True},
        {"compile_model": False, "blocks_compiled": True},
        # a resumed run: the optimizer state of 2 eager steps must survive the warm-up's step
        {"capture_optimizer": True, "eager_steps_first": 2},
        {"capture_optimizer": False, "eager_steps_first": 2},
    ],
)
def test_cudagraph_matches_eager_on_cuda(batches, options):
    reference = run_steps("eager", batches, AlignedLoss(), device="cuda")
    candidate = run_steps("cudagraph", batches, AlignedLoss(), device="cuda", **options)
    assert_same_training(reference, candidate)


class NaNOnSecondStepLoss(torch.nn.Module):
    """AlignedLoss whose loss (and so every gradient) is NaN for the micro-batches of optimizer step 2."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = AlignedLoss()
        self.calls = 0

    def forward(self, *args):
        output = self.inner(*args)
        self.calls += 1
        poisoned = 2 * ACCUMULATION - 1 <= self.calls <= 2 * ACCUMULATION
        return output._replace(loss=output.loss * float("nan")) if poisoned else output


@pytest.mark.parametrize(
    "mode, implementation",
    # fused AdamW skips from the device flag (found_inf); for_loop AdamW reads the flag on the host
    [("eager", "fused"), ("compile", "fused"), ("eager", "for_loop")],
)
def test_a_non_finite_step_updates_nothing_when_skip_nonfinite(batches, mode, implementation):
    model = tiny_model(seed=1)
    optimizer = build_optimizer(model.parameters(), lr=LR, weight_decay=0.01, implementation=implementation)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=4)
    step = build_train_step(mode, model, NaNOnSecondStepLoss(), optimizer, scheduler, skip_nonfinite=True)
    on_device = implementation == "fused"
    assert ("no host read" in step.describe_nonfinite_policy()) == on_device
    skipped, snapshots = [], []
    for i in range(3):
        metrics = step(batches[i * ACCUMULATION : (i + 1) * ACCUMULATION])
        skipped.append(metrics["update_skipped"].item())
        snapshots.append(
            (
                [p.detach().clone() for p in model.parameters()],
                [s["exp_avg"].clone() for s in optimizer.state.values()],
                [float(s["step"]) for s in optimizer.state.values()],
            )
        )
    assert skipped == [0.0, 1.0, 0.0]
    assert torch.isfinite(metrics["loss"])  # step 3's loss is finite again
    (params_1, moments_1, counts_1), (params_2, moments_2, counts_2), (params_3, _, counts_3) = snapshots
    assert all(torch.equal(a, b) for a, b in zip(params_1, params_2))  # step 2 changed no parameter
    assert all(torch.equal(a, b) for a, b in zip(moments_1, moments_2))  # ... and no optimizer state
    assert set(counts_1) == set(counts_2) == {1.0} and set(counts_3) == {2.0}  # nor AdamW's step count
    assert not all(torch.equal(a, b) for a, b in zip(params_2, params_3))  # step 3 trained, finite
    assert all(torch.isfinite(p).all() for p in params_3)
    assert scheduler.last_epoch == 3  # the LR schedule advanced through the skipped step


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def count_host_reads(monkeypatch) -> list[str]:
    """Patch every tensor method that reads a value on the host; returns the list the calls go to."""
    calls: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return calls


@pytest.mark.parametrize(
    "mode, in_backward, implementation",
    [("eager", False, None), ("compile", False, None), ("eager", True, None), ("eager", False, "for_loop")],
)
def test_a_step_reads_nothing_on_the_host(batches, monkeypatch, mode, in_backward, implementation):
    """A step (non-finite check, clipping, fused AdamW or AdamW in backward, LR schedule) makes no
    .item() / bool() / tolist() / float() / int() call on a tensor. The counter's own check: for_loop
    AdamW, which cannot skip from a device flag, reads it on the host."""
    torch._dynamo.reset()
    model = tiny_model(seed=1)
    optimizer = build_optimizer(
        model.parameters(), lr=LR, weight_decay=0.01, in_backward=in_backward, implementation=implementation
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=4)
    micro = 1 if in_backward else ACCUMULATION
    step = build_train_step(
        mode, model, AlignedLoss(), optimizer, scheduler, None if in_backward else 1.0, skip_nonfinite=True
    )
    step(batches[:micro])  # compiles (tracing may read values)
    calls = count_host_reads(monkeypatch)
    for i in (1, 2):
        metrics = step(batches[i * micro : (i + 1) * micro])
    monkeypatch.undo()
    if implementation == "for_loop":
        assert "__bool__" in calls
    else:
        assert calls == [], f"host reads inside the step: {calls}"
    assert metrics["update_skipped"].item() == 0.0 and torch.isfinite(metrics["grad_norm"])
