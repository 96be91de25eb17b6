"""Our loss equals Boson's reference formula on Boson's own model outputs (issue 5, docs/higgs_audio_v2.md §6.4).

Reference side: random samples -> ``prepare_chatml_sample`` -> ``HiggsAudioSampleCollator`` -> Boson's
``HiggsAudioModel`` (random weights) -> ``logits``, ``expanded_labels``, ``audio_logits`` with the
collator's ``label_audio_ids`` and ``audio_out_ids_start`` -> the reference loss (both shifts,
segment-start masking, per-codebook token means, 1/K weights).

Our side: the same samples -> our tokenizer/document builder (targets built once) -> packed into ONE
row -> our model with the same weights (loaded from Boson's ``save_pretrained`` through our HF adapter)
-> ``AlignedLoss``. Boson right-pads a batch of separate samples; we pack them as documents of one row:
the per-token means over the micro-batch must be the same numbers.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sample_strategies import TINY_TOKENIZER, chatml_samples, codes_in_order

from higgs_tune.boson_reference import (
    boson_dataset_sample,
    boson_model_inputs,
    boson_tokenizer,
    boson_training_collator,
)
from higgs_tune.data.batch import PackingSpec
from higgs_tune.data.chatml import tokenize_sample
from higgs_tune.data.document import AudioLayout, build_document
from higgs_tune.data.packer import collate_rows
from higgs_tune.data.tokenizer import HiggsTokenizer
from higgs_tune.loss import AlignedLoss, reference_loss
from higgs_tune.models.higgs_audio.builders import from_checkpoint_dir

pytest.importorskip("transformers")
pytest.importorskip("boson_multimodal")
from higgs_model_testing import boson_config, boson_model  # noqa: E402

TOKENIZER = HiggsTokenizer.from_path(TINY_TOKENIZER)
BOSON_TOKENIZER = boson_tokenizer(TINY_TOKENIZER / "tokenizer.json")
LAYOUT = AudioLayout()
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Boson's tiny model with sharpened heads (so any mis-pairing of logits and targets moves the loss)
    and ours with the same weights, through Boson's save_pretrained and our HF adapter."""
    boson = boson_model(boson_config(num_layers=2, attn_implementation="eager"), seed=3)
    with torch.no_grad():
        boson.audio_decoder_proj.text_lm_head.weight.mul_(20.0)
        boson.audio_decoder_proj.audio_lm_head.weight.mul_(20.0)
    path = tmp_path_factory.mktemp("boson_ckpt")
    boson.save_pretrained(str(path))
    ours = from_checkpoint_dir(path, dtype=torch.float32, device="cpu").eval()
    return boson, ours


def boson_reference(boson, samples: list):
    special = TOKENIZER.special
    collator = boson_training_collator(
        audio_in_token_id=special.audio_in,
        audio_out_token_id=special.audio_out,
        pad_token_id=special.pad,
        layout=LAYOUT,
    )
    batch = collator(samples)
    with torch.no_grad():
        out = boson(**boson_model_inputs(batch))
    num_out = batch.audio_out_ids.shape[1] if batch.audio_out_ids is not None else 0
    audio_logits = out.audio_logits if num_out else torch.zeros(0, 8, 1026)
    label_audio_ids = batch.label_audio_ids if num_out else torch.zeros(8, 0, dtype=torch.long)
    starts = batch.audio_out_ids_start if num_out else torch.zeros(0, dtype=torch.long)
    # Valid-target counts as the reference loss sees them (after both shifts and the start masking).
    masked = label_audio_ids.clone()
    masked[:, starts] = -100
    num_text = (out.expanded_labels[:, 1:] != -100).sum()
    num_audio = (masked[:, 1:] != -100).sum(1)
    loss = reference_loss(out.logits, out.expanded_labels, audio_logits, label_audio_ids, starts)
    return loss, num_text, num_audio


def our_loss(ours, documents):
    length = sum(len(doc) for doc in documents)
    spec = PackingSpec(seq_len=length + 5, batch_size=1, num_codebooks=LAYOUT.num_codebooks)
    batch = collate_rows([documents], spec, TOKENIZER.special.pad)
    with torch.no_grad():
        return AlignedLoss()(ours(batch), batch)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(samples=st.lists(chatml_samples(max_frames=5), min_size=1, max_size=3))
def test_loss_components_equal_the_reference_on_boson_outputs(models, samples):
    boson, ours = models
    documents, reference_samples = [], []
    for sample, codes_by_path in samples:
        codes = codes_in_order(sample, codes_by_path)
        documents.append(build_document(tokenize_sample(sample, TOKENIZER), codes, LAYOUT))
        reference_samples.append(boson_dataset_sample(sample, codes, BOSON_TOKENIZER, LAYOUT.num_codebooks))

    expected, num_text, num_audio = boson_reference(boson, reference_samples)
    got = our_loss(ours, documents)

    assert int(got.num_text_targets) == int(num_text)
    assert got.num_audio_targets.tolist() == num_audio.tolist()
    torch.testing.assert_close(got.text_loss, expected.text_loss, rtol=TOLERANCE, atol=TOLERANCE)
    torch.testing.assert_close(got.codebook_losses, expected.codebook_losses, rtol=TOLERANCE, atol=TOLERANCE)
    torch.testing.assert_close(got.audio_loss, expected.audio_loss, rtol=TOLERANCE, atol=TOLERANCE)
    torch.testing.assert_close(got.loss, expected.loss, rtol=TOLERANCE, atol=TOLERANCE)
