"""The decoding half of Boson's audio tokenizer (``bosonai/higgs-audio-v2-tokenizer``): codes -> waveform.

Boson's ``HiggsAudioTokenizer.decode``, for codes ``[B, K, T]`` (K = 8 codebooks, values
0..1023, no BOS/EOS, no delay):

1. residual VQ decode: per codebook k, ``embed_k[codes[:, k]]`` ``[B, T, codebook_dim]``, projected by
   ``project_out_k`` to ``[B, T, quantizer_dim]``; summed over the codebooks;
2. ``fc_post2``: ``[B, T, quantizer_dim] -> [B, T, D]``;
3. the DAC decoder on ``[B, D, T]``: a width-7 convolution to ``channels``, one upsampling block per
   ratio (Snake, transposed convolution of stride r that halves the channels, three dilated residual
   units), Snake, a width-7 convolution to one channel: ``[B, 1, T * prod(ratios)]`` (no tanh, no clip).

Why not Boson's class itself: constructing ``HiggsAudioTokenizer`` downloads HuBERT (the semantic teacher,
used only to encode), and its module imports torchaudio, descript-audiotools and descript-audio-codec,
whose releases pin other torch builds. This module reads the same two files (``config.json``,
``model.pth``), keeps only the decode path's weights (weight norm folded into plain convolutions: inference
never needs it apart) and is checked against Boson's own ``decode`` on the same weights in
``tests/audio/test_audio_decoder.py``.
"""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np
import torch
from torch import nn

from higgs_tune.models.audio_codec_files import CodecSizes, read_codec_folder


class Snake1d(nn.Module):
    """``x + sin(alpha x)^2 / alpha`` with one learned ``alpha`` per channel; x: ``[B, C, L]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class ResidualUnit(nn.Module):
    """``x + conv1(snake(conv7_dilated(snake(x))))``; lengths are kept (padding ``3 * dilation``)."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(channels),
            nn.Conv1d(channels, channels, kernel_size=7, dilation=dilation, padding=3 * dilation),
            Snake1d(channels),
            nn.Conv1d(channels, channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class DecoderBlock(nn.Module):
    """Upsample ``[B, in, L] -> [B, out, L * stride]``, then three residual units (dilations 1, 3, 9)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(in_channels),
            nn.ConvTranspose1d(
                in_channels,
                out_channels,
                kernel_size=2 * stride,
                stride=stride,
                padding=math.ceil(stride / 2),
                output_padding=stride % 2,
            ),
            ResidualUnit(out_channels, 1),
            ResidualUnit(out_channels, 3),
            ResidualUnit(out_channels, 9),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DACDecoder(nn.Module):
    """``[B, latent_dim, T] -> [B, 1, T * prod(ratios)]``; channels halve at every upsampling block."""

    def __init__(self, latent_dim: int, channels: int, ratios: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(latent_dim, channels, kernel_size=7, padding=3)]
        for i, stride in enumerate(ratios):
            layers.append(DecoderBlock(channels // 2**i, channels // 2 ** (i + 1), stride))
        out_channels = channels // 2 ** len(ratios)
        layers += [Snake1d(out_channels), nn.Conv1d(out_channels, 1, kernel_size=7, padding=3)]
        self.model = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.model(latent)


class AudioCodecDecoder(nn.Module):
    """Codes ``[B, K, T]`` -> waveform ``[B, T * hop_length]`` at ``sample_rate`` (fp32).

    Build it with :meth:`from_pretrained` from Boson's audio tokenizer folder. The weight shapes give the
    sizes; ``ratios`` and ``sample_rate`` come from its ``config.json``.
    """

    def __init__(self, sizes: CodecSizes, channels: int) -> None:
        super().__init__()
        k, q = sizes.num_codebooks, sizes.quantizer_dim
        self.num_codebooks = k
        self.codebook_size = sizes.codebook_size
        self.sample_rate = sizes.sample_rate
        self.hop_length = math.prod(sizes.ratios)
        # Residual VQ decode, all codebooks at once: embeddings [K, bins, codebook_dim] and each
        # codebook's output projection [K, quantizer_dim, codebook_dim] (+ bias [K, quantizer_dim]).
        self.register_buffer("codebook_embeddings", torch.zeros(k, sizes.codebook_size, sizes.codebook_dim))
        self.project_out_weight = nn.Parameter(torch.zeros(k, q, sizes.codebook_dim))
        self.project_out_bias = nn.Parameter(torch.zeros(k, q))
        self.fc_post2 = nn.Linear(q, sizes.latent_dim)
        self.decoder_2 = DACDecoder(sizes.latent_dim, channels, list(sizes.ratios))

    @torch.no_grad()
    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: integer ``[B, K, T]`` in ``0..codebook_size-1`` -> waveform ``[B, T * hop_length]``."""
        if codes.dim() != 3 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"codes have shape {tuple(codes.shape)}, expected [B, {self.num_codebooks}, T]")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"code values span {int(codes.min())}..{int(codes.max())}, "
                f"expected 0..{self.codebook_size - 1} (strip stream BOS/EOS and revert the delay first)"
            )
        codes = codes.to(self.codebook_embeddings.device, torch.long)
        codebook_index = torch.arange(self.num_codebooks, device=codes.device)[None, :, None]
        embedded = self.codebook_embeddings[codebook_index, codes]  # [B, K, T, codebook_dim]
        quantized = torch.einsum("bktc,kdc->btd", embedded, self.project_out_weight)
        quantized = quantized + self.project_out_bias.sum(0)  # [B, T, quantizer_dim]
        latent = self.fc_post2(quantized).transpose(1, 2)  # [B, D, T]
        return self.decoder_2(latent)[:, 0]

    def check_codes_layout(self, num_codebooks: int, codebook_size: int) -> None:
        """Raise ValueError unless this decoder reads ``num_codebooks`` codebooks of ``codebook_size``
        codes (the generating model's audio layout)."""
        if (self.num_codebooks, self.codebook_size) != (num_codebooks, codebook_size):
            raise ValueError(
                f"the audio decoder reads {self.num_codebooks} codebooks of {self.codebook_size} codes, "
                f"the model has {num_codebooks} of {codebook_size}"
            )

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> AudioCodecDecoder:
        """Load from Boson's audio tokenizer folder (``config.json`` + ``model.pth``); fp32, eval mode.

        Raises FileNotFoundError for a missing file and ValueError for a quantizer this decoder does not
        implement (residual FSQ) or weights that do not match the config.
        """
        files = read_codec_folder(path, "audio decoder")
        rvq = files.rvq_state()
        decode_state = {
            "codebook_embeddings": rvq["codebook_embeddings"],
            "project_out_weight": rvq["project_out_weight"],
            "project_out_bias": rvq["project_out_bias"],
            "fc_post2.weight": files.take("fc_post2.weight"),
            "fc_post2.bias": files.take("fc_post2.bias"),
            **files.module_state("decoder_2."),
        }
        model = cls(files.sizes(), channels=files.take("decoder_2.model.0.bias").shape[0])
        try:
            model.load_state_dict(decode_state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{files.weights_path} does not match {files.config_path}: {error}") from None
        return model.to(device).eval()


def write_wav(path: str | Path, waveform: np.ndarray | torch.Tensor, sample_rate: int) -> None:
    """Write a mono waveform ``[samples]`` (floats, clipped to [-1, 1]) as 16-bit PCM."""
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().float().cpu().numpy()
    pcm = (np.clip(np.asarray(waveform, dtype=np.float32), -1.0, 1.0) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())
