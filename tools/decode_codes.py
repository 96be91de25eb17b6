"""Listen to audio codes: decode ``.npy`` codes files ([8, T], values 0..1023, e.g. a manifest's codes or
``<output_dir>/generations/step_<N>/sample_<i>.npy``) into 16-bit wav files with Boson's audio decoder.

    python tools/decode_codes.py --audio-decoder /models/higgs-audio-v2-tokenizer codes/0001.npy ...
        [--out-dir DIR]

Each ``X.npy`` becomes ``X.wav`` (in ``--out-dir`` if given, else next to it). The decoder is
``higgs_tune.models.audio_decoder`` (Boson's decode path, read from the audio tokenizer folder:
``config.json`` + ``model.pth``). The last line of stdout is one JSON object: the wav files written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from higgs_tune.models.audio_decoder import AudioCodecDecoder, write_wav


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("codes", type=Path, nargs="+", help=".npy files of codes [K, T]")
    parser.add_argument("--audio-decoder", required=True, help="Boson's audio tokenizer folder")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the wav files go")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        decoder = AudioCodecDecoder.from_pretrained(args.audio_decoder, device=args.device)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--audio-decoder: {error}") from None
    written = []
    for path in args.codes:
        codes = np.load(path)
        if not np.issubdtype(codes.dtype, np.integer) or codes.ndim != 2:
            raise SystemExit(f"{path}: expected an integer array [K, T], got {codes.dtype} {codes.shape}")
        try:
            waveform = decoder(torch.from_numpy(codes.astype(np.int64))[None])[0]
        except ValueError as error:
            raise SystemExit(f"{path}: {error}") from None
        out = (args.out_dir or path.parent) / f"{path.stem}.wav"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_wav(out, waveform, decoder.sample_rate)
        written.append(str(out))
    summary = {"wav": written, "sample_rate": decoder.sample_rate}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
