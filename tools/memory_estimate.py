#!/usr/bin/env python
"""Expected GPU memory of a training config, and the headroom on a named card.

    python tools/memory_estimate.py --config configs/rtx24gb_lora.yaml --card rtx24gb
    python tools/memory_estimate.py --config configs/rtx16gb_qlora.yaml --card rtx16gb seq_len=8192
    python tools/memory_estimate.py --config configs/a100.yaml --card a100-80gb --json

Reads the config (with ``key=value`` overrides, as ``tune run``): the architecture (the checkpoint's
``config.json`` when ``checkpointer.checkpoint_dir`` exists, else the ``model`` node), built on the meta
device (no memory); ``dtype``; ``finetune`` (mode, LoRA targets and rank, ``quantize_base``: NF4 bases);
the optimizer (AdamW moments in the parameter dtype, ``moment_dtype: bf16``, ``adamw8bit``, fp32 master
weights, ``in_backward``); ``activation_checkpointing``; ``seq_len``, ``batch_size`` and the dataset's
per-row capacities; the loss's ``text_chunk_size``. Then it counts, in bytes:

- weights: parameters in ``dtype``; NF4 bases at torchao's exact storage
  (:func:`higgs_tune.models.higgs_audio.qlora.nf4_bytes`);
- trained parameters: gradients (the parameter dtype; with ``in_backward`` only the largest one at a
  time) and optimizer states;
- activations of one micro-batch (formulas in :func:`activation_bytes`), with or without per-layer
  activation checkpointing, including the heads and the chunked text cross-entropy;

and prints the estimated peak of ``torch.cuda.max_memory_allocated``, plus a reserve for what the
allocator does not count (CUDA context, library workspaces, fragmentation: ``--overhead-gib``), against
the card. QLoRA also prints the set-up peak: the bf16 checkpoint is loaded onto the card, then each base
weight is quantized in turn. Estimates, not measurements: ``tools/gpu_check.py`` measures the consumer
configs on a GPU (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from higgs_tune.config import load_config  # noqa: E402
from higgs_tune.models.higgs_audio.config import HiggsAudioModelArgs  # noqa: E402
from higgs_tune.models.higgs_audio.lora import apply_lora, lora_modules, set_trainable  # noqa: E402
from higgs_tune.models.higgs_audio.qlora import NF4Options, nf4_bytes  # noqa: E402

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
# Memory as the driver reports it, in GiB (a "24 GB" RTX 4090 has 24564 MiB).
CARDS = {
    "rtx24gb": 24.0,  # RTX 3090 / 3090 Ti / 4090, RTX A5000
    "rtx16gb": 16.0,  # RTX 4060 Ti 16 GB / 4070 Ti Super / 4080 (Super), RTX A4000
    "a100-40gb": 40.0,
    "a100-80gb": 80.0,
    "h100-80gb": 79.6,
}
# Eager NF4 dequantization of one weight (torchao's get_original_weight): int64 codes of both nibbles
# (8 bytes per weight), their looked-up values, the scaled halves and the stacked result (2 bytes each).
NF4_DEQUANTIZE_BYTES_PER_WEIGHT = 14
# Quantizing one weight (to_nf4): the scaled copy, one uint8 code per weight, the packed half.
NF4_QUANTIZE_BYTES_PER_WEIGHT = 4


@dataclass
class Plan:
    """What the config trains and how (read from the YAML)."""

    args: HiggsAudioModelArgs
    dtype_bytes: int
    seq_len: int
    batch_size: int
    text_ffn_capacity: int
    audio_ffn_capacity: int
    text_target_capacity: int
    audio_target_capacity: int
    text_chunk_size: int
    checkpoint_text_chunks: bool
    activation_checkpointing: bool
    quantize: NF4Options | None


def model_args(cfg) -> HiggsAudioModelArgs:
    """The architecture: the checkpoint's config.json if it exists here, else the ``model`` node."""
    from torchtune import config as tt_config

    checkpoint_dir = cfg.checkpointer.checkpoint_dir
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "config.json").is_file():
        hf_config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
        return HiggsAudioModelArgs.from_hf_config(hf_config)
    return tt_config.instantiate(cfg.model, device="meta").args


def read_plan(cfg) -> Plan:
    dataset, loss = cfg.dataset, cfg.get("loss") or {}
    quantize = (cfg.get("finetune") or {}).get("quantize_base")
    return Plan(
        args=model_args(cfg),
        dtype_bytes=DTYPE_BYTES[cfg.dtype],
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        text_ffn_capacity=dataset.get("text_ffn_capacity") or cfg.seq_len,
        audio_ffn_capacity=dataset.get("audio_ffn_capacity") or cfg.seq_len,
        text_target_capacity=dataset.get("text_target_capacity") or cfg.seq_len,
        audio_target_capacity=dataset.get("audio_target_capacity") or cfg.seq_len,
        text_chunk_size=loss.get("text_chunk_size", 256),
        checkpoint_text_chunks=loss.get("checkpoint_text_chunks", True),
        activation_checkpointing=bool(cfg.get("activation_checkpointing", False)),
        quantize=None if quantize is None else NF4Options(**quantize),
    )


def meta_model(cfg, plan: Plan) -> nn.Module:
    """The model on the meta device with the config's LoRA modules and trainable parameters."""
    from higgs_tune.models.higgs_audio.builders import build_model

    model = build_model(plan.args, device="meta", dtype=torch.bfloat16 if plan.dtype_bytes == 2 else None)
    finetune = cfg.get("finetune") or {}
    lora = finetune.get("lora")
    if lora is not None:
        apply_lora(model, list(lora.targets), rank=lora.rank, alpha=lora.alpha)
    set_trainable(model, finetune.get("mode", "full"))
    return model


def static_bytes(model: nn.Module, plan: Plan, optimizer_cfg) -> dict[str, int]:
    """Weights, adapters, gradients and optimizer states (bytes)."""
    quantized = set(lora_modules(model)) if plan.quantize is not None else set()
    base, nf4, adapters, trained, largest_trained = 0, 0, 0, 0, 0
    for name, param in model.named_parameters():
        module_name = name.rsplit(".", 1)[0]
        if module_name in quantized and name.endswith(".weight"):
            nf4 += nf4_bytes(param.numel(), plan.quantize)
        elif "lora_" in name:
            adapters += param.numel() * plan.dtype_bytes
        else:
            base += param.numel() * plan.dtype_bytes
        if param.requires_grad:
            trained += param.numel()
            largest_trained = max(largest_trained, param.numel())
    name = optimizer_cfg.get("name", "adamw")
    master = bool(optimizer_cfg.get("master_weights", False))
    if master:
        moment = 4  # fp32 master copies with fp32 moments
    elif name == "adamw8bit":
        moment = 1
    elif optimizer_cfg.get("moment_dtype", "fp32") == "bf16":
        moment = 2
    else:
        moment = plan.dtype_bytes  # torch AdamW keeps its moments in the parameter dtype
    grads = (largest_trained if optimizer_cfg.get("in_backward", False) else trained) * plan.dtype_bytes
    out = {
        "frozen/base weights (model dtype)": base,
        "NF4 base weights": nf4,
        "LoRA adapters": adapters,
        "gradients": grads,
        f"optimizer states ({name}, 2 moments x {moment} B)": 2 * moment * trained,
    }
    if master:
        out["fp32 master weights"] = 4 * trained
    return {k: v for k, v in out.items() if v or k == "gradients"}


def activation_bytes(plan: Plan, largest_quantized: int) -> dict[str, int]:
    """Activation memory (bytes) of one micro-batch, B rows of L positions, bf16 (fp32) values.

    - per decoder layer, per position: ~(17 H + 3 kv) values for the attention and norms (normed input in
      both norm kinds with fp32 upcasts, q/k/v, rotated q/k, GQA-repeated k/v, attention output,
      residuals), plus per FFN position (capacity C_text_ffn + C_audio_ffn) 4 I values (gate, up, silu,
      product) and 2 H (gathered input and its norm);
    - with activation checkpointing: the L layer inputs [B, L, H] + one layer's working set, doubled for
      its gradients alive at the same time; without: every layer's working set + one layer's gradients;
    - attention masks: one bool [B, L, L] per mask kind (block-causal; fast-forward if any such layer),
      plus the additive bf16 bias SDPA builds from a bool mask;
    - text head + chunked CE: bf16 logits [B C_tt, V] kept for the backward and their gradient, plus one
      chunk's fp32 logits, log-probabilities and gradient (3 x chunk x V x 4 bytes; all chunks' fp32
      logits if ``checkpoint_text_chunks`` is off);
    - audio head + CE (fp32 on the whole block): per logit of [B C_at, K C] the model-dtype logits and
      gradient, fp32 upcast, log-probabilities and gradient;
    - embeddings: text, the fp32 codebook sum and the merged stream [B, L, H];
    - QLoRA: the eager dequantization of the largest NF4 weight (once in the forward, once in the
      backward; compiled steps fuse most of it).
    """
    a = plan.args
    b, length, value = plan.batch_size, plan.seq_len, plan.dtype_bytes
    tokens = b * length
    kv = a.num_kv_heads * a.head_dim
    ffn_positions = b * (plan.text_ffn_capacity + plan.audio_ffn_capacity)
    one_layer = (
        tokens * (17 * a.hidden_size + 3 * kv) + ffn_positions * (4 * a.intermediate_size + 2 * a.hidden_size)
    ) * value
    if plan.activation_checkpointing:
        layers = {
            "checkpointed layer inputs": a.num_layers * tokens * a.hidden_size * value,
            "one layer recomputed (+ grads)": 2 * one_layer,
        }
    else:
        layers = {"every layer's activations (no checkpointing)": a.num_layers * one_layer + one_layer}
    mask_kinds = 2 if "fast_forward" in a.layer_kinds() else 1
    text_rows, vocab = b * plan.text_target_capacity, a.vocab_size
    chunk = min(plan.text_chunk_size, plan.text_target_capacity) * b
    fp32_text = 3 * chunk * vocab * 4 if plan.checkpoint_text_chunks else 3 * text_rows * vocab * 4
    audio_logits = b * plan.audio_target_capacity * a.num_codebooks * a.codebook_vocab_size
    out = {
        **layers,
        "attention masks": mask_kinds * b * length * length * (1 + value),
        f"text head + chunked CE (chunk {plan.text_chunk_size})": 2 * text_rows * vocab * value + fp32_text,
        "audio head + CE": audio_logits * (2 * value + 3 * 4),
        "embeddings": tokens * a.hidden_size * (2 * value + 4),
    }
    if largest_quantized:
        out["NF4 dequantization (largest weight, eager)"] = (
            2 * NF4_DEQUANTIZE_BYTES_PER_WEIGHT * largest_quantized
        )
    return out


def estimate(cfg) -> dict:
    """Every figure of the estimate (bytes), by part."""
    plan = read_plan(cfg)
    model = meta_model(cfg, plan)
    quantized = lora_modules(model) if plan.quantize is not None else {}
    largest = max((m.weight.numel() for m in quantized.values()), default=0)
    static = static_bytes(model, plan, cfg.optimizer)
    activations = activation_bytes(plan, largest)
    result = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "static": static,
        "activations": activations,
        "peak_allocated": sum(static.values()) + sum(activations.values()),
    }
    if quantized:  # set-up: the whole model in the model dtype, then one to_nf4 at a time
        full = sum(p.numel() for p in model.parameters()) * plan.dtype_bytes
        result["setup_peak_allocated"] = full + NF4_QUANTIZE_BYTES_PER_WEIGHT * largest
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--card", choices=sorted(CARDS), help="the GPU to compare with (memory in GiB)")
    parser.add_argument("--gpu-gib", type=float, help="or its memory in GiB")
    parser.add_argument(
        "--overhead-gib", type=float, default=1.5, help="CUDA context, workspaces, allocator fragmentation"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (as tune run)")
    cli = parser.parse_args(argv)
    cfg = load_config(cli.config, cli.overrides)
    result = estimate(cfg)
    card_gib = cli.gpu_gib if cli.gpu_gib is not None else CARDS.get(cli.card)
    total = result["peak_allocated"] + cli.overhead_gib * GIB
    result.update(config=str(cli.config), card=cli.card, card_gib=card_gib, overhead_gib=cli.overhead_gib)
    if card_gib is not None:
        result["headroom_gib"] = card_gib - total / GIB
        if "setup_peak_allocated" in result:
            result["setup_headroom_gib"] = card_gib - (
                result["setup_peak_allocated"] / GIB + cli.overhead_gib
            )
    if cli.json:
        print(json.dumps(result))
        return result

    print(
        f"{cli.config}: {result['parameters']:,} parameters (adapters included), "
        f"{result['trained_parameters']:,} trained; "
        f"seq_len {cfg.seq_len} x batch {cfg.batch_size}, "
        f"activation checkpointing {'on' if cfg.get('activation_checkpointing') else 'off'}"
    )
    for section in ("static", "activations"):
        print(f"{section}:")
        for name, value in result[section].items():
            print(f"  {name:48s} {value / GIB:7.2f} GiB")
    print(
        f"{'estimated peak allocated (torch.cuda.max_memory_allocated)':50s} {result['peak_allocated'] / GIB:7.2f} GiB"
    )
    print(f"{'+ CUDA context, workspaces, fragmentation':50s} {cli.overhead_gib:7.2f} GiB")
    print(f"{'= estimated need':50s} {total / GIB:7.2f} GiB")
    if card_gib is not None:
        name = cli.card or "GPU"
        verdict = "fits" if result["headroom_gib"] >= 0 else "DOES NOT FIT"
        print(f"{name} ({card_gib:.1f} GiB): headroom {result['headroom_gib']:.2f} GiB, {verdict}")
        if "setup_headroom_gib" in result:
            setup = result["setup_peak_allocated"] / GIB
            print(
                f"set-up peak (model dtype checkpoint on the card, quantized weight by weight): {setup:.2f} GiB "
                f"allocated, headroom {result['setup_headroom_gib']:.2f} GiB"
            )
    return result


if __name__ == "__main__":
    main()
