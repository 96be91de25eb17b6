"""Generation speed: the cache-free reference path against the KV-cached one, on the same prompts.

    python tools/bench_generation.py --config small --columns 20          # smoke run (seconds)
    python tools/bench_generation.py --config cpu3b                       # CPU, proportioned like 3B
    python tools/bench_generation.py --config 3b --device cuda --dtype bf16 --batch-sizes 1 8 --sides cached compiled

The model is ``tools/bench.py``'s architecture of ``--config`` (random weights, seed 0), with the audio
head's EOS rows zeroed so that the answer is speech for all ``--columns`` steps (a random model would
otherwise end its segment at a random column and go on in text). The prompt is a voice-cloning prompt
(system text, a user sentence, an assistant audio reference, a new user sentence) of about
``--prompt-positions`` positions, forcing speech (``<|audio_out_bos|>``); a batch of B holds B such
prompts with different reference codes.

Sides (``--sides``), each greedy for ``--columns`` steps (one audio column per step):

* ``reference``: ``generate(..., use_cache=False)``, every step re-runs the whole prefix (the path
  before the KV cache), prompt by prompt;
* ``cached``: ``generate_batch`` with an eager :class:`higgs_tune.decoding.CachedDecoder` (one prefill,
  one decode step per column);
* ``compiled``: the same with the decode step compiled (``compile=True``; on CUDA also captured as CUDA
  graphs), after one warm-up generation that compiles it.

Reported per side and batch size: columns/s (all rows: B x steps / wall time), columns/s per prompt,
the real-time factor at 25 frames/s (wall time / audio time of one prompt; < 1 is faster than real time)
and the speed-up over the reference. Every side must produce the reference's codes (fp32) -- the check
that all sides do the same work. On CPU the sides run one after the other in one process: on a shared
machine, compare the ratios of one run (``--threads 1`` spares the decode step's many small ops the
waits for a second, busy core).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

FRAMES_PER_SECOND = 25  # Boson's audio tokenizer: 25 code columns per second of audio
SIDES = ("reference", "cached", "compiled")


def bench_model(config: str, device: torch.device, dtype: torch.dtype):
    """``tools/bench.py``'s architecture ``config``, random weights, audio EOS never the argmax."""
    import bench

    from higgs_tune.models.higgs_audio.builders import build_model

    args = bench.model_args(bench.CONFIGS[config])
    torch.manual_seed(0)
    model = build_model(args, device=device, dtype=dtype).eval()
    stride = args.codebook_vocab_size
    with torch.no_grad():
        for k in range(args.num_codebooks):  # logit 0 < the max of ~1000 random logits
            model.audio_decoder_proj.audio_lm_head.weight[k * stride + args.audio_stream_eos_id].zero_()
    return model


def voice_clone_prompts(model, count: int, prompt_positions: int):
    """``count`` speech-forcing voice-cloning prompts of about ``prompt_positions`` positions."""
    from higgs_tune.data.document import AudioLayout
    from higgs_tune.data.tokenizer import HiggsTokenizer
    from higgs_tune.generation import GenerationTokens, build_prompt

    tokenizer = HiggsTokenizer.from_path(str(REPO / "higgs_tune" / "assets" / "tiny_tokenizer"))
    layout = AudioLayout.from_model_config(model.args.to_hf_config())
    messages = [
        {"role": "system", "content": "Generate audio following instruction."},
        {"role": "user", "content": "the small cat sees a big dog"},
        {"role": "assistant", "content": {"type": "audio", "audio_codes": "reference.npy"}},
        {"role": "user", "content": "a big red dog sees the small blue bird"},
    ]
    rng = np.random.default_rng(0)

    def prompt(frames: int):
        codes = rng.integers(0, layout.codebook_size, size=(layout.num_codebooks, frames))
        return build_prompt(messages, tokenizer, layout, [codes], force_audio=True)

    frames = max(prompt_positions - len(prompt(1)) + 1, 1)  # one position per reference frame
    prompts = [prompt(frames) for _ in range(count)]
    return prompts, GenerationTokens.from_tokenizer(tokenizer, model.args)


def run_side(side: str, model, prompts, tokens, columns: int, repeats: int) -> tuple[float, list]:
    """Median wall time of ``repeats`` generations of ``columns`` steps for all prompts; the outputs."""
    from higgs_tune.decoding import CachedDecoder
    from higgs_tune.generation import cache_positions_needed, generate, generate_batch

    device = next(model.parameters()).device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if side == "reference":
        run = lambda: [generate(model, p, tokens, max_new_columns=columns, use_cache=False) for p in prompts]  # noqa: E731
    else:
        compiled = side == "compiled"
        decoder = CachedDecoder(
            model,
            batch_size=len(prompts),
            max_positions=cache_positions_needed(prompts, columns),
            compile=compiled,
            cuda_graphs=compiled and device.type == "cuda",
        )
        run = lambda: generate_batch(model, prompts, tokens, max_new_columns=columns, decoder=decoder)  # noqa: E731
        if compiled:
            run()  # compiles (and captures) the decode step
    times, outputs = [], None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        outputs = run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), outputs


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cpu3b", help="tools/bench.py architecture (small, cpu3b, 3b)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--prompt-positions", type=int, default=200)
    parser.add_argument("--columns", type=int, default=300, help="steps per answer (one column each)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the cached sides (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    cli = parser.parse_args(argv)
    if cli.threads is not None:
        torch.set_num_threads(cli.threads)
    device = torch.device(cli.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cli.dtype]
    model = bench_model(cli.config, device, dtype)
    results = []
    for batch_size in cli.batch_sizes:
        prompts, tokens = voice_clone_prompts(model, batch_size, cli.prompt_positions)
        reference_s, reference_codes = None, None
        for side in cli.sides:
            repeats = 1 if side == "reference" else cli.repeats
            seconds, outputs = run_side(side, model, prompts, tokens, cli.columns, repeats)
            codes = [out.audio_columns[0] for out in outputs]
            assert all(out.num_steps == cli.columns and len(out.audio_columns) == 1 for out in outputs)
            if side == "reference":
                reference_s, reference_codes = seconds, codes
            per_prompt = cli.columns / seconds
            result = {
                "config": cli.config,
                "device": str(device),
                "dtype": cli.dtype,
                "threads": torch.get_num_threads(),
                "side": side,
                "batch_size": batch_size,
                "prompt_positions": len(prompts[0]),
                "columns": cli.columns,
                "seconds": round(seconds, 3),
                "columns_per_s": round(batch_size * per_prompt, 2),
                "columns_per_s_per_prompt": round(per_prompt, 2),
                "real_time_factor": round(FRAMES_PER_SECOND / per_prompt, 4),
                "speedup_vs_reference": None if reference_s is None else round(reference_s / seconds, 1),
                "same_codes_as_reference": None
                if reference_codes is None
                else all(torch.equal(a, b) for a, b in zip(codes, reference_codes)),
            }
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


if __name__ == "__main__":
    main()
