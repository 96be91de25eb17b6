"""The encoding half of Boson's audio tokenizer (``bosonai/higgs-audio-v2-tokenizer``): waveform -> codes.

Boson's ``HiggsAudioTokenizer.encode`` for a 24 kHz mono clip ``x`` of ``L`` samples (released sizes):

1. semantic branch: ``x`` resampled to 16 kHz (torchaudio's default windowed sinc,
   :func:`higgs_tune.audio_io.resample_sinc`), zero-padded by 160 samples on each side, through the frozen
   HuBERT teacher (``bosonai/hubert_base``, a standard ``HubertModel``); the mean of all its hidden states
   (the embedding output and every layer, 13 for HuBERT-base) ``[F, 768]``, every second frame kept
   (50 -> 25 frames/s), then ``encoder_semantic`` (a stride-1 convolution stack, ELU residual units);
2. acoustic branch: the DAC encoder on ``x`` ``[1, L]`` -> ``[256, A]`` (A = L / 960 when divisible);
3. lengths: if ``A`` differs from the semantic frame count ``S``, the DAC encoder is run again on ``x``
   zero-padded by 320 samples on each side; then both are cut to the shorter;
4. ``fc_prior`` on the concatenated ``[256 + 768]`` features -> 1024, then residual VQ: for each of the 8
   codebooks, ``project_in`` (1024 -> 64), the nearest codebook entry (Euclidean), ``project_out`` back,
   subtracted from the residual. Codes ``[8, T]`` at 25 frames/s, values 0..1023.

This module is that computation on a batch: clips of different lengths are right-padded, every
convolution with a kernel wider than one reads zeros past each clip's end (as the clip alone would), the
HuBERT feature extractor (whose GroupNorm spans the whole clip) runs clip by clip and its transformer with
an attention mask, and each clip's codes are cut to its own length. Checked against Boson's own ``encode``
on the same weights in ``tests/audio/test_audio_encoder.py``.

Why not Boson's class: its module imports torchaudio (no release for torch 2.13), descript-audiotools and
descript-audio-codec, and builds HuBERT with ``trust_remote_code`` from the hub.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from higgs_tune.audio_io import read_audio, resample_sinc, resample_to
from higgs_tune.models.audio_codec_files import CodecFiles, CodecSizes, read_codec_folder
from higgs_tune.models.audio_decoder import Snake1d

# Boson's get_regress_target pads the 16 kHz waveform by this many samples on each side (half of
# HuBERT's 320-sample frame step); _xcodec_encode re-pads the 24 kHz input by this times the semantic
# downsampling factor when the two branches disagree on the frame count.
SEMANTIC_PAD = 160


def zero_beyond(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x ``[B, C, L]`` with positions ``>= lengths[b]`` set to zero (lengths ``[B]``)."""
    positions = torch.arange(x.shape[-1], device=x.device)
    return x * (positions[None, None, :] < lengths[:, None, None]).to(x.dtype)


class MaskedConv1d(nn.Conv1d):
    """``nn.Conv1d`` on a right-padded batch: ``forward(x [B, C, L], lengths [B])`` zeroes the input past
    each item's length first, so each item's valid outputs are those of the item alone; returns the output
    and its per-item lengths."""

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        (k,), (s,), (p,), (d,) = self.kernel_size, self.stride, self.padding, self.dilation
        return (lengths + 2 * p - d * (k - 1) - 1) // s + 1

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(zero_beyond(x, lengths)), self.output_lengths(lengths)


class DACResidualUnit(nn.Module):
    """``x + conv1(snake(conv7_dilated(snake(x))))``, lengths kept (Boson's DAC ``ResidualUnit``)."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            [
                Snake1d(channels),
                MaskedConv1d(channels, channels, kernel_size=7, dilation=dilation, padding=3 * dilation),
                Snake1d(channels),
                nn.Conv1d(channels, channels, kernel_size=1),
            ]
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        y, _ = self.block[1](self.block[0](x), lengths)
        return x + self.block[3](self.block[2](y))


class DACEncoderBlock(nn.Module):
    """Three residual units (dilations 1, 3, 9) on ``channels // 2``, Snake, then a stride-``stride``
    convolution (width ``2 * stride``) to ``channels``: ``[B, channels/2, L] -> [B, channels, ~L/stride]``."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        half = channels // 2
        self.block = nn.ModuleList(
            [
                DACResidualUnit(half, 1),
                DACResidualUnit(half, 3),
                DACResidualUnit(half, 9),
                Snake1d(half),
                MaskedConv1d(
                    half, channels, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2)
                ),
            ]
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for unit in self.block[:3]:
            x = unit(x, lengths)
        return self.block[4](self.block[3](x), lengths)


class DACEncoder(nn.Module):
    """``[B, 1, L] -> [B, latent_dim, ~L / prod(ratios)]``; channels double at every downsampling block."""

    def __init__(self, channels: int, ratios: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [MaskedConv1d(1, channels, kernel_size=7, padding=3)]
        for stride in ratios:
            channels *= 2
            layers.append(DACEncoderBlock(channels, stride))
        layers += [Snake1d(channels), MaskedConv1d(channels, latent_dim, kernel_size=3, padding=1)]
        self.block = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = self.block[0](x, lengths)
        for block in self.block[1:-2]:
            x, lengths = block(x, lengths)
        return self.block[-1](self.block[-2](x), lengths)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames out for ``lengths`` samples in (the residual units' convolutions keep lengths)."""
        for module in self.modules():
            if isinstance(module, MaskedConv1d):
                lengths = module.output_lengths(lengths)
        return lengths


class SemanticConv(nn.Module):
    """Boson's ``semantic_module.Conv1d`` wrapper (weights under ``.conv``), "same" padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool) -> None:
        super().__init__()
        self.conv = MaskedConv1d(
            in_channels, out_channels, kernel_size=kernel_size, padding=(kernel_size - 1) // 2, bias=bias
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.conv(x, lengths)[0]


class SemanticResidualUnit(nn.Module):
    """``x + conv2(elu(conv1(elu(x))))`` (width-3 then width-1 convolutions, no biases)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.activation = nn.ELU()
        self.conv1 = SemanticConv(channels, channels, 3, bias=False)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.activation(self.conv1(self.activation(x), lengths)))


class SemanticEncoderBlock(nn.Module):
    """Two residual units, then a width-3 convolution (with bias); lengths kept."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.res_units = nn.ModuleList([SemanticResidualUnit(channels), SemanticResidualUnit(channels)])
        self.conv = SemanticConv(channels, channels, 3, bias=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        for unit in self.res_units:
            x = unit(x, lengths)
        return self.conv(x, lengths)


class SemanticEncoder(nn.Module):
    """Boson's ``encoder_semantic`` at its defaults: ``[B, C, S] -> [B, C, S]`` (a width-3 convolution
    without bias, two blocks)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = SemanticConv(channels, channels, 3, bias=False)
        self.conv_blocks = nn.ModuleList([SemanticEncoderBlock(channels), SemanticEncoderBlock(channels)])

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.conv(x, lengths)
        for block in self.conv_blocks:
            x = block(x, lengths)
        return x


class AudioCodecEncoder(nn.Module):
    """Waveforms at ``sample_rate`` -> codes ``[K, T]`` per clip (K = 8, 25 frames/s), Boson's ``encode``.

    Build it with :meth:`from_pretrained` (Boson's tokenizer folder + a HuBERT folder). :meth:`encode`
    takes a list of clips, :meth:`encode_file` a path; :meth:`forward` is the padded-batch computation.
    """

    def __init__(
        self, sizes: CodecSizes, *, channels: int, semantic_model: nn.Module, semantic_sample_rate: int
    ) -> None:
        super().__init__()
        k, bins, c, q = sizes.num_codebooks, sizes.codebook_size, sizes.codebook_dim, sizes.quantizer_dim
        self.sample_rate = sizes.sample_rate
        self.semantic_sample_rate = semantic_sample_rate
        self.hop_length = math.prod(sizes.ratios)
        self.frame_rate = math.ceil(sizes.sample_rate / self.hop_length)
        # Boson's formula: HuBERT frames (20 ms at 16 kHz) per codec frame.
        self.semantic_downsample_factor = int(
            self.hop_length / (sizes.sample_rate / semantic_sample_rate) / 320
        )
        self.num_codebooks, self.codebook_size = k, bins
        self.semantic_model = semantic_model.eval().requires_grad_(False)
        semantic_dim = semantic_model.config.hidden_size
        self.encoder = DACEncoder(channels, sizes.ratios, sizes.latent_dim)
        self.encoder_semantic = SemanticEncoder(semantic_dim)
        self.fc_prior = nn.Linear(sizes.latent_dim + semantic_dim, q)
        # Residual VQ, all codebooks stacked: entries [K, bins, C], project_in [K, C, Q] (+ bias [K, C]),
        # project_out [K, Q, C] (+ bias [K, Q]); C = codebook_dim, Q = quantizer_dim.
        self.register_buffer("codebook_embeddings", torch.zeros(k, bins, c))
        self.project_in_weight = nn.Parameter(torch.zeros(k, c, q))
        self.project_in_bias = nn.Parameter(torch.zeros(k, c))
        self.project_out_weight = nn.Parameter(torch.zeros(k, q, c))
        self.project_out_bias = nn.Parameter(torch.zeros(k, q))

    @property
    def device(self) -> torch.device:
        return self.codebook_embeddings.device

    def semantic_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """16 kHz samples (``resample_sinc``'s rounding) for ``lengths`` samples at ``sample_rate``."""
        gcd = math.gcd(self.sample_rate, self.semantic_sample_rate)
        new, orig = self.semantic_sample_rate // gcd, self.sample_rate // gcd
        return torch.tensor([int(torch.ceil(torch.as_tensor(new * n / orig))) for n in lengths.tolist()])

    def semantic_features(
        self, waveforms: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms ``[B, N]`` (valid up to ``lengths [B]``) -> HuBERT features ``[B, S, C]``, frames ``[B]``:
        the mean of all hidden states, every ``semantic_downsample_factor``-th frame."""
        resampled = resample_sinc(waveforms, self.sample_rate, self.semantic_sample_rate)
        lengths16 = self.semantic_lengths(lengths).to(waveforms.device)
        padded = nn.functional.pad(
            zero_beyond(resampled[:, None], lengths16)[:, 0], (SEMANTIC_PAD, SEMANTIC_PAD)
        )
        hubert = self.semantic_model
        # Clip by clip: the first convolution's GroupNorm normalises over the whole clip.
        features = [
            hubert.feature_extractor(padded[i : i + 1, : n + 2 * SEMANTIC_PAD])[0].transpose(0, 1)
            for i, n in enumerate(lengths16.tolist())
        ]  # [F_i, 512] each
        frames = torch.tensor([f.shape[0] for f in features], device=waveforms.device)
        batch = nn.utils.rnn.pad_sequence(features, batch_first=True)  # [B, F, 512]
        hidden = hubert.feature_projection(batch)
        # No mask when every clip has the same length: the computation of a single clip, exactly.
        mask = None
        if int(frames.min()) != batch.shape[1]:
            mask = torch.arange(batch.shape[1], device=batch.device)[None, :] < frames[:, None]
        states = hubert.encoder(hidden, attention_mask=mask, output_hidden_states=True).hidden_states
        target = torch.stack(states, dim=1).mean(1)  # [B, F, C]
        step = self.semantic_downsample_factor
        if step > 1:
            target, frames = target[:, ::step], (frames + step - 1) // step
        return target, frames

    @torch.no_grad()
    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """waveforms ``[B, N]`` at ``sample_rate`` (clip b valid up to ``lengths[b]``) -> codes
        ``[B, K, T]`` (int64) and frames ``[B]`` (clip b's codes are ``codes[b, :, :frames[b]]``)."""
        lengths = lengths.to(self.device)
        waveforms = zero_beyond(waveforms.to(self.device, torch.float32)[:, None], lengths)[:, 0]
        semantic, semantic_frames = self.semantic_features(waveforms, lengths)
        semantic = self.encoder_semantic(semantic.transpose(1, 2), semantic_frames)  # [B, C, S]

        # Boson re-pads a clip whose acoustic frame count differs from its semantic one.
        repad = self.encoder.output_lengths(lengths) != semantic_frames
        pad = SEMANTIC_PAD * self.semantic_downsample_factor
        clips = [
            nn.functional.pad(w[:n], (pad, pad)) if r else w[:n]
            for w, n, r in zip(waveforms, lengths.tolist(), repad.tolist())
        ]
        acoustic_lengths = torch.tensor([c.shape[0] for c in clips], device=self.device)
        acoustic_input = nn.utils.rnn.pad_sequence(clips, batch_first=True)[:, None]  # [B, 1, N']
        acoustic, acoustic_frames = self.encoder(acoustic_input, acoustic_lengths)  # [B, D, A]

        frames = torch.minimum(acoustic_frames, semantic_frames)
        longest = int(frames.max())
        features = torch.cat([acoustic[:, :, :longest], semantic[:, :, :longest]], dim=1)
        residual = self.fc_prior(features.transpose(1, 2))  # [B, T, quantizer_dim]
        return self.quantize(residual), frames

    def quantize(self, residual: torch.Tensor) -> torch.Tensor:
        """Residual VQ encode: ``[B, T, quantizer_dim]`` -> codes ``[B, K, T]`` (Boson's distance formula)."""
        codes = []
        for k in range(self.num_codebooks):
            x = nn.functional.linear(residual, self.project_in_weight[k], self.project_in_bias[k])
            flat = x.reshape(-1, x.shape[-1])
            embed = self.codebook_embeddings[k].t()  # [codebook_dim, bins]
            distance = -(
                flat.pow(2).sum(1, keepdim=True) - 2 * flat @ embed + embed.pow(2).sum(0, keepdim=True)
            )
            index = distance.max(dim=-1).indices.view(x.shape[:-1])  # [B, T]
            quantized = nn.functional.embedding(index, self.codebook_embeddings[k])
            residual = residual - nn.functional.linear(
                quantized, self.project_out_weight[k], self.project_out_bias[k]
            )
            codes.append(index)
        return torch.stack(codes, dim=1)

    def encode(self, clips: Sequence[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """Mono clips ``[N_i]`` at ``sample_rate`` (one forward) -> codes ``[K, T_i]`` each (int64, CPU)."""
        if not clips:
            return []
        tensors = [torch.as_tensor(np.asarray(c, dtype=np.float32)) for c in clips]
        if any(t.dim() != 1 or t.numel() == 0 for t in tensors):
            shapes = [tuple(t.shape) for t in tensors]
            raise ValueError(f"encode takes non-empty mono clips [N], got shapes {shapes}")
        lengths = torch.tensor([t.numel() for t in tensors])
        codes, frames = self(nn.utils.rnn.pad_sequence(tensors, batch_first=True), lengths)
        return [codes[i, :, :n].cpu() for i, n in enumerate(frames.tolist())]

    def encode_file(self, path: str | Path) -> torch.Tensor:
        """An audio file (any rate, mixed to mono, resampled as Boson's ``encode``) -> codes ``[K, T]``."""
        samples, rate = read_audio(path)
        return self.encode([resample_to(samples, rate, self.sample_rate)])[0]

    @classmethod
    def from_pretrained(
        cls,
        codec_dir: str | Path,
        semantic_model_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> AudioCodecEncoder:
        """Load Boson's audio tokenizer folder (``config.json`` + ``model.pth``) and the HuBERT folder
        (``bosonai/hubert_base`` saved locally; default ``<codec_dir>/hubert_base``); fp32, eval mode.

        HuBERT's architecture comes from its folder; its weights from ``model.pth``'s ``semantic_model.*``
        when present (Boson loads them over the folder's, ``strict=False``), else from the folder.
        FileNotFoundError for a missing file, ValueError for weights that do not fit.
        """
        files = read_codec_folder(codec_dir, "audio encoder")
        semantic_folder = Path(semantic_model_dir) if semantic_model_dir else Path(codec_dir) / "hubert_base"
        semantic_model = load_semantic_model(semantic_folder, files)
        rvq = files.rvq_state()
        encoder_state = files.module_state("encoder.")
        sizes = files.sizes()
        if files.take("fc_prior.weight").shape[1] != sizes.latent_dim + semantic_model.config.hidden_size:
            raise ValueError(
                f"{files.weights_path}: fc_prior reads {files.take('fc_prior.weight').shape[1]} channels, not "
                f"the DAC latent {sizes.latent_dim} + HuBERT's {semantic_model.config.hidden_size}"
            )
        model = cls(
            sizes,
            channels=encoder_state["encoder.block.0.weight"].shape[0],
            semantic_model=semantic_model,
            semantic_sample_rate=int(files.config.get("semantic_sample_rate") or 16000),
        )
        state = {
            **rvq,
            **encoder_state,
            **files.module_state("encoder_semantic."),
            "fc_prior.weight": files.take("fc_prior.weight"),
            "fc_prior.bias": files.take("fc_prior.bias"),
        }
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("semantic_model.")]
        if missing or unexpected:
            raise ValueError(
                f"{files.weights_path} does not match {files.config_path}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model.to(device).eval()


def load_semantic_model(folder: Path, files: CodecFiles) -> nn.Module:
    """transformers' ``HubertModel`` from ``folder``, with ``model.pth``'s ``semantic_model.*`` weights
    loaded over it when the tokenizer checkpoint carries them."""
    from transformers import HubertModel

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"audio encoder: semantic model {folder / 'config.json'} not found (expected a local copy of "
            "bosonai/hubert_base, e.g. --semantic-model DIR or a hubert_base folder inside the tokenizer's)"
        )
    model = HubertModel.from_pretrained(str(folder))
    saved = {
        k[len("semantic_model.") :]: v for k, v in files.state.items() if k.startswith("semantic_model.")
    }
    if saved:
        own = model.state_dict()
        for old, new in (
            (".weight_g", ".parametrizations.weight.original0"),
            (".weight_v", ".parametrizations.weight.original1"),
        ):  # weight norm saved under the other spelling than this transformers version uses
            for key in [k for k in saved if k.endswith(old) and k not in own]:
                saved[key[: -len(old)] + new] = saved.pop(key)
            for key in [k for k in saved if k.endswith(new) and k not in own]:
                saved[key[: -len(new)] + old] = saved.pop(key)
        saved = {k: v for k, v in saved.items() if k in own}  # e.g. masked_spec_embed (training only)
        mismatched = [k for k, v in saved.items() if v.shape != own[k].shape]
        if mismatched:
            raise ValueError(
                f"{files.weights_path}: semantic_model weights do not fit the HuBERT of {folder} "
                f"({mismatched[0]}: {tuple(saved[mismatched[0]].shape)} vs {tuple(own[mismatched[0]].shape)})"
            )
        model.load_state_dict(saved, strict=False)
    if files.take("encoder_semantic.conv.conv.weight").shape[1] != model.config.hidden_size:
        raise ValueError(
            f"{files.weights_path}: encoder_semantic reads "
            f"{files.take('encoder_semantic.conv.conv.weight').shape[1]} channels, "
            f"the HuBERT of {folder} has hidden_size {model.config.hidden_size}"
        )
    return model.float()
