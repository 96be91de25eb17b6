#!/usr/bin/env python
"""Expected GPU memory of fine-tuning the Higgs Audio v2 3B architecture on one GPU.

Counts parameters on a meta-device model (no memory) and prints, for full fine-tuning, audio-adapter-only
and LoRA, the static memory (weights, gradients, optimizer states) plus an activation estimate with
per-layer activation checkpointing, and compares the total with the GPU size. The formula is printed
with the figures.

    python tools/memory_estimate.py --seq-len 4096 --batch-size 1 --gpu-gib 80
"""

from __future__ import annotations

import argparse

from higgs_tune.models.higgs_audio.builders import higgs_audio_3b
from higgs_tune.models.higgs_audio.lora import LORA_TARGETS, apply_lora, set_trainable

GIB = 1024**3
BYTES = {"fp32": 4, "bf16": 2}


def activation_bytes(args, seq_len: int, batch_size: int, text_capacity: int, audio_capacity: int) -> dict:
    """Activation memory (bytes) of one micro-batch with per-layer activation checkpointing.

    - checkpointed layer inputs: num_layers * B * L * H bf16 values;
    - recompute working set of ONE layer during its backward, per token ~ (17 H + 3 kv + 4 I) bf16
      values (normed input in both norms with fp32 upcasts, q/k/v, rotated q/k, GQA-repeated k/v,
      attention output, gathered FFN input and its norm, gate/up/silu/product of the SwiGLU, residual
      update), doubled for the gradients alive at the same time;
    - attention masks: one bool [B, L, L] per mask kind (block-causal, fast-forward);
    - heads + loss at the gathered target positions: bf16 logits + fp32 upcast + fp32 gradient
      (10 bytes per logit) for C_tt text positions x V and C_at audio positions x K x C;
    - embeddings: text and audio [B, L, H] + the merged stream (3 x 2 bytes).
    """
    h, kv, i = args.hidden_size, args.num_kv_heads * args.head_dim, args.intermediate_size
    tokens = batch_size * seq_len
    layer_inputs = args.num_layers * tokens * h * 2
    one_layer = 2 * tokens * (17 * h + 3 * kv + 4 * i) * 2
    masks = 2 * batch_size * seq_len * seq_len
    heads = (
        10
        * batch_size
        * (text_capacity * args.vocab_size + audio_capacity * args.num_codebooks * args.codebook_vocab_size)
    )
    embeddings = 3 * tokens * h * 2
    return {
        "checkpointed layer inputs": layer_inputs,
        "one layer recomputed (+grads)": one_layer,
        "attention masks": masks,
        "heads + loss": heads,
        "embeddings": embeddings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--text-target-capacity", type=int, default=1024, help="C_tt (positions with text logits)"
    )
    parser.add_argument("--audio-target-capacity", type=int, default=None, help="C_at (default: seq_len)")
    parser.add_argument("--gpu-gib", type=float, default=80 * 1e9 / GIB, help="GPU memory (80 GB = 74.5 GiB)")
    parser.add_argument(
        "--overhead-gib", type=float, default=2.0, help="CUDA context, allocator slack, kernels"
    )
    parser.add_argument("--grad-dtype", choices=BYTES, default="bf16")
    parser.add_argument(
        "--optimizer-state-dtype", choices=BYTES, default="fp32", help="AdamW exp_avg/exp_avg_sq"
    )
    parser.add_argument(
        "--master-weights", action="store_true", help="keep an fp32 master copy of trained params"
    )
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-targets", nargs="+", default=list(LORA_TARGETS), choices=LORA_TARGETS)
    opts = parser.parse_args()

    model = higgs_audio_3b(device="meta")
    args = model.args
    total = sum(p.numel() for p in model.parameters())
    print(f"Higgs Audio v2 3B (meta-device build): {total:,} parameters")

    audio_adapter = sum(
        p.numel() for n, p in model.named_parameters() if n in set(set_trainable(model, "audio_adapter"))
    )
    lora_model = higgs_audio_3b(device="meta")
    apply_lora(lora_model, opts.lora_targets, rank=opts.lora_rank, alpha=2.0 * opts.lora_rank)
    lora = sum(p.numel() for n, p in lora_model.named_parameters() if "lora_" in n)

    audio_capacity = opts.audio_target_capacity or opts.seq_len
    act = activation_bytes(args, opts.seq_len, opts.batch_size, opts.text_target_capacity, audio_capacity)
    act_total = sum(act.values())

    grad_b, state_b = BYTES[opts.grad_dtype], BYTES[opts.optimizer_state_dtype]
    per_trained = grad_b + 2 * state_b + (4 if opts.master_weights else 0)
    print(
        "\nFormula: total = 2 bytes x P (bf16 weights)"
        f" + T x (grad {grad_b} + AdamW 2 x {state_b}{' + fp32 master 4' if opts.master_weights else ''}"
        f" = {per_trained} bytes) + T_lora x 2 (adapter weights) + activations + overhead {opts.overhead_gib} GiB,"
        "\n         P = all parameters, T = trained parameters."
    )
    print(
        f"Activations (B={opts.batch_size}, seq_len={opts.seq_len}, per-layer AC, C_tt={opts.text_target_capacity},"
        f" C_at={audio_capacity}):"
    )
    for name, value in act.items():
        print(f"  {name:32s} {value / GIB:8.2f} GiB")
    print(f"  {'total':32s} {act_total / GIB:8.2f} GiB")

    print(
        f"\n{'mode':16s} {'trained params':>16s} {'weights':>9s} {'grads+opt':>10s} {'activ.':>8s} {'total':>8s}  fits"
    )
    for mode, trained, extra_weights in (
        ("full", total, 0),
        ("audio_adapter", audio_adapter, 0),
        (f"lora r={opts.lora_rank}", lora, lora),
    ):
        weights = 2 * (total + extra_weights)
        states = per_trained * trained
        grand = weights + states + act_total + opts.overhead_gib * GIB
        fits = "yes" if grand <= opts.gpu_gib * GIB else "NO"
        print(
            f"{mode:16s} {trained:16,d} {weights / GIB:8.2f}G {states / GIB:9.2f}G {act_total / GIB:7.2f}G"
            f" {grand / GIB:7.2f}G  {fits} (GPU {opts.gpu_gib:.1f} GiB)"
        )


if __name__ == "__main__":
    main()
