"""Peak memory of the text-head + cross-entropy, forward + backward: naive vs gathered + chunked.

A benchmark, not a test. Each variant runs in a FRESH subprocess (peak RSS is a process-wide
high-water mark) and reports the extra peak memory of one forward + backward over what was allocated
before it (hidden states, LM-head weight, targets). The weight gradient [V, H] is part of every variant's
peak; ``--frozen-head`` leaves it out so that only the logits and CE memory remain (plus what the GEMMs
themselves allocate: see ``matmul_only``):

    matmul_only       the gathered LM-head GEMMs with a trivial loss: the floor under the variants below
    naive             logits [1, L, V] at every position, upcast to fp32, CE (what most trainers do)
    chunked           every position, but the project's chunked fp32 CE
    gathered          only the N positions that carry a text target, one fp32 CE over them
    gathered_chunked  gathered positions + chunked CE: the project's path (AlignedLoss)

On CUDA (``--device cuda``) it uses ``torch.cuda.max_memory_allocated`` instead of RSS.

    python tools/bench_loss_memory.py                       # L=4096, 256 targets, H=3072, V=128256, bf16
    python tools/bench_loss_memory.py --hidden 1024 --variants naive gathered_chunked
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from higgs_tune.data.batch import IGNORE_INDEX
from higgs_tune.loss.aligned_loss import chunked_text_cross_entropy

VARIANTS = ("matmul_only", "naive", "chunked", "gathered", "gathered_chunked")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _warm_up(device: torch.device, dtype: torch.dtype) -> None:
    """Run both CE paths once on tiny tensors: first calls import modules and allocate caches (tens of
    MiB of RSS) that would otherwise be charged to the measured step."""
    logits = torch.randn(8, 16, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 16, (8,), device=device)
    chunked_text_cross_entropy(logits, targets, 4)[0].backward()
    F.cross_entropy(logits.float(), targets).backward()


def run_variant(args: argparse.Namespace) -> dict:
    """One forward + backward of the variant; returns its extra peak memory in bytes."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(0)
    # Generated in the model dtype: no fp32 temporaries that would raise the high-water mark above what
    # the measured step needs.
    hidden = torch.randn(1, args.seq_len, args.hidden, generator=generator, dtype=dtype).to(device)
    hidden.requires_grad_()
    lm_head = torch.randn(args.vocab, args.hidden, generator=generator, dtype=dtype).to(device)
    lm_head.mul_(args.hidden**-0.5)
    lm_head.requires_grad_(not args.frozen_head)
    target_positions = torch.randperm(args.seq_len, generator=generator)[: args.num_targets].sort().values
    targets = torch.full((1, args.seq_len), IGNORE_INDEX)
    targets[0, target_positions] = torch.randint(0, args.vocab, (args.num_targets,), generator=generator)
    targets = targets.to(device)
    target_index = target_positions.to(device)[None]  # [1, N], what the packer's text_target_index holds
    _warm_up(device, dtype)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _current_rss_bytes()
    start = time.perf_counter()

    if args.variant in ("matmul_only", "gathered", "gathered_chunked"):
        rows = torch.gather(hidden, 1, target_index[:, :, None].expand(-1, -1, args.hidden))  # [1, N, H]
        row_targets = torch.gather(targets, 1, target_index)  # [1, N]
    else:
        rows, row_targets = hidden, targets
    logits = F.linear(rows, lm_head).flatten(0, 1)  # [rows, V], model dtype (as nn.Linear)
    row_targets = row_targets.flatten()
    if args.variant == "matmul_only":
        loss = logits.sum() / args.num_targets  # no CE: what the gathered LM-head GEMMs alone cost
    elif args.variant in ("chunked", "gathered_chunked"):
        ce_sum, _, _ = chunked_text_cross_entropy(logits, row_targets, args.chunk_size, with_z=False)
        loss = ce_sum / args.num_targets
    else:
        loss = F.cross_entropy(logits.float(), row_targets, ignore_index=IGNORE_INDEX)
    del logits
    loss.backward()

    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss_bytes()
    return {
        "variant": args.variant,
        "extra_peak_bytes": peak - before,
        "seconds": time.perf_counter() - start,
        "loss": float(loss),
        "grad_norm": float(hidden.grad.float().norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--num-targets", type=int, default=256, help="positions that carry a text target")
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument(
        "--chunk-size", type=int, default=256, help="rows per fp32 chunk (AlignedLoss text_chunk_size)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--frozen-head",
        action="store_true",
        help="LM-head weight without grad (LoRA-style): isolates the logits/CE memory from the weight gradient",
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.variant is not None:
        print(json.dumps(run_variant(args)))
        return

    fp32_full = 4 * args.seq_len * args.vocab
    print(
        f"L={args.seq_len} targets={args.num_targets} H={args.hidden} V={args.vocab} dtype={args.dtype} "
        f"chunk={args.chunk_size} device={args.device} frozen_head={args.frozen_head}; fp32 logits at every position = {fp32_full / 2**30:.2f} GiB"
    )
    common = list(sys.argv[1:])
    if "--variants" in common:
        i = common.index("--variants")
        end = i + 1
        while end < len(common) and not common[end].startswith("--"):
            end += 1
        del common[i:end]
    for variant in args.variants:
        child = subprocess.run(
            [sys.executable, __file__, *common, "--variant", variant],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            raise RuntimeError(f"variant {variant} failed (exit {child.returncode}):\n{child.stderr}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(
            f"{variant:>17}: extra peak {result['extra_peak_bytes'] / 2**20:9.1f} MiB   "
            f"{result['seconds']:6.2f} s   loss {result['loss']:.4f}   |grad hidden| {result['grad_norm']:.6f}"
        )


if __name__ == "__main__":
    main()
