"""Boson's audio tokenizer folder (``bosonai/higgs-audio-v2-tokenizer``: ``config.json`` + ``model.pth``),
read once for the encoder (``audio_encoder.py``) and the decoder (``audio_decoder.py``).

``model.pth`` is the full state dict of Boson's ``HiggsAudioTokenizer``: the DAC ``encoder.*`` and
``decoder_2.*`` (weight-normed convolutions), ``encoder_semantic.*``, ``semantic_model.*`` (the HuBERT
teacher), ``fc_prior``/``fc_post1``/``fc_post2`` and the residual VQ ``quantizer.vq.layers.<k>.*``.
Boson loads it with ``strict=False``; the readers here take the keys their path needs and name the file
and key when one is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

CODEC_FOLDER_HINT = (
    "expected Boson's audio tokenizer folder, e.g. a local copy of bosonai/higgs-audio-v2-tokenizer"
)


@dataclass(frozen=True)
class CodecSizes:
    """The codec's sizes shared by its encoder and decoder: ``num_codebooks`` RVQ codebooks of
    ``codebook_size`` entries of ``codebook_dim``, projected to ``quantizer_dim``; the DAC latent has
    ``latent_dim`` channels, one frame per ``prod(ratios)`` samples at ``sample_rate``."""

    num_codebooks: int
    codebook_size: int
    codebook_dim: int
    quantizer_dim: int
    latent_dim: int
    ratios: tuple[int, ...]
    sample_rate: int


@dataclass
class CodecFiles:
    """The parsed folder: its ``config.json`` and the ``model.pth`` state dict (fp32 tensors as saved)."""

    config: dict
    state: dict[str, torch.Tensor]
    config_path: Path
    weights_path: Path

    @property
    def num_codebooks(self) -> int:
        return int(self.config.get("n_q", 8))

    def take(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as fp32; ValueError naming the file when it is absent."""
        if key not in self.state:
            raise ValueError(f"{self.weights_path}: no {key!r} (not a Higgs Audio tokenizer checkpoint?)")
        return self.state[key].float()

    def module_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every key under ``prefix`` (kept in the names), weight norm folded into plain ``weight``s.

        Both spellings of weight norm are read: ``weight_g``/``weight_v`` (``torch.nn.utils.weight_norm``)
        and ``parametrizations.weight.original0/1`` (``torch.nn.utils.parametrizations.weight_norm``).
        """
        out = {}
        for key in self.state:
            if not key.startswith(prefix):
                continue
            if key.endswith(".weight_v"):
                stem = key[: -len(".weight_v")]
                out[f"{stem}.weight"] = torch._weight_norm(self.take(key), self.take(f"{stem}.weight_g"), 0)
            elif key.endswith(".parametrizations.weight.original1"):
                stem = key[: -len(".parametrizations.weight.original1")]
                g = self.take(f"{stem}.parametrizations.weight.original0")
                out[f"{stem}.weight"] = torch._weight_norm(self.take(key), g, 0)
            elif not key.endswith((".weight_g", ".parametrizations.weight.original0")):
                out[key] = self.take(key)
        if not out:
            raise ValueError(f"{self.weights_path}: no weights under {prefix!r} ({CODEC_FOLDER_HINT})")
        return out

    def sizes(self) -> CodecSizes:
        """The sizes, read from the weights (``ratios`` and ``sample_rate`` from ``config.json``);
        ValueError when ``config.json``'s ``D`` disagrees with the weights."""
        embed = self.take("quantizer.vq.layers.0._codebook.embed")  # [bins, codebook_dim]
        latent_dim, quantizer_dim = self.take("fc_post2.weight").shape
        if "D" in self.config and self.config["D"] != latent_dim:
            raise ValueError(
                f"{self.weights_path}: fc_post2 maps to {latent_dim} channels, config.json says D={self.config['D']}"
            )
        return CodecSizes(
            num_codebooks=self.num_codebooks,
            codebook_size=embed.shape[0],
            codebook_dim=embed.shape[1],
            quantizer_dim=quantizer_dim,
            latent_dim=latent_dim,
            ratios=tuple(self.config.get("ratios", [8, 5, 4, 2])),
            sample_rate=int(self.config.get("sample_rate", 16000)),
        )

    def rvq_state(self) -> dict[str, torch.Tensor]:
        """The residual VQ, codebooks stacked: ``codebook_embeddings [K, bins, codebook_dim]``,
        ``project_in_weight [K, codebook_dim, quantizer_dim]`` (+ ``_bias [K, codebook_dim]``),
        ``project_out_weight [K, quantizer_dim, codebook_dim]`` (+ ``_bias [K, quantizer_dim]``).
        A codebook as wide as the quantizer has identity projections (Boson's ``nn.Identity``)."""
        stacked: dict[str, list[torch.Tensor]] = {
            name: []
            for name in (
                "codebook_embeddings",
                "project_in_weight",
                "project_in_bias",
                "project_out_weight",
                "project_out_bias",
            )
        }
        for k in range(self.num_codebooks):
            layer = f"quantizer.vq.layers.{k}"
            embed = self.take(f"{layer}._codebook.embed")  # [bins, codebook_dim]
            stacked["codebook_embeddings"].append(embed)
            for projection in ("project_in", "project_out"):
                if f"{layer}.{projection}.weight" in self.state:
                    weight = self.take(f"{layer}.{projection}.weight")
                    bias = self.take(f"{layer}.{projection}.bias")
                else:  # codebook_dim == quantizer_dim
                    weight, bias = torch.eye(embed.shape[1]), torch.zeros(embed.shape[1])
                stacked[f"{projection}_weight"].append(weight)
                stacked[f"{projection}_bias"].append(bias)
        return {name: torch.stack(tensors) for name, tensors in stacked.items()}


def read_codec_folder(path: str | Path, what: str) -> CodecFiles:
    """Read ``config.json`` and ``model.pth`` from ``path``; ``what`` names the reader in the errors.

    FileNotFoundError for a missing file; ValueError for a residual-FSQ quantizer (only RVQ exists here).
    """
    folder = Path(path)
    config_path, weights_path = folder / "config.json", folder / "model.pth"
    for required in (config_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(
                f"{what}: {required} not found ({CODEC_FOLDER_HINT}: config.json and model.pth)"
            )
    config = json.loads(config_path.read_text())
    if not isinstance(config.get("bins", 1024), int):
        raise ValueError(
            f"{config_path}: bins={config['bins']} is a residual FSQ quantizer; only RVQ is supported"
        )
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    return CodecFiles(config, state, config_path, weights_path)
