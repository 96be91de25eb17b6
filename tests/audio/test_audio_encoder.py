"""The audio encoder (``higgs_tune.models.audio_encoder``) against Boson's ``HiggsAudioTokenizer.encode``,
and the resampler (``higgs_tune.audio_io``) against torchaudio's own source.

Boson's side: its tokenizer class with random weights at the released sizes, written and loaded by its
own code (``boson_codec.py``), calling torchaudio's ``functional.resample`` executed from the torchaudio
wheel (``torchaudio_oracle.py``) and, for files, ``librosa.load`` / ``librosa.resample`` as it does.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch
import torchaudio_oracle
from boson_codec import load_boson_codec, write_boson_codec, write_hubert_folder

from higgs_tune.audio_io import AudioFileError, read_audio, resample_sinc, resample_to, sinc_resample_kernel
from higgs_tune.models.audio_decoder import AudioCodecDecoder
from higgs_tune.models.audio_encoder import AudioCodecEncoder


@pytest.mark.parametrize(
    ("orig", "new"),
    [(24000, 16000), (16000, 24000), (44100, 24000), (22050, 24000), (8000, 24000), (200, 16000)],
)
def test_resample_equals_torchaudio(orig, new):
    generator = torch.Generator().manual_seed(orig)
    for shape in [(4801,), (2, 3, 1237), (1, 7)]:
        waveform = torch.randn(shape, generator=generator)
        expected = torchaudio_oracle.resample(waveform, orig, new)
        assert torch.equal(resample_sinc(waveform, orig, new), expected), (orig, new, shape)
    double = torch.randn(999, generator=generator, dtype=torch.float64)
    assert torch.equal(resample_sinc(double, orig, new), torchaudio_oracle.resample(double, orig, new))
    gcd = np.gcd(orig, new)
    kernel, width = torchaudio_oracle.torchaudio_functions()["_get_sinc_resample_kernel"](
        orig, new, gcd, dtype=torch.float32
    )
    ours, our_width = sinc_resample_kernel(orig, new, dtype=torch.float32)
    assert our_width == width and torch.equal(ours, kernel)


def test_resample_of_a_padded_batch_equals_each_clip():
    clips = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (3001, 1200, 2999)]
    batch = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True)
    out = resample_sinc(batch, 24000, 16000)
    for i, clip in enumerate(clips):
        single = resample_sinc(clip, 24000, 16000)
        torch.testing.assert_close(out[i, : single.shape[0]], single, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory):
    """Boson's audio tokenizer folder (random weights, released sizes) with a hubert_base folder inside."""
    folder = tmp_path_factory.mktemp("codec")
    write_boson_codec(folder)
    write_hubert_folder(folder / "hubert_base")
    return folder


@pytest.fixture(scope="module")
def boson(codec_dir):
    return load_boson_codec(codec_dir)


@pytest.fixture(scope="module")
def encoder(codec_dir):
    return AudioCodecEncoder.from_pretrained(codec_dir)


def speech_like(num_samples: int, seed: int) -> np.ndarray:
    """A noisy harmonic signal with an envelope (float32 in [-1, 1])."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / 24000
    tone = sum(
        np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) / (i + 1) for i, f in enumerate((140, 280, 560, 1100))
    )
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.2 * tone * envelope + 0.02 * rng.standard_normal(num_samples)).astype(np.float32)


@pytest.mark.slow
def test_codes_equal_boson_at_24k(boson, encoder):
    # 25 frames exactly; one odd length whose acoustic and semantic frame counts differ (Boson re-pads
    # the acoustic input by 320 samples on each side) and one whose counts agree without re-padding.
    lengths = [9600, 9000, 10497]
    hubert_frames = encoder.semantic_model._get_feat_extract_output_lengths(
        encoder.semantic_lengths(torch.tensor(lengths)) + 320
    )
    semantic_frames = (hubert_frames + 1) // 2
    acoustic_frames = encoder.encoder.output_lengths(torch.tensor(lengths))
    assert (acoustic_frames != semantic_frames).tolist() == [False, True, False]
    for n in lengths:
        wav = speech_like(n, seed=n)
        expected = boson.encode(wav, sr=24000)
        codes = encoder.encode([wav])[0]
        assert codes.dtype == torch.int64 and codes.shape == expected.shape, n
        assert torch.equal(codes, expected.cpu()), n
    assert expected.shape == (8, 11)  # 10497 samples: 10.9 frames at 25 frames/s


def test_batch_equals_one_clip_at_a_time(encoder):
    clips = [speech_like(n, seed=n) for n in (9600, 12011, 4800, 7000)]
    batch = encoder.encode(clips)
    for clip, codes in zip(clips, batch):
        assert torch.equal(codes, encoder.encode([clip])[0])
    assert [c.shape[1] for c in batch] == [10, 13, 5, 8]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rate", "suffix", "channels"), [(16000, ".flac", 1), (22050, ".wav", 2), (44100, ".ogg", 1)]
)
def test_file_codes_equal_boson_at_other_rates(boson, encoder, tmp_path, rate, suffix, channels):
    samples = np.stack([speech_like(rate * 2 // 5, seed=rate + c) for c in range(channels)], axis=1)
    path = tmp_path / f"clip{suffix}"
    soundfile.write(path, samples, rate)
    expected = boson.encode(str(path))  # librosa.load + librosa.resample to 24 kHz, then encode
    codes = encoder.encode_file(path)
    assert codes.shape == expected.shape == (8, 10)
    assert torch.equal(codes, expected.cpu())


@pytest.mark.slow
def test_encode_decode_round_trip_equals_boson(boson, encoder, codec_dir):
    wav = speech_like(7680, seed=7)
    ours = AudioCodecDecoder.from_pretrained(codec_dir)(encoder.encode([wav])[0][None])
    expected = torch.from_numpy(boson.decode(boson.encode(wav, sr=24000)[None]))[:, 0]
    assert ours.shape == expected.shape == (1, 7680)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_semantic_weights_come_from_the_folder_without_model_pth_ones(codec_dir, encoder, tmp_path):
    state = torch.load(codec_dir / "model.pth", weights_only=True)
    torch.save(
        {k: v for k, v in state.items() if not k.startswith("semantic_model.")}, tmp_path / "model.pth"
    )
    (tmp_path / "config.json").write_text((codec_dir / "config.json").read_text())
    alone = AudioCodecEncoder.from_pretrained(tmp_path, semantic_model_dir=codec_dir / "hubert_base")
    from transformers import HubertModel

    folder_weights = HubertModel.from_pretrained(str(codec_dir / "hubert_base")).state_dict()
    for key, value in alone.semantic_model.state_dict().items():
        assert torch.equal(value, folder_weights[key]), key
    # model.pth's semantic_model.* (what Boson's strict=False load uses) differ from the folder's here.
    assert not torch.equal(
        encoder.semantic_model.state_dict()["encoder.layers.0.attention.q_proj.weight"],
        folder_weights["encoder.layers.0.attention.q_proj.weight"],
    )


def test_missing_files_are_clear_errors(codec_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="audio encoder: .*config.json not found"):
        AudioCodecEncoder.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"semantic model .*nowhere/config.json not found"):
        AudioCodecEncoder.from_pretrained(codec_dir, semantic_model_dir=tmp_path / "nowhere")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioFileError, match="empty.wav: cannot read audio"):
        read_audio(tmp_path / "empty.wav")
    soundfile.write(tmp_path / "silent.wav", np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(AudioFileError, match="silent.wav: the audio is empty"):
        read_audio(tmp_path / "silent.wav")


def test_read_and_resample_like_librosa(tmp_path):
    import librosa

    stereo = np.stack([speech_like(22050, 1), speech_like(22050, 2)], axis=1)
    soundfile.write(tmp_path / "s.wav", stereo, 22050, subtype="FLOAT")
    samples, rate = read_audio(tmp_path / "s.wav")
    expected, expected_rate = librosa.load(tmp_path / "s.wav", sr=None, mono=True)
    assert rate == expected_rate == 22050 and np.array_equal(samples, expected)
    assert np.array_equal(
        resample_to(samples, 22050, 24000), librosa.resample(expected, orig_sr=22050, target_sr=24000)
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_codes_equal_cpu_codes(codec_dir, encoder):
    """fp32 on CUDA (TF32 off): the CPU codes, batched."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    clips = [speech_like(n, seed=n) for n in (9600, 12011, 4800)]
    on_cuda = AudioCodecEncoder.from_pretrained(codec_dir, device="cuda").encode(clips)
    for codes, expected in zip(on_cuda, encoder.encode(clips)):
        assert (codes == expected).float().mean() > 0.99
