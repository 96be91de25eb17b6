"""Convert a Higgs Audio checkpoint between Boson's layout and transformers' HiggsAudioV2 layout.

    python tools/convert.py SRC DST --to transformers [--tokenizer PATH] [--audio-tokenizer ID_OR_PATH]
    python tools/convert.py SRC DST --to boson [--tokenizer PATH]

``SRC`` is either layout (told apart by its ``config.json``); ``DST`` is written atomically (a temporary
sibling renamed into place). The tensors are copied bit for bit under the other layout's names, in
their stored dtype. The checks are the export's: every parameter of the model present with its shape,
nothing unexpected, and, towards transformers, an architecture its model computes (every layer DualFFN,
summed codebook embeddings, the delay pattern). ``--to transformers`` also writes transformers'
generation config, processor config, chat template and tokenizer files (from ``--tokenizer`` or SRC),
so ``HiggsAudioV2ForConditionalGeneration.from_pretrained(DST, use_text_head=True)`` and
``HiggsAudioV2Processor.from_pretrained(DST)`` load it; ``--audio-tokenizer`` is the transformers-format
audio tokenizer the processor config names (default: eustlb/higgs-audio-v2-tokenizer). ``--to boson``
copies the tokenizer files next to the weights.

A problem is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from higgs_tune.data.tokenizer import HiggsTokenizer
from higgs_tune.models.higgs_audio.checkpoint import (
    LAYOUTS,
    checkpoint_layout,
    read_hf_state_dict,
    read_model_args,
    save_hf_checkpoint,
)
from higgs_tune.models.higgs_audio.transformers_layout import DEFAULT_AUDIO_TOKENIZER, TOKENIZER_FILES


def convert(src: Path, dst: Path, to: str, tokenizer: Path | None, audio_tokenizer: str) -> Path:
    """Read ``src`` (either layout), write ``dst`` in layout ``to``; returns ``dst``."""
    if dst.resolve() == src.resolve():
        raise ValueError(f"DST is SRC ({src}): write the conversion to another directory")
    tokenizer_dir = Path(HiggsTokenizer.for_checkpoint(src, tokenizer).source).parent
    args = read_model_args(src)
    state_dict = read_hf_state_dict(src)  # our names, stored dtype
    out = save_hf_checkpoint(
        state_dict, args, dst, layout=to, tokenizer_dir=tokenizer_dir, audio_tokenizer=audio_tokenizer
    )
    if to == "boson":
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, out / name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="checkpoint directory (Boson's or transformers' layout)")
    parser.add_argument("dst", type=Path, help="output directory")
    parser.add_argument("--to", choices=LAYOUTS, required=True, help="layout to write")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer.json or its folder (default: SRC's)"
    )
    parser.add_argument(
        "--audio-tokenizer", default=DEFAULT_AUDIO_TOKENIZER, help="processor's audio tokenizer"
    )
    args = parser.parse_args(argv)
    try:
        source_layout = checkpoint_layout(args.src)
        out = convert(args.src, args.dst, args.to, args.tokenizer, args.audio_tokenizer)
    except (OSError, ValueError, KeyError) as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return 1
    print(f"converted {args.src} ({source_layout} layout) -> {out} ({args.to} layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
