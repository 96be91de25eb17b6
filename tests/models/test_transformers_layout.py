"""transformers' HiggsAudioV2 layout: round trips, key names, refusals (main test environment: the
conversion is higgs_tune's own code; the comparison with transformers' model is tests/transformers_port/)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from higgs_model_testing import boson_config, boson_model
from safetensors.torch import load_file, save_file

from higgs_tune.models.higgs_audio.builders import higgs_audio_3b, higgs_audio_tiny
from higgs_tune.models.higgs_audio.checkpoint import (
    CheckpointKeyError,
    checkpoint_layout,
    load_hf_checkpoint,
    read_hf_config,
    read_model_args,
    save_hf_checkpoint,
)
from higgs_tune.models.higgs_audio.transformers_layout import (
    TransformersLayoutError,
    from_transformers_key,
    to_transformers_key,
)

REPO = Path(__file__).resolve().parents[2]
TINY_TOKENIZER = REPO / "higgs_tune" / "assets" / "tiny_tokenizer"


def convert(src: Path, dst: Path, to: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert.py"), str(src), str(dst), "--to", to, *extra],
        capture_output=True,
        text=True,
    )


def with_tokenizer(directory: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TINY_TOKENIZER / name, directory / name)
    return directory


def test_boson_made_checkpoint_round_trips_bit_identical(tmp_path):
    """Boson's own save_pretrained -> transformers layout -> Boson layout: the same tensors bit for bit
    under the same names, and the same architecture."""
    boson = boson_model(boson_config(num_layers=2))
    boson.save_pretrained(tmp_path / "boson")
    with_tokenizer(tmp_path / "boson")
    for src, dst, to in (("boson", "hf", "transformers"), ("hf", "boson_again", "boson")):
        result = convert(tmp_path / src, tmp_path / dst, to)
        assert result.returncode == 0, result.stderr
    assert checkpoint_layout(tmp_path / "hf") == "transformers"
    original = load_file(tmp_path / "boson" / "model.safetensors")
    again = load_file(tmp_path / "boson_again" / "model.safetensors")
    original.pop("audio_codebook_weights", None)  # a Boson buffer transformers drops (never a parameter)
    assert sorted(again) == sorted(original)
    for key, tensor in original.items():
        assert tensor.dtype == again[key].dtype and torch.equal(tensor, again[key]), key
    # tie_word_embeddings is recorded only (the text head is untied in both); transformers' config has no
    # place for Boson's text_config value, so the way back writes Boson's released value, True.
    assert read_model_args(tmp_path / "boson_again") == read_model_args(tmp_path / "boson").replace(
        tie_word_embeddings=True
    )
    transformers_keys = set(load_file(tmp_path / "hf" / "model.safetensors"))
    assert "model.embed_audio_tokens.embed_audio_tokens.weight" in transformers_keys
    assert {"audio_lm_head.weight", "text_lm_head.weight", "model.norm.weight"} <= transformers_keys


def test_ours_transformers_ours_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = higgs_audio_tiny(dtype="bf16")
    export = save_hf_checkpoint(
        model.state_dict(), model.args, tmp_path / "hf", layout="transformers", tokenizer_dir=TINY_TOKENIZER
    )
    config = json.loads((export / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["codebook_size"] == 1026
    back = load_hf_checkpoint(export, dtype=None)
    assert back.args == model.args
    for key, tensor in model.state_dict().items():
        assert back.state_dict()[key].dtype == torch.bfloat16
        assert torch.equal(back.state_dict()[key], tensor), key


def test_key_names_of_the_released_model_map_both_ways():
    keys = list(higgs_audio_3b(device="meta").state_dict())
    mapped = [to_transformers_key(k) for k in keys]
    assert len(set(mapped)) == len(keys)
    assert [from_transformers_key(k) for k in mapped] == keys
    assert (
        to_transformers_key("layers.27.audio_mlp.gate_proj.weight")
        == "model.layers.27.audio_mlp.gate_proj.weight"
    )
    assert to_transformers_key("audio_decoder_proj.text_lm_head.weight") == "text_lm_head.weight"
    with pytest.raises(TransformersLayoutError, match="not a transformers HiggsAudioV2 parameter"):
        from_transformers_key("lm_head.weight")


@pytest.mark.parametrize(
    "overrides, option",
    [
        (dict(num_layers=3, audio_dual_ffn_layers=(0, 2)), "audio_dual_ffn_layers"),
        (dict(audio_adapter_type="dual_ffn", audio_dual_ffn_layers=(1,)), "audio_adapter_type='dual_ffn'"),
        (dict(audio_embed_avg=True), "audio_embed_avg=True"),
    ],
)
def test_models_transformers_cannot_compute_are_refused(tmp_path, overrides, option):
    model = higgs_audio_tiny(**overrides)
    with pytest.raises(TransformersLayoutError, match=option.replace("(", r"\(").replace(")", r"\)")):
        save_hf_checkpoint(
            model.state_dict(),
            model.args,
            tmp_path / "hf",
            layout="transformers",
            tokenizer_dir=TINY_TOKENIZER,
        )
    assert not (tmp_path / "hf").exists()


def test_transformers_checkpoint_without_text_head_or_tokenizer_is_a_clear_error(tmp_path):
    model = higgs_audio_tiny()
    export = save_hf_checkpoint(
        model.state_dict(), model.args, tmp_path / "hf", layout="transformers", tokenizer_dir=TINY_TOKENIZER
    )
    tensors = load_file(export / "model.safetensors")
    del tensors["text_lm_head.weight"]
    save_file(tensors, str(export / "model.safetensors"))
    with pytest.raises(CheckpointKeyError, match="no text_lm_head.weight .*use_text_head=True"):
        load_hf_checkpoint(export)
    (export / "tokenizer.json").unlink()
    result = convert(export, tmp_path / "boson", "boson")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert "no tokenizer.json" in result.stderr


def test_evaluate_reads_the_transformers_layout_like_bosons(tmp_path):
    """tools/evaluate.py on a Boson export and on its transformers conversion: the same numbers."""
    data = tmp_path / "data"
    made = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "make_synthetic.py"),
            "--out",
            str(data),
            "--num-samples",
            "6",
            "--num-val",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    model = higgs_audio_tiny()
    boson = with_tokenizer(save_hf_checkpoint(model.state_dict(), model.args, tmp_path / "boson"))
    assert convert(boson, tmp_path / "hf", "transformers").returncode == 0
    results = []
    for checkpoint in (boson, tmp_path / "hf"):
        evaluated = subprocess.run(
            [sys.executable, str(REPO / "tools" / "evaluate.py"), "--checkpoint", str(checkpoint)]
            + ["--data", str(data / "train.jsonl"), "--device", "cpu", "--seq-len", "256"],
            capture_output=True,
            text=True,
        )
        assert evaluated.returncode == 0, evaluated.stderr
        result = json.loads(evaluated.stdout.strip().splitlines()[-1])
        result.pop("checkpoint")
        results.append(result)
    assert results[0] == results[1]
    mapped = read_hf_config(tmp_path / "hf")  # Boson's config.json content, mapped from transformers'
    assert mapped["model_type"] == "higgs_audio" and mapped["audio_codebook_size"] == 1024
    assert mapped["audio_in_token_idx"] == read_hf_config(boson)["audio_in_token_idx"]


def test_a_transformers_made_config_survives_transformers_boson_transformers(tmp_path):
    """A config as transformers' conversion writes it (its defaults: bos 1, eos <|eot_id|>, 2048 positions,
    RoPE written as low 0.125 / high 0.5 / original 1024) comes back unchanged through Boson's layout."""
    model = higgs_audio_tiny()
    export = save_hf_checkpoint(
        model.state_dict(), model.args, tmp_path / "hf", layout="transformers", tokenizer_dir=TINY_TOKENIZER
    )
    config = json.loads((export / "config.json").read_text())
    config.update(
        bos_token_id=1,
        eos_token_id=777,  # the tiny tokenizer's <|eot_id|>
        max_position_embeddings=2048,
        rope_parameters={
            "factor": 32.0,
            "rope_theta": 500000.0,
            "high_freq_factor": 0.5,
            "low_freq_factor": 0.125,
            "original_max_position_embeddings": 1024,
            "rope_type": "llama3",
        },
    )
    (export / "config.json").write_text(json.dumps(config))
    for src, dst, to in (("hf", "boson", "boson"), ("boson", "hf_again", "transformers")):
        result = convert(tmp_path / src, tmp_path / dst, to)
        assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "hf_again" / "config.json").read_text()) == config
    original, again = (
        load_file(export / "model.safetensors"),
        load_file(tmp_path / "hf_again" / "model.safetensors"),
    )
    assert sorted(original) == sorted(again)
    assert all(torch.equal(original[key], again[key]) for key in original)
