"""Generate audio codes (and text) from an exported Higgs Audio checkpoint, with Boson's inference protocol.

    python tools/generate.py --checkpoint DIR --text "..." [--tokenizer PATH] [--system "..."]
        [--greedy | --temperature T --top-k K --top-p P] [--ras-win-len W] [--seed S] [--max-new-columns N]
        [--out codes.npy] [--manifest M --index I | --manifest M --indices I J ...] [--no-force-audio]
        [--audio-decoder DIR] [--batch-size B] [--compile]

Prompt (``higgs_tune.generation.build_prompt``):

- ``--text`` alone: a system turn (``--system``, default Boson's "Generate audio following instruction.")
  and a user turn with the text;
- ``--manifest M --index I``: the messages of sample I (0-based, blank lines skipped) of manifest M, up
  to its LAST assistant turn (the answer to generate), with their audio items read from the codes files
  (voice cloning references, audio-in prompts). With ``--text`` too, the text replaces the content of
  the last user turn of that context (same voice, new sentence).
- ``--manifest M --indices I J ...``: several samples, generated together (``--batch-size`` prompts per
  batch, default all), each with its own stop and its own generator (seed ``--seed`` + its rank in the
  list); ``--out`` is then a folder: ``<out>/sample_<I>.npy`` (+ ``.wav``).

The prompt ends with ``<|audio_out_bos|>`` (the serve engine's ``force_audio_gen``) unless
``--no-force-audio``; then the model decides between text and speech. Generation: greedy by default,
or sampled, with a KV cache (``higgs_tune/generation.py``); ``--compile`` compiles the decode step (and
on CUDA captures it as CUDA graphs). Repetition-aware sampling is on with Boson's serve-engine defaults
(``--ras-win-len 7``, at most 2 repeats; ``--ras-win-len 0`` turns it off, as Boson's
``HiggsAudioModel.generate`` default): its redraws come from the seeded generator, also when greedy.

Writes ``--out`` (default ``codes.npy``): the codes [K, T] of the first generated audio segment
(delay reverted, stream BOS/EOS dropped, as the serve engine decodes them); further segments go to
``<out>.1.npy``, ... With ``--audio-decoder /path/to/higgs-audio-v2-tokenizer`` (a local copy of Boson's
audio tokenizer: ``config.json`` + ``model.pth``), also writes ``<out>.wav`` (24 kHz, all segments
concatenated), decoded by ``higgs_tune.models.audio_decoder`` (Boson's decode path, without its HuBERT
download and torchaudio). The last line of stdout is one JSON object describing the result (with ``--indices``: ``{"results":
[...]}``, one object per sample).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from higgs_tune.data.document import AudioLayout
from higgs_tune.data.tokenizer import HiggsTokenizer
from higgs_tune.decoding import CachedDecoder
from higgs_tune.generation import (
    GenerationOutput,
    GenerationTokens,
    SamplingConfig,
    build_prompt,
    cache_positions_needed,
    generate_batch,
    held_out_prompt,
)
from higgs_tune.models.audio_decoder import AudioCodecDecoder, write_wav
from higgs_tune.models.higgs_audio.builders import from_checkpoint_dir
from higgs_tune.models.higgs_audio.checkpoint import read_hf_config

DEFAULT_SYSTEM = "Generate audio following instruction."


def manifest_prompt(manifest: Path, index: int, text: str | None) -> tuple[list[dict], list[np.ndarray]]:
    """The context of sample ``index``: its messages before the last assistant turn, and their codes;
    ``text`` replaces the text of the last user turn."""
    try:
        held_out = held_out_prompt(manifest, index)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    messages, codes = held_out.messages, held_out.context_codes
    if text is not None:
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise SystemExit(f"{manifest} sample {index}: no user turn whose text --text could replace")
        messages = [*messages[: users[-1]], {"role": "user", "content": text}, *messages[users[-1] + 1 :]]
    return messages, codes


def load_audio_decoder(path: str, model_args, device: torch.device) -> AudioCodecDecoder:
    """Boson's audio tokenizer's decoder from its folder, checked against the model's codebooks."""
    layout = AudioLayout.from_model_config(model_args.to_hf_config())
    try:
        decoder = AudioCodecDecoder.from_pretrained(path, device=device)
        decoder.check_codes_layout(layout.num_codebooks, layout.codebook_size)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--audio-decoder: {error}") from None
    return decoder


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="HF-layout checkpoint directory")
    parser.add_argument("--text", default=None, help="the text to speak")
    parser.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt for --text alone")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer.json or its directory (default: the checkpoint directory)",
    )
    parser.add_argument("--manifest", type=Path, default=None, help="take the prompt from this manifest")
    parser.add_argument("--index", type=int, default=None, help="sample of --manifest (0-based)")
    parser.add_argument(
        "--indices", type=int, nargs="+", default=None, help="several samples of --manifest, batched"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default: all)")
    parser.add_argument(
        "--compile", action="store_true", help="compile the decode step (CUDA: also capture CUDA graphs)"
    )
    parser.add_argument(
        "--greedy", action="store_true", help="argmax decoding (default unless sampling args)"
    )
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument(
        "--ras-win-len",
        type=int,
        default=7,
        help="repetition-aware sampling window (Boson's serve engine: 7; 0 = off)",
    )
    parser.add_argument("--ras-win-max-num-repeat", type=int, default=2, help="RAS: repeats allowed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument(
        "--max-new-columns",
        type=int,
        default=400,
        help="decoding steps: text tokens + audio columns (default 400 = 16 s of speech)",
    )
    parser.add_argument(
        "--no-force-audio", action="store_true", help="do not end the prompt with <|audio_out_bos|>"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("codes.npy"), help="codes of the first segment (.npy)"
    )
    parser.add_argument(
        "--audio-decoder", default=None, help="Boson's audio tokenizer folder (config.json + model.pth)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default=None,
        help="model dtype (default: bf16 on cuda, fp32 on cpu)",
    )
    args = parser.parse_args(argv)

    sampled = any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    if args.greedy and sampled:
        parser.error("--greedy excludes --temperature / --top-k / --top-p")
    if args.index is not None and args.indices is not None:
        parser.error("--index excludes --indices")
    indices = args.indices if args.indices is not None else [args.index] if args.index is not None else None
    if (args.manifest is None) != (indices is None):
        parser.error("--manifest and --index (or --indices) go together")
    if args.manifest is None and args.text is None:
        parser.error("give --text, or --manifest and --index")
    sampling = SamplingConfig(
        greedy=not sampled,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        ras_win_len=args.ras_win_len or None,
        ras_win_max_num_repeat=args.ras_win_max_num_repeat,
    )

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    hf_config = read_hf_config(args.checkpoint)
    try:
        tokenizer = HiggsTokenizer.for_checkpoint(args.checkpoint, args.tokenizer)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    model = from_checkpoint_dir(args.checkpoint, dtype=dtype, device=device).eval()
    tokens = GenerationTokens.from_tokenizer(tokenizer, model.args)
    audio_decoder = (
        None if args.audio_decoder is None else load_audio_decoder(args.audio_decoder, model.args, device)
    )

    if args.manifest is not None:
        contexts = [manifest_prompt(args.manifest, index, args.text) for index in indices]
    else:
        messages = [{"role": "system", "content": args.system}, {"role": "user", "content": args.text}]
        contexts = [(messages, [])]
    layout = AudioLayout.from_model_config(hf_config)
    prompts = [
        build_prompt(messages, tokenizer, layout, codes, force_audio=not args.no_force_audio)
        for messages, codes in contexts
    ]
    batch_size = min(args.batch_size or len(prompts), len(prompts))
    decoder = CachedDecoder(
        model,
        batch_size=batch_size,
        max_positions=cache_positions_needed(prompts, args.max_new_columns),
        compile=args.compile,
        cuda_graphs=args.compile and device.type == "cuda",
    )
    results = generate_batch(
        model,
        prompts,
        tokens,
        max_new_columns=args.max_new_columns,
        sampling=sampling,
        generators=[torch.Generator(device=device).manual_seed(args.seed + i) for i in range(len(prompts))],
        decoder=decoder,
    )
    if args.indices is None:
        summary = write_result(results[0], len(prompts[0]), args.out, tokenizer, audio_decoder)
    else:
        summary = {
            "results": [
                {
                    "index": index,
                    **write_result(
                        result, len(prompt), args.out / f"sample_{index}.npy", tokenizer, audio_decoder
                    ),
                }
                for index, prompt, result in zip(indices, prompts, results)
            ]
        }
    print(json.dumps(summary))
    return summary


def write_result(
    result: GenerationOutput,
    prompt_positions: int,
    out: Path,
    tokenizer: HiggsTokenizer,
    audio_decoder: AudioCodecDecoder | None,
) -> dict:
    """Write one prompt's segments (``out``, ``<out>.1.npy``, ...; ``<out>.wav`` with a decoder); its summary."""
    segments = [codes.numpy().astype(np.int16) for codes in result.audio_codes]
    written = []
    for i, codes in enumerate(segments):
        path = out if i == 0 else out.with_suffix(f".{i}.npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, codes)
        written.append(str(path))
    if not segments:
        print(f"{out}: the model generated no audio segment (see generated_text)", file=sys.stderr)
    wav = None
    if audio_decoder is not None and segments:
        wav = out.with_suffix(".wav")
        waveform = torch.cat(
            [audio_decoder(torch.from_numpy(codes.astype(np.int64))[None])[0] for codes in segments]
        )
        write_wav(wav, waveform, audio_decoder.sample_rate)
    return {
        "prompt_positions": prompt_positions,
        "generated_text": tokenizer.decode(result.text_ids.tolist()),
        "generated_text_ids": result.text_ids.tolist(),
        "segments": [list(codes.shape) for codes in segments],
        "codes_files": written,
        "wav": str(wav) if wav is not None else None,
        "stopped_by": result.stopped_by,
        "num_steps": result.num_steps,
    }


if __name__ == "__main__":
    main()
