"""Parity with Boson's HiggsAudioModel (the oracle): weights through our HF adapter, same logits.

fp32, random weights (norm weights randomised too), eval mode. Tolerance: max abs diff < 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch
from boson_multimodal.model.higgs_audio import HiggsAudioModel as BosonModel
from higgs_model_testing import (
    boson_config,
    boson_model,
    make_boson_sample,
    pack_batch,
    run_boson,
    select_targets,
)

from higgs_tune.models.higgs_audio.checkpoint import (
    INDEX_FILE,
    load_hf_checkpoint,
    save_hf_checkpoint,
    save_model,
)
from higgs_tune.models.higgs_audio.lora import apply_lora, merged_state_dict

TOL = 1e-4

SAMPLES = {
    "audio_in_and_two_audio_out": [
        ("text", 6),
        ("audio_in", 5),
        ("text", 4),
        ("audio_out", 6),
        ("text", 3),
        ("audio_out", 3),
        ("text", 2),
    ],
    "audio_out_only": [("text", 3), ("audio_out", 9)],
    "text_only": [("text", 17)],
    "two_audio_in_three_audio_out": [
        ("audio_in", 2),
        ("text", 2),
        ("audio_out", 4),
        ("audio_in", 3),
        ("audio_out", 1),
        ("text", 1),
        ("audio_out", 2),
    ],
}

CONFIGS = {
    "2_layers_gqa2_all_dual": dict(num_layers=2, num_heads=4, num_kv_heads=2),
    "3_layers_gqa4_fast_forward_layer1": dict(
        num_layers=3, num_heads=4, num_kv_heads=1, dual_ffn_layers=[0, 2]
    ),
    "4_layers_mha_fast_forward_0_3_sdpa": dict(
        num_layers=4, num_heads=4, num_kv_heads=4, dual_ffn_layers=[1, 2], attn_implementation="sdpa"
    ),
    "2_layers_dual_ffn_adapter_llama_layer0": dict(num_layers=2, adapter="dual_ffn", dual_ffn_layers=[1]),
    "embed_avg_strong_rope_scaling": dict(
        num_layers=2, num_heads=2, num_kv_heads=1, embed_avg=True, original_max_positions=16
    ),
}


def assert_max_abs_diff(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    if actual.numel():
        diff = (actual - expected).abs().max().item()
        assert diff < TOL, f"{what}: max abs diff {diff:.3g} >= {TOL}"


def _ours_from_boson(boson, tmp_path):
    boson.save_pretrained(tmp_path / "boson")
    return load_hf_checkpoint(tmp_path / "boson", dtype=torch.float32).eval()


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_logits_match_boson(config_name, tmp_path):
    boson = boson_model(boson_config(**CONFIGS[config_name]))
    ours = _ours_from_boson(boson, tmp_path)
    for sample_name, segments in SAMPLES.items():
        ref = run_boson(boson, make_boson_sample(segments, seed=len(sample_name)))
        length = ref.tokens.shape[0]
        batch = pack_batch([[ref]], seq_len=length + 5)  # trailing padding
        with torch.no_grad():
            full = ours.forward_full(batch)
            train = ours(batch)  # target indices select every position
        out_mask = ref.audio_out_mask
        assert_max_abs_diff(full.text_logits[0, :length], ref.text_logits, sample_name)
        assert_max_abs_diff(full.audio_logits[0, :length][out_mask], ref.audio_logits, sample_name)
        torch.testing.assert_close(train.text_logits, full.text_logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(train.audio_logits, full.audio_logits, rtol=0, atol=1e-6)

        # Training forward with only target-carrying positions selected: the gathered logits are the
        # reference logits at those positions.
        selected = select_targets(batch)
        with torch.no_grad():
            sparse = ours(selected)
        text_index = selected["text_target_index"][0]
        valid = text_index < length
        assert_max_abs_diff(sparse.text_logits[0][valid], ref.text_logits[text_index[valid]], sample_name)
        audio_index = selected["audio_target_index"][0]
        valid = audio_index < length
        if valid.any():
            # Boson's audio logits are ordered by audio-out position: map positions to their rank.
            rank = torch.cumsum(out_mask.long(), 0) - 1
            assert out_mask[audio_index[valid]].all()
            expected = ref.audio_logits[rank[audio_index[valid]]]
            assert_max_abs_diff(sparse.audio_logits[0][valid], expected, sample_name)


@pytest.mark.parametrize("config_name", ["3_layers_gqa4_fast_forward_layer1", "2_layers_gqa2_all_dual"])
def test_packed_rows_match_boson_per_document(config_name, tmp_path):
    """Documents packed in rows (restarting positions, block-causal attention, trailing padding) give,
    per document, the logits of Boson's model run on that document alone."""
    boson = boson_model(boson_config(**CONFIGS[config_name]))
    ours = _ours_from_boson(boson, tmp_path)
    refs = [
        run_boson(boson, make_boson_sample(segments, seed=i)) for i, segments in enumerate(SAMPLES.values())
    ]
    rows = [[refs[0], refs[1], refs[2]], [refs[3]]]
    seq_len = max(sum(doc.tokens.shape[0] for doc in row) for row in rows) + 7
    batch = pack_batch(rows, seq_len)
    with torch.no_grad():
        full = ours.forward_full(batch)
    for b, row in enumerate(rows):
        start = 0
        for doc in row:
            end = start + doc.tokens.shape[0]
            assert_max_abs_diff(full.text_logits[b, start:end], doc.text_logits, f"text row {b}")
            audio = full.audio_logits[b, start:end][doc.audio_out_mask]
            assert_max_abs_diff(audio, doc.audio_logits, f"audio row {b}")
            start = end


def test_round_trip_boson_ours_export_boson(tmp_path):
    """Boson save -> ours -> our sharded export -> Boson from_pretrained: no missing/unexpected keys,
    identical weights and outputs."""
    boson = boson_model(boson_config(num_layers=3, dual_ffn_layers=[0, 2]))
    ours = _ours_from_boson(boson, tmp_path)
    export = save_model(ours, tmp_path / "export", max_shard_bytes=200_000)
    index = json.loads((export / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    reloaded, info = BosonModel.from_pretrained(export, output_loading_info=True, attn_implementation="eager")
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    reloaded.eval()
    original_state = boson.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, original_state[key]), key
    sample = make_boson_sample(SAMPLES["audio_in_and_two_audio_out"])
    before, after = run_boson(boson, sample), run_boson(reloaded, sample)
    assert torch.equal(before.text_logits, after.text_logits)
    assert torch.equal(before.audio_logits, after.audio_logits)
    # and our own loader reads our export back unchanged
    again = load_hf_checkpoint(export, dtype=None)
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_lora_merged_export_loads_in_boson_with_same_outputs(tmp_path):
    boson = boson_model(boson_config(num_layers=2))
    ours = _ours_from_boson(boson, tmp_path)
    apply_lora(
        ours, ["q_proj", "v_proj", "o_proj", "mlp", "audio_mlp", "text_lm_head", "audio_lm_head"], 4, 8.0
    )
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_b" in name:
                param.normal_(std=0.05)  # non-zero adapters, so merging matters
    ref = run_boson(boson, make_boson_sample(SAMPLES["audio_in_and_two_audio_out"]))
    length = ref.tokens.shape[0]
    batch = pack_batch([[ref]], length)
    with torch.no_grad():
        with_lora = ours.forward_full(batch)
    assert (with_lora.text_logits[0] - ref.text_logits).abs().max() > 1e-3  # the adapters change outputs

    export = save_hf_checkpoint(merged_state_dict(ours), ours.args, tmp_path / "merged")
    merged_boson, info = BosonModel.from_pretrained(
        export, output_loading_info=True, attn_implementation="eager"
    )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    merged_ref = run_boson(merged_boson.eval(), make_boson_sample(SAMPLES["audio_in_and_two_audio_out"]))
    assert_max_abs_diff(with_lora.text_logits[0], merged_ref.text_logits, "text")
    assert_max_abs_diff(with_lora.audio_logits[0][ref.audio_out_mask], merged_ref.audio_logits, "audio")
