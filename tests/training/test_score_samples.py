"""tools/score_samples.py: per-sample losses and gradient norms (torch.func.vmap over the audio adapter)
equal those of plain autograd on each sample alone, and a trained model ranks a broken sample first."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from training_testing import (
    TOKENIZER_PATH,
    load_tool,
    make_manifest,
    real_batches,
    tiny_model,
    transform_safe_loss,
)

from higgs_tune.data.document import AudioLayout
from higgs_tune.data.tokenizer import HiggsTokenizer
from higgs_tune.training.optim import build_optimizer
from higgs_tune.training.step import build_train_step

score_samples = load_tool("score_samples")


def one_document_rows(manifest, model):
    tokenizer = HiggsTokenizer.from_path(str(TOKENIZER_PATH))
    layout = AudioLayout.from_model_config(model.args.to_hf_config())
    return score_samples.one_document_rows(manifest, tokenizer, layout, seq_len=256)


def test_vmap_scores_equal_autograd_per_sample(tmp_path):
    manifest = make_manifest(tmp_path, num_samples=6)
    model = tiny_model()
    loss_fn = transform_safe_loss()
    entries, rows = one_document_rows(manifest, model)
    names = score_samples.select_parameters(model, "audio")
    assert names and all("audio" in n for n in names)
    loss, grad_norm, _, _ = score_samples.score_rows(model, loss_fn, rows[:4], names, chunk_size=2)
    params = [p for n, p in model.named_parameters() if n in names]
    for i, row in enumerate(rows[:4]):
        expected_loss = loss_fn(model(row), row).loss
        grads = torch.autograd.grad(expected_loss, params)
        expected_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        torch.testing.assert_close(loss[i], expected_loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_norm[i], expected_norm.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_trained_model_ranks_the_broken_sample_first(tmp_path):
    """A model fit to a clean set; then one sample's speech codes are replaced by noise (codes that no
    longer match its text, in a file of its own: other samples may share the original file, e.g. as a
    voice-clone reference). Scoring the set ranks that sample first."""
    manifest = make_manifest(tmp_path, num_samples=32, seed=1)
    model = tiny_model()
    loss_fn = transform_safe_loss()
    optimizer = build_optimizer(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    step = build_train_step("eager", model, loss_fn, optimizer)
    batches = real_batches(manifest, model, 6)
    for _ in range(25):  # 150 optimizer steps over 6 micro-batches
        for batch in batches:
            step([batch])

    lines = manifest.read_text().splitlines()
    broken_line = next(i for i, line in enumerate(lines) if '"tts"' in line and i > 10)
    sample = json.loads(lines[broken_line])
    speech = sample["messages"][-1]["content"]
    codes = np.load(manifest.parent / speech["audio_codes"])
    noise = np.random.default_rng(0).integers(0, 1024, codes.shape).astype(codes.dtype)
    np.save(manifest.parent / "broken.npy", noise)
    speech["audio_codes"] = "broken.npy"
    lines[broken_line] = json.dumps(sample)
    manifest.write_text("\n".join(lines) + "\n")

    entries, rows = one_document_rows(manifest, model)
    audio_params = score_samples.select_parameters(model, "audio")
    scores = score_samples.rank(entries, rows, model, loss_fn, audio_params, chunk_size=16, sort="audio_loss")
    top = [(s.location.rsplit(":", 1)[1], round(s.audio_loss, 2), round(s.grad_norm, 2)) for s in scores[:4]]
    assert scores[0].location == f"{manifest}:{broken_line + 1}", top
    assert scores[0].audio_loss > scores[1].audio_loss + 1.0, top
    # It also pulls the audio adapter among the hardest (gradient norms compare across sample kinds less
    # well than audio losses: a transcription sample's text error can pull harder).
    by_gradient = score_samples.rank(
        entries, rows, model, loss_fn, audio_params, chunk_size=16, sort="grad_norm"
    )
    gradient_top = [(s.location.rsplit(":", 1)[1], round(s.grad_norm, 2)) for s in by_gradient[:3]]
    assert scores[0].location in [s.location for s in by_gradient[:3]], gradient_top
