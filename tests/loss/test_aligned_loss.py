"""AlignedLoss mechanics: normalisation, gradient accumulation, chunking, options, compile."""

import math

import pytest
import torch
import torch.nn.functional as F
from loss_batch_builder import (
    NUM_AUDIO_CLASSES,
    NUM_CODEBOOKS,
    VOCAB_SIZE,
    gathered_targets,
    logits_at_positions,
    one_hot_logits,
    pack,
    recount,
    text_document,
    tts_document,
)

from higgs_tune.data.batch import IGNORE_INDEX, gather_at
from higgs_tune.loss import AlignedLoss, LossOutput, global_target_counts
from higgs_tune.loss.aligned_loss import chunked_text_cross_entropy

K, C, V = NUM_CODEBOOKS, NUM_AUDIO_CLASSES, VOCAB_SIZE


def mixed_batch(seed: int = 0, seq_len: int = 96, text_target_capacity=None, audio_target_capacity=None):
    g = torch.Generator().manual_seed(seed)
    rows = [
        [tts_document(num_frames=4, generator=g), text_document(reply_len=5, generator=g)],
        [tts_document(num_frames=7, with_reference=True, with_audio_in=True, generator=g)],
    ]
    return pack(rows, seq_len, text_target_capacity, audio_target_capacity).batch


def random_outputs(batch, dtype=torch.float32, requires_grad=True):
    b = batch["tokens"].shape[0]
    text = torch.randn(b, batch["text_target_index"].shape[1], V, dtype=dtype)
    audio = torch.randn(b, batch["audio_target_index"].shape[1], K, C, dtype=dtype)
    return {
        "text_logits": text.requires_grad_(requires_grad),
        "audio_logits": audio.requires_grad_(requires_grad),
    }


def manual_terms(outputs, batch):
    """Per-token CE straight from F.cross_entropy on the gathered logits (fp32), micro-batch means."""
    text_targets, audio_targets = gathered_targets(batch)
    text_loss = F.cross_entropy(outputs["text_logits"].float().reshape(-1, V), text_targets.reshape(-1))
    codebook = torch.stack(
        [
            F.cross_entropy(
                outputs["audio_logits"][:, :, k].float().reshape(-1, C), audio_targets[:, :, k].reshape(-1)
            )
            for k in range(K)
        ]
    )
    return text_loss, codebook


def test_default_is_text_mean_plus_mean_over_codebooks_of_token_means():
    batch = mixed_batch()
    outputs = random_outputs(batch)
    result = AlignedLoss()(outputs, batch)
    assert isinstance(result, LossOutput)
    text_loss, codebook = manual_terms(outputs, batch)
    torch.testing.assert_close(result.text_loss, text_loss)
    torch.testing.assert_close(result.codebook_losses, codebook)
    torch.testing.assert_close(result.audio_loss, codebook.mean())
    torch.testing.assert_close(result.loss, text_loss + codebook.mean())
    assert result.num_text_targets == batch["num_text_targets"].sum()
    torch.testing.assert_close(result.num_audio_targets, batch["num_audio_targets"].sum(0))
    assert (
        result.loss.requires_grad
        and not result.text_loss.requires_grad
        and not result.audio_loss.requires_grad
    )


def test_oracle_logits_give_zero_loss_and_full_accuracy_random_give_chance():
    batch = mixed_batch()
    text_targets, audio_targets = gathered_targets(batch)
    oracle = {
        "text_logits": one_hot_logits(text_targets, V),
        "audio_logits": one_hot_logits(audio_targets, C),
    }
    result = AlignedLoss()(oracle, batch)
    assert result.loss < 1e-6
    assert result.text_accuracy == 1.0 and torch.all(result.codebook_accuracies == 1.0)
    uniform = {
        "text_logits": torch.zeros_like(oracle["text_logits"]),
        "audio_logits": torch.zeros_like(oracle["audio_logits"]),
    }
    result = AlignedLoss()(uniform, batch)
    assert result.text_loss == pytest.approx(math.log(V), rel=1e-5)
    torch.testing.assert_close(result.codebook_losses, torch.full((K,), math.log(C)))


def test_accuracy_counts_argmax_hits_over_valid_targets():
    batch = mixed_batch()
    text_targets, audio_targets = gathered_targets(batch)
    text_logits = one_hot_logits(text_targets, V)
    valid_positions = torch.nonzero(text_targets != IGNORE_INDEX)
    wrong = valid_positions[:3]  # make exactly three text predictions wrong
    for b, i in wrong.tolist():
        text_logits[b, i] = one_hot_logits((text_targets[b, i] + 1) % V, V)
    audio_logits = one_hot_logits(audio_targets, C)
    b, i = torch.nonzero(audio_targets[:, :, 2] != IGNORE_INDEX)[0].tolist()
    audio_logits[b, i, 2] = one_hot_logits((audio_targets[b, i, 2] + 1) % C, C)
    result = AlignedLoss()({"text_logits": text_logits, "audio_logits": audio_logits}, batch)
    n_text = int(batch["num_text_targets"].sum())
    assert result.text_accuracy.item() == pytest.approx((n_text - 3) / n_text)
    n2 = int(batch["num_audio_targets"].sum(0)[2])
    assert result.codebook_accuracies[2].item() == pytest.approx((n2 - 1) / n2)
    assert torch.all(result.codebook_accuracies[[0, 1, 3, 4, 5, 6, 7]] == 1.0)


class TinyHeads(torch.nn.Module):
    """A linear 'model': fixed per-position features -> text and audio logits at the target indices."""

    def __init__(self, hidden: int = 16, dtype=torch.float64):
        super().__init__()
        self.text_head = torch.nn.Linear(hidden, V, bias=False, dtype=dtype)
        self.audio_head = torch.nn.Linear(hidden, K * C, bias=False, dtype=dtype)

    def forward(self, features, batch):  # features [B, L, H]
        b, _, h = features.shape
        padded = torch.cat([features, features.new_zeros(b, 1, h)], 1)  # sink row
        text_h = torch.gather(padded, 1, batch["text_target_index"][:, :, None].expand(-1, -1, h))
        audio_h = torch.gather(padded, 1, batch["audio_target_index"][:, :, None].expand(-1, -1, h))
        audio = self.audio_head(audio_h)
        return {"text_logits": self.text_head(text_h), "audio_logits": audio.view(*audio.shape[:2], K, C)}


def four_uneven_rows():
    g = torch.Generator().manual_seed(3)
    rows = [
        [tts_document(num_frames=3, generator=g)],
        [text_document(reply_len=9, generator=g)],
        [
            tts_document(num_frames=9, with_reference=True, generator=g),
            text_document(reply_len=2, generator=g),
        ],
        [tts_document(num_frames=5, with_audio_in=True, generator=g)],
    ]
    return pack(rows, 112).batch


def split_rows(batch):
    return [
        {name: value[b : b + 1] for name, value in batch.items()} for b in range(batch["tokens"].shape[0])
    ]


def test_gradient_accumulation_with_global_denominators_equals_one_big_batch():
    batch = four_uneven_rows()
    counts = batch["num_audio_targets"].sum(1)
    assert len(set(batch["num_text_targets"].tolist())) > 2 and len(set(counts.tolist())) > 2  # uneven rows
    features = torch.randn(4, 112, 16, dtype=torch.float64)
    model = TinyHeads()
    loss_fn = AlignedLoss()

    full = loss_fn(model(features, batch), batch)
    full.loss.backward()
    full_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    micro_batches = split_rows(batch)
    num_text, num_audio = global_target_counts(micro_batches)
    total = 0.0
    for b, micro in enumerate(micro_batches):
        out = loss_fn(model(features[b : b + 1], micro), micro, num_text, num_audio)
        out.loss.backward()
        total = total + out.loss.detach()
    torch.testing.assert_close(total, full.loss.detach(), rtol=0, atol=1e-12)
    for grad, expected in zip([p.grad for p in model.parameters()], full_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-12)

    # Sensitivity: per-micro-batch means (the default denominators) would NOT give the global mean.
    model.zero_grad()
    for b, micro in enumerate(micro_batches):
        (loss_fn(model(features[b : b + 1], micro), micro).loss / 4).backward()
    assert not torch.allclose(model.text_head.weight.grad, full_grads[0], rtol=1e-3)


def test_global_target_counts_sums_micro_batches():
    batch = four_uneven_rows()
    num_text, num_audio = global_target_counts(split_rows(batch))
    assert num_text == batch["num_text_targets"].sum()
    torch.testing.assert_close(num_audio, batch["num_audio_targets"].sum(0))
    with pytest.raises(ValueError, match="at least one micro-batch"):
        global_target_counts([])


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 1000])
def test_chunked_text_cross_entropy_equals_unchunked(chunk_size):
    logits = torch.randn(37, 50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[torch.randperm(37)[:9]] = IGNORE_INDEX
    ce_sum, z_sum, hits = chunked_text_cross_entropy(logits, targets, chunk_size, label_smoothing=0.1)
    expected = F.cross_entropy(logits, targets, reduction="sum", label_smoothing=0.1)
    valid = targets != IGNORE_INDEX
    torch.testing.assert_close(ce_sum, expected)
    torch.testing.assert_close(z_sum, (torch.logsumexp(logits, -1)[valid] ** 2).sum())
    assert hits == (logits.argmax(-1) == targets).sum()
    (grad,) = torch.autograd.grad(ce_sum + 0.5 * z_sum, logits)
    (expected_grad,) = torch.autograd.grad(
        expected + 0.5 * (torch.logsumexp(logits, -1)[valid] ** 2).sum(), logits
    )
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_loss_is_independent_of_text_chunk_size_in_bf16(chunk_size):
    batch = mixed_batch()
    outputs = random_outputs(batch, dtype=torch.bfloat16)
    result = AlignedLoss(text_chunk_size=chunk_size)(outputs, batch)
    (grad,) = torch.autograd.grad(result.loss, outputs["text_logits"])
    reference_outputs = {name: value.detach().requires_grad_() for name, value in outputs.items()}
    text_loss, _ = manual_terms(reference_outputs, batch)  # fp32 upcast of the whole block at once
    (expected_grad,) = torch.autograd.grad(text_loss, reference_outputs["text_logits"])
    torch.testing.assert_close(result.text_loss, text_loss.detach())
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, expected_grad)


def test_text_cross_entropy_never_keeps_all_fp32_logits_for_backward():
    """Failure mode 9: the saved activations are the model-dtype logits, not an fp32 [N, V] copy."""
    logits = torch.randn(64, 512, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 512, (64,))
    saved = []

    def pack_hook(tensor):
        saved.append((tensor.dtype, tensor.numel()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        ce_sum, _, _ = chunked_text_cross_entropy(logits, targets, chunk_size=8)
    fp32_saved = [numel for dtype, numel in saved if dtype == torch.float32]
    assert sum(fp32_saved) < 8 * 512  # all fp32 tensors kept for backward: less than one chunk of logits
    ce_sum.backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_shape_mismatch_is_an_error_naming_both_shapes():
    batch = mixed_batch()
    outputs = random_outputs(batch)
    cropped = dict(outputs, text_logits=outputs["text_logits"][:, :-1])
    with pytest.raises(ValueError, match=r"\(2, 95, 1024\).*\(2, 96\)"):
        AlignedLoss()(cropped, batch)
    swapped = dict(outputs, audio_logits=outputs["audio_logits"].transpose(1, 2))  # codebook and time axes
    with pytest.raises(ValueError, match=r"\(2, 8, 96, 1026\).*\(2, 96, 8\)"):
        AlignedLoss()(swapped, batch)
    with pytest.raises(ValueError, match=r"num_audio_targets_global must have shape \(8,\)"):
        AlignedLoss()(outputs, batch, batch["num_text_targets"].sum(), torch.tensor(5))


def test_model_output_object_with_attributes_is_accepted():
    batch = mixed_batch()
    outputs = random_outputs(batch)

    class Output:
        text_logits = outputs["text_logits"]
        audio_logits = outputs["audio_logits"]

    torch.testing.assert_close(AlignedLoss()(Output(), batch).loss, AlignedLoss()(outputs, batch).loss)
    with pytest.raises(KeyError, match="audio_logits"):
        AlignedLoss()({"text_logits": outputs["text_logits"]}, batch)


def test_no_audio_targets_gives_zero_audio_term_without_nan_and_text_gradients_flow():
    batch = pack([[text_document()], [text_document(reply_len=3)]], 40).batch
    assert batch["num_audio_targets"].sum() == 0
    outputs = random_outputs(batch)
    result = AlignedLoss(z_loss_weight=1e-3)(outputs, batch)
    assert torch.isfinite(result.loss)
    assert result.audio_loss == 0 and torch.all(result.codebook_losses == 0)
    assert torch.all(result.codebook_accuracies == 0)
    result.loss.backward()
    assert outputs["text_logits"].grad.abs().sum() > 0
    assert torch.all(outputs["audio_logits"].grad == 0)
    assert torch.isfinite(outputs["audio_logits"].grad).all()


def test_no_text_targets_gives_zero_text_term_without_nan_and_audio_gradients_flow():
    batch = mixed_batch()
    batch["text_targets"] = torch.full_like(batch["text_targets"], IGNORE_INDEX)
    batch = recount(batch)
    outputs = random_outputs(batch)
    result = AlignedLoss()(outputs, batch)
    assert result.text_loss == 0 and torch.isfinite(result.loss) and result.loss > 0
    result.loss.backward()
    assert torch.all(outputs["text_logits"].grad == 0)
    assert outputs["audio_logits"].grad.abs().sum() > 0


def test_a_codebook_without_targets_in_the_global_batch_contributes_zero():
    batch = mixed_batch()
    batch["audio_targets"][:, 5] = IGNORE_INDEX
    batch = recount(batch)
    outputs = random_outputs(batch)
    result = AlignedLoss()(outputs, batch)
    assert result.codebook_losses[5] == 0 and torch.isfinite(result.codebook_losses).all()
    _, codebook = manual_terms(outputs, {**batch})
    torch.testing.assert_close(result.codebook_losses[[0, 1, 2, 3, 4, 6, 7]], codebook[[0, 1, 2, 3, 4, 6, 7]])
    # The reference mean divides by K (=8) even when a codebook has no target; so does the default here.
    torch.testing.assert_close(result.audio_loss, codebook.nan_to_num().sum() / K)


def test_codebook_reduction_and_weights():
    batch = mixed_batch()
    outputs = random_outputs(batch, requires_grad=False)
    mean = AlignedLoss()(outputs, batch)
    summed = AlignedLoss(codebook_reduction="sum")(outputs, batch)
    torch.testing.assert_close(summed.audio_loss, K * mean.audio_loss)
    torch.testing.assert_close(summed.loss, mean.text_loss + K * mean.audio_loss)
    weights = [2.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0]
    w = torch.tensor(weights)
    weighted_mean = AlignedLoss(codebook_weights=weights)(outputs, batch)
    torch.testing.assert_close(weighted_mean.audio_loss, (w * mean.codebook_losses).sum() / w.sum())
    weighted_sum = AlignedLoss(codebook_weights=weights, codebook_reduction="sum")(outputs, batch)
    torch.testing.assert_close(weighted_sum.audio_loss, (w * mean.codebook_losses).sum())
    text_heavy = AlignedLoss(text_weight=3.0)(outputs, batch)
    torch.testing.assert_close(text_heavy.loss, 3.0 * mean.text_loss + mean.audio_loss)
    with pytest.raises(ValueError, match="codebook_weights has 3 entries but the audio logits have 8"):
        AlignedLoss(codebook_weights=[1.0, 1.0, 1.0])(outputs, batch)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"codebook_reduction": "max"}, "codebook_reduction"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"z_loss_weight": -1.0}, "z_loss_weight"),
        ({"text_chunk_size": 0}, "text_chunk_size"),
        ({"codebook_weights": [0.0, 0.0]}, "codebook_weights"),
        ({"codebook_weights": [1.0, -1.0]}, "codebook_weights"),
    ],
)
def test_invalid_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlignedLoss(**kwargs)


def test_label_smoothing_matches_its_definition():
    batch = mixed_batch()
    outputs = random_outputs(batch, requires_grad=False)
    eps = 0.1
    result = AlignedLoss(label_smoothing=eps)(outputs, batch)
    text_targets, audio_targets = gathered_targets(batch)

    def smoothed(logits, targets, num_classes):
        logp = torch.log_softmax(logits.float().reshape(-1, num_classes), -1)
        targets = targets.reshape(-1)
        valid = targets != IGNORE_INDEX
        nll = -logp[valid].gather(1, targets[valid, None]).squeeze(1)
        return ((1 - eps) * nll + eps * (-logp[valid].mean(1))).mean()

    torch.testing.assert_close(result.text_loss, smoothed(outputs["text_logits"], text_targets, V))
    expected = torch.stack(
        [smoothed(outputs["audio_logits"][:, :, k], audio_targets[:, :, k], C) for k in range(K)]
    )
    torch.testing.assert_close(result.codebook_losses, expected)


def test_z_loss_is_weighted_mean_squared_logsumexp_over_valid_targets():
    batch = mixed_batch()
    outputs = random_outputs(batch, requires_grad=False)
    weight = 1e-2
    plain = AlignedLoss()(outputs, batch)
    result = AlignedLoss(z_loss_weight=weight)(outputs, batch)
    text_targets, audio_targets = gathered_targets(batch)
    lse_text = torch.logsumexp(outputs["text_logits"], -1)[text_targets != IGNORE_INDEX]
    lse_audio = torch.logsumexp(outputs["audio_logits"], -1)  # [B, C_at, K]
    per_codebook = torch.stack(
        [lse_audio[..., k][audio_targets[..., k] != IGNORE_INDEX].square().mean() for k in range(K)]
    )
    expected = weight * (lse_text.square().mean() + per_codebook.mean())
    torch.testing.assert_close(result.z_loss, expected)
    torch.testing.assert_close(result.loss, plain.loss + expected)
    torch.testing.assert_close(result.text_loss, plain.text_loss)  # z-loss is reported apart
    assert plain.z_loss == 0


def test_capacities_smaller_than_seq_len_give_the_same_loss():
    full = mixed_batch()
    small = mixed_batch(text_target_capacity=12, audio_target_capacity=24)
    assert small["text_target_index"].shape == (2, 12)
    features_text = torch.randn(2, 96, V)
    features_audio = torch.randn(2, 96, K, C)
    a = AlignedLoss()(logits_at_positions(features_text, features_audio, full), full)
    b = AlignedLoss()(logits_at_positions(features_text, features_audio, small), small)
    torch.testing.assert_close(a.loss, b.loss)


def test_gathered_targets_at_sink_are_ignored():
    batch = mixed_batch(text_target_capacity=20)
    text = gather_at(batch["text_targets"], batch["text_target_index"])
    sink = batch["text_target_index"] == batch["tokens"].shape[1]
    assert sink.any() and torch.all(text[sink] == IGNORE_INDEX)


def test_instantiates_from_yaml_config():
    from omegaconf import OmegaConf
    from torchtune import config

    cfg = OmegaConf.create(
        "loss:\n  _component_: higgs_tune.loss.AlignedLoss\n  codebook_reduction: sum\n"
        "  codebook_weights: [1, 1, 1, 1, 1, 1, 1, 2]\n  text_chunk_size: 64\n"
    )
    loss_fn = config.instantiate(cfg.loss)
    assert isinstance(loss_fn, AlignedLoss)
    assert loss_fn.codebook_reduction == "sum" and loss_fn.text_chunk_size == 64
    assert loss_fn.codebook_weights.tolist() == [1, 1, 1, 1, 1, 1, 1, 2]


def _compiled_equals_eager(backend):
    batch = mixed_batch()
    loss_fn = AlignedLoss(text_chunk_size=16, z_loss_weight=1e-3, label_smoothing=0.05)
    outputs = random_outputs(batch)

    def step(text_logits, audio_logits, batch, num_text, num_audio):
        result = loss_fn(
            {"text_logits": text_logits, "audio_logits": audio_logits}, batch, num_text, num_audio
        )
        result.loss.backward()
        return result

    num_text, num_audio = global_target_counts([batch])
    eager = step(outputs["text_logits"], outputs["audio_logits"], batch, num_text, num_audio)
    eager_grads = [outputs["text_logits"].grad.clone(), outputs["audio_logits"].grad.clone()]
    compiled_inputs = [
        outputs["text_logits"].detach().requires_grad_(),
        outputs["audio_logits"].detach().requires_grad_(),
    ]
    torch._dynamo.reset()
    compiled_loss = torch.compile(loss_fn, fullgraph=True, backend=backend)
    result = compiled_loss(
        {"text_logits": compiled_inputs[0], "audio_logits": compiled_inputs[1]}, batch, num_text, num_audio
    )
    result.loss.backward()
    for name in LossOutput._fields:
        torch.testing.assert_close(getattr(result, name), getattr(eager, name), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_inputs[0].grad, eager_grads[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(compiled_inputs[1].grad, eager_grads[1], rtol=1e-5, atol=1e-7)


def test_fullgraph_compile_forward_backward_equals_eager_aot_eager():
    _compiled_equals_eager("aot_eager")


@pytest.mark.slow
def test_fullgraph_compile_forward_backward_equals_eager_inductor():
    _compiled_equals_eager("inductor")
