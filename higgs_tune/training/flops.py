"""Model FLOPs utilisation (MFU), PaLM's definition (Chowdhery et al. 2022, appendix B).

Training FLOPs per token = 6 * N + 12 * L * H * S, where N counts the weights a token passes through in
matrix multiplies (shared attention, ONE FFN per layer: a position takes the text or the audio FFN,
never both, the text head and the audio head; no embeddings), L the layers, H the hidden size and S the
sequence length (the attention term). MFU = FLOPs per token x tokens per second / peak FLOP/s.
"""

from __future__ import annotations

import torch

from higgs_tune.models.higgs_audio.config import HiggsAudioModelArgs

# Peak dense bf16 tensor-core FLOP/s, matched by substring of torch.cuda.get_device_name, the first
# match wins (so the PCIe and NVL H100s come before the SXM one, "NVIDIA H100 80GB HBM3").
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def matmul_params_per_token(args: HiggsAudioModelArgs) -> int:
    """N of the PaLM formula for Higgs Audio (see the module docstring)."""
    hidden = args.hidden_size
    attention = hidden * args.head_dim * (2 * args.num_heads + 2 * args.num_kv_heads)
    ffn = 3 * hidden * args.intermediate_size
    heads = hidden * (args.vocab_size + args.num_codebooks * args.codebook_vocab_size)
    return args.num_layers * (attention + ffn) + heads


def training_flops_per_token(args: HiggsAudioModelArgs, seq_len: int) -> float:
    """6 * N + 12 * L * H * S."""
    return 6 * matmul_params_per_token(args) + 12 * args.num_layers * args.hidden_size * seq_len


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of a known CUDA device; None on CPU or an unknown card (no MFU then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu(
    args: HiggsAudioModelArgs,
    seq_len: int,
    tokens_per_second: float,
    device: torch.device,
    world_size: int = 1,
):
    """MFU of ``world_size`` devices like ``device`` processing ``tokens_per_second`` in all; None when the
    device's peak is unknown."""
    peak = peak_flops(device)
    if peak is None:
        return None
    return training_flops_per_token(args, seq_len) * tokens_per_second / (peak * world_size)
