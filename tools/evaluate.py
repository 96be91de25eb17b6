"""Evaluate an exported Higgs Audio checkpoint on a manifest: loss components and accuracies.

    python tools/evaluate.py --checkpoint DIR --data MANIFEST [--tokenizer PATH] [--batch-size N]
        [--seq-len L] [--device cpu|cuda] [--dtype fp32|bf16]

``DIR`` is an HF-layout checkpoint (``config.json`` + safetensors, e.g. a run's ``<output_dir>/hf``). The
manifest is scanned and packed exactly as training packs it (``build_higgs_dataset``); every document is
evaluated once (no shuffling, the last batch padded, a document longer than ``--seq-len`` is an error,
not a silent drop). The numbers are the training definitions (docs/higgs_audio_v2.md §6.4) as token means over the WHOLE
manifest (:func:`higgs_tune.evaluation.evaluate`).

Progress goes to stderr; the last line of stdout is ONE JSON object: ``loss``, ``text_loss``,
``audio_loss`` (mean over codebooks), ``codebook_losses`` (K), ``z_loss``, ``text_accuracy``,
``codebook_accuracies`` (K), ``n_text`` (text targets), ``n_audio`` (targets per codebook),
``num_batches``, ``num_documents``, ``checkpoint``, ``data``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from higgs_tune.data.batch import PackingSpec
from higgs_tune.data.dataset import build_dataloader, build_higgs_dataset
from higgs_tune.data.document import AudioLayout
from higgs_tune.data.tokenizer import HiggsTokenizer
from higgs_tune.evaluation import evaluate
from higgs_tune.loss import AlignedLoss
from higgs_tune.models.higgs_audio.builders import from_checkpoint_dir
from higgs_tune.models.higgs_audio.checkpoint import read_hf_config


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="HF-layout checkpoint directory")
    parser.add_argument("--data", type=Path, required=True, help="JSONL manifest to evaluate on")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer.json or its directory (default: the checkpoint directory)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="packed rows per batch (default 1)")
    parser.add_argument("--seq-len", type=int, default=2048, help="positions per packed row (default 2048)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default=None,
        help="model dtype (default: bf16 on cuda, fp32 on cpu)",
    )
    parser.add_argument("--num-workers", type=int, default=0, help="data loader workers (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    device = torch.device(args.device or default_device())
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    hf_config = read_hf_config(args.checkpoint)
    try:
        tokenizer = HiggsTokenizer.for_checkpoint(args.checkpoint, args.tokenizer)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    tokenizer.check_against_model_config(hf_config)
    layout = AudioLayout.from_model_config(hf_config)

    dataset, _, stats = build_higgs_dataset(
        tokenizer,
        path=str(args.data),
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        audio_layout=layout,
        too_long="error",
    )
    spec = PackingSpec(seq_len=args.seq_len, batch_size=args.batch_size, num_codebooks=layout.num_codebooks)
    loader = build_dataloader(
        dataset, spec, seed=0, shuffle=False, num_workers=args.num_workers, drop_last=False
    )
    model = from_checkpoint_dir(args.checkpoint, dtype=dtype, device=device)
    print(
        f"evaluating {args.checkpoint} on {stats['train_samples']} documents of {args.data} "
        f"({stats['train_rows']} packed rows of {args.seq_len}, {device}, {dtype})",
        file=sys.stderr,
    )
    result = evaluate(model, loader, AlignedLoss(), device)
    result.update(
        num_documents=int(stats["train_samples"]), checkpoint=str(args.checkpoint), data=str(args.data)
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
