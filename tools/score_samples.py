"""Score every sample of a manifest by its loss and gradient norm, to find mislabeled or broken samples.

    python tools/score_samples.py --manifest data/train.jsonl --checkpoint-dir outputs/run/hf \\
        --params audio --top 20 --out scores.jsonl

Each sample is built as its own row (one document, padded to ``--seq-len``), so its loss is the aligned
loss of that sample alone (token means over its own targets). Its gradient norm is the norm of the
gradient of that loss with respect to the selected trainable parameters (``--params``: ``audio``, the
audio adapter: audio FFNs and norms, codebook embeddings, audio head; ``all``; or a comma-separated list
of name substrings). Per-sample gradients come from ``torch.func.vmap`` over the rows of a chunk of
the pure gradient function of the functional step (:func:`higgs_tune.training.functional.make_functional_grad_fn`).

Samples are printed sorted by the chosen key (``--sort``: ``loss``, ``grad_norm``, ``text_loss`` or
``audio_loss``; compare like with like: a transcription sample's loss is mostly text CE, a TTS
sample's mostly audio CE), highest first: a sample
the trained model finds far harder than the rest, or that pulls the weights far harder, is the first to
inspect (codes of another utterance, a transcript that does not match, truncated audio).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
AUDIO_ADAPTER_NAMES = (
    "audio_mlp",
    "audio_input_layernorm",
    "audio_post_attention_layernorm",
    "audio_codebook_embeddings",
    "audio_lm_head",
)


SORT_KEYS = ("loss", "grad_norm", "text_loss", "audio_loss")


@dataclass(frozen=True)
class SampleScore:
    location: str  # <manifest>:<line>
    loss: float
    grad_norm: float
    text_loss: float
    audio_loss: float


def select_parameters(model: torch.nn.Module, which: str) -> list[str]:
    """Names of the parameters whose per-sample gradient is measured (``audio``, ``all`` or substrings)."""
    names = [name for name, _ in model.named_parameters()]
    if which == "all":
        return names
    patterns = AUDIO_ADAPTER_NAMES if which == "audio" else tuple(p for p in which.split(",") if p)
    selected = [name for name in names if any(p in name for p in patterns)]
    if not selected:
        raise ValueError(f"--params {which!r} selects no parameter of {type(model).__name__}")
    return selected


def one_document_rows(manifest: Path, tokenizer, layout, seq_len: int, on_bad_sample: str = "error"):
    """(entries, row batches [1, ...] each) — every sample of the manifest as its own padded row."""
    from higgs_tune.data.batch import PackingSpec
    from higgs_tune.data.manifest import load_document, scan_manifest
    from higgs_tune.data.packer import collate_rows

    scan = scan_manifest(manifest, tokenizer, layout, on_bad_sample=on_bad_sample)
    spec = PackingSpec(seq_len=seq_len, batch_size=1, num_codebooks=layout.num_codebooks)
    entries, rows = [], []
    for entry in scan.entries:
        if entry.stats.length > seq_len:
            raise ValueError(f"{entry.location}: {entry.stats.length} positions, --seq-len is {seq_len}")
        entries.append(entry)
        rows.append(collate_rows([[load_document(entry, tokenizer, layout)]], spec, tokenizer.special.pad))
    return entries, rows


def score_rows(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    rows: Sequence[dict[str, torch.Tensor]],
    param_names: Sequence[str],
    chunk_size: int = 8,
    compile_backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss and gradient norm.

    Args:
        rows: single-row batches ([1, ...] fields), one document each.
        param_names: parameters differentiated (the others are constants).
        chunk_size: rows per ``vmap`` call (memory: chunk_size copies of the selected gradients).

    Returns:
        (loss [N], grad_norm [N], text_loss [N], audio_loss [N]) fp32.
    """
    from higgs_tune.training.functional import make_functional_grad_fn

    params = {name: p.detach() for name, p in model.named_parameters() if name in set(param_names)}
    grad_fn = make_functional_grad_fn(model, loss_fn, backend=None)

    def one_row(params, row):
        batch = {name: value.unsqueeze(0) for name, value in row.items()}
        grads, output = grad_fn(
            params, batch, batch["num_text_targets"].sum(), batch["num_audio_targets"].sum(0)
        )
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads.values()])
        )
        return output.loss, norm, output.text_loss, output.audio_loss

    per_chunk = torch.func.vmap(one_row, in_dims=(None, 0))
    if compile_backend is not None:
        per_chunk = torch.compile(per_chunk, fullgraph=True, backend=compile_backend)
    results = []
    model.eval()
    for start in range(0, len(rows), chunk_size):
        chunk = rows[start : start + chunk_size]
        stacked = {name: torch.cat([row[name] for row in chunk]) for name in chunk[0]}
        results.append(per_chunk(params, stacked))
    return tuple(torch.cat([r[i] for r in results]).detach().float() for i in range(4))  # type: ignore[return-value]


def transform_safe_loss():
    """The aligned loss without its text-chunk activation checkpoint (torch.func refuses saved-tensor hooks)."""
    from higgs_tune.loss import AlignedLoss

    return AlignedLoss(checkpoint_text_chunks=False)


def main(argv: list[str] | None = None) -> list[SampleScore]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="HF Higgs Audio directory")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="default: <checkpoint-dir>/tokenizer.json"
    )
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--params", default="audio", help="audio | all | comma-separated name substrings")
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--sort", choices=list(SORT_KEYS), default="loss")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write every score as JSONL here")
    cli = parser.parse_args(argv)
    if cli.checkpoint_dir is None:
        parser.error("--checkpoint-dir is required (a trained model; a random one ranks nothing)")

    from higgs_tune.data.document import AudioLayout
    from higgs_tune.data.tokenizer import HiggsTokenizer
    from higgs_tune.models.higgs_audio.builders import from_checkpoint_dir

    model = from_checkpoint_dir(cli.checkpoint_dir, dtype=torch.float32, device=cli.device)
    tokenizer = HiggsTokenizer.for_checkpoint(cli.checkpoint_dir, cli.tokenizer)
    config = model.args.to_hf_config()
    tokenizer.check_against_model_config(config)
    entries, rows = one_document_rows(
        cli.manifest, tokenizer, AudioLayout.from_model_config(config), cli.seq_len
    )
    rows = [{k: v.to(cli.device) for k, v in row.items()} for row in rows]
    scores = rank(
        entries,
        rows,
        model,
        transform_safe_loss(),
        select_parameters(model, cli.params),
        cli.chunk_size,
        cli.sort,
    )
    print(f"{'loss':>9} {'grad_norm':>10} {'text':>8} {'audio':>8}  sample")
    for s in scores[: cli.top]:
        print(f"{s.loss:9.4f} {s.grad_norm:10.4f} {s.text_loss:8.4f} {s.audio_loss:8.4f}  {s.location}")
    if cli.out is not None:
        cli.out.write_text("".join(json.dumps(dataclasses.asdict(s)) + "\n" for s in scores))
    return scores


def rank(
    entries, rows, model, loss_fn, param_names, chunk_size: int = 8, sort: str = "loss"
) -> list[SampleScore]:
    """Scores of ``rows`` (one per manifest entry), sorted by ``sort`` (:data:`SORT_KEYS`), highest first."""
    if sort not in SORT_KEYS:
        raise ValueError(f"sort key {sort!r} is not one of {SORT_KEYS}")
    loss, grad_norm, text_loss, audio_loss = score_rows(model, loss_fn, rows, param_names, chunk_size)
    scores = [
        SampleScore(
            entry.location, float(loss[i]), float(grad_norm[i]), float(text_loss[i]), float(audio_loss[i])
        )
        for i, entry in enumerate(entries)
    ]
    return sorted(scores, key=lambda s: getattr(s, sort), reverse=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
