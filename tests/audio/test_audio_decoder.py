"""The audio decoder (``higgs_tune.models.audio_decoder``) against Boson's ``HiggsAudioTokenizer.decode``:
same random weights (Boson's released architecture, written by Boson's code as Boson publishes them), same
codes, same waveform."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
import torch
from boson_codec import RELEASED_CONFIG, load_boson_codec, write_boson_codec

from higgs_tune.models.audio_decoder import AudioCodecDecoder, write_wav


@pytest.fixture(scope="module")
def released_codec(tmp_path_factory):
    """Boson's audio tokenizer folder (config.json + model.pth) with random weights, released sizes."""
    folder = tmp_path_factory.mktemp("codec")
    write_boson_codec(folder)
    return folder


@pytest.fixture(scope="module")
def decoder(released_codec):
    return AudioCodecDecoder.from_pretrained(released_codec)


def test_decode_matches_boson(released_codec, decoder):
    boson = load_boson_codec(released_codec)
    codes = torch.randint(0, 1024, (1, 8, 40), generator=torch.Generator().manual_seed(0))
    expected = torch.from_numpy(boson.decode(codes))[:, 0]  # [1, samples]
    waveform = decoder(codes)
    assert waveform.shape == (1, 40 * 960) == expected.shape
    assert decoder.sample_rate == boson.sampling_rate == 24000
    # fp32; the only difference is the order of the 8-codebook sum (one einsum here, a loop there):
    # seen 2e-7 on waveforms of std 0.03.
    torch.testing.assert_close(waveform, expected, rtol=0, atol=1e-5)
    # A real comparison: other codes give another waveform.
    other = codes.clone()
    other[0, 3, 20] = (other[0, 3, 20] + 1) % 1024
    assert (decoder(other) - waveform).abs().max() > 1e-3


def test_batch_decodes_like_single_items(decoder):
    codes = torch.randint(0, 1024, (2, 8, 12), generator=torch.Generator().manual_seed(1))
    batch = decoder(codes)
    for i in range(2):
        torch.testing.assert_close(batch[i : i + 1], decoder(codes[i : i + 1]), rtol=1e-5, atol=1e-6)


def test_parametrized_weight_norm_keys_load_the_same(released_codec, decoder, tmp_path):
    """A model.pth saved with torch.nn.utils.parametrizations.weight_norm (newer torch) names g and v
    ``parametrizations.weight.original0/1``; the decoder folds both spellings the same way."""
    state = torch.load(released_codec / "model.pth", weights_only=True)
    renamed = {}
    for key, value in state.items():
        for old, new in (
            (".weight_g", ".parametrizations.weight.original0"),
            (".weight_v", ".parametrizations.weight.original1"),
        ):
            if key.endswith(old):
                key = key[: -len(old)] + new
        renamed[key] = value
    torch.save(renamed, tmp_path / "model.pth")
    (tmp_path / "config.json").write_text((released_codec / "config.json").read_text())
    codes = torch.randint(0, 1024, (1, 8, 6))
    assert torch.equal(AudioCodecDecoder.from_pretrained(tmp_path)(codes), decoder(codes))


def test_bad_codes_are_refused(decoder):
    with pytest.raises(ValueError, match=r"expected \[B, 8, T\]"):
        decoder(torch.zeros(1, 7, 4, dtype=torch.long))
    with_bos = torch.zeros(1, 8, 4, dtype=torch.long)
    with_bos[0, :, 0] = 1024  # a stream BOS left in
    with pytest.raises(ValueError, match="code values span 0..1024"):
        decoder(with_bos)
    negative = torch.zeros(1, 8, 4, dtype=torch.long)
    negative[0, 2, 1] = -1
    with pytest.raises(ValueError, match="code values span -1..0"):
        decoder(negative)


def test_codes_layout_check(decoder):
    decoder.check_codes_layout(8, 1024)
    with pytest.raises(ValueError, match="reads 8 codebooks of 1024 codes, the model has 4 of 1024"):
        decoder.check_codes_layout(4, 1024)


def test_missing_or_mismatched_files_are_errors(released_codec, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        AudioCodecDecoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_CONFIG))
    with pytest.raises(FileNotFoundError, match="model.pth not found"):
        AudioCodecDecoder.from_pretrained(tmp_path)
    (tmp_path / "model.pth").symlink_to(released_codec / "model.pth")
    (tmp_path / "config.json").write_text(json.dumps({**RELEASED_CONFIG, "D": 128}))
    with pytest.raises(ValueError, match="config.json says D=128"):
        AudioCodecDecoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**RELEASED_CONFIG, "bins": [8, 5, 5, 5]}))
    with pytest.raises(ValueError, match="residual FSQ"):
        AudioCodecDecoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**RELEASED_CONFIG, "ratios": [8, 5, 4, 2]}))
    with pytest.raises(ValueError, match="does not match"):
        AudioCodecDecoder.from_pretrained(tmp_path)


def test_write_wav(tmp_path):
    waveform = np.array([0.0, 0.5, -0.5, 2.0, -2.0], dtype=np.float32)
    write_wav(tmp_path / "a.wav", waveform, 24000)
    with wave.open(str(tmp_path / "a.wav")) as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()) == (1, 2, 24000, 5)
        pcm = np.frombuffer(f.readframes(5), dtype=np.int16)
    assert pcm.tolist() == [0, 16383, -16383, 32767, -32767]
