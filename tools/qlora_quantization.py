#!/usr/bin/env python
"""NF4 (the QLoRA base format of configs/rtx16gb_qlora.yaml) against torchao's int8 weight-only, measured.

    python tools/qlora_quantization.py            # 3B-shaped weights, CPU

For each weight shape of the 3B model's quantized linears (random N(0, 0.02) values in bf16, like the
released init; a trained checkpoint has heavier tails), per format: the bytes stored per weight (the
tensors the quantized weight holds), the relative RMS error of the dequantized weight, and the time of
one LoRA-style forward + backward of a [tokens, in] bf16 input through the quantized base (input
gradient only, as for a frozen base) relative to the same through the bf16 weight, the three formats
interleaved in one loop so that other load on the machine hits all of them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torchao.dtypes.nf4tensor import linear_nf4, to_nf4
from torchao.quantization import Int8WeightOnlyConfig, quantize_

# (out, in) of the 3B linears: q/o, k/v, gate/up, down.
SHAPES = ((3072, 3072), (1024, 3072), (8192, 3072), (3072, 8192))


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the plain tensors inside a (possibly nested) tensor subclass."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:
        return tensor.numel() * tensor.element_size()
    names, _ = flatten()
    return sum(stored_bytes(getattr(tensor, name)) for name in names)


def measure(shape: tuple[int, int], tokens: int, repeats: int) -> list[str]:
    torch.manual_seed(0)
    weight = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    nf4 = to_nf4(weight)
    int8_linear = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=torch.bfloat16)
    int8_linear.weight.data.copy_(weight)
    quantize_(int8_linear, Int8WeightOnlyConfig())
    int8_weight = int8_linear.weight
    dequantized = {"nf4": nf4.get_original_weight(), "int8": int8_weight.dequantize()}
    forward = {
        "bf16": lambda x: F.linear(x, weight),
        "nf4": lambda x: linear_nf4(x, nf4),
        "int8": lambda x: int8_linear(x),
    }
    times: dict[str, list[float]] = {name: [] for name in forward}
    x = torch.randn(tokens, shape[1], dtype=torch.bfloat16, requires_grad=True)
    for i in range(repeats + 1):
        for name, fn in forward.items():
            start = time.perf_counter()
            fn(x).float().square().mean().backward()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
            x.grad = None
    rms = weight.float().square().mean().sqrt()
    base = statistics.median(times["bf16"])
    rows = []
    for name, stored in (("nf4", stored_bytes(nf4)), ("int8", stored_bytes(int8_weight))):
        error = (dequantized[name].float() - weight.float()).square().mean().sqrt() / rms
        ratio = statistics.median(times[name]) / base
        rows.append(
            f"| {shape[0]} x {shape[1]} | {name} | {stored / weight.numel():.4f} | {error:.4f} | {ratio:.2f}x |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    cli = parser.parse_args()
    print("| weight (out x in) | format | bytes per weight | relative RMS error | fwd+bwd time vs bf16 |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        for row in measure(shape, cli.tokens, cli.repeats):
            print(row, flush=True)


if __name__ == "__main__":
    main()
