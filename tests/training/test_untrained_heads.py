"""``loss.text_weight: 0``: the text head is neither computed nor trained by the step (frozen, not in the
optimizer, no gradient allocated), everything else trains as before."""

from __future__ import annotations

import pytest
import torch
from training_testing import make_manifest, real_batches, tiny_model

from higgs_tune.loss import AlignedLoss
from higgs_tune.models.higgs_audio.lora import freeze_text_only
from higgs_tune.training.optim import build_optimizer
from higgs_tune.training.step import build_train_step


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    manifest = make_manifest(tmp_path_factory.mktemp("synthetic"), num_samples=32)
    return real_batches(manifest, tiny_model(), 2)


@pytest.mark.parametrize("in_backward", [False, True])
def test_text_weight_zero_neither_computes_nor_trains_what_only_the_text_head_reads(batches, in_backward):
    model = tiny_model(seed=1)
    head = model.audio_decoder_proj.text_lm_head
    last = f"layers.{len(model.layers) - 1}"
    text_only = {
        "audio_decoder_proj.text_lm_head.weight",
        f"{last}.post_attention_layernorm.weight",
        *(f"{last}.mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")),
    }
    assert set(freeze_text_only(model)) == text_only
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, lr=1e-3, weight_decay=0.1, in_backward=in_backward)
    loss_fn = AlignedLoss(text_weight=0.0)
    step = build_train_step(
        "eager", model, loss_fn, optimizer, None, None if in_backward else 1.0, text_logits=False
    )
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    for batch in batches:
        metrics = step([batch])
    assert calls == [], "the text head ran in a training step"
    assert head.weight.grad is None and not head.weight.requires_grad
    assert all(head.weight is not p for p in optimizer.param_groups[0]["params"])
    assert torch.equal(head.weight, before["audio_decoder_proj.text_lm_head.weight"])
    # Frozen: what only the text head reads, the last layer's text FFN and its norm (they act on text
    # positions after the last attention). Everything else trained, with a gradient from the audio loss.
    unchanged = {n for n, p in model.named_parameters() if torch.equal(p, before[n])}
    assert unchanged == text_only
    assert metrics["text_loss"].item() == 0.0 and metrics["audio_loss"].item() > 0.0
    # The loss alone equals the full model's audio loss (the text head only adds a 0-weighted term).
    with torch.no_grad():
        full = loss_fn(model(batches[0]), batches[0])
        audio_only = loss_fn(model(batches[0], text_logits=False), batches[0])
    torch.testing.assert_close(audio_only.loss, full.audio_loss)


def test_the_text_head_is_skipped_only_for_a_zero_text_weight(batches):
    model = tiny_model()
    optimizer = build_optimizer(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="text_weight 0"):
        build_train_step("eager", model, AlignedLoss(), optimizer, text_logits=False)
    with torch.no_grad(), pytest.raises(ValueError, match="text_weight is 1.0"):
        AlignedLoss()(model(batches[0], text_logits=False), batches[0])
