"""Encoding speed of the audio tokenizer's encoder (``higgs_tune.models.audio_encoder``) at the released sizes.

    python tools/bench_encoder.py [--clips 8] [--seconds 5] [--batch 4] [--device cpu]

Random weights, built in memory: Boson's released codec sizes (DAC encoder 64 -> 2048 channels, ratios
8/5/4/2/3, latent 256, RVQ 8 x 1024 x 64) and a HuBERT-base (transformers' ``HubertConfig()`` defaults:
12 layers, hidden 768), so the compute is that of the real tokenizer. Clips are noise of ``--seconds``
at 24 kHz. Prints one JSON line: clips and seconds of audio per wall-clock second, and seconds of audio
per CPU second of the process (all threads), for batches of ``--batch`` clips and one clip at a time
(measured in the same run, alternately).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def released_encoder(device: str):
    from transformers import HubertConfig, HubertModel

    from higgs_tune.models.audio_codec_files import CodecSizes
    from higgs_tune.models.audio_encoder import AudioCodecEncoder

    torch.manual_seed(0)
    sizes = CodecSizes(
        num_codebooks=8,
        codebook_size=1024,
        codebook_dim=64,
        quantizer_dim=1024,
        latent_dim=256,
        ratios=(8, 5, 4, 2, 3),
        sample_rate=24000,
    )
    model = AudioCodecEncoder(
        sizes, channels=64, semantic_model=HubertModel(HubertConfig()), semantic_sample_rate=16000
    )
    with torch.no_grad():
        for parameter in (model.codebook_embeddings, model.project_in_weight, model.project_out_weight):
            parameter.normal_(std=0.05)
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    model = released_encoder(args.device)
    rng = np.random.default_rng(0)
    clips = [
        (0.1 * rng.standard_normal(int(args.seconds * 24000))).astype(np.float32) for _ in range(args.clips)
    ]
    model.encode(clips[:1])  # warm-up

    def timed(group: list[np.ndarray], batch_size: int) -> tuple[float, float]:
        """(wall-clock, this process's CPU) seconds to encode ``group``."""
        start, start_cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(group), batch_size):
            model.encode(group[i : i + batch_size])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - start_cpu

    # Alternately, group by group: the same clips batched, then one at a time (a shared machine's load
    # then weighs on both sides alike).
    batched = single = batched_cpu = single_cpu = 0.0
    for i in range(0, len(clips), args.batch):
        group = clips[i : i + args.batch]
        wall, cpu = timed(group, args.batch)
        batched, batched_cpu = batched + wall, batched_cpu + cpu
        wall, cpu = timed(group, 1)
        single, single_cpu = single + wall, single_cpu + cpu
    audio = args.clips * args.seconds
    report = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "clips": args.clips,
        "clip_seconds": args.seconds,
        "batch": args.batch,
        "batched_clips_per_s": round(args.clips / batched, 3),
        "batched_audio_s_per_s": round(audio / batched, 3),
        "single_clips_per_s": round(args.clips / single, 3),
        "single_audio_s_per_s": round(audio / single, 3),
        "batched_over_single": round(single / batched, 3),
        # CPU seconds of this process (all its threads): what a machine of your own would spend
        "batched_audio_s_per_cpu_s": round(audio / batched_cpu, 3),
        "single_audio_s_per_cpu_s": round(audio / single_cpu, 3),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
