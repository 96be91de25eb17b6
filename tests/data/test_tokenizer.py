"""The tiny tokenizer asset, the tool that makes it, by-name special tokens and the model-config check."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sample_strategies import TINY_TOKENIZER

from higgs_tune.data.tokenizer import SPECIAL_TOKEN_NAMES, HiggsTokenizer

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = HiggsTokenizer.from_path(TINY_TOKENIZER)


def tiny_model_config(**overrides) -> dict:
    config = {
        "model_type": "higgs_audio",
        "audio_in_token_idx": 783,
        "audio_out_token_idx": 784,
        "audio_out_bos_token_id": 781,
        "audio_eos_token_id": 780,
        "pad_token_id": 769,
        "text_config": {"model_type": "llama", "vocab_size": 1024},
    }
    config.update(overrides)
    return config


def test_make_tokenizer_tool_reproduces_the_asset_byte_for_byte(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_tokenizer.py"), "--out-dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (TINY_TOKENIZER / name).read_bytes(), name


def test_asset_follows_the_llama3_special_token_layout():
    """768 BPE ids, then Llama-3's 256 special tokens (128000 + i -> 768 + i) with Higgs Audio's names."""
    assert TOKENIZER.vocab_size == 1024
    expected = {
        "<|begin_of_text|>": 768,
        "<|end_of_text|>": 769,
        "<|finetune_right_pad_id|>": 772,
        "<|start_header_id|>": 774,
        "<|end_header_id|>": 775,
        "<|eom_id|>": 776,
        "<|eot_id|>": 777,
        "<|python_tag|>": 778,
        "<|audio_bos|>": 779,
        "<|audio_eos|>": 780,
        "<|audio_out_bos|>": 781,
        "<|reserved_special_token_6|>": 782,
        "<|AUDIO|>": 783,
        "<|AUDIO_OUT|>": 784,
        "<|recipient|>": 785,
        "<|scene_desc_start|>": 786,
        "<|scene_desc_end|>": 787,
        "<|reserved_special_token_0|>": 770,
        "<|reserved_special_token_247|>": 1023,
    }
    assert {name: TOKENIZER.token_to_id(name) for name in expected} == expected
    special = TOKENIZER.special
    for field, name in SPECIAL_TOKEN_NAMES.items():
        assert getattr(special, field) == TOKENIZER.token_to_id(name)
    assert special.pad == special.end_of_text
    assert all(TOKENIZER.id_to_token(i).startswith("<") for i in range(768, 1024))
    config = json.loads((TINY_TOKENIZER / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|begin_of_text|>" and config["eos_token"] == "<|end_of_text|>"


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(max_size=40)
    | st.lists(
        st.sampled_from(["<|eot_id|>", "<|AUDIO|>", "hello", " world", "\n\n", "<|audio_out_bos|>", "é"])
    ).map("".join)
)
def test_encode_matches_transformers_without_special_tokens(text):
    """Boson calls PreTrainedTokenizerFast.encode(text, add_special_tokens=False): same ids, special-token
    strings recognised as single ids, no BOS added; decode gives the text back."""
    transformers = pytest.importorskip("transformers")
    reference = _hf_tokenizer(transformers)
    ids = TOKENIZER.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert TOKENIZER.decode(ids) == text


_HF = {}


def _hf_tokenizer(transformers):
    if "tok" not in _HF:
        _HF["tok"] = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(TINY_TOKENIZER / "tokenizer.json")
        )
    return _HF["tok"]


def test_special_token_strings_are_single_ids():
    ids = TOKENIZER.encode("hi<|audio_out_bos|><|AUDIO_OUT|><|audio_eos|><|eot_id|>")
    assert ids[-4:] == [781, 784, 780, 777]
    assert TOKENIZER.special.begin_of_text not in ids  # no BOS added


def test_from_path_accepts_file_or_directory(tmp_path):
    by_file = HiggsTokenizer.from_path(TINY_TOKENIZER / "tokenizer.json")
    assert by_file.special == TOKENIZER.special
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        HiggsTokenizer.from_path(tmp_path)


def test_for_checkpoint_prefers_the_given_tokenizer_then_the_export(tmp_path):
    assert HiggsTokenizer.for_checkpoint(tmp_path, TINY_TOKENIZER).special == TOKENIZER.special
    assert HiggsTokenizer.for_checkpoint(TINY_TOKENIZER).special == TOKENIZER.special
    with pytest.raises(FileNotFoundError, match="checkpoint directory holds none, pass --tokenizer PATH"):
        HiggsTokenizer.for_checkpoint(tmp_path)


def test_missing_special_token_is_named(tmp_path):
    data = json.loads((TINY_TOKENIZER / "tokenizer.json").read_text())
    for token in data["added_tokens"]:
        if token["content"] in ("<|AUDIO_OUT|>", "<|recipient|>"):
            token["content"] = f"<|renamed_{token['id']}|>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(KeyError, match=r"<\|AUDIO_OUT\|>, <\|recipient\|>"):
        HiggsTokenizer.from_path(tmp_path)


def test_matching_model_config_passes():
    TOKENIZER.check_against_model_config(tiny_model_config())


def test_every_model_config_mismatch_is_named():
    config = tiny_model_config(
        audio_in_token_idx=128015, pad_token_id=128001, text_config={"vocab_size": 512}
    )
    del config["audio_eos_token_id"]
    with pytest.raises(ValueError) as error:
        TOKENIZER.check_against_model_config(config)
    message = str(error.value)
    assert "audio_in_token_idx=128015 but the tokenizer has <|AUDIO|>=783" in message
    assert "pad_token_id=128001 but the tokenizer has <|end_of_text|>=769" in message
    assert "audio_eos_token_id=128012 (absent, HiggsAudioConfig default)" in message
    assert "vocab size 1024 exceeds the model's text_config.vocab_size=512" in message
    assert "audio_out_token_idx" not in message and "audio_out_bos_token_id" not in message
    with pytest.raises(ValueError, match="text_config.vocab_size is missing"):
        TOKENIZER.check_against_model_config(
            {k: v for k, v in tiny_model_config().items() if k != "text_config"}
        )


def test_unknown_token_lookup_is_named():
    with pytest.raises(KeyError, match=re.escape("no token <|nope|>")):
        TOKENIZER.token_to_id("<|nope|>")
