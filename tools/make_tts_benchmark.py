"""Write the packing benchmark's inputs: a 3B-proportioned random checkpoint and a plain TTS manifest.

    python tools/make_tts_benchmark.py --out DIR [--num-samples 64] [--words 40] [--frames 171] [--seed 0]

``DIR/checkpoint`` is a Higgs Audio model in Boson's layout with random weights, proportioned like the 3B
model where it matters on a CPU (``tools/bench.py``'s ``cpu3b`` architecture: the real 128256-id
vocabulary, hidden 512, 4 DualFFN layers), with the special-token ids of the project's tiny tokenizer.
``DIR/train.jsonl`` holds ``--num-samples`` TTS samples (system prompt, user text, assistant speech) as a
user's own data set would: the text is ``--words`` +-25% words of :data:`make_synthetic.WORDS`, the
speech ``--frames`` +-15% frames of random codes, so that a sample is about 240 positions of which about
180 are audio columns (frames + the delay pattern's 7 + stream BOS/EOS) with the defaults.

Train on it with the shipped demo config, capacities left to ``auto``::

    tune run recipes/higgs_finetune --config configs/cpu_tiny.yaml checkpointer.checkpoint_dir=DIR/checkpoint \\
        tokenizer.path=higgs_tune/assets/tiny_tokenizer/tokenizer.json dataset.path=DIR/train.jsonl seq_len=2048
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling tools below
import bench  # noqa: E402
import make_synthetic as synthetic  # noqa: E402


def write_manifest(out: Path, num_samples: int, words: int, frames: int, seed: int) -> Path:
    """``out/train.jsonl`` + ``out/codes/*.npy`` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    (out / "codes").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(num_samples):
        num_words = int(rng.integers(round(words * 0.75), round(words * 1.25) + 1))
        text = " ".join(rng.choice(synthetic.WORDS, size=num_words))
        num_frames = int(rng.integers(round(frames * 0.85), round(frames * 1.15) + 1))
        codes = rng.integers(0, synthetic.CODEBOOK_SIZE, size=(synthetic.NUM_CODEBOOKS, num_frames))
        relative = f"codes/{index:06d}.npy"
        np.save(out / relative, codes.astype(np.int16))
        sample = {
            "messages": [
                {"role": "system", "content": synthetic.SYSTEM_PROMPT},
                {"role": "user", "content": text},
                {"role": "assistant", "content": {"type": "audio", "audio_codes": relative}},
            ]
        }
        lines.append(json.dumps(sample))
    manifest = out / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def write_checkpoint(out: Path, seed: int) -> Path:
    """``out/checkpoint``: tools/bench.py's cpu3b architecture, random weights, Boson's layout."""
    import torch

    from higgs_tune.models.higgs_audio.builders import build_model
    from higgs_tune.models.higgs_audio.checkpoint import save_hf_checkpoint

    args = bench.model_args(bench.CONFIGS["cpu3b"])
    torch.manual_seed(seed)
    model = build_model(args, dtype=torch.float32)
    return save_hf_checkpoint(model.state_dict(), args, out / "checkpoint")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--words", type=int, default=40, help="mean words of user text per sample")
    parser.add_argument("--frames", type=int, default=171, help="mean audio frames per sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    manifest = write_manifest(args.out, args.num_samples, args.words, args.frames, args.seed)
    checkpoint = write_checkpoint(args.out, args.seed)
    print(json.dumps({"manifest": str(manifest), "checkpoint": str(checkpoint)}))


if __name__ == "__main__":
    main()
