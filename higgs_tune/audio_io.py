"""Audio files in, sample rates converted: what the audio tokenizer's encoder reads, without torchaudio.

- :func:`read_audio`: any file libsndfile reads (wav, flac, ogg, mp3, ...) through ``soundfile``, mixed to
  mono float32 the way ``librosa.load(path, sr=None, mono=True)`` does (Boson's ``encode`` loads files so);
- :func:`resample_to`: a clip to the codec's rate the way Boson's ``encode`` does it,
  ``librosa.resample(wav, orig_sr=sr, target_sr=rate)``: soxr at its ``HQ`` quality (librosa's default
  ``res_type="soxr_hq"``), then cut or zero-padded to ``ceil(len * rate / sr)`` samples;
- :func:`resample_sinc`: torch port of ``torchaudio.functional.resample`` with its defaults (windowed
  sinc, Hann window, ``lowpass_filter_width=6``, ``rolloff=0.99``), which Boson's tokenizer uses to bring
  the 24 kHz waveform to its semantic model's 16 kHz; batched, on any device, same formula and the same
  float operations as torchaudio, so the semantic features (and the codes) do not move.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


class AudioFileError(ValueError):
    """An audio file that cannot be used (unreadable, empty); the message names the file."""


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read ``path`` -> (mono float32 samples ``[N]``, sample rate). Several channels are averaged.

    Raises AudioFileError naming the file when it is missing, cannot be decoded or holds no samples.
    """
    import soundfile

    try:
        with soundfile.SoundFile(str(path)) as f:
            sample_rate = int(f.samplerate)
            samples = f.read(dtype="float32", always_2d=True)  # [N, channels]
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        raise AudioFileError(f"{path}: cannot read audio ({error})") from None
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if mono.size == 0:
        raise AudioFileError(f"{path}: the audio is empty (0 samples)")
    return np.ascontiguousarray(mono), sample_rate


def resample_to(samples: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """Mono float32 ``[N]`` at ``sample_rate`` -> ``[ceil(N * target_rate / sample_rate)]`` at
    ``target_rate``, as ``librosa.resample`` (soxr HQ) does; unchanged when the rates are equal."""
    if sample_rate == target_rate:
        return samples
    import soxr

    # librosa's rounding: N times the float ratio (22050 samples -> 24001 at 24 kHz, as Boson gets)
    length = int(np.ceil(samples.shape[0] * (float(target_rate) / sample_rate)))
    out = soxr.resample(samples, sample_rate, target_rate, quality="soxr_hq")
    if out.shape[0] >= length:
        return np.asarray(out[:length], dtype=samples.dtype)
    return np.pad(out, (0, length - out.shape[0])).astype(samples.dtype)


def sinc_resample_kernel(
    orig_freq: int, new_freq: int, *, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, int]:
    """torchaudio's default resampling filter bank for ``orig_freq -> new_freq`` (reduced by their gcd).

    Returns ``(kernel [new, 1, 2 * width + orig], width)``: filter j gives output sample ``j`` of every
    group of ``new`` outputs, read from ``2 * width + orig`` inputs. The filter is
    ``sinc(pi * base * t) * cos(pi * t * base / 12)^2 * base / orig`` at ``t = i / orig - j / new`` for
    inputs ``i = -width .. width + orig - 1``, with ``base = 0.99 * min(orig, new)`` and ``base * t``
    clamped to ``[-6, 6]`` (six zero crossings on each side).
    """
    gcd = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // gcd, new_freq // gcd
    lowpass_filter_width, rolloff = 6, 0.99
    base_freq = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base_freq)
    idx = torch.arange(-width, width + orig, dtype=dtype, device=device)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=dtype, device=device)[:, None, None] / new + idx
    t *= base_freq
    t = t.clamp_(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t *= math.pi
    kernels = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernels *= window * (base_freq / orig)
    return kernels, width


def resample_sinc(waveform: torch.Tensor, orig_freq: int, new_freq: int) -> torch.Tensor:
    """``torchaudio.functional.resample(waveform, orig_freq, new_freq)`` with its defaults.

    waveform: float ``[..., N]`` -> ``[..., ceil(N * new / orig)]`` (rates reduced by their gcd). The input
    is zero-padded on both sides, so a right-padded batch gives every item the samples it gives alone.
    """
    if not waveform.is_floating_point():
        raise TypeError(f"resample_sinc needs a floating-point waveform, got {waveform.dtype}")
    if orig_freq == new_freq:
        return waveform
    kernel, width = sinc_resample_kernel(orig_freq, new_freq, dtype=waveform.dtype, device=waveform.device)
    gcd = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // gcd, new_freq // gcd
    shape = waveform.shape
    flat = waveform.reshape(-1, shape[-1])
    padded = torch.nn.functional.pad(flat, (width, width + orig))
    resampled = torch.nn.functional.conv1d(padded[:, None], kernel, stride=orig)  # [n, new, groups]
    resampled = resampled.transpose(1, 2).reshape(flat.shape[0], -1)
    # torchaudio's own rounding (a float32 ceil), so the lengths agree for every length
    target_length = int(torch.ceil(torch.as_tensor(new * shape[-1] / orig)))
    return resampled[:, :target_length].reshape(*shape[:-1], -1)
